"""`python -m benchmarks.gpu` runs where only torch, transformers, numpy, pillow, faiss-cpu and pydantic exist.

GPU machines are often bare images, so the benchmark must not need Ray or boto3: it runs here in a
fresh interpreter with both made unimportable, on CPU at its smallest sizes, with the tiny checkpoint.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BLOCKED = "ray", "boto3", "botocore", "starlette"
SCRIPT = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
from benchmarks.gpu import main
raise SystemExit(main(["--quick", "--device", "cpu", "--model", {model!r}, "--images", "12", "--rounds", "1"]))
"""


def test_gpu_benchmark_runs_without_ray_or_boto3(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(blocked=BLOCKED, model=str(tiny_model_dir))],
        capture_output=True,
        text=True,
        timeout=600,
        env={"BENCH_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for heading in ("### Vision tower on cpu", "### Preprocessing, 12 x 640x480 JPEG", "### Builder, 12 images"):
        assert heading in result.stdout, result.stdout
    assert "encode_pixels / raw forward" in result.stdout
    assert "builder (embed_local) / min(forward, all-core preprocessing)" in result.stdout
