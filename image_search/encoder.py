"""The CLIP image tower: uint8 crops in, L2-normalised float32 vectors out.

Loaded with transformers from a hub id or a local folder (a full CLIP checkpoint; only the vision
tower and its projection are kept). Used by the Embedder deployment and the index builder.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoConfig, CLIPConfig, CLIPVisionModelWithProjection

from image_search.fingerprint import TEXT_PROJECTION, projections_fingerprint, read_checkpoint_tensor
from image_search.precision import Precision
from image_search.preprocessing import PREPROCESSOR_CONFIG, PreprocessSpec, normalize_batch

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelLoadError(Exception):
    """The checkpoint could not be loaded; the message names what to fix."""


@dataclass(frozen=True)
class ModelIdentity:
    """What an index must agree on with the model that queries it."""

    name: str
    embedding_dim: int
    fingerprint: str


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def load_preprocess_spec(model: str) -> PreprocessSpec:
    from pathlib import Path

    if Path(model).is_dir():
        return PreprocessSpec.from_checkpoint(model)
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(model, PREPROCESSOR_CONFIG)
    except Exception:  # a checkpoint without a preprocessor config uses CLIP's defaults
        logger.warning("no %s for %s; using CLIP defaults", PREPROCESSOR_CONFIG, model)
        return PreprocessSpec()
    return PreprocessSpec.from_checkpoint(Path(path).parent)


def _load_vision_tower(model: str) -> CLIPVisionModelWithProjection:
    config = AutoConfig.from_pretrained(model)
    vision_config: Any = config
    if isinstance(config, CLIPConfig):
        # A full CLIP checkpoint keeps the projection size at the top level, not in vision_config.
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim
    verbosity = transformers.logging.get_verbosity()
    # The text tower's weights are left out on purpose; its load report would only be noise.
    transformers.logging.set_verbosity_error()
    try:
        return CLIPVisionModelWithProjection.from_pretrained(model, config=vision_config)
    finally:
        transformers.logging.set_verbosity(verbosity)


class ClipImageEncoder:
    def __init__(self, model: str, device: str = "auto", precision: Precision = "fp32") -> None:
        self.device = pick_device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
        self.precision = precision
        try:
            self.model = _load_vision_tower(model)
            self.spec = load_preprocess_spec(model)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"could not load CLIP checkpoint {model!r}: {exc}. "
                "Pass a hub id such as openai/clip-vit-base-patch32 (needs internet once) "
                "or a local folder holding config.json and the weights."
            ) from exc
        self.model.eval().to(self.device)
        if precision == "fp16":
            self.model.half()
        self.identity = ModelIdentity(
            name=model,
            embedding_dim=int(self.model.config.projection_dim),
            fingerprint=self._fingerprint(model),
        )

    @property
    def embedding_dim(self) -> int:
        return self.identity.embedding_dim

    def _fingerprint(self, model: str) -> str:
        """A hash of both projections (image and text): the same checkpoint under any name or path matches."""
        visual = self.model.visual_projection.weight.detach().to("cpu", torch.float32).numpy()
        return projections_fingerprint(visual, read_checkpoint_tensor(model, TEXT_PROJECTION))

    @torch.inference_mode()
    def encode_pixels(self, pixels: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """(N, H, W, 3) uint8 crops -> (N, dim) float32 unit vectors."""
        batch = np.stack(pixels) if not isinstance(pixels, np.ndarray) else pixels
        tensor = torch.from_numpy(normalize_batch(batch, self.spec)).to(self.device)
        if self.precision == "fp16":
            tensor = tensor.half()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        with autocast:
            embeddings = self.model(pixel_values=tensor).image_embeds
        embeddings = embeddings.float()
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return embeddings.cpu().numpy().astype(np.float32, copy=False)
