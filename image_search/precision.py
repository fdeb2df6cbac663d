"""Numeric precision of the CLIP towers, as named in configs and on the command line.

`auto` picks the fastest precision that keeps search results unchanged on the hardware at hand:

* a GPU: fp16 (tensor cores; embeddings match fp32 to cosine 0.99999, issue 10);
* a CPU with native bf16 (AVX512-BF16 or AMX): bf16 autocast, about 2.2x fp32 with the same top-5
  (benchmarks.precision_parity);
* any other CPU: fp32 (bf16 without hardware support is emulated and slower than fp32).

The decision is a pure function of the device type and the CPU's feature flags, so every
combination is tested without the hardware; reading the flags is the only I/O, kept apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

Precision = Literal["auto", "fp32", "bf16", "fp16"]
"""What a user may ask for."""

ResolvedPrecision = Literal["fp32", "bf16", "fp16"]
"""What actually runs (what /info, the builder's output and the manifest report)."""

PRECISIONS: tuple[str, ...] = get_args(Precision)

# /proc/cpuinfo flag names of the instructions that make CPU bf16 matmuls native.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CPUINFO = Path("/proc/cpuinfo")


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of /proc/cpuinfo text (x86 `flags`, ARM `Features`), as a set.

    Only the first processor's line is read: the kernel lists the same features for every core.
    """
    for line in cpuinfo.splitlines():
        name, separator, value = line.partition(":")
        if separator and name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def host_cpu_flags(path: Path = CPUINFO) -> frozenset[str]:
    """This machine's CPU flags; empty where /proc/cpuinfo does not exist (macOS, Windows)."""
    try:
        return parse_cpu_flags(path.read_text(errors="replace"))
    except OSError:
        return frozenset()


def has_native_bf16(cpu_flags: frozenset[str]) -> bool:
    return bool(cpu_flags & NATIVE_BF16_FLAGS)


def resolve_precision(requested: str, device_type: str, cpu_flags: frozenset[str]) -> ResolvedPrecision:
    """The precision that runs for `requested` on a `device_type` ("cuda" or "cpu") device.

    Raises ValueError, naming the fix, for a request the device cannot run.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; use one of {', '.join(PRECISIONS)}")
    on_gpu = device_type == "cuda"
    if requested == "auto":
        if on_gpu:
            return "fp16"
        return "bf16" if has_native_bf16(cpu_flags) else "fp32"
    if requested == "fp16" and not on_gpu:
        raise ValueError("precision fp16 needs a GPU; use auto, bf16 or fp32 on CPU")
    resolved: ResolvedPrecision = requested  # type: ignore[assignment]
    return resolved
