"""Our PIL + numpy preprocessing against transformers' PIL-backend CLIP processor."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from image_search.encoder import ClipImageEncoder
from image_search.preprocessing import PreprocessSpec, crop_box, pixels_from_bytes, prepare_pixels, resized_size
from tests.support import synthetic_image

# (size, mode, format): varied sizes, aspects (incl. extreme), modes and encodings.
CASES = [
    ((224, 224), "RGB", "PNG"),
    ((640, 480), "RGB", "JPEG"),
    ((480, 640), "RGB", "JPEG"),
    ((1024, 768), "RGB", "JPEG"),
    ((2000, 1500), "RGB", "JPEG"),
    ((300, 200), "L", "PNG"),
    ((333, 777), "RGB", "PNG"),
    ((1200, 300), "RGB", "JPEG"),
    ((300, 1200), "RGB", "PNG"),
    ((225, 224), "RGB", "PNG"),
    ((100, 80), "RGB", "PNG"),
    ((64, 300), "RGB", "JPEG"),
    ((500, 500), "RGBA", "PNG"),
    ((640, 427), "P", "PNG"),
    ((799, 533), "RGB", "WEBP"),
    ((256, 256), "L", "JPEG"),
    ((1920, 1080), "RGB", "JPEG"),
    ((331, 249), "RGB", "BMP"),
    ((900, 450), "CMYK", "JPEG"),
    ((3000, 40), "RGB", "PNG"),
    ((450, 1350), "RGB", "JPEG"),
    ((513, 287), "RGB", "TIFF"),
]


def encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


@pytest.fixture(scope="module")
def encoder(tiny_model_dir: Path) -> ClipImageEncoder:
    return ClipImageEncoder(str(tiny_model_dir))


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil.from_pretrained(tiny_model_dir)


def reference_embedding(encoder: ClipImageEncoder, processor: CLIPImageProcessorPil, data: bytes) -> np.ndarray:
    """transformers' own path: full decode, convert to RGB, its processor, the same tower."""
    image = Image.open(io.BytesIO(data)).convert("RGBA")
    rgb = Image.new("RGB", image.size, (255, 255, 255))
    rgb.paste(image, mask=image.getchannel("A"))
    pixel_values = processor(images=[rgb], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        vector = encoder.model(pixel_values=pixel_values).image_embeds[0].numpy()
    return vector / np.linalg.norm(vector)


def test_embeddings_match_transformers_processor(encoder: ClipImageEncoder, reference: CLIPImageProcessorPil) -> None:
    assert len(CASES) >= 20
    datas = [encode(synthetic_image(i, size, mode), fmt) for i, (size, mode, fmt) in enumerate(CASES)]
    ours = encoder.encode_pixels(np.stack([pixels_from_bytes(data, encoder.spec) for data in datas]))
    for (size, mode, fmt), data, vector in zip(CASES, datas, ours, strict=True):
        cosine = float(vector @ reference_embedding(encoder, reference, data))
        assert cosine >= 0.9999, (size, mode, fmt, cosine)


def test_prepare_pixels_shape_and_dtype() -> None:
    spec = PreprocessSpec()
    out = prepare_pixels(synthetic_image(1, (640, 480)), spec)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8


@pytest.mark.parametrize(
    ("size", "expected"), [((640, 480), (298, 224)), ((480, 640), (224, 298)), ((224, 224), (224, 224))]
)
def test_resized_size_follows_transformers_rule(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert resized_size(*size, 224) == expected


def test_crop_box_is_centred() -> None:
    left, top, right, bottom = crop_box(640, 480, PreprocessSpec())
    assert top == 0 and bottom == pytest.approx(480)
    assert left == pytest.approx(640 - right, abs=3)


def test_extreme_aspect_does_not_allocate_giant_intermediate() -> None:
    # 10000x3 would resize to 746666x224 (500 MB) before cropping; the box resize never makes it.
    image = Image.new("RGB", (10000, 3), (10, 200, 30))
    out = prepare_pixels(image, PreprocessSpec())
    assert out.shape == (224, 224, 3)
    assert abs(int(out[112, 112, 1]) - 200) <= 2


def test_spec_reads_old_and_new_config_shapes() -> None:
    old = PreprocessSpec.from_dict({"size": 256, "crop_size": 240})
    new = PreprocessSpec.from_dict({"size": {"shortest_edge": 256}, "crop_size": {"height": 240, "width": 240}})
    assert old == new
    assert (old.shortest_edge, old.crop_height, old.crop_width) == (256, 240, 240)
