"""sinks.present: the store's rows -> 8x8's JSON shapes (pure)."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors.conversation import call_permission_granted, window_open
from schemas.models import MessageState, User
from sinks import present as P
from sinks import rows as R
from sinks.rows import PiiPolicy
from sinks.store import StoredMessage
from tests.unit.sinks.test_rows import T0, conversation, conversation_row, fallback_state, state, step

DEFAULT_PII = PiiPolicy()


def records(s: MessageState, pii: PiiPolicy = DEFAULT_PII) -> list[dict[str, object]]:
    message, steps = R.state_rows(s, pii)
    return P.detail_records(message, steps, clear=pii.clear)


def test_detail_records_match_8x8_second_example_for_the_fallback_step() -> None:
    s = fallback_state()
    s = state(version=4, steps=s.steps, user=User(msisdn="+639221101234"), read_at=s.read_at, final=True)
    assert records(s)[1] == {
        "umid": "u-1",
        "subAccountId": "acme_01",
        "channel": "WhatsApp",
        "channelId": "904d1303-5754-e911-8154-020897df5459",
        "direction": "outbound",
        "country": "SG",
        "status": {"state": "read", "timestamp": "2020-06-17T04:25:21.06Z"},
        "user": {"msisdn": "+63922110xxxx"},
        "contentType": "Text",
        "content": "**MASKED**",
        "createdAt": "2020-06-17T04:15:21.06Z",
        "clientMessageId": "client message id",
        "clientBatchId": "client batch id",
        "batchId": "c9c01382-38bf-4e27-8962-ae0684ab56c3",
        "step": 2,
    }


def test_detail_records_keep_8x8_key_order_and_required_keys() -> None:
    first = records(fallback_state())[0]
    assert list(first) == [
        "umid",
        "subAccountId",
        "channel",
        "channelId",
        "direction",
        "status",
        "user",
        "contentType",
        "content",
        "createdAt",
        "clientMessageId",
        "clientBatchId",
        "batchId",
        "step",
    ]
    assert first["channel"] == "Viber"
    assert first["channelId"] is None  # required: present even when unknown
    assert first["contentType"] is None
    assert first["createdAt"] == "2020-06-17T04:15:21.06Z"  # from the step that knows it
    assert first["status"] == {
        "state": "undelivered",
        "detail": "rejected_by_operator",
        "errorCode": 7,
        "errorMessage": "Invalid message length",
        "timestamp": "2020-06-17T04:15:21.06Z",
    }
    assert first["user"] == {"msisdn": "+63922110xxxx", "channelUserId": "cu-1"}


def test_created_at_falls_back_to_the_first_event_when_never_reported() -> None:
    s = state(steps=(step(1, "sms", "sent", T0),))
    assert records(s)[0]["createdAt"] == "2020-06-17T04:15:21.06Z"


def test_clear_policy_shows_the_number_and_no_masked_content() -> None:
    first = records(fallback_state(), PiiPolicy(clear=True))[0]
    assert first["user"]["msisdn"] == "+639221101234"  # type: ignore[index]
    assert "content" not in first


@pytest.mark.parametrize(
    ("stored", "shown"),
    [
        ("sms", "SMS"),
        ("whatsapp", "WhatsApp"),
        ("rcs", "RCS"),
        ("viber", "Viber"),
        ("line", "Line"),
        ("wechat", "WeChat"),
        ("kakao", "Kakao"),
        ("zalo", "Zalo"),
        ("facebook", "Facebook"),
        ("carrierpigeon", "carrierpigeon"),
    ],
)
def test_display_channel_uses_8x8_casing(stored: str, shown: str) -> None:
    assert P.display_channel(stored) == shown


def test_summary_record_describes_the_path() -> None:
    message, _ = R.state_rows(fallback_state(), PiiPolicy())
    summary = P.summary_record(message)
    assert summary["channelPath"] == ["Viber", "WhatsApp"]
    assert summary["fellBack"] is True
    assert summary["status"] == {"state": "read", "timestamp": "2020-06-17T04:25:21.06Z"}


@given(
    now_offset=st.integers(min_value=-3 * 86_400, max_value=10 * 86_400),
    response=st.sampled_from([None, "accept", "reject"]),
    permanent=st.sampled_from([None, False, True]),
    until_offset=st.one_of(st.none(), st.integers(min_value=-86_400, max_value=8 * 86_400)),
    window=st.booleans(),
)
def test_conversation_record_evaluates_now_like_the_processor(
    now_offset: int, response: str | None, permanent: bool | None, until_offset: int | None, window: bool
) -> None:
    conv = conversation(
        call_permission=response,
        call_permission_at=T0 if response else None,
        call_permission_until=None if until_offset is None else T0 + timedelta(seconds=until_offset),
        call_permission_permanent=permanent,
        window_open_until=(T0 + timedelta(hours=24)) if window else None,
    )
    now = T0 + timedelta(seconds=now_offset)
    record = P.conversation_record(conversation_row(conv), now)
    assert record["windowOpen"] is window_open(conv, now)
    assert record["callPermission"]["granted"] is call_permission_granted(conv, now)


def test_conversation_record_reads_json_text_and_shows_the_masked_number() -> None:
    row = conversation_row(conversation())
    row["counts_by_type"] = '{"Text":2,"Interactive":1}'  # as SQLite stores it
    row["call_permission_permanent"] = None
    record = P.conversation_record(row, T0)
    assert record["countsByType"] == {"Interactive": 1, "Text": 2}
    assert record["user"] == {"msisdn": "+658196xxxx", "channelUserId": "BSUID.1"}
    assert record["callPermission"] == {
        "response": None,
        "at": None,
        "until": None,
        "permanent": None,
        "granted": False,
    }
    assert (record["windowOpen"], record["windowOpenUntil"]) == (True, "2020-06-18T04:20:21.06Z")


# --- a stored message -> the read API's data[] -----------------------------------------------------


def stored(s: MessageState, **kw: object) -> StoredMessage:
    message, steps = R.state_rows(s, DEFAULT_PII)
    fields: dict[str, object] = {"looked_up": None, "channel_ids": {}, "clear": False}
    fields.update(kw)
    return StoredMessage(message, tuple(steps), **fields)  # type: ignore[arg-type]


def test_message_details_fill_what_the_lookup_and_inbound_messages_said_then_the_operators_ids() -> None:
    s = state(steps=(step(1, "viber", "sent", T0), step(2, "sms", "delivered", T0 + timedelta(minutes=1))))
    looked_up = [
        {"channel": "Viber", "step": 1, "channelId": "vb-1", "country": "SG",
         "createdAt": "2020-06-17T04:00Z"},
        {"channel": "SMS", "step": 2, "contentType": "Text"},
    ]  # fmt: skip
    found = stored(s, looked_up=looked_up)
    viber, sms = P.message_details(found, {("acme_01", "sms"): "op-sms"})
    assert (viber["channelId"], viber["country"]) == ("vb-1", "SG")
    assert viber["createdAt"] == "2020-06-17T04:00:00Z"
    assert (viber["contentType"], sms["contentType"]) == (P.UNKNOWN, "Text")  # required strings: never null
    assert sms["channelId"] == "op-sms"  # the operator's map, where nothing else knew it
    assert sms["createdAt"] == "2020-06-17T04:00:00Z"  # the earliest known submission time stands in
    by_inbound = P.message_details(stored(s, channel_ids={"sms": "in-sms"}), {("acme_01", "sms"): "op-sms"})
    assert by_inbound[1]["channelId"] == "in-sms"  # the subaccount's own inbound channelId wins


def test_message_details_are_the_stored_details_completed() -> None:
    found = stored(fallback_state())
    assert P.stored_details(found) == P.detail_records(found.message, found.steps)
    assert P.message_details(found) == P.complete_details(P.stored_details(found))
    assert P.message_details(stored(fallback_state(), clear=True))[0].get("content") is None
    assert P.message_details(stored(fallback_state()))[0]["content"] == "**MASKED**"
    assert P.message_details(dataclasses.replace(found, steps=())) == []  # the API answers 404


def test_inbound_record_speaks_the_inbound_webhook_vocabulary() -> None:
    row = {
        "umid": "in-1", "sub_account_id": "acme_01", "channel": "whatsapp", "channel_id": "ch-1",
        "type": "Interactive", "ts": T0, "msisdn_masked": "+658196xxxx", "channel_user_id": None,
        "text": None, "url": None, "payload": None, "interactive_type": "button_reply",
        "button_reply_id": "b-1", "button_reply_title": "Yes", "list_reply_id": None,
        "list_reply_title": None, "list_reply_description": None, "reply_to_umid": "u-1",
    }  # fmt: skip
    assert P.inbound_record(row) == {
        "umid": "in-1",
        "subAccountId": "acme_01",
        "channel": "WhatsApp",
        "channelId": "ch-1",
        "direction": "inbound",
        "type": "Interactive",
        "timestamp": "2020-06-17T04:15:21.06Z",
        "user": {"msisdn": "+658196xxxx"},
        "content": {"interactive": {"type": "button_reply", "buttonReply": {"id": "b-1", "title": "Yes"}}},
        "replyToUmid": "u-1",
    }
