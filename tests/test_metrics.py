"""Metric labels stay bounded: ids and arbitrary paths never become label values."""

from __future__ import annotations

import pytest

from serve_app.metrics import route_label


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/", "page"),
        ("/search", "search"),
        ("/search/combined", "search"),
        ("/images/17", "images"),
        ("/images/99999999", "images"),
        ("/ui/app.js", "ui"),
        ("/info", "info"),
        ("/healthz", "healthz"),
        ("/wp-admin/login.php", "other"),
        ("/%00/../etc", "other"),
    ],
)
def test_route_label(path: str, label: str) -> None:
    assert route_label(path) == label
