"""uint8 crops -> the vision tower's input tensor, with the arithmetic on the model's device.

On a GPU the float32 batch is 4x the bytes of the uint8 crops, and normalising it with numpy on
one CPU core ran 4-37x slower than the forward pass it fed (issue 10). So the crops travel as
uint8, through a page-locked host buffer that is reused across calls (pageable memory would be
copied once more by the driver, and a `non_blocking` copy from it is synchronous), and rescaling,
mean/std and the dtype cast run where the model runs. On a CPU the same torch code runs on the
host tensor, without the buffer: there is no transfer to stage.

Pure torch and numpy: everything here runs, and is tested, on CPU tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from image_search.preprocessing import PreprocessSpec


def check_crops(pixels: np.ndarray | Sequence[np.ndarray]) -> tuple[int, tuple[int, ...]]:
    """(count, shape of one crop) of a uint8 (N, H, W, 3) batch or a list of (H, W, 3) crops."""
    if isinstance(pixels, np.ndarray):
        count, item_shape, dtypes = len(pixels), tuple(pixels.shape[1:]), {pixels.dtype}
    else:
        if not pixels:
            raise ValueError("expected at least one crop")
        count, item_shape = len(pixels), tuple(pixels[0].shape)
        dtypes = {item.dtype for item in pixels}
        if any(tuple(item.shape) != item_shape for item in pixels):
            raise ValueError("crops of different shapes cannot form one batch")
    if len(item_shape) != 3 or item_shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) pixels, got crops of shape {item_shape}")
    if dtypes != {np.dtype(np.uint8)}:
        raise ValueError(f"expected uint8 crops, got {sorted(str(dtype) for dtype in dtypes)}")
    return count, item_shape


class HostStaging:
    """One reusable host buffer for uint8 batches; page-locked when it feeds a GPU.

    Allocating pinned memory costs far more than copying into it, so the buffer is kept and only
    replaced by a larger one. Not thread-safe, and the caller must not stage the next batch before
    the device has finished reading this one (the encoder holds a lock across a whole call, which
    ends with a synchronising copy back).
    """

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.buffer: torch.Tensor | None = None
        self.allocations = 0

    def stage(self, pixels: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """The batch copied into the buffer (one copy; a list is stacked straight into it)."""
        count, item_shape = check_crops(pixels)
        buffer = self.buffer
        if buffer is None or buffer.shape[0] < count or tuple(buffer.shape[1:]) != item_shape:
            buffer = torch.empty((count, *item_shape), dtype=torch.uint8, pin_memory=self.pin)
            self.buffer = buffer
            self.allocations += 1
        view = buffer[:count]
        target = view.numpy()
        if isinstance(pixels, np.ndarray):
            np.copyto(target, pixels)
        else:
            np.stack(pixels, out=target)
        return view


class DeviceNormalizer:
    """(N, H, W, 3) uint8 on a device -> (N, 3, H, W) model input on the same device.

    `normalize_batch`'s (x * scale - mean) / std, folded into x * a + b with a = scale / std and
    b = -mean / std (computed in float64, rounded once): two passes over the batch instead of
    five, the first of which also converts and transposes. The result differs from the numpy
    reference by at most ~5e-7 (float32 rounding, tested). The cast to the model's dtype comes last.
    """

    def __init__(self, spec: PreprocessSpec, device: torch.device, dtype: torch.dtype) -> None:
        self.dtype = dtype
        mean = torch.tensor(spec.image_mean, dtype=torch.float64)
        std = torch.tensor(spec.image_std, dtype=torch.float64)
        self.a = (spec.rescale_factor / std).to(device, torch.float32).view(1, 3, 1, 1)
        self.b = (-mean / std).to(device, torch.float32).view(1, 3, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        count, height, width, _ = pixels.shape
        batch = torch.empty((count, 3, height, width), dtype=torch.float32, device=pixels.device)
        torch.mul(pixels.permute(0, 3, 1, 2), self.a, out=batch)  # uint8 -> float32, NHWC -> NCHW, scaled
        batch.add_(self.b)
        return batch if self.dtype == torch.float32 else batch.to(self.dtype)
