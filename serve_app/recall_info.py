"""What /info says about recall: per segment the index, its tuned search knob and the recall measured
when it was written (image_search/recall_tuning.py, kept in the version file), and a summary.

An exact (Flat) segment has recall 1.0 by construction. An approximate segment reports what its tuning
measured on held-out vectors of the collection: recall@k, the lower confidence bound compared with the
target, whether the target was met, and the single-query latency at the chosen knob. A `searcher.nprobe`
or `searcher.ef_search` setting replaces the tuned knob on every approximate segment: then the measured
recall no longer describes what runs, and the summary says so (`overridden`) rather than claim it.

Pure: reads the version's segment entries only.
"""

from __future__ import annotations

from typing import Any

from image_search.index_spec import DEFAULT_RECALL_TARGET
from image_search.segments import SegmentInfo, Version


def segment_recall(info: SegmentInfo) -> dict[str, Any]:
    params = dict(info.index.get("params", {}))
    entry: dict[str, Any] = {"segment": info.name, "vectors": info.count, "index": info.index.get("factory")}
    tuning = params.get("tuning")
    if not isinstance(tuning, dict):
        approximate = any(key in params for key in ("nprobe", "ef_search"))
        # Exact: recall 1.0. An approximate segment written before tuning existed: not measured.
        entry.update({"exact": False, "recall": None} if approximate else {"exact": True, "recall": 1.0})
        return entry
    entry.update(
        {
            "exact": tuning.get("param") is None,
            "param": tuning.get("param"),
            "value": tuning.get("value"),
            "recall": tuning.get("recall"),
            "recall_lower_bound": tuning.get("lower_bound"),
            "target": tuning.get("target"),
            "met": tuning.get("met"),
            "k": tuning.get("k"),
            "p50_ms": tuning.get("p50_ms"),
            "p99_ms": tuning.get("p99_ms"),
        }
    )
    return entry


def recall_report(version: Version, nprobe: int | None = None, ef_search: int | None = None) -> dict[str, Any]:
    """{"target", "min_recall", "met", "overridden", "segments": [...]} for the version served."""
    segments = [segment_recall(info) for info in version.segments]
    measured = [entry["recall"] for entry in segments if entry["recall"] is not None]
    approximate = [entry for entry in segments if not entry["exact"]]
    targets = [entry["target"] for entry in approximate if entry.get("target") is not None]
    overridden = {key: value for key, value in (("nprobe", nprobe), ("ef_search", ef_search)) if value}
    return {
        "target": max(targets) if targets else DEFAULT_RECALL_TARGET,
        "min_recall": min(measured) if measured else None,
        # Every approximate segment measured and at its target, with the tuned knobs in use.
        "met": all(entry.get("met") is True for entry in approximate) and not (approximate and overridden),
        "overridden": overridden or None,
        "segments": segments,
    }
