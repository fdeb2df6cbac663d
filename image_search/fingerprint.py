"""The model fingerprint: a hash of both CLIP projections, read straight from the checkpoint.

An index is only meaningful to the CLIP that made its vectors, and text queries only to the text
tower trained with that image tower, so the fingerprint covers the visual AND the text projection.
The text projection is read as one tensor from the checkpoint's weight files, so the builder (which
loads only the image tower) and the server compute the same value without loading the text tower.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

TEXT_PROJECTION = "text_projection.weight"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_WEIGHTS = "pytorch_model.bin"


def projections_fingerprint(visual: np.ndarray, text: np.ndarray | None) -> str:
    """16 hex digits over the projection weights (float32). A checkpoint without a text tower
    hashes its visual projection alone, which is also what indexes built before text search hold."""
    digest = hashlib.sha256(np.ascontiguousarray(visual, dtype=np.float32).tobytes())
    if text is not None:
        digest.update(np.ascontiguousarray(text, dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


def _checkpoint_file(model: str, filename: str) -> Path | None:
    """A file of a checkpoint folder or of a hub checkpoint (from the local cache or downloaded once)."""
    folder = Path(model)
    if folder.is_dir():
        path = folder / filename
        return path if path.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(model, filename, _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    return Path(found) if found else None


def read_checkpoint_tensor(model: str, name: str) -> np.ndarray | None:
    """One weight tensor of a checkpoint as float32, or None when the checkpoint does not hold it."""
    index = _checkpoint_file(model, SAFETENSORS_INDEX)
    if index is not None:
        shard = json.loads(index.read_text()).get("weight_map", {}).get(name)
        path = _checkpoint_file(model, shard) if shard else None
        return _read_safetensors(path, name) if path is not None else None
    single = _checkpoint_file(model, SAFETENSORS)
    if single is not None:
        return _read_safetensors(single, name)
    legacy = _checkpoint_file(model, PYTORCH_WEIGHTS)
    if legacy is not None:
        state = torch.load(legacy, map_location="cpu", weights_only=True, mmap=True)
        tensor = state.get(name)
        return tensor.to(torch.float32).numpy() if tensor is not None else None
    return None


def _read_safetensors(path: Path, name: str) -> np.ndarray | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as weights:
        if name not in weights.keys():  # noqa: SIM118  (safe_open has keys(), not __contains__)
            return None
        return weights.get_tensor(name).to(torch.float32).numpy()
