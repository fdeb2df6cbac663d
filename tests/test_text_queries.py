"""Text-query validation and combined-query weighting, without Ray: unit and property tests."""

from __future__ import annotations

import math
from urllib.parse import quote_from_bytes

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from image_search.errors import (
    ClientError,
    EmptyText,
    InvalidText,
    InvalidWeights,
    MalformedRequest,
    NoFiles,
    NoQuery,
    TextTooLong,
    TooManyQueries,
    TooManyTexts,
    ZeroQuery,
)
from serve_app.combined import parse_weight, parse_weights, weighted_sum
from serve_app.config import UploadLimits
from serve_app.text_queries import (
    MAX_ECHO_CHARS,
    check_counts,
    clean_text,
    query_values,
    single_query_param,
    text_query,
)

LIMITS = UploadLimits(max_text_chars=50, max_texts=3, max_queries=4)

# ---------------------------------------------------------------- text validation


def test_a_text_is_stripped_and_keeps_its_inner_whitespace() -> None:
    assert clean_text("  a red\tbicycle\n ", LIMITS) == "a red\tbicycle"


@pytest.mark.parametrize("control", ["\x00", "\x07", "\x1b", "\x7f", "\x85", "\x9f"])
def test_control_characters_are_refused(control: str) -> None:
    with pytest.raises(InvalidText, match=f"U\\+{ord(control):04X}"):
        clean_text(f"a{control}b", LIMITS)


def test_the_length_limit_counts_characters_before_tokenising() -> None:
    assert clean_text("é" * LIMITS.max_text_chars, LIMITS) == "é" * LIMITS.max_text_chars
    with pytest.raises(TextTooLong) as caught:
        clean_text("é" * (LIMITS.max_text_chars + 1), LIMITS)
    assert caught.value.status == 413


@pytest.mark.parametrize("text", ["", "   ", "\t\r\n", "\u3000", "\u2003\u00a0"])
def test_text_that_is_empty_after_stripping_is_refused(text: str) -> None:
    with pytest.raises(EmptyText):
        clean_text(text, LIMITS)


def test_invalid_utf8_in_a_form_field_is_an_entry_error_that_echoes_safely() -> None:
    query = text_query(b"caf\xc3 \xff\xfe", LIMITS)
    assert isinstance(query.error, InvalidText) and "UTF-8" in query.error.message
    assert query.text.startswith("caf") and "\ufffd" in query.text


def test_a_text_field_over_the_byte_bound_is_too_long_without_decoding_it_all() -> None:
    query = text_query(b"x" * (4 * LIMITS.max_text_chars + 1), LIMITS)
    assert isinstance(query.error, TextTooLong)
    assert len(query.text) <= MAX_ECHO_CHARS


def test_refused_text_is_echoed_without_control_characters() -> None:
    query = text_query("bad\x00text", LIMITS)
    assert isinstance(query.error, InvalidText)
    assert query.text == "bad\ufffdtext"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=()), max_size=80))
def test_any_unicode_text_is_a_valid_query_or_a_client_error(text: str) -> None:
    query = text_query(text, LIMITS)
    if query.error is None:
        assert query.text == query.text.strip() and query.text
        assert len(query.text) <= LIMITS.max_text_chars
        assert all(ch in "\t\n\r" or ord(ch) >= 0x20 for ch in query.text)
        query.text.encode("utf-8")  # always encodable: no lone surrogates
    else:
        assert isinstance(query.error, ClientError) and 400 <= query.error.status < 500
        assert len(query.text) <= MAX_ECHO_CHARS
        query.text.encode("utf-8")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_in_a_form_field_are_a_valid_query_or_a_client_error(raw: bytes) -> None:
    query = text_query(raw, LIMITS)
    assert query.error is None or 400 <= query.error.status < 500
    query.text.encode("utf-8")


# ---------------------------------------------------------------- counts and GET ?q=


def test_counts_are_checked_per_kind_and_together() -> None:
    check_counts(files=1, texts=3, limits=LIMITS)
    with pytest.raises(TooManyTexts):
        check_counts(files=0, texts=4, limits=LIMITS)
    with pytest.raises(TooManyQueries):
        check_counts(files=2, texts=3, limits=LIMITS)
    with pytest.raises(NoFiles):
        check_counts(files=0, texts=0, limits=LIMITS)


def test_max_queries_is_bounded_so_one_searcher_call_fits_a_grpc_message() -> None:
    assert UploadLimits(max_queries=256).max_queries == 256
    with pytest.raises(ValueError, match="max_queries"):
        UploadLimits(max_queries=257)


def test_query_values_percent_decode_and_keep_the_raw_bytes() -> None:
    raw = b"k=3&q=a+red%20bicycle&q=%E6%9D%B1%E4%BA%AC&other=1"
    assert query_values(raw, "q") == [b"a red bicycle", "東京".encode()]
    assert query_values(raw, "k") == [b"3"]
    assert query_values(b"", "q") == []


def test_get_q_refuses_invalid_utf8_missing_and_repeated() -> None:
    assert single_query_param(b"q=%F0%9F%9A%B2+bike", LIMITS) == "🚲 bike"
    with pytest.raises(InvalidText):
        single_query_param(b"q=%C3%28", LIMITS)
    with pytest.raises(NoQuery):
        single_query_param(b"k=3", LIMITS)
    with pytest.raises(MalformedRequest):
        single_query_param(b"q=a&q=b", LIMITS)
    with pytest.raises(EmptyText):
        single_query_param(b"q=+++", LIMITS)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_any_q_bytes_give_a_query_or_a_client_error(raw: bytes) -> None:
    try:
        text = single_query_param(b"q=" + quote_from_bytes(raw).encode(), LIMITS)
    except ClientError as exc:
        assert 400 <= exc.status < 500
    else:
        assert text == raw.decode("utf-8").strip()


# ---------------------------------------------------------------- weights


@pytest.mark.parametrize(("raw", "value"), [("1", 1.0), ("-0.5", -0.5), (" +2 ", 2.0), (".25", 0.25), ("3e-1", 0.3)])
def test_weights_are_plain_decimal_numbers(raw: str, value: float) -> None:
    assert parse_weight(raw, "text_weight") == pytest.approx(value)


@pytest.mark.parametrize("raw", ["nan", "inf", "-Infinity", "1e999", "1_0", "0x10", "", "one", "1,5", "1e"])
def test_weights_that_are_not_finite_plain_numbers_are_refused(raw: str) -> None:
    with pytest.raises(InvalidWeights) as caught:
        parse_weight(raw, "file_weight")
    assert caught.value.status == 422 and "file_weight" in caught.value.message


def test_weights_default_to_one_and_must_match_the_count() -> None:
    assert parse_weights([], 3, "text_weight", "text") == [1.0, 1.0, 1.0]
    assert parse_weights(["2", "-1"], 2, "text_weight", "text") == [2.0, -1.0]
    with pytest.raises(InvalidWeights, match="got 1 for 2"):
        parse_weights(["2"], 2, "text_weight", "text")


def _unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def test_the_weighted_sum_is_normalised_and_follows_the_signs() -> None:
    a, b = _unit(1, 0, 0), _unit(0, 1, 0)
    combined = weighted_sum(np.stack([a, b]), [1.0, -1.0])
    np.testing.assert_allclose(combined, _unit(1, -1, 0), atol=1e-6)
    np.testing.assert_allclose(weighted_sum(np.stack([a, b]), [3.0, 1.0]), _unit(3, 1, 0), atol=1e-6)
    assert combined.dtype == np.float32


def test_one_query_with_a_positive_weight_is_itself_and_a_negative_one_its_opposite() -> None:
    a = _unit(0.3, -0.2, 0.9)
    np.testing.assert_allclose(weighted_sum(a[None], [0.01]), a, atol=1e-6)
    np.testing.assert_allclose(weighted_sum(a[None], [-5.0]), -a, atol=1e-6)


def test_huge_finite_weights_do_not_overflow() -> None:
    a, b = _unit(1, 0), _unit(0, 1)
    np.testing.assert_allclose(weighted_sum(np.stack([a, b]), [1e300, 1e300]), _unit(1, 1), atol=1e-6)


def test_all_zero_weights_and_cancelling_queries_are_refused() -> None:
    a, b = _unit(1, 2, 3), _unit(3, 2, 1)
    with pytest.raises(ZeroQuery, match="zero"):
        weighted_sum(np.stack([a, b]), [0.0, 0.0])
    with pytest.raises(ZeroQuery, match="cancel"):
        weighted_sum(np.stack([a, a]), [1.0, -1.0])
    with pytest.raises(InvalidWeights):
        weighted_sum(np.stack([a, b]), [math.nan, 1.0])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.floats(-1, 1, allow_nan=False), min_size=4, max_size=4),
            st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_the_weighted_sum_is_a_unit_vector_or_a_zero_query(parts: list[tuple[list[float], float]]) -> None:
    vectors = np.asarray([vector for vector, _ in parts], dtype=np.float32)
    weights = [weight for _, weight in parts]
    try:
        combined = weighted_sum(vectors, weights)
    except ZeroQuery as exc:
        assert exc.status == 422
    else:
        assert abs(float(np.linalg.norm(combined)) - 1.0) < 1e-5
