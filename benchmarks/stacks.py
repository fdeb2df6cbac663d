"""Summaries of py-spy's collapsed stacks (`py-spy record --format raw`): where a process spends its CPU.

Each line is `frame;frame;...;frame COUNT`, outermost first. A frame's inclusive share is the
fraction of samples whose stack contains it (counted once per stack, recursion included once).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    stacks = []
    for line in text.splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks.append((frames.split(";"), int(count)))
    return stacks


def inclusive_shares(stacks: list[tuple[list[str], int]]) -> tuple[int, list[tuple[str, float]]]:
    """(total samples, [(frame, share of samples containing it)], largest first)."""
    total = sum(count for _, count in stacks)
    counts: Counter[str] = Counter()
    for frames, count in stacks:
        for frame in set(frames):
            counts[frame] += count
    return total, [(frame, count / total) for frame, count in counts.most_common()] if total else []


def record(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """Start `py-spy record` on `pid` for `seconds` (None where py-spy is not installed)."""
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        return None
    command = [py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--format", "raw"]
    return subprocess.Popen(
        [*command, "--output", str(out), "--rate", "200", "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
