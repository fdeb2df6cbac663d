"""Whether an index can be queried by a model: the one check, used wherever an index meets a model.

An index is only meaningful to the CLIP that made its vectors with the same preprocessing: the
same embedding dimension, the same projection weights (the fingerprint), the same resize/crop and
normalisation. Every refusal names both sides and the fix.
"""

from __future__ import annotations

from typing import Any

from image_search.errors import ArtifactError
from image_search.manifest import Manifest
from image_search.preprocessing import PreprocessSpec


def check_compatible(
    manifest: Manifest,
    *,
    model_name: str,
    embedding_dim: int,
    fingerprint: str | None = None,
    preprocessing: dict[str, Any] | None = None,
) -> None:
    """Raise ArtifactError unless the index fits the model; `None` parts are not known yet and not checked."""
    if manifest.embedding_dim != embedding_dim:
        raise ArtifactError(
            f"the index holds {manifest.embedding_dim}-d vectors from model {manifest.model!r}, but model "
            f"{model_name!r} makes {embedding_dim}-d vectors; serve with the model the index was built with "
            "or rebuild the index"
        )
    if fingerprint is not None and manifest.model_fingerprint != fingerprint:
        raise ArtifactError(
            f"the index was built with model {manifest.model!r} (fingerprint {manifest.model_fingerprint}), "
            f"not with {model_name!r} (fingerprint {fingerprint}); serve with the same model or rebuild"
        )
    if preprocessing is not None and (
        PreprocessSpec.from_dict(preprocessing).to_dict() != PreprocessSpec.from_dict(manifest.preprocessing).to_dict()
    ):
        raise ArtifactError(
            f"the index was built with other preprocessing settings ({manifest.preprocessing}) than model "
            f"{model_name!r} uses ({preprocessing}); rebuild the index with this model"
        )
