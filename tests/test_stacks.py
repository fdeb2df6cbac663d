"""benchmarks.stacks: inclusive shares of py-spy's collapsed stacks."""

from __future__ import annotations

from benchmarks.stacks import inclusive_shares, parse_collapsed

COLLAPSED = """<module> (app.py:1);run (loop.py:10);handle (ingress.py:5);decode (pre.py:3) 6
<module> (app.py:1);run (loop.py:10);handle (ingress.py:5) 2
<module> (app.py:1);run (loop.py:10);recurse (r.py:1);recurse (r.py:1) 2
garbage line
"""


def test_inclusive_shares_count_each_frame_once_per_stack() -> None:
    total, shares = inclusive_shares(parse_collapsed(COLLAPSED))
    by_frame = dict(shares)
    assert total == 10
    assert by_frame["run (loop.py:10)"] == 1.0
    assert by_frame["handle (ingress.py:5)"] == 0.8
    assert by_frame["decode (pre.py:3)"] == 0.6
    assert by_frame["recurse (r.py:1)"] == 0.2  # recursion counted once
    assert shares[0][1] == 1.0


def test_no_samples_gives_no_shares() -> None:
    assert inclusive_shares(parse_collapsed("")) == (0, [])
