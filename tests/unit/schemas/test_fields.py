"""schemas/fields.py: the validation vocabulary shared by webhooks (ingest/parse.py) and 8x8's details
answers (processors/reconcile.py): each check's verdict and the words of its reason."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import fields as F


def reason(check, *args):  # type: ignore[no-untyped-def]
    with pytest.raises(F.FieldError) as caught:
        check(*args)
    return caught.value.field, caught.value.message, caught.value.code


def test_field_paths_join_with_dots_from_the_root() -> None:
    assert F.field_path("", "umid") == "umid"
    assert F.field_path("payload.status", "state") == "payload.status.state"


@pytest.mark.parametrize(
    ("obj", "max_len", "expected"),
    [
        ({}, None, "required"),
        ({"k": None}, None, "required"),
        ({"k": 5}, None, "expected string, got number"),
        ({"k": ["a"]}, None, "expected string, got array"),
        ({"k": ""}, None, "must not be empty"),
        ({"k": " \t"}, None, "must not be empty"),
        ({"k": "abcd"}, 3, "longer than 3 characters"),
    ],
)
def test_req_str_refuses_with_the_reason(obj: dict[str, object], max_len: int | None, expected: str) -> None:
    assert reason(F.req_str, obj, "k", "payload", max_len) == ("payload.k", expected, F.CODE_INVALID)


def test_req_str_and_opt_str_return_the_value_as_given() -> None:
    assert F.req_str({"k": " a "}, "k", "p", 3) == " a "
    assert F.opt_str({"k": ""}, "k", "p") == ""
    assert F.opt_str({}, "k", "p") is None
    assert reason(F.opt_str, {"k": True}, "k", "p", None)[1] == "expected string, got boolean"


def test_objects_required_and_optional() -> None:
    assert F.req_obj({"k": {"a": 1}}, "k", "") == {"a": 1}
    assert F.opt_obj({"k": None}, "k", "") is None
    assert reason(F.req_obj, {}, "k", "") == ("k", "required", F.CODE_INVALID)
    assert reason(F.opt_obj, {"k": "x"}, "k", "")[1] == "expected object, got string"


@given(st.integers(min_value=F.INT32_MIN, max_value=F.INT32_MAX))
def test_int32_takes_an_integer_or_its_digits(n: int) -> None:
    assert F.int32(n, "p", "k") == n
    assert F.int32(str(n), "p", "k") == n
    assert F.int32(f" +{n}" if n >= 0 else f" {n} ", "p", "k") == n


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (2**31, "out of range: 2147483648"),
        (-(2**31) - 1, "out of range: -2147483649"),
        ("12a", "not an integer: '12a'"),
        ("\uff11\uff12", "not an integer: '\uff11\uff12'"),  # full-width digits: isdigit() but not ASCII
        ("99999999999", "not an integer: '99999999999'"),
        (1.5, "expected integer, got number"),
        (None, "expected integer, got null"),
    ],
)
def test_int32_refuses(value: object, expected: str) -> None:
    assert reason(F.int32, value, "data[0]", "step") == ("data[0].step", expected, F.CODE_INVALID)


def test_iso_timestamps_any_offset_to_utc() -> None:
    assert F.iso_timestamp("2026-07-03T05:45:00+02:00", "s", "t") == datetime(2026, 7, 3, 3, 45, tzinfo=UTC)
    assert reason(F.iso_timestamp, "yesterday", "s", "t")[1] == "not an ISO 8601 timestamp: 'yesterday'"
    assert reason(F.iso_timestamp, 17, "s", "t")[1] == "expected string, got number"


def test_show_cuts_long_values_and_channels_normalise() -> None:
    assert F.show("x" * 500).endswith("…") and len(F.show("x" * 500)) == 80
    assert F.normalise_channel("GoogleRCS") == "rcs"
    assert F.normalise_channel("WhatsApp") == "whatsapp"


def test_bad_carries_another_code() -> None:
    assert reason(F.bad, "", "eventType", "unsupported", 1003) == ("eventType", "unsupported", 1003)
