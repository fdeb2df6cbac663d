"""Every value a client sends is parsed strictly: a valid value or a 4xx ClientError, nothing else."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from image_search.errors import ClientError, ImageNotFound, InvalidK, InvalidSize
from serve_app.client_values import parse_decimal, parse_image_id, parse_k, parse_thumbnail_size

SIZES = (128, 256, 512)


@pytest.mark.parametrize(
    ("raw", "value"),
    [("5", 5), (" 7 ", 7), ("007", 7), ("²", None), ("٣", None), ("+1", None), ("-1", None), ("1e3", None),
     ("1_000", None), ("", None), (" ", None), ("1 2", None), ("１", None), ("0x10", None)],
)  # fmt: skip
def test_only_plain_ascii_decimals_parse(raw: str, value: int | None) -> None:
    assert parse_decimal(raw) == value


@given(st.text(max_size=30))
def test_k_is_a_number_in_range_or_invalid_k(raw: str) -> None:
    try:
        k = parse_k(raw, default_k=5, max_k=100)
    except InvalidK as exc:
        assert exc.status == 422
    else:
        assert 1 <= k <= 100


@pytest.mark.parametrize(("raw", "k"), [(None, 5), ("1", 1), ("100", 100)])
def test_k_at_the_limits_is_accepted(raw: str | None, k: int) -> None:
    assert parse_k(raw, default_k=5, max_k=100) == k


@pytest.mark.parametrize("raw", ["0", "101", "²", "5.0"])
def test_k_one_over_the_limits_is_refused(raw: str) -> None:
    with pytest.raises(InvalidK):
        parse_k(raw, default_k=5, max_k=100)


@given(st.text(max_size=40))
def test_an_image_id_is_a_plain_number_or_not_found(raw: str) -> None:
    try:
        image_id = parse_image_id(raw)
    except ImageNotFound as exc:
        assert exc.status == 404
    else:
        assert image_id >= 0 and raw.isascii()


@given(st.text(max_size=20))
def test_a_thumbnail_size_is_one_of_the_list_or_invalid_size(raw: str) -> None:
    try:
        size = parse_thumbnail_size(raw, SIZES)
    except InvalidSize as exc:
        assert exc.status == 422
    else:
        assert size in SIZES


def test_error_messages_repeat_a_bounded_part_of_the_value() -> None:
    with pytest.raises(ClientError) as raised:
        parse_k("x" * 10_000, default_k=5, max_k=100)
    assert len(raised.value.message) < 200
