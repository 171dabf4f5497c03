"""ingest.parse: documented samples parse, every bad input is an InvalidEvent naming its field."""

from __future__ import annotations

import copy
import dataclasses
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.fastreceipt import encode_receipt
from ingest.parse import (
    CODE_INVALID,
    CODE_UNSUPPORTED,
    HTTP_INVALID,
    HTTP_UNSUPPORTED,
    error_body,
    parse_webhook,
)
from schemas.errors import InvalidEvent
from schemas.models import DeliveryReceipt, InboundMessage
from tests.fixtures import webhooks

RECEIVED_AT = datetime(2026, 7, 3, 3, 45, 0, 123456, tzinfo=UTC)
DELETE = object()


def parse(body: bytes, **kwargs: Any) -> DeliveryReceipt | InboundMessage:
    return parse_webhook(body, RECEIVED_AT, **kwargs)


def doc(name: str) -> dict[str, Any]:
    return orjson.loads(webhooks.load(name))


def patched(name: str, changes: dict[str, Any]) -> bytes:
    """Fixture `name` with dotted paths set to new values (or removed with DELETE)."""
    data = doc(name)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[key]
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return orjson.dumps(data)


def without_raw(event: DeliveryReceipt | InboundMessage) -> DeliveryReceipt | InboundMessage:
    return dataclasses.replace(event, raw_json="")


def nested_lists(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


DR = "dr_v9_whatsapp_undelivered_provider_error"
IN = "in_v3_list_reply"
IN_CALL = "in_v3_call_permission_reply"
IN_LOC = "in_v3_location"


# --- documented samples ----------------------------------------------------------------------------


def test_fixture_inventory() -> None:
    assert len(webhooks.DELIVERY_RECEIPTS) >= 14
    assert len(webhooks.INBOUND_MESSAGES) >= 14
    assert set(webhooks.ALL) == set(webhooks.DELIVERY_RECEIPTS) | set(webhooks.INBOUND_MESSAGES)


@pytest.mark.parametrize("name", webhooks.ALL)
def test_every_fixture_parses(name: str) -> None:
    body = webhooks.load(name)
    event = parse(body)
    expected = DeliveryReceipt if name.startswith("dr_") else InboundMessage
    assert type(event) is expected
    assert event.raw_json == body.decode("utf-8")
    assert event.received_at == RECEIVED_AT
    assert event.channel == event.channel.lower()
    if isinstance(event, DeliveryReceipt):
        assert event.status.state == event.status.state.lower()
        assert event.status.timestamp.tzinfo is not None
    else:
        assert event.timestamp.tzinfo is not None


@pytest.mark.parametrize("name", webhooks.UNSUPPORTED)
def test_documented_but_unsupported_events_are_refused_as_unsupported(name: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse(webhooks.load(name))
    assert (info.value.code, info.value.http_status, info.value.field) == (
        CODE_UNSUPPORTED,
        HTTP_UNSUPPORTED,
        "eventType",
    )


def test_source_delivery_receipt_sample() -> None:
    event = parse(webhooks.load("dr_source_whatsapp_undelivered"))
    assert isinstance(event, DeliveryReceipt)
    assert event.umid == "5ef3c9ae-18d7-425a-a518-329de6f43d03"
    assert event.sub_account_id == "TestSubAccountId"
    assert event.channel == "whatsapp"
    assert event.status.state == "undelivered"
    assert event.status.detail == "rejected_by_operator"
    assert event.status.error_code == 15
    assert event.status.error_message == "Invalid destination"
    assert event.status.timestamp == datetime(2016, 1, 1, tzinfo=UTC)
    assert event.batch_id == "95f8bc5e-7517-eb11-815c-022a22cc1c71"
    assert event.client_message_id == "cde4ef5e-7517-eb11-8278-00155d9f27ac"
    assert event.client_batch_id == "f38ea8a7-7517-eb11-827b-00155d7d21a4"
    assert event.user.msisdn == event.user.channel_user_id == "+6581968289"
    assert event.version is None
    assert event.outbound_content_json is None


def test_v9_receipt_keeps_outbound_content_as_compact_json() -> None:
    body = webhooks.load("dr_v9_whatsapp_delivered_template")
    event = parse(body)
    assert isinstance(event, DeliveryReceipt)
    assert event.version == 9
    assert event.whatsapp_pricing_category == "marketing"
    assert event.outbound_content_json is not None
    assert " " not in event.outbound_content_json.split('"text"')[0]  # compact separators
    assert orjson.loads(event.outbound_content_json) == orjson.loads(body)["payload"]["outboundContent"]


def test_v9_receipt_whatsapp_object_and_missing_channel_user_id() -> None:
    event = parse(webhooks.load(DR))
    assert isinstance(event, DeliveryReceipt)
    assert event.whatsapp_provider_error_code == "131026"
    queued = parse(webhooks.load("dr_v9_whatsapp_queued"))
    assert queued.user.msisdn == "+6581968289" and queued.user.channel_user_id is None


def test_seven_fractional_digits_are_cut_to_microseconds() -> None:
    event = parse(webhooks.load("dr_v9_sms_queued_7_digit_fraction"))
    assert isinstance(event, DeliveryReceipt)
    assert event.status.timestamp == datetime(2020, 12, 22, 1, 24, 30, 603089, tzinfo=UTC)


def test_inbound_v3_user_fields_and_recipient() -> None:
    event = parse(webhooks.load("in_v3_whatsapp_text"))
    assert isinstance(event, InboundMessage)
    assert event.version == 3
    assert event.type == "Text"
    assert event.content.text == "WhatsApp inbound message"
    assert event.channel_id == "269a57f4-3522-eb11-8278-00155d9f27ac"
    assert event.user.channel_user_id == "SG.13491208655302741918"
    assert event.user.name == "Jane Tan"
    assert event.user.username == "jane.tan"
    assert event.timestamp == datetime(2026, 6, 9, 10, 13, 20, tzinfo=UTC)


def test_inbound_source_sample() -> None:
    event = parse(webhooks.load("in_source_whatsapp_text"))
    assert isinstance(event, InboundMessage)
    assert event.umid == "9e09ac86-bd74-5465-851d-1eb5a5fdbb9a"
    assert event.reply_to_umid == "777a57f4-bd74-eb11-851d-00155d9fer55"  # not a uuid, kept anyway
    assert event.timestamp == datetime(2016, 1, 1, 14, 34, 56, 17000, tzinfo=UTC)
    assert event.version is None


def test_inbound_interactive_replies() -> None:
    button = parse(webhooks.load("in_waref_button_reply"))
    assert isinstance(button, InboundMessage) and button.content.interactive is not None
    assert button.content.interactive.type == "button_reply"
    assert button.content.interactive.button_reply is not None
    assert button.content.interactive.button_reply.id == "option-2"
    assert button.content.interactive.button_reply.title == "FAQ"

    listed = parse(webhooks.load(IN))
    assert isinstance(listed, InboundMessage) and listed.content.interactive is not None
    reply = listed.content.interactive.list_reply
    assert reply is not None and (reply.id, reply.description) == ("slot-2", "2:00 PM - 3:00 PM")

    nfm = parse(webhooks.load("in_v3_nfm_reply"))
    assert isinstance(nfm, InboundMessage) and nfm.content.interactive is not None
    assert nfm.content.interactive.type == "nfmReply"
    flow = orjson.loads(nfm.content.interactive.nfm_response_json or "")
    assert flow["flow_token"] == "flowtoken-7f3a2c91"

    call = parse(webhooks.load(IN_CALL))
    assert isinstance(call, InboundMessage) and call.content.interactive is not None
    permission = call.content.interactive.call_permission_reply
    assert permission is not None
    assert permission.response == "accept"
    assert permission.is_permanent is False
    assert permission.expiration_timestamp == datetime(2026, 1, 23, 6, 51, 55, tzinfo=UTC)
    assert permission.response_source == "user_action"


def test_inbound_location_numbers_and_numeric_strings() -> None:
    numbers = parse(webhooks.load(IN_LOC))
    assert isinstance(numbers, InboundMessage)
    assert (numbers.content.latitude, numbers.content.longitude) == (1.2840567, 103.8510132)
    strings = parse(webhooks.load("in_v2_location_string_coordinates"))
    assert isinstance(strings, InboundMessage)
    assert strings.type == "Location" and strings.channel == "viber"
    assert (strings.content.latitude, strings.content.longitude) == (-33.8688197, 151.2092955)


# --- normalisation and leniency --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("whatsapp", "whatsapp"),
        ("WhatsApp", "whatsapp"),
        ("whatsApp", "whatsapp"),
        ("RCS", "rcs"),
        ("GoogleRCS", "rcs"),
        ("googlercs", "rcs"),
        ("LineNotification", "linenotification"),
        ("ZaloNotification", "zalonotification"),
        ("SMS", "sms"),
        ("Kakao", "kakao"),  # unknown channels are kept
    ],
)
def test_channel_normalised(given: str, expected: str) -> None:
    assert parse(patched(DR, {"payload.channel": given})).channel == expected
    assert parse(patched(IN, {"payload.recipient.channel": given})).channel == expected


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("text", "Text"),
        ("TEXT", "Text"),
        ("none", "None"),
        ("interactive", "Interactive"),
        ("document", "Document"),
        ("buttons", "Buttons"),
        ("Sticker", "Sticker"),  # unknown values kept as given
        ("reaction", "reaction"),
    ],
)
def test_inbound_type_canonical_casing(given: str, expected: str) -> None:
    event = parse(patched(IN, {"payload.type": given}))
    assert isinstance(event, InboundMessage) and event.type == expected


def test_state_detail_event_type_and_namespace_are_case_insensitive() -> None:
    body = patched(
        DR,
        {
            "namespace": "CHATAPPS",
            "eventType": "Outbound_Message_Status_Changed",
            "payload.status.state": "Undelivered",
            "payload.status.detail": "Rejected_By_Operator",
        },
    )
    event = parse(body)
    assert isinstance(event, DeliveryReceipt)
    assert (event.status.state, event.status.detail) == ("undelivered", "rejected_by_operator")
    assert without_raw(event) == without_raw(parse(webhooks.load(DR)))


@pytest.mark.parametrize(
    ("itype", "key", "field_name"),
    [
        ("BUTTON_REPLY", "button_reply", "button_reply"),
        ("buttonReply", "buttonReply", "button_reply"),
        ("List_Reply", "list_reply", "list_reply"),
        ("NFMREPLY", "nfmReply", "nfm_response_json"),
        ("nfm_reply", "NfmReply", "nfm_response_json"),
        ("callpermissionreply", "callPermissionReply", "call_permission_reply"),
    ],
)
def test_interactive_type_matched_case_insensitively(itype: str, key: str, field_name: str) -> None:
    sub = {
        "button_reply": {"id": "b1", "title": "Yes"},
        "list_reply": {"id": "r1", "title": "Row", "description": "d"},
        "nfm_response_json": {"responseJson": '{"a":1}'},
        "call_permission_reply": {"response": "reject", "isPermanent": True},
    }[field_name]
    event = parse(patched(IN, {"payload.content.interactive": {"type": itype, key: sub}}))
    assert isinstance(event, InboundMessage) and event.content.interactive is not None
    assert event.content.interactive.type == itype  # kept as given
    assert getattr(event.content.interactive, field_name) is not None


def test_unknown_interactive_type_is_kept_without_sub_objects() -> None:
    body = patched(IN, {"payload.content.interactive": {"type": "product_reply", "product_reply": {"x": 1}}})
    event = parse(body)
    assert isinstance(event, InboundMessage) and event.content.interactive is not None
    assert event.content.interactive.type == "product_reply"
    assert event.content.interactive.button_reply is None and event.content.interactive.list_reply is None


@pytest.mark.parametrize(
    ("name", "changes", "check"),
    [
        (DR, {"payload.status.errorCode": "15"}, lambda e: e.status.error_code == 15),
        (DR, {"payload.status.errorCode": " 2000 "}, lambda e: e.status.error_code == 2000),
        (DR, {"payload.status.errorCode": None}, lambda e: e.status.error_code is None),
        (
            DR,
            {"payload.whatsapp.providerErrorCode": 131026},
            lambda e: e.whatsapp_provider_error_code == "131026",
        ),
        (DR, {"payload.whatsapp": None}, lambda e: e.whatsapp_provider_error_code is None),
        (DR, {"payload.status.detail": ""}, lambda e: e.status.detail is None),
        (DR, {"payload.status.detail": DELETE}, lambda e: e.status.detail is None),
        (DR, {"payload.user": None}, lambda e: e.user.msisdn is None),
        (DR, {"payload.user": {}}, lambda e: e.user.channel_user_id is None),
        (DR, {"payload.batchId": None}, lambda e: e.batch_id is None),
        (DR, {"version": "9"}, lambda e: e.version == 9),
        (DR, {"payload.version": 8}, lambda e: e.version == 9),  # the envelope wins
        ("dr_v8_whatsapp_read", {"payload.version": 8}, lambda e: e.version == 8),
        (
            DR,
            {"payload.status.timestamp": "2026-07-03T11:30:12+08:00"},
            lambda e: e.status.timestamp == datetime(2026, 7, 3, 3, 30, 12, tzinfo=UTC),
        ),
        (DR, {"payload.umid": "x" * 100}, lambda e: len(e.umid) == 100),
        (DR, {"payload.umid": "msg-42"}, lambda e: e.umid == "msg-42"),  # non-uuid umids are accepted
        (IN, {"payload.content": None}, lambda e: e.content.interactive is None),
        (IN, {"payload.recipient.channelId": DELETE}, lambda e: e.channel_id is None),
        (
            IN,
            {"payload.content.interactive.list_reply": DELETE},
            lambda e: e.content.interactive.list_reply is None,
        ),
        (
            "in_v3_nfm_reply",
            {"payload.content.interactive.nfmReply.responseJson": {"flow_token": "t"}},
            lambda e: e.content.interactive.nfm_response_json == '{"flow_token":"t"}',
        ),
        (IN_LOC, {"payload.content.location.latitude": "-90"}, lambda e: e.content.latitude == -90.0),
        (IN_LOC, {"payload.content.location.longitude": 180}, lambda e: e.content.longitude == 180.0),
        (
            IN_CALL,
            {"payload.content.interactive.callPermissionReply.expirationTimestamp": None},
            lambda e: True,
        ),
    ],
)
def test_lenient_inputs_accepted(name: str, changes: dict[str, Any], check: Any) -> None:
    assert check(parse(patched(name, changes)))


def test_utf8_bom_is_tolerated_and_raw_kept_exactly() -> None:
    body = b"\xef\xbb\xbf" + webhooks.load(DR)
    event = parse(body)
    assert event.raw_json == body.decode("utf-8")
    assert without_raw(event) == without_raw(parse(webhooks.load(DR)))


def test_nesting_limit_is_inclusive_and_configurable() -> None:
    def nested(levels: int) -> dict[str, Any]:
        value: dict[str, Any] = {}
        for _ in range(levels - 1):
            value = {"n": value}
        return value

    # the envelope is depth 1, so an extra top-level field holding `n` levels reaches depth n + 1
    ok = patched(DR, {"extra": nested(31)})
    parse(ok)
    with pytest.raises(InvalidEvent) as info:
        parse(patched(DR, {"extra": nested(32)}))
    assert info.value.reason == "body: JSON nesting deeper than 32"
    parse(patched(DR, {"extra": nested(32)}), max_depth=33)
    with pytest.raises(InvalidEvent):
        parse(webhooks.load(DR), max_depth=2)
    with pytest.raises(ValueError):
        parse(webhooks.load(DR), max_depth=0)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    event = parse(patched(DR, {"payload.status.errorMessage": "[" * 100 + "{" * 100}))
    assert isinstance(event, DeliveryReceipt) and event.status.error_message is not None


# --- bad input: one row per class, each naming its field -------------------------------------------


def bad(case_id: str, body: bytes, reason: str, *, unsupported: bool = False) -> Any:
    """One bad-input row; the expected field is the reason's prefix. A reason ending in `…` is a prefix."""
    field = reason.split(": ", 1)[0]
    return pytest.param(body, CODE_UNSUPPORTED if unsupported else CODE_INVALID, field, reason, id=case_id)


BAD = [
    bad("empty", b"", "body: empty"),
    bad("whitespace", b" \r\n\t", "body: empty"),
    bad("not_json", b"hello", "body: not valid JSON (line 1 column 1)"),
    bad("truncated", b'{"a": ', "body: not valid JSON (line 1 column 7)"),
    bad("second_line", b'{\n  "a": tru}', "body: not valid JSON (line 2 column…"),
    bad("trailing_garbage", b"{} x", "body: not valid JSON…"),
    bad("nan", b'{"a": NaN}', "body: not valid JSON…"),
    bad("lone_surrogate_escape", b'{"a": "\\ud800"}', "body: not valid JSON…"),
    bad("not_utf8", b'{"a": "\xff"}', "body: not UTF-8…"),
    bad("utf16", '{"a": 1}'.encode("utf-16"), "body: not UTF-8…"),
    bad("encoded_surrogate", b'{"a": "\xed\xa0\x80"}', "body: not UTF-8…"),
    bad("array", b"[]", "body: expected a JSON object, got array"),
    bad("array_of_events", b"[" + webhooks.load(DR) + b"]", "body: expected a JSON object…"),
    bad("number", b"42", "body: expected a JSON object, got number"),
    bad("string", b'"x"', "body: expected a JSON object, got string"),
    bad("null", b"null", "body: expected a JSON object, got null"),
    bad("deep_arrays", b"[" * 100_000 + b"]" * 100_000, "body: JSON nesting deeper than 32"),
    bad("deep_objects", b'{"a":' * 5000 + b"1" + b"}" * 5000, "body: JSON nesting deeper…"),
    bad("deep_unclosed", b"[" * 2000, "body: JSON nesting deeper than 32"),
    bad("deep_in_payload", patched(DR, {"payload.x": nested_lists(31)}), "body: JSON nesting deeper than 32"),
    bad("empty_object", b"{}", "eventType: required"),
    bad("no_event_type", patched(DR, {"eventType": DELETE}), "eventType: required"),
    bad("event_type_number", patched(DR, {"eventType": 1}), "eventType: expected string, got number"),
    bad(
        "event_type_unknown",
        patched(DR, {"eventType": "foo"}),
        "eventType: unsupported value 'foo'",
        unsupported=True,
    ),
    bad(
        "event_type_external_app",
        patched(DR, {"eventType": "external_app_message"}),
        "eventType: unsupported value 'external_app_message'",
        unsupported=True,
    ),
    bad("no_namespace", patched(DR, {"namespace": DELETE}), "namespace: required"),
    bad(
        "namespace_sms",
        patched(DR, {"namespace": "SMS"}),
        "namespace: unsupported value 'SMS'",
        unsupported=True,
    ),
    bad("namespace_object", patched(DR, {"namespace": {}}), "namespace: expected string, got object"),
    bad("no_payload", patched(DR, {"payload": DELETE}), "payload: required"),
    bad("payload_array", patched(DR, {"payload": []}), "payload: expected object, got array"),
    bad("payload_string", patched(IN, {"payload": "{}"}), "payload: expected object, got string"),
    # delivery receipts
    bad("dr_no_umid", patched(DR, {"payload.umid": DELETE}), "payload.umid: required"),
    bad("dr_null_umid", patched(DR, {"payload.umid": None}), "payload.umid: required"),
    bad("dr_empty_umid", patched(DR, {"payload.umid": ""}), "payload.umid: must not be empty"),
    bad("dr_blank_umid", patched(DR, {"payload.umid": "  \t"}), "payload.umid: must not be empty"),
    bad("dr_long_umid", patched(DR, {"payload.umid": "x" * 101}), "payload.umid: longer than 100 characters"),
    bad("dr_umid_number", patched(DR, {"payload.umid": 123}), "payload.umid: expected string, got number"),
    bad("dr_umid_bool", patched(DR, {"payload.umid": True}), "payload.umid: expected string, got boolean"),
    bad("dr_no_sub_account", patched(DR, {"payload.subAccountId": DELETE}), "payload.subAccountId: required"),
    bad(
        "dr_empty_sub_account",
        patched(DR, {"payload.subAccountId": ""}),
        "payload.subAccountId: must not be empty",
    ),
    bad(
        "dr_long_sub_account",
        patched(DR, {"payload.subAccountId": "s" * 51}),
        "payload.subAccountId: longer than 50 characters",  # 8x8's limit (was 100 before it was applied)
    ),
    bad(
        "dr_sub_account_number",
        patched(DR, {"payload.subAccountId": 7}),
        "payload.subAccountId: expected string, got number",
    ),
    bad("dr_no_channel", patched(DR, {"payload.channel": DELETE}), "payload.channel: required"),
    bad(
        "dr_channel_list",
        patched(DR, {"payload.channel": ["whatsapp"]}),
        "payload.channel: expected string, got array",
    ),
    bad("dr_no_status", patched(DR, {"payload.status": DELETE}), "payload.status: required"),
    bad(
        "dr_status_string",
        patched(DR, {"payload.status": "delivered"}),
        "payload.status: expected object, got string",
    ),
    bad("dr_no_state", patched(DR, {"payload.status.state": DELETE}), "payload.status.state: required"),
    bad(
        "dr_state_number",
        patched(DR, {"payload.status.state": 2}),
        "payload.status.state: expected string, got number",
    ),
    bad(
        "dr_empty_state", patched(DR, {"payload.status.state": ""}), "payload.status.state: must not be empty"
    ),
    bad(
        "dr_no_timestamp",
        patched(DR, {"payload.status.timestamp": DELETE}),
        "payload.status.timestamp: required",
    ),
    bad(
        "dr_bad_timestamp",
        patched(DR, {"payload.status.timestamp": "yesterday"}),
        "payload.status.timestamp: not an ISO 8601 timestamp: 'yesterday'",
    ),
    bad(
        "dr_impossible_date",
        patched(DR, {"payload.status.timestamp": "2026-02-30T00:00:00Z"}),
        "payload.status.timestamp: not an ISO 8601 timestamp: '2026-02-30T00:00:00Z'",
    ),
    bad(
        "dr_timestamp_overflow",
        patched(DR, {"payload.status.timestamp": "0001-01-01T00:00:00+01:00"}),
        "payload.status.timestamp: not an ISO 8601 timestamp…",
    ),
    bad(
        "dr_epoch_timestamp",
        patched(DR, {"payload.status.timestamp": 1751513112}),
        "payload.status.timestamp: expected string, got number",
    ),
    bad(
        "dr_detail_number",
        patched(DR, {"payload.status.detail": 5}),
        "payload.status.detail: expected string, got number",
    ),
    bad(
        "dr_error_code_word",
        patched(DR, {"payload.status.errorCode": "abc"}),
        "payload.status.errorCode: not an integer: 'abc'",
    ),
    bad(
        "dr_error_code_float",
        patched(DR, {"payload.status.errorCode": 1.5}),
        "payload.status.errorCode: expected integer, got number",
    ),
    bad(
        "dr_error_code_bool",
        patched(DR, {"payload.status.errorCode": True}),
        "payload.status.errorCode: expected integer, got boolean",
    ),
    bad(
        "dr_error_code_huge",
        patched(DR, {"payload.status.errorCode": 2**40}),
        "payload.status.errorCode: out of range: 1099511627776",
    ),
    bad(
        "dr_error_code_unicode_digits",
        patched(DR, {"payload.status.errorCode": "\u0661\u0665"}),
        "payload.status.errorCode: not an integer…",
    ),
    bad(
        "dr_error_message_object",
        patched(DR, {"payload.status.errorMessage": {}}),
        "payload.status.errorMessage: expected string, got object",
    ),
    bad("dr_user_array", patched(DR, {"payload.user": []}), "payload.user: expected object, got array"),
    bad(
        "dr_msisdn_number",
        patched(DR, {"payload.user.msisdn": 6581968289}),
        "payload.user.msisdn: expected string, got number",
    ),
    bad(
        "dr_batch_id_number",
        patched(DR, {"payload.batchId": 1}),
        "payload.batchId: expected string, got number",
    ),
    bad(
        "dr_client_message_id_bool",
        patched(DR, {"payload.clientMessageId": False}),
        "payload.clientMessageId: expected string, got boolean",
    ),
    bad(
        "dr_whatsapp_string",
        patched(DR, {"payload.whatsapp": "x"}),
        "payload.whatsapp: expected object, got string",
    ),
    bad(
        "dr_provider_code_array",
        patched(DR, {"payload.whatsapp.providerErrorCode": []}),
        "payload.whatsapp.providerErrorCode: expected string, got array",
    ),
    bad(
        "dr_pricing_number",
        patched(DR, {"payload.whatsapp.pricingCategory": 1}),
        "payload.whatsapp.pricingCategory: expected string, got number",
    ),
    bad(
        "dr_outbound_content_string",
        patched(DR, {"payload.outboundContent": "hi"}),
        "payload.outboundContent: expected object, got string",
    ),
    bad("dr_version_word", patched(DR, {"version": "nine"}), "version: not an integer: 'nine'"),
    bad("dr_version_float", patched(DR, {"version": 9.5}), "version: expected integer, got number"),
    # limits (ingest refuses what the read API or the processor cannot take)
    bad(
        "dr_umid_slash",
        patched(DR, {"payload.umid": "a/b"}),
        "payload.umid: character '/' (U+002F) at position 1 is not allowed in a umid "
        "(^[A-Za-z0-9\\-]{1,100}$)",
    ),
    bad(
        "dr_umid_rtl_mark",
        patched(DR, {"payload.umid": "ab\u200f"}),
        "payload.umid: character '\\u200f' (U+200F) at position 2…",
    ),
    bad(
        "dr_umid_non_ascii",
        patched(DR, {"payload.umid": "caf\u00e9"}),
        "payload.umid: character 'é' (U+00E9)…",
    ),
    bad(
        "dr_sub_account_short",
        patched(DR, {"payload.subAccountId": "ab"}),
        "payload.subAccountId: shorter than 3 characters",
    ),
    bad(
        "dr_sub_account_space",
        patched(DR, {"payload.subAccountId": "bad sub"}),
        "payload.subAccountId: character ' ' (U+0020) at position 3…",
    ),
    bad(
        "dr_channel_long",
        patched(DR, {"payload.channel": "w" * 200_000}),
        "payload.channel: longer than 32 characters",
    ),
    bad("dr_channel_space", patched(DR, {"payload.channel": "what sapp"}), "payload.channel: character ' '…"),
    bad(
        "dr_state_unknown",
        patched(DR, {"payload.status.state": "exploded"}),
        "payload.status.state: unknown value 'exploded' (8x8 documents accepted, delivered, error, failed, "
        "ok, queued, read, rejected, sent, undelivered, unknown)",
    ),
    bad(
        "dr_state_long",
        patched(DR, {"payload.status.state": "s" * 200_000}),
        "payload.status.state: unknown value…",
    ),
    bad(
        "dr_detail_long",
        patched(DR, {"payload.status.detail": "d" * 65}),
        "payload.status.detail: longer than 64…",
    ),
    bad(
        "dr_error_message_long",
        patched(DR, {"payload.status.errorMessage": "m" * 1001}),
        "payload.status.errorMessage: longer than 1000 characters",
    ),
    bad(
        "dr_msisdn_long",
        patched(DR, {"payload.user.msisdn": "1" * 33}),
        "payload.user.msisdn: longer than 32…",
    ),
    bad("dr_batch_id_slash", patched(DR, {"payload.batchId": "a/b"}), "payload.batchId: character '/'…"),
    bad(
        "dr_client_message_id_long",
        patched(DR, {"payload.clientMessageId": "c" * 51}),
        "payload.clientMessageId: longer than 50 characters",
    ),
    bad(
        "dr_client_message_id_control",
        patched(DR, {"payload.clientMessageId": "a\nb"}),
        "payload.clientMessageId: character '\\n' (U+000A) is not printable",
    ),
    bad(
        "dr_client_batch_id_long",
        patched(DR, {"payload.clientBatchId": "c" * 101}),
        "payload.clientBatchId: longer than 100 characters",
    ),
    bad(
        "dr_pricing_long",
        patched(DR, {"payload.whatsapp.pricingCategory": "p" * 65}),
        "payload.whatsapp.pricingCategory: longer than 64 characters",
    ),
    bad(
        "dr_provider_code_long",
        patched(DR, {"payload.whatsapp.providerErrorCode": "1" * 33}),
        "payload.whatsapp.providerErrorCode: longer than 32 characters",
    ),
    bad(
        "dr_timestamp_year_9999",
        patched(DR, {"payload.status.timestamp": "9999-12-31T23:59:59Z"}),
        "payload.status.timestamp: more than 1 day after the request was received: '9999-12-31T23:59:59Z'",
    ),
    bad(
        "dr_timestamp_a_day_and_a_bit_ahead",
        patched(DR, {"payload.status.timestamp": "2026-07-04T03:45:00.123457Z"}),
        "payload.status.timestamp: more than 1 day after…",
    ),
    bad(
        "dr_timestamp_before_2000",
        patched(DR, {"payload.status.timestamp": "1999-12-31T23:59:59.9999999Z"}),
        "payload.status.timestamp: before 2000-01-01: '1999-12-31T23:59:59.9999999Z'",
    ),
    bad(
        "in_timestamp_ahead",
        patched(IN, {"payload.timestamp": "2030-01-01T00:00:00Z"}),
        "payload.timestamp: more than 1 day after…",
    ),
    bad(
        "in_sub_account_long",
        patched(IN, {"payload.subAccountId": "s" * 60}),
        "payload.subAccountId: longer than 50 characters",
    ),
    bad(
        "in_channel_id_slash",
        patched(IN, {"payload.recipient.channelId": "a/b"}),
        "payload.recipient.channelId: character '/'…",
    ),
    bad(
        "in_reply_to_space",
        patched(IN, {"payload.replyToUmid": "a b"}),
        "payload.replyToUmid: character ' '…",
    ),
    bad(
        "in_text_long",
        patched(IN, {"payload.content.text": "t" * 35_001}),
        "payload.content.text: longer than 35000 characters",
    ),
    bad("in_type_long", patched(IN, {"payload.type": "T" * 33}), "payload.type: longer than 32 characters"),
    bad(
        "in_list_reply_title_long",
        patched(IN, {"payload.content.interactive.list_reply.title": "t" * 1025}),
        "payload.content.interactive.list_reply.title: longer than 1024 characters",
    ),
    bad(
        "in_username_long",
        patched(IN, {"payload.user.username": "u" * 257}),
        "payload.user.username: longer…",
    ),
    bad(
        "in_call_expiry_far",
        patched(
            IN_CALL,
            {"payload.content.interactive.callPermissionReply.expirationTimestamp": "2027-01-01T00:00:00Z"},
        ),
        "payload.content.interactive.callPermissionReply.expirationTimestamp: more than 30 days after…",
    ),
    # inbound messages
    bad("in_no_umid", patched(IN, {"payload.umid": DELETE}), "payload.umid: required"),
    bad("in_no_sub_account", patched(IN, {"payload.subAccountId": DELETE}), "payload.subAccountId: required"),
    bad("in_no_timestamp", patched(IN, {"payload.timestamp": DELETE}), "payload.timestamp: required"),
    bad(
        "in_bad_timestamp",
        patched(IN, {"payload.timestamp": "2026-13-01T00:00:00Z"}),
        "payload.timestamp: not an ISO 8601 timestamp: '2026-13-01T00:00:00Z'",
    ),
    bad("in_no_recipient", patched(IN, {"payload.recipient": DELETE}), "payload.recipient: required"),
    bad(
        "in_no_channel",
        patched(IN, {"payload.recipient.channel": DELETE}),
        "payload.recipient.channel: required",
    ),
    bad(
        "in_channel_id_number",
        patched(IN, {"payload.recipient.channelId": 5}),
        "payload.recipient.channelId: expected string, got number",
    ),
    bad("in_no_type", patched(IN, {"payload.type": DELETE}), "payload.type: required"),
    bad("in_type_number", patched(IN, {"payload.type": 1}), "payload.type: expected string, got number"),
    bad(
        "in_content_string",
        patched(IN, {"payload.content": "hi"}),
        "payload.content: expected object, got string",
    ),
    bad(
        "in_text_number",
        patched(IN, {"payload.content.text": 1}),
        "payload.content.text: expected string, got number",
    ),
    bad(
        "in_username_number",
        patched(IN, {"payload.user.username": 1}),
        "payload.user.username: expected string, got number",
    ),
    bad(
        "in_reply_to_number",
        patched(IN, {"payload.replyToUmid": 1}),
        "payload.replyToUmid: expected string, got number",
    ),
    bad(
        "in_interactive_no_type",
        patched(IN, {"payload.content.interactive.type": DELETE}),
        "payload.content.interactive.type: required",
    ),
    bad(
        "in_interactive_array",
        patched(IN, {"payload.content.interactive": []}),
        "payload.content.interactive: expected object, got array",
    ),
    bad(
        "in_list_reply_id_number",
        patched(IN, {"payload.content.interactive.list_reply.id": 7}),
        "payload.content.interactive.list_reply.id: expected string, got number",
    ),
    bad(
        "in_list_reply_string",
        patched(IN, {"payload.content.interactive.list_reply": "x"}),
        "payload.content.interactive.list_reply: expected object, got string",
    ),
    bad(
        "in_nfm_response_number",
        patched("in_v3_nfm_reply", {"payload.content.interactive.nfmReply.responseJson": 1}),
        "payload.content.interactive.nfmReply.responseJson: expected string, got number",
    ),
    bad(
        "in_call_expiry_bad",
        patched(IN_CALL, {"payload.content.interactive.callPermissionReply.expirationTimestamp": "soon"}),
        "payload.content.interactive.callPermissionReply.expirationTimestamp: "
        "not an ISO 8601 timestamp: 'soon'",
    ),
    bad(
        "in_call_permanent_string",
        patched(IN_CALL, {"payload.content.interactive.callPermissionReply.isPermanent": "false"}),
        "payload.content.interactive.callPermissionReply.isPermanent: expected boolean, got string",
    ),
    bad(
        "in_location_array",
        patched(IN_LOC, {"payload.content.location": [1, 2]}),
        "payload.content.location: expected object, got array",
    ),
    bad(
        "in_latitude_word",
        patched(IN_LOC, {"payload.content.location.latitude": "north"}),
        "payload.content.location.latitude: not a number: 'north'",
    ),
    bad(
        "in_latitude_range",
        patched(IN_LOC, {"payload.content.location.latitude": 91}),
        "payload.content.location.latitude: out of range [-90, 90]: 91",
    ),
    bad(
        "in_latitude_nan_string",
        patched(IN_LOC, {"payload.content.location.latitude": "NaN"}),
        "payload.content.location.latitude: out of range…",
    ),
    bad(
        "in_longitude_bool",
        patched(IN_LOC, {"payload.content.location.longitude": True}),
        "payload.content.location.longitude: expected number, got boolean",
    ),
    bad(
        "in_longitude_range",
        patched(IN_LOC, {"payload.content.location.longitude": "-180.5"}),
        "payload.content.location.longitude: out of range…",
    ),
]


@pytest.mark.parametrize(("body", "code", "field", "reason"), BAD)
def test_bad_input_is_an_invalid_event_naming_its_field(
    body: bytes, code: int, field: str, reason: str
) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse(body)
    error = info.value
    assert error.code == code
    assert error.http_status == (HTTP_UNSUPPORTED if code == CODE_UNSUPPORTED else HTTP_INVALID)
    assert error.field == field
    assert error.reason == str(error)
    assert error.reason.startswith(f"{field}: ")
    if reason.endswith("…"):
        assert error.reason.startswith(reason[:-1])
    else:
        assert error.reason == reason
    assert error.raw == body
    assert error.__cause__ is None and error.__suppress_context__


def test_bad_rows_are_unique() -> None:
    assert len({row.id for row in BAD}) == len(BAD)


# --- error body ---------------------------------------------------------------------------------------


def test_error_body_matches_8x8_shape() -> None:
    body = error_body(
        1000,
        "payload.umid: required",
        "1cc1eda1-f5dd-ea11-8288-0263195dd35a",
        datetime(2020, 12, 22, 5, 52, 1, 850000, tzinfo=UTC),
    )
    assert body == (
        b'{"code":1000,"message":"payload.umid: required",'
        b'"errorId":"1cc1eda1-f5dd-ea11-8288-0263195dd35a","timestamp":"2020-12-22T05:52:01.85Z"}'
    )


# --- properties ---------------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside `value` (dict keys and list indexes), the root excluded."""
    out: list[tuple[Any, ...]] = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        out.append((*prefix, key))
        out.extend(_paths(child, (*prefix, key)))
    return out


def _container_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths of every JSON object inside `value`, the root included, skipping `outboundContent`."""
    if not isinstance(value, dict):
        return []
    out = [prefix]
    for key, child in value.items():
        if key != "outboundContent":
            out.extend(_container_paths(child, (*prefix, key)))
    return out


def _at(data: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        data = data[key]
    return data


def _assert_parses_or_invalid(body: bytes) -> None:
    try:
        event = parse_webhook(body, RECEIVED_AT)
    except InvalidEvent as error:
        assert error.field and error.reason.startswith(f"{error.field}: ")
        assert error.raw == body
        assert (error.code, error.http_status) in {
            (CODE_INVALID, HTTP_INVALID),
            (CODE_UNSUPPORTED, HTTP_UNSUPPORTED),
        }
    else:
        assert isinstance(event, DeliveryReceipt | InboundMessage)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_invalid_event(body: bytes) -> None:
    _assert_parses_or_invalid(body)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_arbitrary_json_raises_only_invalid_event(value: Any) -> None:
    _assert_parses_or_invalid(orjson.dumps(value))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(webhooks.ALL), data=st.data())
def test_mutated_valid_payloads_raise_only_invalid_event(name: str, data: st.DataObject) -> None:
    value = doc(name)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = _paths(value)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        parent = _at(value, path[:-1])
        action = data.draw(st.sampled_from(["drop", "replace", "insert"]), label="action")
        if action == "drop":
            del parent[path[-1]]
        elif action == "replace":
            parent[path[-1]] = data.draw(json_values, label="new value")
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=12), label="junk key")] = data.draw(json_values, label="junk")
        else:
            parent.insert(path[-1], data.draw(json_values, label="junk"))
    _assert_parses_or_invalid(orjson.dumps(value))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(webhooks.ALL), data=st.data())
def test_extra_fields_anywhere_parse_to_the_same_event(name: str, data: st.DataObject) -> None:
    original = doc(name)
    value = copy.deepcopy(original)
    for _ in range(data.draw(st.integers(1, 4), label="extras")):
        target = _at(value, data.draw(st.sampled_from(_container_paths(value)), label="where"))
        key = "x_" + data.draw(st.text(max_size=8), label="key")
        target[key] = data.draw(json_values, label="extra")
    body = orjson.dumps(value)
    event = parse_webhook(body, RECEIVED_AT)
    assert event.raw_json == body.decode()
    assert without_raw(event) == without_raw(parse_webhook(orjson.dumps(original), RECEIVED_AT))


def _random_case(text: str, flips: list[bool]) -> str:
    return "".join(c.upper() if flip else c.lower() for c, flip in zip(text, flips, strict=False))


case_flips = st.lists(st.booleans(), min_size=64, max_size=64)


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(webhooks.DELIVERY_RECEIPTS),
    flips=st.tuples(case_flips, case_flips, case_flips, case_flips, case_flips),
)
def test_case_variants_of_receipts_normalise_to_the_same_event(
    name: str, flips: tuple[list[bool], ...]
) -> None:
    value = doc(name)
    payload = value["payload"]
    value["namespace"] = _random_case(value["namespace"], flips[0])
    value["eventType"] = _random_case(value["eventType"], flips[1])
    payload["channel"] = _random_case(payload["channel"], flips[2])
    payload["status"]["state"] = _random_case(payload["status"]["state"], flips[3])
    if payload["status"].get("detail"):
        payload["status"]["detail"] = _random_case(payload["status"]["detail"], flips[4])
    assert without_raw(parse(orjson.dumps(value))) == without_raw(parse(webhooks.load(name)))


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(webhooks.INBOUND_MESSAGES),
    flips=st.tuples(case_flips, case_flips, case_flips),
)
def test_case_variants_of_inbound_messages_normalise_to_the_same_event(
    name: str, flips: tuple[list[bool], ...]
) -> None:
    value = doc(name)
    payload = value["payload"]
    payload["recipient"]["channel"] = _random_case(payload["recipient"]["channel"], flips[0])
    payload["type"] = _random_case(payload["type"], flips[1])
    value["eventType"] = _random_case(value["eventType"], flips[2])
    assert without_raw(parse(orjson.dumps(value))) == without_raw(parse(webhooks.load(name)))


def test_reasons_quote_long_values_cut_short() -> None:
    with pytest.raises(InvalidEvent) as info:
        parse(patched(DR, {"payload.status.timestamp": "x" * 100_000}))
    assert info.value.field == "payload.status.timestamp"
    assert len(info.value.reason) < 200 and info.value.reason.endswith("…")


@pytest.mark.parametrize(
    ("name", "path"),
    [
        (DR, "payload.status.errorMessage"),
        (DR, "payload.status.detail"),
        (DR, "payload.user.msisdn"),
        ("in_source_whatsapp_text", "payload.content.text"),
        ("in_source_nfm_reply", "payload.content.interactive.nfmReply.responseJson"),
    ],
)
def test_a_string_holding_nul_is_refused_with_its_field(name: str, path: str) -> None:
    """PostgreSQL's text cannot hold U+0000: a webhook carrying one would be acknowledged and then never
    written (the sink's batch failing again and again, its partition stopped). Refused at the door
    instead, 400 with the field, like any other invalid value; the fast receipt path leaves it to the
    parser. A backslash followed by the text "u0000" is an ordinary string."""
    data = doc(name)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = "before \x00 after"
    with pytest.raises(InvalidEvent) as refused:
        parse(orjson.dumps(data))
    assert refused.value.http_status == 400
    assert refused.value.field == path and "\\u0000" in str(refused.value)
    assert encode_receipt(orjson.dumps(data), RECEIVED_AT) is None
    node[last] = "before \\u0000 after"  # the six characters, not NUL
    parse(orjson.dumps(data))
