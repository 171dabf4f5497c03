"""sinks.rows: masking, hashing, row shapes and the 8x8 read shapes. Pure, no I/O."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.models import (
    ButtonReply,
    Conversation,
    InboundContent,
    InboundMessage,
    Interactive,
    MessageState,
    StatusEvent,
    Step,
    User,
)
from sinks import rows as R
from sinks.rows import MASKED, PiiPolicy

T0 = datetime(2020, 6, 17, 4, 15, 21, 60000, tzinfo=UTC)
KEY = b"test-key"


def step(n: int, channel: str, state: str, at: datetime, **kw: object) -> Step:
    history = kw.pop(
        "history",
        (StatusEvent("sent", at),)
        if state == "sent"
        else (StatusEvent("sent", at - timedelta(seconds=1)), StatusEvent(state, at)),
    )
    return Step(
        step=n,
        channel=channel,
        state=state,
        status_timestamp=at,
        first_event_at=history[0].timestamp,
        history=history,
        **kw,
    )  # type: ignore[arg-type]


def state(
    umid: str = "u-1", version: int = 1, steps: tuple[Step, ...] | None = None, **kw: object
) -> MessageState:
    steps = (
        steps
        if steps is not None
        else (step(1, "whatsapp", "delivered", T0, detail="delivered_to_recipient"),)
    )
    last = steps[-1]
    fields: dict[str, object] = {
        "umid": umid,
        "sub_account_id": "acme_01",
        "version": version,
        "state": last.state,
        "detail": last.detail,
        "status_timestamp": last.status_timestamp,
        "steps": steps,
        "updated_at": last.status_timestamp + timedelta(seconds=1),
        "user": User(msisdn="+639221101234", channel_user_id="cu-1"),
        "batch_id": "c9c01382-38bf-4e27-8962-ae0684ab56c3",
        "client_message_id": "client message id",
        "client_batch_id": "client batch id",
    }
    fields.update(kw)
    return MessageState(**fields)  # type: ignore[arg-type]


# --- PII ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("msisdn", "masked"),
    [
        ("+6581968289", "+658196xxxx"),
        ("+639221101234", "+63922110xxxx"),
        (" +6581968289 ", "+658196xxxx"),
        ("6581968289", "658196xxxx"),
        ("1234", "xxxx"),
        ("+12", "+xx"),
        (None, None),
        ("", None),
    ],
)
def test_mask_msisdn_masks_the_last_four_digits_like_8x8(msisdn: str | None, masked: str | None) -> None:
    assert PiiPolicy().mask_msisdn(msisdn) == masked
    assert PiiPolicy(clear=True).mask_msisdn(msisdn) == masked


@given(st.from_regex(r"\+[1-9][0-9]{7,14}", fullmatch=True))
def test_masking_keeps_length_and_country_prefix(msisdn: str) -> None:
    masked = PiiPolicy.mask_msisdn(msisdn)
    assert masked is not None
    assert len(masked) == len(msisdn)
    assert masked.endswith("xxxx")
    assert masked[:-4] == msisdn[:-4]


def test_hash_msisdn_is_hmac_sha256_hex_with_the_key() -> None:
    expected = hmac.new(KEY, b"+6581968289", hashlib.sha256).hexdigest()
    assert PiiPolicy(hash_key=KEY).hash_msisdn("+6581968289") == expected
    assert PiiPolicy(hash_key=b"other").hash_msisdn("+6581968289") != expected
    assert PiiPolicy(hash_key=KEY).hash_msisdn(None) is None


def test_text_is_masked_unless_clear() -> None:
    assert PiiPolicy().text("hello") == MASKED
    assert PiiPolicy(clear=True).text("hello") == "hello"
    assert PiiPolicy().text(None) is None


def test_repr_hides_the_hash_key() -> None:
    assert "test-key" not in repr(PiiPolicy(hash_key=KEY))


def test_hash_key_must_be_bytes() -> None:
    with pytest.raises(ValueError, match="bytes"):
        PiiPolicy(hash_key="text")  # type: ignore[arg-type]


# --- rows --------------------------------------------------------------------------------------


def fallback_state() -> MessageState:
    s1 = step(
        1,
        "viber",
        "undelivered",
        T0,
        detail="rejected_by_operator",
        error_code=7,
        error_message="Invalid message length",
    )
    s2 = step(
        2,
        "whatsapp",
        "read",
        T0 + timedelta(minutes=10),
        read_at=T0 + timedelta(minutes=10),
        channel_id="904d1303-5754-e911-8154-020897df5459",
        country="SG",
        content_type="Text",
        created_at=T0,
    )
    return state(version=4, steps=(s1, s2), read_at=s2.read_at, final=True)


def test_state_rows_have_exactly_the_shared_columns() -> None:
    message, steps = R.state_rows(fallback_state(), PiiPolicy(hash_key=KEY))
    assert tuple(message) == R.MESSAGE_COLUMNS
    assert all(tuple(s) == R.STEP_COLUMNS for s in steps)
    assert message["channel_path"] == "viber>whatsapp"
    assert message["current_channel"] == "whatsapp"
    assert message["fell_back"] is True
    assert message["step_count"] == 2
    assert message["final"] is True
    assert [s["step"] for s in steps] == [1, 2]
    assert {s["version"] for s in steps} == {4}
    assert steps[0]["error_code"] == 7


def test_state_rows_hold_no_clear_msisdn_by_default() -> None:
    message, _ = R.state_rows(fallback_state(), PiiPolicy(hash_key=KEY))
    assert message["msisdn_masked"] == "+63922110xxxx"
    assert message["msisdn_hash"] == PiiPolicy(hash_key=KEY).hash_msisdn("+639221101234")
    assert message["msisdn"] is None
    clear, _ = R.state_rows(fallback_state(), PiiPolicy(clear=True, hash_key=KEY))
    assert clear["msisdn"] == "+639221101234"
    assert clear["msisdn_masked"] == "+63922110xxxx"


def test_status_event_rows_flatten_every_step_history() -> None:
    events = R.status_event_rows(fallback_state())
    assert len(events) == 4
    assert all(tuple(e) == R.EVENT_COLUMNS for e in events)
    assert [(e["step"], e["state"]) for e in events] == [
        (1, "sent"),
        (1, "undelivered"),
        (2, "sent"),
        (2, "read"),
    ]


def test_latest_states_keeps_the_highest_version_per_umid() -> None:
    a1, a3, a2, b1 = state("a", 1), state("a", 3), state("a", 2), state("b", 1)
    assert R.latest_states([a1, a3, b1, a2]) == [a3, b1]


def inbound(**kw: object) -> InboundMessage:
    fields: dict[str, object] = {
        "umid": "in-1",
        "sub_account_id": "acme_01",
        "timestamp": T0,
        "channel": "whatsapp",
        "type": "Interactive",
        "received_at": T0,
        "raw_json": '{"secret": true}',
        "channel_id": "ch-1",
        "user": User(msisdn="+6581968289", channel_user_id="6581968289", name="Ann"),
        "content": InboundContent(
            text="my address is ...",
            interactive=Interactive("buttonReply", button_reply=ButtonReply("yes", "Yes")),
        ),
    }
    fields.update(kw)
    return InboundMessage(**fields)  # type: ignore[arg-type]


def test_inbound_row_masks_content_and_drops_clear_only_fields() -> None:
    row = R.inbound_row(inbound(), PiiPolicy(hash_key=KEY))
    assert tuple(row) == R.INBOUND_COLUMNS
    assert row["text"] == MASKED
    assert row["raw_json"] is None
    assert row["msisdn"] is None
    assert row["user_name"] is None
    assert row["msisdn_masked"] == "+658196xxxx"
    assert row["interactive_type"] == "buttonReply"
    assert (row["button_reply_id"], row["button_reply_title"]) == ("yes", "Yes")


def test_inbound_row_keeps_everything_when_clear() -> None:
    row = R.inbound_row(inbound(), PiiPolicy(clear=True))
    assert row["text"] == "my address is ..."
    assert row["raw_json"] == '{"secret": true}'
    assert row["msisdn"] == "+6581968289"
    assert row["user_name"] == "Ann"


# --- 8x8 shapes --------------------------------------------------------------------------------


def test_fixed_iso_sorts_like_time() -> None:
    times = [T0, T0.replace(microsecond=0), T0 + timedelta(days=400), T0 - timedelta(microseconds=1)]
    assert sorted(times) == sorted(times, key=R.fixed_iso)


def test_event_key_is_the_dedup_identity_of_an_event() -> None:
    s = state(
        steps=(
            step(
                1,
                "sms",
                "undelivered",
                T0,
                history=(StatusEvent("sent", T0), StatusEvent("undelivered", T0, error_code=7)),
            ),
        )
    )
    keys = [R.event_key(e) for e in R.event_values(s)]
    assert keys == [("u-1", 1, "sent", "", T0), ("u-1", 1, "undelivered", "", T0)]
    assert [R.as_tuple(r, R.EVENT_COLUMNS) for r in R.status_event_rows(s)] == R.event_values(s)


def test_the_tuple_builders_follow_the_column_lists() -> None:
    s = fallback_state()
    message, steps = R.state_rows(s, PiiPolicy(hash_key=KEY))
    assert R.message_values(s, PiiPolicy(hash_key=KEY)) == R.as_tuple(message, R.MESSAGE_COLUMNS)
    assert R.step_values(s) == [R.as_tuple(r, R.STEP_COLUMNS) for r in steps]
    assert message["channel_path"] == s.channel_path and message["fell_back"] is True


def test_inbound_cursor_round_trips_and_rejects_garbage() -> None:
    row = {"ts": T0, "umid": "in-1|odd"}
    assert R.parse_inbound_cursor(R.inbound_cursor(row)) == (T0, "in-1|odd")
    for bad in ("", "nonsense", "2020-06-17T04:15:21.060000Z|", "2020-13-01T00:00:00Z|u", "x|u"):
        with pytest.raises(ValueError, match="malformed cursor"):
            R.parse_inbound_cursor(bad)


# --- conversations ---------------------------------------------------------------------------------


def conversation(
    user: str | None = "BSUID.1", msisdn: str | None = "+6581968289", **kw: object
) -> Conversation:
    key_user = user or msisdn or ""
    fields: dict[str, object] = {
        "key": f"acme_01|whatsapp|ch-1|{key_user}",
        "sub_account_id": "acme_01",
        "channel": "whatsapp",
        "user_key": key_user,
        "version": 3,
        "first_inbound_at": T0,
        "last_inbound_at": T0 + timedelta(minutes=5),
        "last_umid": "in-3",
        "last_type": "Text",
        "updated_at": T0 + timedelta(minutes=5, seconds=1),
        "channel_id": "ch-1",
        "user": User(msisdn=msisdn, channel_user_id=user),
        "message_count": 3,
        "counts_by_type": (("Interactive", 1), ("Text", 2)),
        "window_open_until": T0 + timedelta(hours=24, minutes=5),
    }
    fields.update(kw)
    return Conversation(**fields)  # type: ignore[arg-type]


KEYED_PII = PiiPolicy(hash_key=KEY)


def conversation_row(conv: Conversation, pii: PiiPolicy = KEYED_PII) -> dict[str, object]:
    return dict(zip(R.CONVERSATION_COLUMNS, R.conversation_values(conv, pii), strict=True))


def test_conversation_row_is_keyed_by_the_keyed_hash_and_holds_no_clear_number() -> None:
    by_number = conversation_row(conversation(None))
    assert (
        by_number["key_hash"]
        == hmac.new(KEY, b"acme_01|whatsapp|ch-1|+6581968289", hashlib.sha256).hexdigest()
    )
    assert by_number["conversation_key"] is None and by_number["msisdn"] is None
    assert by_number["user_key"] == by_number["msisdn_masked"] == "+658196xxxx"
    assert by_number["user_key_hash"] == by_number["msisdn_hash"] == KEYED_PII.hash_msisdn("+6581968289")
    assert "81968289" not in repr(by_number)
    by_id = conversation_row(conversation("BSUID.1"))
    assert (by_id["user_key"], by_id["channel_user_id"]) == ("BSUID.1", "BSUID.1")
    assert by_id["user_key_hash"] == KEYED_PII.hash_msisdn("BSUID.1")
    assert conversation_row(conversation("6581968289"))["user_key"] == "658196xxxx"  # a number by its look
    assert by_id["counts_by_type"] == {"Interactive": 1, "Text": 2}


def test_conversation_row_keeps_the_key_in_clear_when_clear() -> None:
    pii = PiiPolicy(clear=True, hash_key=KEY)
    row = conversation_row(conversation(None), pii)
    assert (row["conversation_key"], row["user_key"], row["msisdn"]) == (
        "acme_01|whatsapp|ch-1|+6581968289",
        "+6581968289",
        "+6581968289",
    )
    assert row["key_hash"] == conversation_row(conversation(None))["key_hash"]  # same row either way


def test_latest_conversations_keeps_the_highest_version_per_key() -> None:
    a1, a3, b2 = conversation(version=1), conversation(version=3), conversation("B", version=2)
    assert R.latest_conversations([a1, b2, a3, a1]) == [a3, b2]


@given(
    st.datetimes(
        min_value=datetime(1000, 1, 1),
        max_value=datetime(9999, 12, 30),  # -07:00 near datetime.max would leave datetime's range in UTC
        timezones=st.sampled_from([UTC, timezone(timedelta(hours=-7))]),
    )
)
def test_fixed_iso_is_utc_with_six_fraction_digits(value: datetime) -> None:
    expected = value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert R.fixed_iso(value) == expected
    assert datetime.fromisoformat(R.fixed_iso(value)) == value


def test_fixed_iso_pads_small_years_so_text_order_is_time_order() -> None:
    early, late = datetime(5, 1, 1, tzinfo=UTC), datetime(1999, 1, 1, tzinfo=UTC)
    assert R.fixed_iso(early) == "0005-01-01T00:00:00.000000Z"
    assert R.fixed_iso(early) < R.fixed_iso(late)


# --- resolve_lineages: which states a store writes ---------------------------------------------------


def _lineage_states() -> tuple[Any, Any, Any]:
    from processors.state import apply_many
    from schemas.models import DeliveryReceipt, Status, User

    def r(state: str, s: int, channel: str = "whatsapp") -> DeliveryReceipt:
        ts = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=s)
        user = User(msisdn="+6590000001")
        return DeliveryReceipt("u-1", "acme", channel, Status(state, ts), ts, "{}", user)

    now = datetime(2026, 1, 2, tzinfo=UTC)
    a1 = dataclasses.replace(apply_many(None, [r("sent", 1)], now=now).state, lineage=5)
    a2 = apply_many(a1, [r("delivered", 2)], now=now).state
    b1 = dataclasses.replace(apply_many(None, [r("sent", 9, "sms")], now=now).state, lineage=8)
    return a1, a2, b1


def test_resolve_keeps_the_highest_version_of_one_lineage_without_reading_the_store() -> None:
    from processors.join import descends, join

    a1, a2, _ = _lineage_states()

    def no_load(umids: list[str]) -> dict[str, Any]:
        raise AssertionError(f"loaded {umids}")

    assert R.resolve_lineages([a2, a1], {}, no_load, join, descends).states == [a2]
    assert R.resolve_lineages([a1, a2], {"u-1": (1, 5)}, no_load, join, descends).states == [a2]


def test_resolve_joins_several_lineages_of_one_batch_and_a_stored_row_of_another() -> None:
    from processors.join import MERGED, descends, join

    a1, a2, b1 = _lineage_states()
    [merged] = R.resolve_lineages([a1, b1, a2], {}, lambda umids: {}, join, descends).states
    assert merged.lineage == MERGED and merged.channel_path == "whatsapp>sms"
    assert merged.version > max(a2.version, b1.version)
    # the stored row (lineage 5, version 2) is loaded only for the umid whose lineage differs
    loaded: list[list[str]] = []

    def load(umids: list[str]) -> dict[str, Any]:
        loaded.append(umids)
        return {"u-1": (a2, {"msisdn_hash": None})}

    [again] = R.resolve_lineages([b1], {"u-1": (2, 5)}, load, join, descends).states
    assert loaded == [["u-1"]] and again.channel_path == "whatsapp>sms" and again.version == 3
