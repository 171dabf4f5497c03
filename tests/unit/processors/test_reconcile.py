"""The reconciler's pure core: details answers -> receipts, 429 messages, the token bucket, the schedule."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.reconcile import (
    CheckSchedule,
    Outcome,
    Pacer,
    details_to_receipts,
    is_reconciled,
    parse_retry_after,
    select_candidates,
)
from processors.state import apply_many
from schemas import mapping
from schemas.errors import InvalidEvent
from schemas.models import DeliveryReceipt, Status, User
from tests.fixtures.webhooks import load

FETCHED = datetime(2026, 7, 1, 12, 0, 0, tzinfo=UTC)
UMID = "dec02e44-c76f-4a0a-b69f-6ac2a4386eb9"

# the two success examples of retrieve-message-details-api.txt, verbatim
DOC_EXAMPLE_1 = b"""{
"data":[
{
"umid":"dec02e44-c76f-4a0a-b69f-6ac2a4386eb9",
"subAccountId":"string",
"channel":"WhatsApp",
"channelId":"8e4d1303-5754-e911-8154-020897df5459",
"direction":"outbound",
"country":"SG",
"status":{
"state":"delivered",
"detail":"delivered_to_carrier",
"errorCode":0,
"errorMessage":"Invalid message length",
"timestamp":"2020-06-17T04:17:21.06Z"
},
"user":{
"msisdn":"+63922110xxxx",
"channelUserId":"string"
},
"contentType":"Text",
"content":"**MASKED**",
"createdAt":"2020-06-17T04:17:21.06Z",
"clientMessageId":"string",
"clientBatchId":"string",
"batchId":"c9c01382-38bf-4e27-8962-ae0684ab56c3",
"step":1
}
]
}"""
DOC_EXAMPLE_2 = b"""{
"data":[
{
"umid":"dec02e44-c76f-4a0a-b69f-6ac2a4386eb9",
"subAccountId":"sub_account_id",
"channel":"WhatsApp",
"channelId":"904d1303-5754-e911-8154-020897df5459",
"direction":"Outbound",
"status":{
"state":"read",
"timestamp":"2020-06-17T04:25:21.06Z"
},
"contentType":"Text",
"createdAt":"2020-06-17T04:15:21.06Z",
"step":2,
"country":"SG",
"user":{
"msisdn":"+63922110xxxx"
},
"content":"**MASKED**",
"clientMessageId":"client message id",
"clientBatchId":"client batch id",
"batchId":"c9c01382-38bf-4e27-8962-ae0684ab56c3"
}
]
}"""


def record(step: int, channel: str, state: str, ts: str, **extra: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "umid": UMID,
        "subAccountId": "acme",
        "channel": channel,
        "channelId": f"chan-{step}",
        "direction": "outbound",
        "status": {"state": state, "timestamp": ts},
        "contentType": "Text",
        "createdAt": "2026-07-01T08:00:00Z",
        "step": step,
    }
    rec.update(extra)
    return rec


def body(*records: dict[str, Any]) -> bytes:
    return json.dumps({"data": list(records)}).encode()


# --- details -> receipts ------------------------------------------------------------------------------


def test_documented_example_1_gives_one_delivered_whatsapp_receipt() -> None:
    [r] = details_to_receipts("string", UMID, DOC_EXAMPLE_1, FETCHED)
    assert r.umid == UMID and r.sub_account_id == "string"
    assert r.channel == "whatsapp"
    assert r.status == Status(
        state="delivered",
        timestamp=datetime(2020, 6, 17, 4, 17, 21, 60000, tzinfo=UTC),
        detail="delivered_to_carrier",
        error_code=0,
        error_message="Invalid message length",
    )
    assert r.user == User(msisdn="+63922110xxxx", channel_user_id="string")
    assert (r.batch_id, r.client_message_id, r.client_batch_id) == (
        "c9c01382-38bf-4e27-8962-ae0684ab56c3",
        "string",
        "string",
    )
    assert r.received_at == FETCHED and r.version is None
    assert json.loads(r.raw_json) == json.loads(DOC_EXAMPLE_1)["data"][0]
    assert is_reconciled(r)


def test_documented_example_2_gives_one_read_receipt_despite_capitalised_direction() -> None:
    [r] = details_to_receipts("sub_account_id", UMID, DOC_EXAMPLE_2, FETCHED)
    assert (r.channel, r.status.state, r.status.detail, r.status.error_code) == (
        "whatsapp",
        "read",
        None,
        None,
    )
    assert r.status.timestamp == datetime(2020, 6, 17, 4, 25, 21, 60000, tzinfo=UTC)
    assert r.user == User(msisdn="+63922110xxxx")
    assert json.loads(r.raw_json)["channelId"] == "904d1303-5754-e911-8154-020897df5459"


def test_receipts_round_trip_through_the_avro_mapping() -> None:
    [r] = details_to_receipts("string", UMID, DOC_EXAMPLE_1, FETCHED)
    assert mapping.receipt_from_dict(mapping.receipt_to_dict(r)) == r


def test_one_receipt_per_record_in_step_order_lenient_case() -> None:
    raw = body(
        record(2, "SMS", "DELIVERED", "2026-07-01T08:05:00.1234567Z", status_extra=1),
        record(1, "Viber", "Undelivered", "2026-07-01T08:01:00Z"),
    )
    raw = raw.replace(
        b'"state": "Undelivered"', b'"state": "Undelivered", "errorCode": "2008", "detail": "X"'
    )
    receipts = details_to_receipts("ACME", UMID.upper(), raw, FETCHED)
    assert [(r.channel, r.status.state) for r in receipts] == [("viber", "undelivered"), ("sms", "delivered")]
    assert receipts[0].status.error_code == 2008 and receipts[0].status.detail == "x"
    assert receipts[1].status.timestamp.microsecond == 123456
    assert all(r.umid == UMID.upper() and r.sub_account_id == "ACME" for r in receipts)


def test_googlercs_and_notification_spellings_match_the_stored_channels() -> None:
    raw = body(
        record(1, "GoogleRCS", "sent", "2026-07-01T08:01:00Z"),
        record(2, "Zalo", "sent", "2026-07-01T08:02:00Z"),
    )
    got = details_to_receipts("acme", UMID, raw, FETCHED, known_channels=("rcs", "zalonotification"))
    assert [r.channel for r in got] == ["rcs", "zalonotification"]
    # without that knowledge, or when `zalo` itself is known, the channel is kept as 8x8 spells it
    assert [r.channel for r in details_to_receipts("acme", UMID, raw, FETCHED)] == ["rcs", "zalo"]
    both = ("zalo", "zalonotification")
    assert details_to_receipts("acme", UMID, raw, FETCHED, known_channels=both)[1].channel == "zalo"


def test_empty_data_gives_no_receipt() -> None:
    assert details_to_receipts("acme", UMID, b'{"data": []}', FETCHED) == []


def test_webhook_receipts_are_not_taken_for_reconciled_ones() -> None:
    from ingest.parse import parse_webhook

    # received after its event (2026-07-03): ingest refuses event times more than a day ahead
    hook = parse_webhook(load("dr_v9_whatsapp_delivered_text"), FETCHED + timedelta(days=2))
    assert isinstance(hook, DeliveryReceipt) and not is_reconciled(hook)


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        (b"", "body", "not valid JSON"),
        (b"\xff\xfe", "body", "not valid JSON"),
        (b"[1]", "body", "expected a JSON object, got array"),
        (b"{}", "data", "required"),
        (b'{"data": {}}', "data", "expected array, got object"),
        (b'{"data": [3]}', "data[0]", "expected object, got number"),
        (
            body({**record(1, "sms", "sent", "2026-07-01T08:00:00Z"), "umid": "other"}),
            "data[0].umid",
            "is not",
        ),
        (
            body({**record(1, "sms", "sent", "2026-07-01T08:00:00Z"), "subAccountId": "x"}),
            "data[0].subAccountId",
            "not the requested subaccount",
        ),
        (
            body({**record(1, "sms", "sent", "2026-07-01T08:00:00Z"), "direction": "inbound"}),
            "data[0].direction",
            "expected outbound",
        ),
        (
            body({**record(1, "sms", "sent", "2026-07-01T08:00:00Z"), "channel": ""}),
            "data[0].channel",
            "empty",
        ),
        (
            body({**record(1, "sms", "sent", "2026-07-01T08:00:00Z"), "channel": 7}),
            "data[0].channel",
            "string",
        ),
        (
            body({**record(1, "sms", "sent", "2026-07-01T08:00:00Z"), "step": None}),
            "data[0].step",
            "required",
        ),
        (body(record(0, "sms", "sent", "2026-07-01T08:00:00Z")), "data[0].step", "must be >= 1"),
        (body(record(1, "sms", "sent", "2026-07-01T08:00:00Z") | {"step": 1.5}), "data[0].step", "integer"),
        (body({**record(1, "sms", "sent", "x"), "status": None}), "data[0].status", "required"),
        (body(record(1, "sms", "sent", "yesterday")), "data[0].status.timestamp", "ISO 8601"),
        (body(record(1, "sms", "", "2026-07-01T08:00:00Z")), "data[0].status.state", "empty"),
        (
            body(
                record(1, "sms", "sent", "2026-07-01T08:00:00Z"),
                record(1, "viber", "sent", "2026-07-01T08:00:00Z"),
            ),
            "data[1].step",
            "already given by data[0]",
        ),
        (
            body(record(1, "sms", "sent", "2026-07-01T08:00:00Z", user="+65")),
            "data[0].user",
            "expected object, got string",
        ),
    ],
)
def test_malformed_answers_raise_invalid_event_naming_the_field(raw: bytes, field: str, words: str) -> None:
    with pytest.raises(InvalidEvent) as err:
        details_to_receipts("acme", UMID, raw, FETCHED)
    assert err.value.field == field
    assert err.value.reason.startswith(f"{field}: ") and words in err.value.reason
    assert err.value.raw == raw


def test_missing_status_timestamp_is_an_error_not_a_made_up_time() -> None:
    rec = record(1, "sms", "sent", "x")
    del rec["status"]["timestamp"]
    with pytest.raises(InvalidEvent, match=r"data\[0\]\.status\.timestamp: required"):
        details_to_receipts("acme", UMID, body(rec), FETCHED)


@given(st.binary(max_size=200))
def test_any_bytes_give_receipts_or_invalid_event(raw: bytes) -> None:
    with contextlib.suppress(InvalidEvent):
        details_to_receipts("acme", UMID, raw, FETCHED)


# --- the state machine folds them ---------------------------------------------------------------------


def test_reconciled_receipts_fold_into_state_duplicates_absorbed_no_regression() -> None:
    raw = body(
        record(1, "Viber", "undelivered", "2026-07-01T08:01:00Z"),
        record(2, "WhatsApp", "read", "2026-07-01T08:09:00Z", user={"msisdn": "+6591234567"}),
    )
    webhook = DeliveryReceipt(
        umid=UMID,
        sub_account_id="acme",
        channel="whatsapp",
        status=Status("delivered", datetime(2026, 7, 1, 8, 5, tzinfo=UTC)),
        received_at=FETCHED,
        raw_json="{}",
    )
    before = apply_many(None, [webhook], now=FETCHED).state
    receipts = details_to_receipts("acme", UMID, raw, FETCHED, known_channels=("whatsapp",))
    after = apply_many(before, receipts, now=FETCHED).state
    assert after.channel_path == "viber>whatsapp" and after.state == "read" and after.final
    again = apply_many(after, receipts, now=FETCHED)
    assert not again.changed and again.duplicate
    # a stale answer (8x8 still says sent) does not move a delivered step back
    stale = details_to_receipts(
        "acme", UMID, body(record(1, "WhatsApp", "sent", "2026-07-01T08:02:00Z")), FETCHED
    )
    assert apply_many(before, stale, now=FETCHED).state.state == "delivered"


# --- 429 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "seconds"),
    [
        ("Quota exceeded. Please try again in 1 second(s).", 1.0),
        ("Quota exceeded. Please try again in 17 second(s).", 17.0),
        ("quota exceeded. please TRY AGAIN IN 2.5 seconds", 2.5),
        ("Quota exceeded.", 1.0),
        (None, 1.0),
        (42, 1.0),
        ("Please try again in 99999999 second(s).", 3600.0),
    ],
)
def test_parse_retry_after(message: object, seconds: float) -> None:
    assert parse_retry_after(message) == seconds


def test_parse_retry_after_default() -> None:
    assert parse_retry_after("Too many requests", default=5.0) == 5.0


# --- the pacer -----------------------------------------------------------------------------------------


def test_pacer_spaces_the_next_send_from_the_previous_answer() -> None:
    p = Pacer(interval=1.0, margin=0.05)
    assert p.acquire("a", 0.0)
    assert p.wait_time("a", 0.5) == math.inf and not p.acquire("a", 5.0)  # one in flight per key
    assert p.acquire("b", 0.0)  # other subaccounts are independent
    p.done("a", 0.3)  # answered 0.3 s after the send: the next send waits from there
    assert p.wait_time("a", 0.3) == pytest.approx(1.05)
    assert not p.acquire("a", 1.3)
    assert p.acquire("a", 1.35)
    p.done("a", 1.36)
    assert p.wait_time("a", 9.0) == 0.0  # no saving up: the wait is from the last answer only


def test_pacer_429_waits_what_8x8_asked_then_slows_down_until_a_quiet_cooldown() -> None:
    p = Pacer(interval=1.0, margin=0.05, slow_factor=2.0, cooldown=60.0)
    p.acquire("a", 0.0)
    p.done("a", 0.1, retry_after=3.0)
    assert p.slowed("a", 0.2)
    assert p.wait_time("a", 0.1) == pytest.approx(3.05)
    assert p.acquire("a", 3.15)
    p.done("a", 3.2)
    assert p.wait_time("a", 3.2) == pytest.approx(2.05)  # half-open: twice the spacing
    p.acquire("a", 5.25)
    p.done("a", 5.3, retry_after=1.0)  # a second 429 doubles the slow spacing again
    assert p.spacing("a", 5.3) == pytest.approx(4.05)
    assert p.wait_time("a", 5.3) == pytest.approx(4.05)
    later = 5.3 + 1.0 + 60.0
    assert not p.slowed("a", later) and p.spacing("a", later) == pytest.approx(1.05)
    p.acquire("a", later)
    p.done("a", later + 0.01)
    assert p.wait_time("a", later + 0.01) == pytest.approx(1.05)  # the circuit closed


def test_pacer_short_retry_after_never_shortens_the_spacing() -> None:
    p = Pacer(interval=1.0, margin=0.05)
    p.acquire("a", 0.0)
    p.done("a", 0.0, retry_after=0.0)
    assert p.wait_time("a", 0.0) >= 1.05


def test_pacer_prune_forgets_idle_keys_only() -> None:
    p = Pacer(interval=1.0, margin=0.0, cooldown=10.0)
    p.acquire("a", 0.0)
    p.acquire("b", 0.0)
    p.done("b", 0.0)
    p.acquire("c", 0.0)
    p.done("c", 0.0, retry_after=1.0)
    assert p.prune(0.5) == 0
    assert p.prune(1.0) == 1 and len(p) == 2  # b; a is in flight, c is slowed
    assert p.prune(11.0) == 1 and len(p) == 1


def test_pacer_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="interval"):
        Pacer(interval=0)
    with pytest.raises(ValueError, match="margin"):
        Pacer(margin=-1)
    with pytest.raises(ValueError, match="slow_factor"):
        Pacer(slow_factor=0.5)


def _simulate(keys: int, requests: int, margin: float, seed: int, limited: bool) -> dict[str, list[float]]:
    """Many keys each sending as soon as the pacer allows, on a fake clock, with random network delays on
    the way there and back (jitter: a slow request followed by a fast one) and random 429s; returns the
    ARRIVAL times at the server per key."""
    rng = random.Random(seed)
    p = Pacer(interval=1.0, margin=margin)
    arrived: dict[str, list[float]] = defaultdict(list)
    wanted = {f"sub-{k}": requests for k in range(keys)}
    events: list[tuple[float, str, float]] = []  # (answer time, key, arrival time)
    now = 0.0
    while any(wanted.values()) or events:
        now += rng.choice([0.0, 0.001, 0.05, 0.3, 0.999, 1.0, 1.7])
        for answer_at, key, _ in sorted(e for e in events if e[0] <= now):
            events.remove(next(e for e in events if e[0] == answer_at and e[1] == key))
            p.done(key, answer_at, rng.choice([1.0, 2.0]) if limited and rng.random() < 0.05 else None)
        for key in rng.sample(sorted(wanted), len(wanted)):
            for _ in range(rng.randint(1, 3)):  # several attempts in the same instant
                if wanted[key] and p.acquire(key, now):
                    there = now + rng.choice([0.0, 0.001, 0.2, 0.9])
                    arrived[key].append(there)
                    events.append((there + rng.choice([0.0, 0.001, 0.4]), key, there))
                    wanted[key] -= 1
        if rng.random() < 0.1:
            p.prune(now)
    return arrived


@settings(max_examples=60, deadline=None)
@given(
    keys=st.integers(1, 30),
    requests=st.integers(1, 12),
    margin=st.sampled_from([0.0, 0.05]),
    seed=st.integers(0, 2**32),
    limited=st.booleans(),
)
def test_pacer_arrivals_never_closer_than_the_limit_whatever_the_network_delays(
    keys: int, requests: int, margin: float, seed: int, limited: bool
) -> None:
    arrived = _simulate(keys, requests, margin, seed, limited)
    assert len(arrived) == keys
    for times in arrived.values():
        assert len(times) == requests
        assert all(b - a >= 1.0 + margin - 1e-9 for a, b in itertools.pairwise(times))


# --- which messages, and when again -------------------------------------------------------------------


def _row(
    umid: str, sub: str, age_s: float, *, final: bool = False, status_age: float | None = None
) -> dict[str, Any]:
    return {
        "umid": umid,
        "sub_account_id": sub,
        "final": final,
        "status_at": FETCHED - timedelta(seconds=age_s if status_age is None else status_age),
        "updated_at": FETCHED - timedelta(seconds=age_s),
        "channel_path": "viber>whatsapp",
    }


def test_select_candidates_not_final_and_quiet_long_enough() -> None:
    rows = [
        _row("old", "a", 3600),
        _row("final", "a", 3600, final=True),
        _row("fresh", "a", 60),
        _row("recent-event", "a", 3600, status_age=10),  # event time recent although processed long ago
        _row("older", "b", 7200),
        _row("edge", "b", 900),
    ]
    got = select_candidates(rows, FETCHED, 900)
    assert [c.umid for c in got] == ["older", "old", "edge"]
    assert got[0].channels == ("viber", "whatsapp") and got[0].sub_account_id == "b"
    assert [c.umid for c in select_candidates(rows, FETCHED, 900, per_subaccount=1)] == ["older", "old"]
    assert [c.umid for c in select_candidates(rows, FETCHED, 900, limit=1)] == ["older"]


def test_schedule_backs_off_and_skips_not_due() -> None:
    sched = CheckSchedule(base=timedelta(seconds=900), not_found_after=timedelta(hours=6))
    rows = [_row("x", "a", 3600), _row("gone", "a", 3600), _row("flaky", "a", 3600)]
    assert sched.record("x", Outcome.RECEIPTS, FETCHED) == FETCHED + timedelta(seconds=900)
    assert sched.record("gone", Outcome.NOT_FOUND, FETCHED) == FETCHED + timedelta(hours=6)
    assert sched.record("flaky", Outcome.FAILED, FETCHED) == FETCHED + timedelta(seconds=900)
    assert select_candidates(rows, FETCHED, 900, sched) == []
    later = FETCHED + timedelta(seconds=900)
    assert [c.umid for c in select_candidates(rows, later, 900, sched)] == ["flaky", "x"]
    # each answered lookup doubles the wait, up to max_backoff; failures do not count
    assert sched.record("x", Outcome.RECEIPTS, later) == later + timedelta(seconds=1800)
    assert sched.attempts("x") == 2 and sched.attempts("flaky") == 0
    for _ in range(20):
        due = sched.record("x", Outcome.RECEIPTS, later)
    assert due == later + timedelta(hours=24)
    assert sched.record("gone", Outcome.NOT_FOUND, later) == later + timedelta(hours=12)


def test_schedule_stays_bounded() -> None:
    sched = CheckSchedule(base=timedelta(seconds=1), max_entries=3)
    for i in range(5):
        sched.record(f"u{i}", Outcome.RECEIPTS, FETCHED)
    assert len(sched) == 3 and sched.due("u0", FETCHED) and not sched.due("u4", FETCHED)
    with pytest.raises(ValueError):
        CheckSchedule(base=timedelta(0))
