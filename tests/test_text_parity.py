"""Our text path (ClipTextEncoder: tokenise, pad, batch, forward, normalise) equals transformers' own
`CLIPModel.get_text_features` on each string alone, on tiny checkpoints with the fixture tokenizer.

Two checkpoints: one whose text config names end-of-text as id 2 (the real openai checkpoints; the
model then pools at the highest id) and one naming the tokenizer's real end-of-text id (pooled at
its first occurrence). The minimum cosine is printed (`pytest -s`) and written to
test-artifacts/text_parity.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPModel, CLIPTokenizer

from image_search.errors import EmptyText
from image_search.text_encoder import ClipTextEncoder
from tests.support import TINY, make_clip_checkpoint

MIN_COSINE = 0.9999
LONG_ENGLISH = " ".join(["a red bicycle by the canal at night with people walking"] * 12)
STRINGS = [
    "dog",  # one word
    "a red bicycle by a canal",
    "A Red BICYCLE by a Canal",  # mixed case
    "a photo of two cats sitting on a table",
    "hello, world!!! (really?) -- yes; #1 @home & 100% [sure] {ok} <tag> 'quote' \"double\"",  # punctuation
    "東京の夜の写真",  # Japanese
    "一只在公园里奔跑的狗",  # Chinese
    "Фотография красного велосипеда",  # Cyrillic
    "صورة لقطة على الطاولة",  # Arabic, right to left
    "कुत्ता पार्क में दौड़ रहा है",  # Devanagari
    "Ελληνικά γράμματα",  # Greek
    "🚲🌃",  # emoji only
    "a bicycle 🚲 at night 🌃 with 👨‍👩‍👧 family",  # emoji with a ZWJ sequence
    "café naïve résumé",  # accents (NFC)
    "cafe\u0301 composed",  # combining accent (NFC-normalised by the tokenizer)
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\ninside",
    "1234567890 3.14159 2026-11-26",
    "x",  # a single letter
    "sunset over the sea " * 3,
    LONG_ENGLISH,  # far more than 77 tokens
    "絵" * 200,  # long in a non-Latin script (bytes fall back to byte tokens)
    "🙂" * 60,  # long in emoji
]


# The text config names the tokenizer's own end-of-text id (make_clip_checkpoint's default when
# `sizes` names none): the model then pools at its first occurrence.
REAL_EOS_SIZES = {
    **TINY,
    "text": {key: value for key, value in TINY["text"].items() if key not in ("bos_token_id", "eos_token_id")},
}


@pytest.fixture(scope="module", params=["legacy_eos_id", "real_eos_id"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    sizes = TINY if request.param == "legacy_eos_id" else REAL_EOS_SIZES
    folder = make_clip_checkpoint(tmp_path_factory.mktemp(f"clip-{request.param}"), sizes=sizes, seed=3)
    eos_id = json.loads((folder / "config.json").read_text())["text_config"]["eos_token_id"]
    assert (eos_id == 2) == (request.param == "legacy_eos_id")
    return folder


def reference_embedding(model: CLIPModel, tokenizer: CLIPTokenizer, text: str) -> np.ndarray:
    """transformers' own path, one string at a time (no padding), L2-normalised."""
    inputs = tokenizer(
        text, truncation=True, max_length=model.config.text_config.max_position_embeddings, return_tensors="pt"
    )
    with torch.inference_mode():
        features = model.get_text_features(**inputs).pooler_output[0]
    return (features / features.norm()).numpy()


def test_text_embeddings_match_transformers_get_text_features(
    checkpoint: Path, artifact_dir: Path, request: pytest.FixtureRequest
) -> None:
    assert len(STRINGS) >= 20
    model = CLIPModel.from_pretrained(checkpoint).eval()
    tokenizer = CLIPTokenizer.from_pretrained(checkpoint)
    expected = np.stack([reference_embedding(model, tokenizer, text) for text in STRINGS])

    # Ours: all strings in one padded batch, through the application's loading code.
    encoder = ClipTextEncoder(str(checkpoint), device="cpu", precision="fp32")
    vectors, truncated = encoder.encode(STRINGS)

    cosines = np.sum(vectors * expected, axis=1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(expected, axis=1)
    worst = int(np.argmin(cosines))
    report = {
        "checkpoint": request.node.callspec.id,
        "strings": len(STRINGS),
        "min_cosine": float(cosines.min()),
        "worst_string": STRINGS[worst][:60],
    }
    print(json.dumps(report, ensure_ascii=False))
    (artifact_dir / f"text_parity-{report['checkpoint']}.json").write_text(json.dumps(report, ensure_ascii=False))
    assert cosines.min() >= MIN_COSINE, report
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Different token sequences must not collapse to one vector (a constant output would pass the
    # cosine check); the tokenizer lowercases, so mixed case equals its lowercase on purpose.
    token_ids = [
        tuple(tokenizer(text, truncation=True, max_length=encoder.max_tokens)["input_ids"]) for text in STRINGS
    ]
    assert len({tuple(np.round(row, 4)) for row in vectors}) == len(set(token_ids))
    assert token_ids[STRINGS.index("A Red BICYCLE by a Canal")] == token_ids[STRINGS.index("a red bicycle by a canal")]

    full_lengths = [len(tokenizer(text)["input_ids"]) for text in STRINGS]
    assert truncated == [length > encoder.max_tokens for length in full_lengths]
    assert truncated[STRINGS.index(LONG_ENGLISH)] and not truncated[STRINGS.index("dog")]


def test_the_token_limit_follows_the_checkpoint(tmp_path: Path) -> None:
    folder = make_clip_checkpoint(tmp_path, sizes=_tiny_with_positions(16))
    encoder = ClipTextEncoder(str(folder), device="cpu")
    assert encoder.max_tokens == 16
    tokens = encoder.tokenize(LONG_ENGLISH)
    assert tokens.truncated and len(tokens.ids) == 16
    assert tokens.ids[-1] == encoder.tokenizer.eos_token_id  # the end token survives the cut


@pytest.mark.parametrize("text", ["", " ", "\t\n", "\u3000\u00a0 "])
def test_text_that_is_empty_after_stripping_is_a_client_error_not_an_embedding(tmp_path: Path, text: str) -> None:
    encoder = ClipTextEncoder(str(make_clip_checkpoint(tmp_path)), device="cpu")
    with pytest.raises(EmptyText) as caught:
        encoder.encode([text])
    assert caught.value.status == 400


def _tiny_with_positions(positions: int) -> dict:
    return {**TINY, "text": {**TINY["text"], "max_position_embeddings": positions}}


# bf16 keeps 8 bits of mantissa: on the tiny checkpoints the text vectors stay this close to fp32
# (the image tower's bf16 parity is checked by benchmarks.precision_parity on real sizes).
MIN_COSINE_BF16 = 0.99


def test_the_text_tower_runs_the_precision_auto_resolves_to_like_the_image_tower(checkpoint: Path) -> None:
    """`auto` is resolved for the text tower as for the image tower (the precision /info reports),
    and the text vectors in that precision stay close to fp32's."""
    from image_search.encoder import ClipImageEncoder
    from image_search.precision import host_cpu_flags, resolve_precision

    encoder = ClipTextEncoder(str(checkpoint), device="cpu", precision="auto")
    assert encoder.precision == resolve_precision("auto", "cpu", host_cpu_flags())
    assert encoder.precision == ClipImageEncoder(str(checkpoint), device="cpu", precision="auto").precision
    served, _ = encoder.encode(STRINGS)
    exact, _ = ClipTextEncoder(str(checkpoint), device="cpu", precision="fp32").encode(STRINGS)
    assert np.sum(served * exact, axis=1).min() >= MIN_COSINE_BF16
    if encoder.precision == "bf16":  # this CPU has native bf16: the forward pass really ran in it
        assert not np.array_equal(served, exact)
