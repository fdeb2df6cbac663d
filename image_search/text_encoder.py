"""The CLIP text tower: a query string in, an L2-normalised float32 vector in the image space out.

Loaded like the image tower (image_search.encoder), from the same checkpoint (hub id or folder):
the tokenizer saved with it and `CLIPTextModelWithProjection` (the vision weights are left out).
A checkpoint without a text tower or without a tokenizer raises `TextTowerUnavailable`, which the
service turns into "text search is off" while image search goes on.

Tokenising and the forward pass are separate steps so the Embedder can batch token rows from
many requests into one forward pass: `token_row` gives a fixed-length row (padding marked with
PAD_ID), `encode_rows` embeds a stack of them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, CLIPConfig, CLIPTextModelWithProjection

from image_search.encoder import ModelLoadError, pick_device
from image_search.errors import EmptyText
from image_search.precision import Precision, host_cpu_flags, resolve_precision

logger = logging.getLogger(__name__)

PAD_ID = -1
"""Marks padding in a token row; never a real token id (those are >= 0)."""

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


class TextTowerUnavailable(Exception):
    """The checkpoint cannot embed text; the message says why (shown in logs, not to clients)."""


@dataclass(frozen=True)
class Tokens:
    ids: list[int]
    truncated: bool


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Loading one tower of a full CLIP checkpoint reports every unused weight of the other; only noise."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def _text_config(model: str) -> Any:
    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read the config of CLIP checkpoint {model!r}: {exc}") from exc
    if isinstance(config, CLIPConfig):
        # A full CLIP checkpoint keeps the projection size at the top level, not in text_config.
        text_config: Any = config.text_config
        text_config.projection_dim = config.projection_dim
        return text_config
    if getattr(config, "model_type", None) == "clip_text_model":
        return config
    raise TextTowerUnavailable(f"checkpoint {model!r} is a {type(config).__name__}, with no CLIP text tower")


def _has_tokenizer_files(model: str) -> bool:
    """A local folder must hold a tokenizer; a hub id is asked (below) whether it has one."""
    folder = Path(model)
    return not folder.is_dir() or any((folder / name).is_file() for name in TOKENIZER_FILES)


def _load_tokenizer(model: str) -> Any:
    if not _has_tokenizer_files(model):
        raise TextTowerUnavailable(f"checkpoint {model!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError, TypeError) as exc:
        raise TextTowerUnavailable(f"checkpoint {model!r} has no usable tokenizer: {exc}") from exc


# CLIP text configs written before transformers PR #24773 say eos_token_id 2 whatever the
# tokenizer uses; the model then takes a text's end to be its highest token id.
LEGACY_EOS_TOKEN_ID = 2


def _check_end_token(model: str, config: Any, tokenizer: Any) -> None:
    """The text model pools at the end-of-text token; a tokenizer that ends texts with another id
    would give every query a wrong embedding without any error, so refuse it here."""
    config_eos = config.eos_token_id
    if config_eos == LEGACY_EOS_TOKEN_ID:
        if tokenizer.eos_token_id != len(tokenizer) - 1:
            raise TextTowerUnavailable(
                f"checkpoint {model!r}: the text config uses the legacy end-of-text id 2 (pool at the highest "
                f"id), but the tokenizer's end-of-text id {tokenizer.eos_token_id} is not its highest; "
                "set text_config.eos_token_id to the tokenizer's eos_token_id"
            )
    elif tokenizer.eos_token_id != config_eos:
        raise TextTowerUnavailable(
            f"checkpoint {model!r}: the tokenizer ends texts with id {tokenizer.eos_token_id} but the text "
            f"config's eos_token_id is {config_eos}; save the checkpoint's own tokenizer with it"
        )


class ClipTextEncoder:
    def __init__(self, model: str, device: str = "auto", precision: Precision = "fp32") -> None:
        self.device = pick_device(device)
        # The same rule as the image tower (`auto` resolved on this hardware), so the precision /info
        # reports is the one both towers run.
        self.precision = resolve_precision(precision, self.device.type, host_cpu_flags())
        config = _text_config(model)
        self.tokenizer = _load_tokenizer(model)
        try:
            with quiet_transformers():
                self.model = CLIPTextModelWithProjection.from_pretrained(model, config=config)
        except (OSError, ValueError) as exc:
            raise TextTowerUnavailable(f"checkpoint {model!r} has no loadable text tower: {exc}") from exc
        _check_end_token(model, config, self.tokenizer)
        self.model.eval().to(self.device)
        if precision == "fp16":
            self.model.half()
        # Follow the checkpoint: 77 positions for CLIP, whatever the tokenizer's own limit says.
        self.max_tokens = int(config.max_position_embeddings)
        self.pad_token_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        self.embedding_dim = int(config.projection_dim)

    def tokenize(self, text: str) -> Tokens:
        """Token ids with the checkpoint's start/end tokens; a text over max_tokens is cut (and says so).

        Text that is empty after stripping is a client error, not an embedding of nothing.
        """
        if not text.strip():
            raise EmptyText("A text query is empty.")
        full: list[int] = self.tokenizer(text, truncation=False, verbose=False)["input_ids"]
        if len(full) <= self.max_tokens:
            return Tokens(full, truncated=False)
        # The tokenizer's own truncation keeps the end token (and whatever else its template adds).
        cut: list[int] = self.tokenizer(text, truncation=True, max_length=self.max_tokens)["input_ids"]
        return Tokens(cut, truncated=True)

    def token_row(self, tokens: Tokens) -> np.ndarray:
        """A fixed-length int64 row (max_tokens), padded with PAD_ID, so rows of any text stack."""
        row = np.full(self.max_tokens, PAD_ID, dtype=np.int64)
        row[: len(tokens.ids)] = tokens.ids
        return row

    @torch.inference_mode()
    def encode_rows(self, rows: np.ndarray) -> np.ndarray:
        """(N, max_tokens) token rows from `token_row` -> (N, dim) float32 unit vectors.

        The batch is cut to its longest text, so short queries do not pay for 77 positions.
        """
        mask = rows != PAD_ID
        width = max(int(mask.sum(axis=1).max()), 1)
        ids = np.where(mask, rows, self.pad_token_id)[:, :width]
        input_ids = torch.from_numpy(np.ascontiguousarray(ids)).to(self.device)
        attention_mask = torch.from_numpy(np.ascontiguousarray(mask[:, :width]).astype(np.int64)).to(self.device)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        with autocast:
            embeddings = self.model(input_ids=input_ids, attention_mask=attention_mask).text_embeds
        embeddings = embeddings.float()
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return embeddings.cpu().numpy().astype(np.float32, copy=False)

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """Texts -> (N, dim) unit vectors and, per text, whether it was truncated."""
        tokens = [self.tokenize(text) for text in texts]
        rows = np.stack([self.token_row(item) for item in tokens])
        return self.encode_rows(rows), [item.truncated for item in tokens]
