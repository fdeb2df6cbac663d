"""CLIP preprocessing as pure functions, shared by indexing and querying.

`prepare_pixels` turns a decoded RGB image into the model's square uint8 input (resize the
shorter side, centre crop). `normalize_batch` turns a stack of those into the float tensor
layout the vision tower takes. Both follow the checkpoint's `preprocessor_config.json`.

The crop is taken by resizing only the source region that ends up inside it (`resize(box=...)`),
which is the same arithmetic as resize-then-crop without the full-size intermediate (a 10000x3
image would otherwise become a 746666x224 one).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from image_search.decoding import DEFAULT_MAX_PIXELS, decode_upright, decoding_errors, resize_to_rgb

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"

# PIL resampling filters by the integer codes transformers stores in the config.
_RESAMPLE_BY_CODE = {
    0: Image.Resampling.NEAREST,
    1: Image.Resampling.LANCZOS,
    2: Image.Resampling.BILINEAR,
    3: Image.Resampling.BICUBIC,
    4: Image.Resampling.BOX,
    5: Image.Resampling.HAMMING,
}


def _triple(values: Any) -> tuple[float, float, float]:
    first, second, third = (float(value) for value in values)
    return first, second, third


@dataclass(frozen=True)
class PreprocessSpec:
    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    resample: int = 3
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> PreprocessSpec:
        size = config.get("size", 224)
        shortest_edge = int(size.get("shortest_edge", 224)) if isinstance(size, dict) else int(size)
        crop = config.get("crop_size", shortest_edge)
        if isinstance(crop, dict):
            crop_height, crop_width = int(crop["height"]), int(crop["width"])
        else:
            crop_height = crop_width = int(crop)
        return cls(
            shortest_edge=int(shortest_edge),
            crop_height=crop_height,
            crop_width=crop_width,
            resample=int(config.get("resample", 3)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            image_mean=_triple(config.get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=_triple(config.get("image_std", OPENAI_CLIP_STD)),
        )

    @classmethod
    def from_checkpoint(cls, folder: str | Path) -> PreprocessSpec:
        path = Path(folder) / PREPROCESSOR_CONFIG
        if not path.is_file():
            return cls()
        return cls.from_dict(json.loads(path.read_text()))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["image_mean"] = list(self.image_mean)
        data["image_std"] = list(self.image_std)
        return data


def resized_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """Output (width, height) after scaling the shorter side to `shortest_edge` (transformers' rule)."""
    if width <= height:
        return shortest_edge, int(shortest_edge * height / width)
    return int(shortest_edge * width / height), shortest_edge


def crop_box(width: int, height: int, spec: PreprocessSpec) -> tuple[float, float, float, float]:
    """The source region (in source pixels) that resize-then-centre-crop would keep."""
    new_width, new_height = resized_size(width, height, spec.shortest_edge)
    left = (new_width - spec.crop_width) // 2
    top = (new_height - spec.crop_height) // 2
    scale_x = width / new_width
    scale_y = height / new_height
    return (
        left * scale_x,
        top * scale_y,
        (left + spec.crop_width) * scale_x,
        (top + spec.crop_height) * scale_y,
    )


def prepare_pixels(image: Image.Image, spec: PreprocessSpec, reducing_gap: float | None = None) -> np.ndarray:
    """Image of any decoded mode -> (crop_height, crop_width, 3) uint8: resize shorter side, centre crop.

    The resize runs on the image as decoded and only its small result becomes RGB (decoding's
    `resize_to_rgb`): no full-size RGB, float or composited copy is ever made.
    `reducing_gap` lets Pillow shrink very large images by whole factors first (faster, with a
    difference far below what the model can tell apart); None keeps the exact reference arithmetic.
    """
    width, height = image.size
    new_width, new_height = resized_size(width, height, spec.shortest_edge)
    resample = _RESAMPLE_BY_CODE.get(spec.resample, Image.Resampling.BICUBIC)
    if new_width >= spec.crop_width and new_height >= spec.crop_height:
        out = resize_to_rgb(
            image,
            (spec.crop_width, spec.crop_height),
            resample,
            box=crop_box(width, height, spec),
            reducing_gap=reducing_gap,
        )
        return np.asarray(out, dtype=np.uint8)
    # The crop is larger than the resized image: pad with zeros, as transformers does.
    resized = np.asarray(resize_to_rgb(image, (new_width, new_height), resample), dtype=np.uint8)
    return _center_crop_padded(resized, spec.crop_height, spec.crop_width)


def _center_crop_padded(array: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    height, width = array.shape[:2]
    out = np.zeros((crop_height, crop_width, 3), dtype=np.uint8)
    top = (height - crop_height) // 2
    left = (width - crop_width) // 2
    src_top, src_left = max(top, 0), max(left, 0)
    dst_top, dst_left = max(-top, 0), max(-left, 0)
    rows = min(height - src_top, crop_height - dst_top)
    cols = min(width - src_left, crop_width - dst_left)
    out[dst_top : dst_top + rows, dst_left : dst_left + cols] = array[
        src_top : src_top + rows, src_left : src_left + cols
    ]
    return out


def normalize_batch(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, rescaled and normalised."""
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) pixels, got shape {pixels.shape}")
    scale = np.float32(spec.rescale_factor)
    mean = np.asarray(spec.image_mean, dtype=np.float32)
    std = np.asarray(spec.image_std, dtype=np.float32)
    batch = (pixels.astype(np.float32) * scale - mean) / std
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def pixels_from_bytes(
    data: bytes, spec: PreprocessSpec, filename: str | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """Encoded image bytes -> the model's uint8 input. The one entry point for builder and queries.

    JPEGs are decoded at the smallest DCT scale that keeps the shorter side >= the resize target
    (the resize shrinks it further anyway), which cuts decode time several-fold for photos.
    """
    image = decode_upright(
        data,
        filename,
        max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
        draft_size=spec.shortest_edge,
    )
    with decoding_errors(filename):
        return prepare_pixels(image, spec)
