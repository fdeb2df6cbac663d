"""The application's configuration refuses settings that would make it unsafe, naming the fix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.config import DEFAULT_RELOAD_INTERVAL_S, AppArgs, WritesOptions


@pytest.mark.parametrize("interval", [0, -1, 30.5])
def test_following_cannot_be_turned_off_or_slowed_past_what_retention_relies_on(interval: float) -> None:
    """Retention deletes retired versions on the promise that replicas read CURRENT this often (issue 21 item 8)."""
    with pytest.raises(ValidationError, match=r"reload_interval_s must be above 0 and at most 30 s.*set it to 1"):
        AppArgs.model_validate({"reload_interval_s": interval})


def test_a_publish_is_picked_up_within_about_a_second_by_default() -> None:
    assert AppArgs().reload_interval_s == DEFAULT_RELOAD_INTERVAL_S <= 1.0
    assert AppArgs.model_validate({"reload_interval_s": 30}).reload_interval_s == 30


def test_the_writer_keeps_retired_versions_an_hour_by_default_and_never_less_than_replicas_need() -> None:
    assert WritesOptions().retention_s == 3600.0
    assert WritesOptions(retention_s=120).retention_s == 120.0
    with pytest.raises(ValidationError, match="retention_s"):
        WritesOptions(retention_s=119)
