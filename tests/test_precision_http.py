"""/info says which precision the Embedder runs: `auto` (the default) resolved on this machine."""

from __future__ import annotations

import requests

from image_search.precision import host_cpu_flags, resolve_precision


def test_info_reports_the_resolved_precision(serve_base_url: str) -> None:
    info = requests.get(f"{serve_base_url}/info", timeout=15).json()
    # The test app leaves embedder.precision at its default, auto, and runs on CPU.
    assert info["precision"] == resolve_precision("auto", "cpu", host_cpu_flags())
