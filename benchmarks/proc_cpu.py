"""CPU time per process role, sampled from /proc: `top` for a benchmark, limited to its own process tree.

Several people's Ray instances may run on one machine, so only this process and its descendants
count (ray.init starts the GCS and the raylet as our children; every worker descends from the
raylet). Linux only; elsewhere the samples are empty and the table says so.

Pure parsing and arithmetic (tested in tests/test_proc_cpu.py); `sample()` is the only I/O.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")

# (substring of the command line, role), first match wins. Serve's replicas and actors set their
# process titles to `ray::<class>` (replicas: `ray::ServeReplica:<app>:<deployment>`).
ROLES: tuple[tuple[str, str], ...] = (
    (":Ingress", "Ingress"),
    (":Embedder", "Embedder"),
    (":Searcher", "Searchers"),
    ("ray::ProxyActor", "HTTP proxy"),
    ("ray::ServeController", "Serve controller"),
    ("raylet", "raylet"),
    ("gcs_server", "GCS"),
    ("dashboard", "dashboard + agents"),
    ("runtime_env", "dashboard + agents"),
    ("log_monitor", "dashboard + agents"),
    ("monitor.py", "dashboard + agents"),
    ("ray::", "other Ray workers"),
)
CLIENT = "client + driver (this process)"


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    ticks: int  # utime + stime, in clock ticks


def parse_stat(text: str) -> ProcStat:
    """/proc/<pid>/stat -> pid, parent and CPU ticks. The name field may hold spaces and parentheses."""
    pid_part, _, rest = text.partition(" (")
    fields = rest.rsplit(") ", 1)[1].split()
    # After the name: state(3) ppid(4) ... utime(14) stime(15); `fields` starts at field 3.
    return ProcStat(pid=int(pid_part), ppid=int(fields[1]), ticks=int(fields[11]) + int(fields[12]))


def role_of(cmdline: str, pid: int, own_pid: int) -> str:
    if pid == own_pid:
        return CLIENT
    for needle, role in ROLES:
        if needle in cmdline:
            return role
    return "other children"


def descendants(parents: dict[int, int], root: int) -> set[int]:
    """`root` and every process whose parent chain leads to it."""
    children: dict[int, list[int]] = defaultdict(list)
    for pid, ppid in parents.items():
        children[ppid].append(pid)
    found, stack = {root}, [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


@dataclass(frozen=True)
class Sample:
    ticks: dict[int, int]  # pid -> CPU ticks
    roles: dict[int, str]  # pid -> role


def cpu_percent_by_role(before: Sample, after: Sample, seconds: float, ticks_per_second: float) -> dict[str, float]:
    """Percent of one core per role between two samples (`top`'s %CPU), processes summed per role.

    A process that started in between counts from zero; one that ended in between is lost (its
    time is not readable any more), which under-reports, never over-reports.
    """
    totals: dict[str, float] = defaultdict(float)
    for pid, ticks in after.ticks.items():
        used = ticks - before.ticks.get(pid, 0)
        totals[after.roles[pid]] += 100.0 * used / ticks_per_second / seconds
    return dict(totals)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:  # the process ended while we looked
        return None


def sample(root: int | None = None, proc: Path = PROC) -> Sample:
    """CPU ticks and role of `root` (default: this process) and its descendants, now."""
    root = os.getpid() if root is None else root
    stats: dict[int, ProcStat] = {}
    for entry in proc.glob("[0-9]*"):
        text = _read(entry / "stat")
        if text:
            stat = parse_stat(text)
            stats[stat.pid] = stat
    ours = descendants({pid: stat.ppid for pid, stat in stats.items()}, root)
    roles = {}
    for pid in ours:
        cmdline = (_read(proc / str(pid) / "cmdline") or "").replace("\0", " ")
        roles[pid] = role_of(cmdline, pid, root)
    return Sample(ticks={pid: stats[pid].ticks for pid in ours if pid in stats}, roles=roles)


def ticks_per_second() -> float:
    return float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
