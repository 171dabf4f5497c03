"""chatpipe.proof.compare: truth against 8x8-shaped records. Pure."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from chatpipe.proof.compare import compare_inbound, compare_message, instant, report
from chatpipe.proof.truth import ExpectedMessage, ExpectedStep

TRUTH = ExpectedMessage(
    "u-1",
    "Sim_Test",
    "delivered",
    (
        ExpectedStep(
            1,
            "whatsapp",
            "undelivered",
            "2026-07-01T12:00:03.1234567Z",
            "rejected_by_operator",
            1018,
            "Message rejected",
        ),
        ExpectedStep(2, "rcs", "delivered", "2026-07-01T12:00:09Z", "delivered_to_recipient"),
    ),
)


def _records() -> list[dict]:
    """What the read API answers for TRUTH (8x8's casing, chatpipe's timestamp format)."""
    return [
        {
            "umid": "u-1",
            "step": 1,
            "channel": "WhatsApp",
            "status": {
                "state": "undelivered",
                "detail": "rejected_by_operator",
                "errorCode": 1018,
                "errorMessage": "Message rejected",
                "timestamp": "2026-07-01T12:00:03.123456Z",
            },
        },
        {
            "umid": "u-1",
            "step": 2,
            "channel": "GoogleRCS",
            "status": {
                "state": "delivered",
                "detail": "delivered_to_recipient",
                "timestamp": "2026-07-01T12:00:09.00Z",
            },
        },
    ]


def test_matching_records_give_no_mismatch() -> None:
    assert compare_message(TRUTH, _records()) == ()
    assert compare_message(TRUTH, list(reversed(_records()))) == ()


def test_no_records_is_missing() -> None:
    (m,) = compare_message(TRUTH, None)
    assert (m.category, m.umid) == ("missing", "u-1")


def _categories(records: list[dict]) -> list[str]:
    return [m.category for m in compare_message(TRUTH, records)]


def test_a_wrong_state_is_named_with_the_step() -> None:
    records = _records()
    records[1]["status"]["state"] = "sent"
    (m,) = compare_message(TRUTH, records)
    assert m.category == "state" and "expected delivered, got sent" in m.what and "step 2 rcs" in m.what


def test_a_wrong_time_is_times() -> None:
    records = _records()
    records[0]["status"]["timestamp"] = "2026-07-01T12:00:03.12Z"
    assert _categories(records) == ["times"]


def test_a_wrong_error_code_is_details() -> None:
    records = _records()
    records[0]["status"]["errorCode"] = 1022
    assert _categories(records) == ["details"]


def test_a_missing_step_is_steps_and_state() -> None:
    assert _categories(_records()[:1]) == ["steps", "state"]


def test_steps_out_of_order_are_steps() -> None:
    records = _records()
    records[0]["step"], records[1]["step"] = 2, 1
    assert "steps" in _categories(records)


def test_each_category_counts_once_per_message() -> None:
    records = _records()
    records[0]["status"]["state"] = records[1]["status"]["state"] = "queued"
    found = compare_message(TRUTH, records)
    assert [m.category for m in found] == ["state"]
    assert report("store", 1, 0, found).counts["state"] == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-07-01T12:00:03Z", datetime(2026, 7, 1, 12, 0, 3, tzinfo=UTC)),
        ("2026-07-01T12:00:03.1Z", datetime(2026, 7, 1, 12, 0, 3, 100000, tzinfo=UTC)),
        ("2026-07-01T12:00:03.6030893Z", datetime(2026, 7, 1, 12, 0, 3, 603089, tzinfo=UTC)),
        ("2026-07-01T14:00:03+02:00", datetime(2026, 7, 1, 12, 0, 3, tzinfo=UTC)),
        ("yesterday", None),
        (None, None),
    ],
)
def test_instants_are_cut_to_the_microsecond(text: str | None, expected: datetime | None) -> None:
    assert instant(text) == expected


def test_inbound_missing_and_extra() -> None:
    found = compare_inbound("Sim_Test", "ch/+65", {"a", "b"}, {"b", "c", "z"}, frozenset({"a", "b", "z"}))
    assert [(m.category, m.umid) for m in found] == [("inbound-missing", "a"), ("inbound-extra", "c")]


def test_report_counts_messages_not_extras_as_unmatched() -> None:
    found = compare_message(TRUTH, None) + compare_inbound("S", "c", set(), {"x"}, frozenset())
    r = report("api", 10, 2, found)
    assert (r.checked, r.matched, r.excluded, r.ok) == (10, 9, 2, False)
    assert r.counts["missing"] == 1 and r.counts["inbound-extra"] == 1
    assert report("api", 3, 0, ()).ok
