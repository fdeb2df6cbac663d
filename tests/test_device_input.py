"""Device-side input preparation, on CPU tensors: the same numbers as the numpy reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from image_search.device_input import DeviceNormalizer, HostStaging, check_crops
from image_search.encoder import ClipImageEncoder
from image_search.precision import host_cpu_flags, resolve_precision
from image_search.preprocessing import PreprocessSpec, normalize_batch


def crops(count: int, seed: int = 0, size: int = 224) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "spec", [PreprocessSpec(), PreprocessSpec(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))]
)
def test_device_normalisation_equals_normalize_batch(spec: PreprocessSpec) -> None:
    pixels = crops(5)
    pixels[0] = 0
    pixels[1] = 255  # both ends of the range
    ours = DeviceNormalizer(spec, torch.device("cpu"), torch.float32)(torch.from_numpy(pixels))
    reference = normalize_batch(pixels, spec)
    assert ours.shape == reference.shape and ours.dtype == torch.float32 and ours.is_contiguous()
    np.testing.assert_allclose(ours.numpy(), reference, rtol=0, atol=1e-6)


def test_device_normalisation_casts_last() -> None:
    pixels = crops(3)
    ours = DeviceNormalizer(PreprocessSpec(), torch.device("cpu"), torch.float16)(torch.from_numpy(pixels))
    assert ours.dtype == torch.float16
    reference = normalize_batch(pixels, PreprocessSpec())
    # float16 keeps ~3 decimal digits of values up to ~2.2: one rounding of the float32 result.
    np.testing.assert_allclose(ours.float().numpy(), reference, rtol=1e-3, atol=1e-3)


def test_staging_reuses_its_buffer_and_grows_only_when_needed() -> None:
    staging = HostStaging(pin=False)
    first = staging.stage(crops(4, seed=1))
    assert staging.allocations == 1 and torch.equal(first, torch.from_numpy(crops(4, seed=1)))
    smaller = staging.stage([crop for crop in crops(2, seed=2)])  # a list is stacked straight in
    assert staging.allocations == 1 and smaller.data_ptr() == first.data_ptr()
    assert torch.equal(smaller, torch.from_numpy(crops(2, seed=2)))
    staging.stage(crops(8, seed=3))
    assert staging.allocations == 2
    staging.stage(crops(2, seed=4, size=32))  # another crop size: another buffer
    assert staging.allocations == 3


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (np.zeros((2, 224, 224), dtype=np.uint8), "expected \\(N, H, W, 3\\)"),
        (np.zeros((2, 224, 224, 3), dtype=np.float32), "expected uint8"),
        ([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)], "different shapes"),
        ([], "at least one"),
    ],
)
def test_malformed_batches_are_refused(pixels: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_crops(pixels)  # type: ignore[arg-type]


def test_encoder_on_cpu_matches_the_plain_forward_of_normalize_batch(tiny_model_dir: Path) -> None:
    encoder = ClipImageEncoder(str(tiny_model_dir), device="cpu", precision="fp32")
    assert encoder.staging is None  # no pinned memory without a GPU
    pixels = crops(6, seed=7)
    with torch.inference_mode():
        raw = encoder.model(pixel_values=torch.from_numpy(normalize_batch(pixels, encoder.spec))).image_embeds
    expected = (raw / raw.norm(dim=-1, keepdim=True)).numpy()
    ours = encoder.encode_pixels(pixels)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    np.testing.assert_array_equal(encoder.encode_pixels(list(pixels)), ours)


def test_encoder_reports_the_precision_that_runs(tiny_model_dir: Path) -> None:
    encoder = ClipImageEncoder(str(tiny_model_dir), device="cpu", precision="auto")
    assert encoder.precision == resolve_precision("auto", "cpu", host_cpu_flags())
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        ClipImageEncoder(str(tiny_model_dir), device="cpu", precision="fp16")


def test_encoder_takes_read_only_batches_without_a_warning(tiny_model_dir: Path) -> None:
    import warnings

    encoder = ClipImageEncoder(str(tiny_model_dir), device="cpu", precision="fp32")
    pixels = crops(2, seed=9)
    expected = encoder.encode_pixels(pixels)
    pixels.flags.writeable = False  # as Ray Data hands zero-copy batches to the encoder actors
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(encoder.encode_pixels(pixels), expected)
