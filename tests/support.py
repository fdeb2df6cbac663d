"""Test and benchmark support: CLIP checkpoints made on the spot, and generated images.

No model hub is reachable here, so checkpoints are randomly initialised `CLIPModel`s saved with
`save_pretrained` (text and vision towers, consistent projection sizes, like the real ones) and
loaded back through the application's own loading code.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image, ImageDraw
from transformers import CLIPConfig, CLIPModel

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


def make_clip_checkpoint(folder: Path, sizes: dict = TINY, seed: int = 0) -> Path:
    """Save a randomly initialised CLIP checkpoint (weights + preprocessor config) into `folder`."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=sizes["text"], vision_config=sizes["vision"], projection_dim=sizes["projection_dim"]
    )
    CLIPModel(config).save_pretrained(folder)
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    return Path(folder)


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


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for Serve's HTTP proxy and Ray's node ports)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post_search(
    base_url: str,
    files: list[tuple[str, bytes]],
    params: dict | None = None,
    timeout: float = 60,
    route: str = "/search",
) -> requests.Response:
    """POST photos as the page and curl do: multipart, one `files` field per photo."""
    parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
    return requests.post(f"{base_url}{route}", files=parts, params=params, timeout=timeout)
