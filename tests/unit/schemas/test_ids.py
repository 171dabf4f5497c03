"""schemas.ids, the formats of 8x8's identifiers that ingest accepts and the read API serves: `ok` and
`problem` always agree, `ok` is the documented pattern, and `problem` names the first thing wrong."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.ids import (
    BATCH_ID,
    CHANNEL_ID,
    CLIENT_BATCH_ID,
    CLIENT_MESSAGE_ID,
    SUBACCOUNT_ID,
    UMID,
    IdFormat,
)

FORMATS = [SUBACCOUNT_ID, UMID, BATCH_ID, CHANNEL_ID, CLIENT_MESSAGE_ID, CLIENT_BATCH_ID]
REGEX_FORMATS = [f for f in FORMATS if f.chars is not None]
ids = st.text(max_size=120) | st.text(alphabet="AZaz09-._&/ %#é\u200f\n", max_size=60)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@given(value=ids)
def test_ok_and_problem_agree(fmt: IdFormat, value: str) -> None:
    assert (fmt.problem(value) is None) == bool(fmt.ok(value))


@pytest.mark.parametrize("fmt", REGEX_FORMATS, ids=lambda f: f.name)
@given(value=ids)
def test_ok_is_the_documented_pattern(fmt: IdFormat, value: str) -> None:
    # `$` also matches before a final newline, so the pattern is checked with fullmatch (as `ok` is)
    regex = fmt.pattern.removeprefix("^").removesuffix("$")
    assert bool(fmt.ok(value)) == (re.fullmatch(regex, value) is not None)


@given(value=ids)
def test_batch_and_channel_ids_are_umids(value: str) -> None:
    assert bool(BATCH_ID.ok(value)) == bool(CHANNEL_ID.ok(value)) == bool(UMID.ok(value))


def test_the_documented_patterns() -> None:
    assert SUBACCOUNT_ID.pattern == r"^[A-Za-z0-9\-._&]{3,50}$"  # 8x8's OpenAPI, verbatim
    assert UMID.pattern == r"^[A-Za-z0-9\-]{1,100}$"
    assert CLIENT_MESSAGE_ID.pattern == "^[[:print:]]{1,50}$"


@pytest.mark.parametrize(
    ("fmt", "value"),
    [
        (SUBACCOUNT_ID, "acme-01"),
        (SUBACCOUNT_ID, "a.b_c&d"),
        (SUBACCOUNT_ID, "x" * 50),
        (UMID, "4a2e7b1c-8f3d-4e5a-9b6c-0d1e2f3a4b5c"),
        (UMID, "abc123-def456-ghi789"),  # 8x8's docs' example, not a UUID
        (UMID, "u"),
        (CLIENT_MESSAGE_ID, "Order #42 / ü — ok"),  # any printable character, spaces included
        (CLIENT_BATCH_ID, "b" * 100),
    ],
)
def test_valid_ids(fmt: IdFormat, value: str) -> None:
    assert fmt.ok(value) and fmt.problem(value) is None


def umid_fault(character: str, position: int) -> str:
    return f"{character} at position {position} is not allowed in a umid (^[A-Za-z0-9\\-]{{1,100}}$)"


@pytest.mark.parametrize(
    ("fmt", "value", "problem"),
    [
        (SUBACCOUNT_ID, "ab", "shorter than 3 characters"),
        (SUBACCOUNT_ID, "x" * 51, "longer than 50 characters"),
        (
            SUBACCOUNT_ID,
            "acme/01",
            r"character '/' (U+002F) at position 4 is not allowed in a subAccountId "
            r"(^[A-Za-z0-9\-._&]{3,50}$)",
        ),
        (UMID, "", "shorter than 1 characters"),
        (UMID, "abc\n", umid_fault("character '\\n' (U+000A)", 3)),
        (UMID, "a%2Fb", umid_fault("character '%' (U+0025)", 1)),
        (UMID, "ab\u200fc", umid_fault("character '\\u200f' (U+200F)", 2)),
        (UMID, "abcé", umid_fault("character 'é' (U+00E9)", 3)),
        (CLIENT_MESSAGE_ID, "x" * 51, "longer than 50 characters"),
        (CLIENT_MESSAGE_ID, "line\nbreak", "character '\\n' (U+000A) is not printable"),
        (CLIENT_MESSAGE_ID, "rtl\u200emark", "character '\\u200e' (U+200E) is not printable"),
        (CLIENT_BATCH_ID, "", "shorter than 1 characters"),
    ],
)
def test_problems_name_the_first_fault(fmt: IdFormat, value: str, problem: str) -> None:
    assert not fmt.ok(value)
    assert fmt.problem(value) == problem


def test_formats_are_values() -> None:
    """Frozen, compared by their definition (not by their compiled checker)."""
    assert IdFormat("umid", 1, 100, r"[A-Za-z0-9\-]") == UMID
    with pytest.raises(AttributeError):
        UMID.max_len = 5  # type: ignore[misc]
