"""Loading the text tower, and the fingerprint that ties an index to both CLIP projections."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from image_search.encoder import ClipImageEncoder
from image_search.fingerprint import TEXT_PROJECTION, projections_fingerprint, read_checkpoint_tensor
from image_search.text_encoder import ClipTextEncoder, TextTowerUnavailable
from tests.support import TINY, make_clip_checkpoint


def test_a_checkpoint_without_tokenizer_has_no_text_search_but_the_same_fingerprint(tmp_path: Path) -> None:
    with_tokenizer = make_clip_checkpoint(tmp_path / "with", seed=1)
    without = make_clip_checkpoint(tmp_path / "without", seed=1, tokenizer=False)
    with pytest.raises(TextTowerUnavailable, match="no tokenizer"):
        ClipTextEncoder(str(without), device="cpu")
    # Same weights, so an index built with one is served by the other (image search keeps working).
    fingerprint = ClipImageEncoder(str(with_tokenizer)).identity.fingerprint
    assert ClipImageEncoder(str(without)).identity.fingerprint == fingerprint


def test_a_vision_only_checkpoint_has_no_text_tower(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = CLIPVisionConfig(**TINY["vision"], projection_dim=TINY["projection_dim"])
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path)
    with pytest.raises(TextTowerUnavailable, match="no CLIP text tower"):
        ClipTextEncoder(str(tmp_path), device="cpu")
    encoder = ClipImageEncoder(str(tmp_path))
    visual = encoder.model.visual_projection.weight.detach().numpy()
    assert read_checkpoint_tensor(str(tmp_path), TEXT_PROJECTION) is None
    assert encoder.identity.fingerprint == projections_fingerprint(visual, None)


def test_the_fingerprint_changes_with_the_text_projection_alone(tmp_path: Path) -> None:
    original = make_clip_checkpoint(tmp_path / "a", seed=2)
    changed = make_clip_checkpoint(tmp_path / "b", seed=2)
    weights = load_file(changed / "model.safetensors")
    weights[TEXT_PROJECTION] = weights[TEXT_PROJECTION] * 1.01
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})

    first, second = ClipImageEncoder(str(original)), ClipImageEncoder(str(changed))
    visual = first.model.visual_projection.weight.detach().numpy()
    np.testing.assert_array_equal(visual, second.model.visual_projection.weight.detach().numpy())
    assert first.identity.fingerprint != second.identity.fingerprint


def test_the_text_tower_embeds_into_the_image_space(tmp_path: Path) -> None:
    folder = make_clip_checkpoint(tmp_path)
    text = ClipTextEncoder(str(folder), device="cpu")
    assert text.embedding_dim == ClipImageEncoder(str(folder)).embedding_dim == TINY["projection_dim"]
    vectors, truncated = text.encode(["a dog", "a cat"])
    assert vectors.shape == (2, TINY["projection_dim"]) and vectors.dtype == np.float32
    assert truncated == [False, False]


def test_a_tokenizer_whose_end_token_the_text_model_does_not_pool_at_is_refused(tmp_path: Path) -> None:
    folder = make_clip_checkpoint(tmp_path)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["text_config"]["eos_token_id"] = 5  # neither the legacy 2 nor the tokenizer's end id
    config_path.write_text(json.dumps(config))
    with pytest.raises(TextTowerUnavailable, match="eos_token_id is 5"):
        ClipTextEncoder(str(folder), device="cpu")
