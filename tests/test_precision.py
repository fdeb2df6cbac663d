"""Precision `auto` and the CPU flag parser: pure functions, every combination without the hardware."""

from __future__ import annotations

from pathlib import Path

import pytest

from image_search.precision import host_cpu_flags, parse_cpu_flags, resolve_precision

X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_bf16 avx512_vnni
bugs\t\t: sysret_ss_attrs

processor\t: 1
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_bf16 avx512_vnni
"""
ARM_CPUINFO = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes pmull bf16 i8mm\n"

NO_BF16 = frozenset({"sse2", "avx2", "avx512f"})
AVX512_BF16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
AMX = frozenset({"avx2", "amx_tile", "amx_bf16", "amx_int8"})


def test_parse_cpu_flags_reads_the_x86_flags_line() -> None:
    flags = parse_cpu_flags(X86_CPUINFO)
    assert "avx512_bf16" in flags and "avx512f" in flags
    assert "sysret_ss_attrs" not in flags  # the `bugs` line is not a feature


def test_parse_cpu_flags_reads_arm_features_and_tolerates_nothing() -> None:
    assert "asimd" in parse_cpu_flags(ARM_CPUINFO)
    assert parse_cpu_flags("") == frozenset()
    assert parse_cpu_flags("processor: 0\nmodel name: something\n") == frozenset()


def test_host_cpu_flags_is_empty_without_cpuinfo(tmp_path: Path) -> None:
    assert host_cpu_flags(tmp_path / "no-such-file") == frozenset()
    (tmp_path / "cpuinfo").write_text(X86_CPUINFO)
    assert "avx512_bf16" in host_cpu_flags(tmp_path / "cpuinfo")


@pytest.mark.parametrize(
    ("requested", "device", "flags", "expected"),
    [
        ("auto", "cuda", NO_BF16, "fp16"),
        ("auto", "cuda", AVX512_BF16, "fp16"),
        ("auto", "cpu", AVX512_BF16, "bf16"),
        ("auto", "cpu", AMX, "bf16"),
        ("auto", "cpu", NO_BF16, "fp32"),
        ("auto", "cpu", frozenset(), "fp32"),
        # ARM's "bf16" feature is not one torch's CPU autocast is known to be fast with: fp32.
        ("auto", "cpu", parse_cpu_flags(ARM_CPUINFO), "fp32"),
        ("fp32", "cuda", NO_BF16, "fp32"),
        ("bf16", "cuda", NO_BF16, "bf16"),
        ("fp16", "cuda", NO_BF16, "fp16"),
        ("fp32", "cpu", AVX512_BF16, "fp32"),
        ("bf16", "cpu", NO_BF16, "bf16"),  # asked for explicitly: emulated, but allowed
    ],
)
def test_resolve_precision(requested: str, device: str, flags: frozenset[str], expected: str) -> None:
    assert resolve_precision(requested, device, flags) == expected


def test_fp16_on_cpu_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="fp16 needs a GPU; use auto, bf16 or fp32"):
        resolve_precision("fp16", "cpu", AMX)


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", "cuda", frozenset())


@pytest.mark.parametrize(
    ("device", "precision", "gpus", "flags", "expected"),
    [
        ("auto", "auto", 2.0, NO_BF16, ("cuda", 1, "fp16")),
        ("auto", "auto", 0.0, AMX, ("cpu", 0, "bf16")),
        ("auto", "auto", 0.0, NO_BF16, ("cpu", 0, "fp32")),
        ("cpu", "auto", 4.0, NO_BF16, ("cpu", 0, "fp32")),
        ("cuda", "bf16", 1.0, NO_BF16, ("cuda", 1, "bf16")),
    ],
)
def test_ray_engine_resolves_device_and_precision_once_on_the_driver(
    device: str, precision: str, gpus: float, flags: frozenset[str], expected: tuple[str, int, str]
) -> None:
    from index_builder.ray_engine import plan_device

    assert plan_device(device, precision, gpus, flags) == expected


def test_ray_engine_refuses_fp16_without_a_gpu() -> None:
    from index_builder.build import BuildError
    from index_builder.ray_engine import plan_device

    with pytest.raises(BuildError, match="fp16 needs a GPU"):
        plan_device("auto", "fp16", 0.0, AMX)
