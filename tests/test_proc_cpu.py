"""benchmarks.proc_cpu: /proc parsing and per-role CPU arithmetic (pure), and one real sample."""

from __future__ import annotations

import os

from benchmarks.proc_cpu import (
    CLIENT,
    Sample,
    cpu_percent_by_role,
    descendants,
    parse_stat,
    role_of,
    sample,
)

# A real line, with a process name holding a space and a parenthesis.
STAT = "4242 (ray::Serve (x) y) S 4000 4242 6775 0 -1 4194304 102 0 0 0 250 75 0 0 20 0 9 0 167958 3133440 410"


def test_parse_stat_reads_parent_and_ticks_past_an_awkward_name() -> None:
    stat = parse_stat(STAT)
    assert (stat.pid, stat.ppid, stat.ticks) == (4242, 4000, 325)


def test_roles_by_command_line() -> None:
    assert role_of("ray::ServeReplica:image_search:Ingress", 5, 1) == "Ingress"
    assert role_of("ray::ServeReplica:image_search:Embedder", 5, 1) == "Embedder"
    assert role_of("ray::ServeReplica:image_search:Searcher", 5, 1) == "Searchers"
    assert role_of("ray::ProxyActor", 5, 1) == "HTTP proxy"
    assert role_of("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --x", 5, 1) == "raylet"
    assert role_of("/venv/.../gcs/gcs_server --gcs_server_port=1", 5, 1) == "GCS"
    assert role_of("ray::IDLE", 5, 1) == "other Ray workers"
    assert role_of("python -m benchmarks.served", 1, 1) == CLIENT


def test_descendants_follow_parent_chains_only() -> None:
    parents = {10: 1, 11: 10, 12: 11, 20: 1, 21: 20}
    assert descendants(parents, 10) == {10, 11, 12}


def test_cpu_percent_sums_per_role_and_counts_new_processes_from_zero() -> None:
    before = Sample(ticks={1: 100, 2: 50}, roles={1: CLIENT, 2: "Searchers"})
    after = Sample(ticks={1: 150, 2: 75, 3: 25}, roles={1: CLIENT, 2: "Searchers", 3: "Searchers"})
    percent = cpu_percent_by_role(before, after, seconds=2.0, ticks_per_second=100.0)
    assert percent == {CLIENT: 25.0, "Searchers": 25.0}


def test_a_real_sample_sees_this_process() -> None:
    now = sample()
    assert now.roles[os.getpid()] == CLIENT and now.ticks[os.getpid()] > 0
