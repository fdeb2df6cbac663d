"""Demo data made on the spot: randomly initialised CLIP checkpoints and generated pictures.

For machines without a model hub or a dataset (`scripts/make_demo_data.py`, what `scripts/run.sh`
falls back to offline), and for the tests and benchmarks, which build their models and images the
same way. A checkpoint is a `CLIPModel` with random weights saved by `save_pretrained` (text and
vision towers, consistent projection sizes, like the real ones) plus the real ViT-B/32
preprocessor config and a small byte-level BPE tokenizer, so it loads through the application's
own loading code. Search scores of a random model mean nothing.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

# The real openai/clip-vit-base-patch32 preprocessor_config.json.
PREPROCESSOR_CONFIG = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
}

TINY = {
    "text": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=1000,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    ),
    "vision": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=224, patch_size=32
    ),
    "projection_dim": 32,
}
VIT_B_32 = {
    "text": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
    "vision": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
    ),
    "projection_dim": 512,
}


def make_clip_checkpoint(folder: Path, sizes: dict = TINY, seed: int = 0, tokenizer: bool = True) -> Path:
    """Save a randomly initialised CLIP checkpoint (weights + preprocessor config + tokenizer) into `folder`.

    `tokenizer=False` leaves the tokenizer out: the same weights (same seed), but no text search.
    Unless `sizes` names them, the text config's start/end ids are the tokenizer's (the model finds
    a text's end by that id).
    """
    text_sizes = dict(sizes["text"])
    clip_tokenizer = make_clip_tokenizer(
        text_sizes.get("vocab_size", 49408), max_length=text_sizes.get("max_position_embeddings", 77)
    )
    text_sizes.setdefault("bos_token_id", clip_tokenizer.bos_token_id)
    text_sizes.setdefault("eos_token_id", clip_tokenizer.eos_token_id)
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=text_sizes, vision_config=sizes["vision"], projection_dim=sizes["projection_dim"])
    CLIPModel(config).save_pretrained(folder)
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    if tokenizer:
        clip_tokenizer.save_pretrained(folder)
    return Path(folder)


# Words the fixture tokenizer learns its merges from: enough to give real multi-byte tokens for
# English queries, while anything else (other scripts, emoji) falls back to byte tokens.
TOKENIZER_CORPUS = (
    "a photo of the red blue green yellow black white dog cat bicycle car canal street night day people "
    "person house tree river mountain beach sea sky city sunset snow rain boat train bird flower garden "
    "picture image with and on in at by near under over two three small large old new running sitting "
    "standing walking eating playing table chair kitchen window door road bridge field forest lake park "
    "children woman man girl boy group crowd market shop food pizza cake coffee cup plate bowl water light"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters (byte-level BPE's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes), strict=True))


def learn_merges(words: list[str], count: int) -> list[tuple[str, str]]:
    """A tiny deterministic BPE trainer: merge the most frequent adjacent pair, `count` times at most."""
    alphabet = bytes_to_unicode()
    pieces = []
    for word in words:
        symbols = [alphabet[byte] for byte in word.encode("utf-8")]
        symbols[-1] += "</w>"
        pieces.append(symbols)
    merges: list[tuple[str, str]] = []
    while len(merges) < count:
        pairs: dict[tuple[str, str], int] = {}
        for symbols in pieces:
            for pair in itertools.pairwise(symbols):
                pairs[pair] = pairs.get(pair, 0) + 1
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for index, symbols in enumerate(pieces):
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            pieces[index] = merged
    return merges


def make_clip_tokenizer(vocab_size: int, max_length: int = 77) -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer laid out like the real one: 256 bytes, 256 word-final bytes,
    the merges, then <|startoftext|> and <|endoftext|> as the two highest ids (checkpoints whose text
    config says eos_token_id 2, like openai's, find the end of a text as the highest id)."""
    alphabet = list(bytes_to_unicode().values())
    merges = learn_merges(sorted(set(TOKENIZER_CORPUS.split())), vocab_size - 2 * len(alphabet) - 2)
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    assert len(vocab) == len(tokens) <= vocab_size, "merges must yield new, distinct tokens"
    # transformers 4.x takes the merges as pairs, although its annotation says strings.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)  # type: ignore[arg-type]


def synthetic_image(seed: int, size: tuple[int, int] = (320, 240), mode: str = "RGB") -> Image.Image:
    """A distinct picture per seed: a colour gradient with a few random shapes on it."""
    rng = np.random.default_rng(seed)
    width, height = size
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    a, b, c = rng.uniform(0, 255, (3, 3)).astype(np.float32)
    base = np.clip(a + (b - a) * x + (c - a) * y * 0.7, 0, 255).astype(np.uint8)
    image = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle([x0, y0, x1 + 1, y1 + 1], fill=colour)
        else:
            draw.ellipse([x0, y0, x1 + 1, y1 + 1], fill=colour)
    return image.convert(mode) if mode != "RGB" else image


def write_image_folder(folder: Path, count: int, start_seed: int = 0) -> list[Path]:
    """Write `count` distinct images (JPEG and PNG, some in sub-folders) and return their paths."""
    paths = []
    for i in range(count):
        seed = start_seed + i
        sub = folder / ("nested" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        size = (320 + 17 * (i % 5), 240 + 13 * (i % 7))
        image = synthetic_image(seed, size)
        path = sub / (f"img_{seed:04d}.jpg" if i % 2 == 0 else f"img_{seed:04d}.png")
        image.save(path, quality=92) if path.suffix == ".jpg" else image.save(path)
        paths.append(path)
    return paths
