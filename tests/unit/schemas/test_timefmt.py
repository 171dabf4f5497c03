"""schemas.timefmt: 8x8's timestamps in (0 to 7 fractional digits, `Z` or an offset, or none: UTC) and out
(UTC, `Z`, a fraction of at least 2 digits only when there is one)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.timefmt import format_iso8601, parse_iso8601


def utc(*args: int) -> datetime:
    return datetime(*args).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("2020-12-22T01:24:30.6030893Z", utc(2020, 12, 22, 1, 24, 30, 603089)),  # 7 digits: cut, not rounded
        ("2020-12-22T01:24:30.9999999Z", utc(2020, 12, 22, 1, 24, 30, 999999)),
        ("2020-12-22T01:24:30.6Z", utc(2020, 12, 22, 1, 24, 30, 600000)),
        ("2020-12-22T01:24:30,25z", utc(2020, 12, 22, 1, 24, 30, 250000)),
        ("2020-12-22T01:24:30Z", utc(2020, 12, 22, 1, 24, 30)),
        ("2020-12-22T01:24Z", utc(2020, 12, 22, 1, 24)),
        ("2020-12-22 01:24:30", utc(2020, 12, 22, 1, 24, 30)),  # no offset: UTC, as 8x8 documents
        ("2020-12-22T03:24:30+02:00", utc(2020, 12, 22, 1, 24, 30)),
        ("2020-12-22T03:24:30+0200", utc(2020, 12, 22, 1, 24, 30)),
        ("2020-12-21T19:54:30.5-05:30", utc(2020, 12, 22, 1, 24, 30, 500000)),
        ("  2020-12-22T01:24:30Z\n", utc(2020, 12, 22, 1, 24, 30)),
        ("0001-01-01T00:00:00-01:00", utc(1, 1, 1, 1)),
    ],
)
def test_parse(text: str, parsed: datetime) -> None:
    got = parse_iso8601(text)
    assert got == parsed and got.tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yesterday",
        "2020-12-22",
        "2020-12-22T01:24:30.Z",
        "2020-13-01T00:00:00Z",
        "2020-02-30T00:00:00Z",
        "2020-12-22T24:00:00Z",
        "2020-12-22T01:24:30+2:00",
        "2020-12-22T01:24:30Z trailing",
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
        "9999-12-31T23:59:59-01:00",  # after year 9999 in UTC
    ],
)
def test_not_a_timestamp_is_a_value_error_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match="not an ISO 8601 timestamp"):
        parse_iso8601(text)


@pytest.mark.parametrize("value", [None, 1608600270, b"2020-12-22T01:24:30Z"])
def test_not_a_string_is_a_value_error(value: object) -> None:
    with pytest.raises(ValueError, match="not an ISO 8601 timestamp"):
        parse_iso8601(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (utc(2020, 12, 22, 1, 24, 30), "2020-12-22T01:24:30Z"),
        (utc(2020, 12, 22, 1, 24, 30, 500000), "2020-12-22T01:24:30.50Z"),
        (utc(2020, 12, 22, 1, 24, 30, 120000), "2020-12-22T01:24:30.12Z"),
        (utc(2020, 12, 22, 1, 24, 30, 603089), "2020-12-22T01:24:30.603089Z"),
        (utc(2020, 12, 22, 1, 24, 30, 1), "2020-12-22T01:24:30.000001Z"),
        (datetime(2020, 12, 22, 3, 24, 30, tzinfo=timezone(timedelta(hours=2))), "2020-12-22T01:24:30Z"),
    ],
)
def test_format(value: datetime, text: str) -> None:
    assert format_iso8601(value) == text


offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(lambda m: timezone(timedelta(minutes=m)))


@given(st.datetimes(min_value=datetime(1000, 1, 2), max_value=datetime(9999, 12, 30), timezones=offsets))
def test_format_then_parse_is_the_same_instant_in_utc(value: datetime) -> None:
    text = format_iso8601(value)
    assert text.endswith("Z")
    back = parse_iso8601(text)
    assert back == value and back.tzinfo is UTC
    assert format_iso8601(back) == text


@given(st.datetimes(min_value=datetime(1000, 1, 1), timezones=st.just(UTC)), st.integers(0, 9))
def test_parse_reads_any_fraction_length_cut_to_microseconds(value: datetime, digits: int) -> None:
    frac = f"{value.microsecond:06d}{'7' * 3}"[:digits]
    text = value.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if digits else "") + "Z"
    expected = value.replace(microsecond=int(frac[:6].ljust(6, "0")) if digits else 0)
    assert parse_iso8601(text) == expected


def test_years_before_1000_round_trip() -> None:
    value = utc(999, 1, 1)
    assert parse_iso8601(format_iso8601(value)) == value
