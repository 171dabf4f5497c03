"""ingest.fastreceipt: whenever it answers, its bytes are the codec's encoding of parse_webhook's receipt."""

from __future__ import annotations

import copy
import functools
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ingest.fastreceipt import encode_receipt, matches
from ingest.parse import EARLIEST, MAX_AHEAD, STATES, parse_webhook
from schemas.catalog import load_schema
from schemas.codec import Codecs, Registry, TopicCodec
from schemas.errors import InvalidEvent
from schemas.fastpath import LENGTHS, LENGTHS_TABLE, UNION1_LENGTHS, varint, write_long
from schemas.models import DeliveryReceipt
from tests.fixtures import webhooks
from tests.unit.ingest.test_parse import DELETE, _at, _paths, doc, json_values, patched
from tests.unit.schemas.test_codec import InMemoryClient

RECEIVED_AT = datetime(2026, 7, 3, 3, 45, 0, 123456, tzinfo=UTC)
DR = "dr_v9_whatsapp_undelivered_provider_error"


@functools.cache
def shared_codec() -> TopicCodec[DeliveryReceipt]:
    """One codec for the module: building one compiles every schema (about 0.1-0.3 s), which per
    hypothesis example made these properties the slowest tests of the suite; encoding is stateless."""
    return Codecs(Registry("memory://", client=InMemoryClient())).receipts  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def receipts() -> TopicCodec[DeliveryReceipt]:
    return shared_codec()


def reference(body: bytes, codec: TopicCodec[DeliveryReceipt]) -> bytes | None:
    """The codec's bytes for parse_webhook's receipt; None when it is refused or not a receipt."""
    try:
        event = parse_webhook(body, RECEIVED_AT)
    except InvalidEvent:
        return None
    return codec.encode(event) if isinstance(event, DeliveryReceipt) else None


def check(body: bytes, codec: TopicCodec[DeliveryReceipt]) -> tuple[str, bytes] | None:
    """The contract: an answer only for a receipt parse_webhook accepts, then byte for byte its encoding."""
    fast = encode_receipt(body, RECEIVED_AT, codec.header)
    if fast is not None:
        expected = reference(body, codec)
        assert expected is not None, f"fast path accepted what parse_webhook refuses: {body!r}"
        assert fast[1] == expected
        assert fast[0] == codec.decode(expected).umid
    return fast


def test_layout_is_the_receipts_schema() -> None:
    schema = json.loads(load_schema("delivery_receipt.avsc"))
    assert matches(schema)
    for change in (
        lambda s: s["fields"].append({"name": "extra", "type": ["null", "string"], "default": None}),
        lambda s: s["fields"].reverse(),
        lambda s: s["fields"][3]["type"]["fields"][1].update(type="string"),  # status.detail
        lambda s: s["fields"][-2].update(type="long"),  # receivedAt without its logical type
    ):
        changed = copy.deepcopy(schema)
        change(changed)
        assert not matches(changed)


@pytest.mark.parametrize("name", webhooks.DELIVERY_RECEIPTS)
def test_every_documented_receipt_takes_the_fast_path(
    name: str, receipts: TopicCodec[DeliveryReceipt]
) -> None:
    for body in (webhooks.load(name), orjson.dumps(doc(name))):
        assert check(body, receipts) is not None


@pytest.mark.parametrize("name", [n for n in webhooks.ALL if n not in webhooks.DELIVERY_RECEIPTS])
def test_other_webhooks_are_left_to_the_parser(name: str, receipts: TopicCodec[DeliveryReceipt]) -> None:
    assert encode_receipt(webhooks.load(name), RECEIVED_AT) is None


@pytest.mark.parametrize(
    "changes",
    [
        {"payload.status.errorCode": "15"},  # numbers as strings: the parser converts them
        {"version": "9"},
        {"payload.umid": "x" * 101},  # too long: the parser refuses it with its reason
        {"payload.umid": "   "},
        {"payload.status.timestamp": "yesterday"},
        {"payload.status.timestamp": DELETE},
        {"payload.status.errorCode": 2**31},
        {"payload.status.errorCode": True},
        {"payload.whatsapp.providerErrorCode": False},
        {"payload.user": []},
        {"payload.user": 0},
        {"payload.user": ["msisdn"]},
        {"payload.whatsapp": [1]},
        {"payload.status": [1]},
        {"payload": [1]},
        {"payload.whatsapp": ""},
        {"payload.outboundContent": "text"},
        {"payload.batchId": 7},
        {"namespace": "other"},
        {"eventType": "outbound_message_status_changed_v2"},
    ],
)
def test_unusual_or_invalid_receipts_are_left_to_the_parser(
    changes: dict[str, Any], receipts: TopicCodec[DeliveryReceipt]
) -> None:
    assert encode_receipt(patched(DR, changes), RECEIVED_AT, receipts.header) is None


@pytest.mark.parametrize(
    "changes",
    [
        {"payload.status.timestamp": "2026-07-03T11:30:12+08:00"},  # the reference parser's path
        {"payload.status.timestamp": "2026-07-03T11:30:12.1Z"},
        {"payload.status.timestamp": "2026-07-03T11:30:12.123456789Z"},
        {"payload.status.detail": ""},
        {"payload.user": {}},
        {"payload.user": None},
        {"payload.whatsapp": {}},
        {"payload.whatsapp.providerErrorCode": 131026},
        {"payload.channel": "GoogleRCS"},
        {"payload.version": 8, "version": DELETE},
        {"payload.outboundContent": {"text": "ü ✓ \u2028", "nested": [[{"a": None}]]}},
        # every limited field at its limit (the limits took the earlier 4095/4096/70000-character cases
        # of these fields away: only outboundContent and the body itself can reach the length tables' end)
        {
            "payload.umid": "u" * 100,
            "payload.subAccountId": "a.b&c-_" + "d" * 43,
            "payload.channel": "W" * 32,
            "payload.status.state": "UnDelivered",
            "payload.status.detail": "d" * 64,
            "payload.status.errorMessage": "é" * 1000,
            "payload.user": {
                "msisdn": "1" * 32,
                "channelUserId": "c" * 128,
                "name": "é" * 256,
                "username": "u" * 256,
            },
            "payload.batchId": "b" * 100,
            "payload.clientMessageId": "ü ✓" * 16 + "xx",
            "payload.clientBatchId": "é" * 100,
            "payload.whatsapp.providerErrorCode": "9" * 32,
            "payload.whatsapp.pricingCategory": "p" * 64,
        },
        {"payload.subAccountId": "abc", "payload.clientMessageId": "", "payload.batchId": ""},
        {"payload.status.timestamp": "2000-01-01T00:00:00Z"},
        {"payload.status.timestamp": "2026-07-04T03:45:00.123456Z"},  # received_at + 1 day exactly
        *({"payload.outboundContent": {"text": "t" * (n - 11)}} for n in (4095, 4096, 70000)),
    ],
)
def test_lenient_receipts_encode_like_the_parser(
    changes: dict[str, Any], receipts: TopicCodec[DeliveryReceipt]
) -> None:
    assert check(patched(DR, changes), receipts) is not None


# the limits: ingest.parse refuses each, naming the field; the fast path leaves each to it
LIMITS = [
    ("payload.umid", "caf\u00e9"),
    ("payload.umid", "a/b"),
    ("payload.umid", "a?b"),
    ("payload.umid", "ab\u200f"),
    ("payload.umid", "abc\n"),
    ("payload.umid", "u" * 101),
    ("payload.subAccountId", "ab"),
    ("payload.subAccountId", "s" * 60),
    ("payload.subAccountId", "bad sub"),
    ("payload.channel", "w" * 200_000),
    ("payload.channel", "W" * 33),
    ("payload.channel", "whats app"),
    ("payload.status.state", "s" * 200_000),
    ("payload.status.state", "exploded"),
    ("payload.status.detail", "d" * 200_000),
    ("payload.status.detail", "d" * 65),
    ("payload.status.errorMessage", "m" * 1001),
    ("payload.user.msisdn", "1" * 33),
    ("payload.user.channelUserId", "c" * 129),
    ("payload.user.name", "n" * 257),
    ("payload.user.username", "n" * 257),
    ("payload.batchId", "b" * 200_000),
    ("payload.batchId", "a b"),
    ("payload.clientMessageId", "c" * 200_000),
    ("payload.clientMessageId", "c" * 51),
    ("payload.clientMessageId", "a\u200fb"),
    ("payload.clientBatchId", "c" * 101),
    ("payload.clientBatchId", "a\x00b"),
    ("payload.whatsapp.providerErrorCode", "1" * 33),
    ("payload.whatsapp.pricingCategory", "p" * 65),
    ("payload.status.timestamp", "9999-12-31T23:59:59Z"),
    ("payload.status.timestamp", "2026-07-04T03:45:00.123457Z"),
    ("payload.status.timestamp", "1999-12-31T23:59:59.9999999Z"),
]


@pytest.mark.parametrize(("field", "value"), LIMITS, ids=[f"{f}={v!r:.30}" for f, v in LIMITS])
def test_values_past_a_limit_are_refused_by_the_parser_and_left_to_it(
    field: str, value: Any, receipts: TopicCodec[DeliveryReceipt]
) -> None:
    body = patched(DR, {field: value})
    with pytest.raises(InvalidEvent) as info:
        parse_webhook(body, RECEIVED_AT)
    assert info.value.field == field
    assert encode_receipt(body, RECEIVED_AT, receipts.header) is None


_FIELDS = {
    "payload.umid": 100,
    "payload.subAccountId": 50,
    "payload.channel": 32,
    "payload.status.state": 12,
    "payload.status.detail": 64,
    "payload.status.errorMessage": 1000,
    "payload.user.msisdn": 32,
    "payload.user.channelUserId": 128,
    "payload.user.name": 256,
    "payload.batchId": 100,
    "payload.clientMessageId": 50,
    "payload.clientBatchId": 100,
    "payload.whatsapp.providerErrorCode": 32,
    "payload.whatsapp.pricingCategory": 64,
}
# characters either side of every rule: id classes, printable or not, bidi marks, non-ASCII, space
_CHARS = "aZ09-._&/?#% \t\n\x00\x7f\u00e9\u0430\u200f\u202e\u2028\uff41\U0001f600"


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted(_FIELDS)), data=st.data())
def test_fast_path_accepts_exactly_what_the_parser_accepts_near_every_limit(
    field: str, data: st.DataObject
) -> None:
    """A mismatch either way fails: the fast path must not refuse a valid value of these fields (it would
    cost speed, not correctness, but it would mean its rules drifted from the parser's) nor accept one
    the parser refuses."""
    codec = shared_codec()
    limit = _FIELDS[field]
    if field == "payload.status.state":
        value = data.draw(st.sampled_from([*sorted(STATES), "Delivered", "READ", "unknown2", "", "sent "]))
    else:
        size = data.draw(st.sampled_from([0, 1, 2, 3, limit - 1, limit, limit + 1]), label="size")
        base = data.draw(st.sampled_from(["a", "Z", "0", "-", "é"]), label="base")
        value = base * max(size, 0)
        if value and data.draw(st.booleans(), label="odd character"):
            at = data.draw(st.integers(0, len(value) - 1), label="at")
            value = value[:at] + data.draw(st.sampled_from(_CHARS), label="char") + value[at + 1 :]
    body = patched(DR, {field: value})
    fast, expected = check(body, codec), reference(body, codec)
    assert (fast is None) == (expected is None), (field, value)


@settings(max_examples=150, deadline=None)
@given(st.integers(-2_000_000, 2_000_000) | st.integers(-3 * 86_400_000_000, 3 * 86_400_000_000))
@example(-1)
@example(0)
@example(1)
def test_fast_path_keeps_the_parsers_time_window_to_the_microsecond(micros: int) -> None:
    codec = shared_codec()
    for edge in (EARLIEST, RECEIVED_AT + MAX_AHEAD):
        when = edge + timedelta(microseconds=micros)
        body = patched(DR, {"payload.status.timestamp": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")})
        inside = EARLIEST <= when <= RECEIVED_AT + MAX_AHEAD
        assert (check(body, codec) is None) == (reference(body, codec) is None) == (not inside)


def test_bom_deep_nesting_and_bad_utf8_are_left_to_the_parser(receipts: TopicCodec[DeliveryReceipt]) -> None:
    body = webhooks.load(DR)
    assert encode_receipt(b"\xef\xbb\xbf" + body, RECEIVED_AT) is None
    deep = patched(DR, {"payload.outboundContent": {"a": json.loads("[" * 40 + "]" * 40)}})
    assert encode_receipt(deep, RECEIVED_AT) is None
    bad_utf8 = body.replace(b'"Message rejected"', b'"Message rejected\xff"')
    assert bad_utf8 != body and encode_receipt(bad_utf8, RECEIVED_AT) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes(body: bytes) -> None:
    codec = shared_codec()
    check(body, codec)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(webhooks.DELIVERY_RECEIPTS), data=st.data())
def test_mutated_receipts_encode_like_the_parser_or_fall_back(name: str, data: st.DataObject) -> None:
    codec = shared_codec()
    value = doc(name)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = _paths(value)
        path = data.draw(st.sampled_from(paths), label="path")
        parent = _at(value, path[:-1])
        action = data.draw(st.sampled_from(["drop", "replace", "case"]), label="action")
        if action == "drop":
            del parent[path[-1]]
        elif action == "replace":
            parent[path[-1]] = data.draw(json_values | st.none(), label="new value")
        elif isinstance(parent[path[-1]], str):
            parent[path[-1]] = data.draw(st.sampled_from([str.upper, str.title, str.swapcase]))(
                parent[path[-1]]
            )
    check(orjson.dumps(value), codec)


@settings(max_examples=300, deadline=None)
@given(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    st.integers(0, 9),
    st.sampled_from(["Z", "z", "", "+00:00", "-0730"]),
)
def test_timestamps_encode_like_the_parser(when: datetime, digits: int, suffix: str) -> None:
    codec = shared_codec()
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        text += "." + f"{when.microsecond:06d}{when.microsecond % 997:03d}"[:digits]
    body = patched(DR, {"payload.status.timestamp": text + suffix})
    assert (check(body, codec) is None) == (reference(body, codec) is None)


@given(st.integers(-(2**63), 2**63 - 1))
def test_write_long_is_varint(n: int) -> None:
    assert write_long(n) == varint(n)


def test_length_tables_are_write_long() -> None:
    assert len(LENGTHS) == len(UNION1_LENGTHS) == LENGTHS_TABLE
    assert all(
        LENGTHS[n] == write_long(n) and UNION1_LENGTHS[n] == b"\x02" + write_long(n)
        for n in range(LENGTHS_TABLE)
    )


@pytest.mark.parametrize("n", [2**48, 2**48 - 1, 2**55 - 1, 2**55, 1_700_000_000_000_000, -(2**50)])
def test_write_long_table_edges(n: int) -> None:
    assert write_long(n) == varint(n)
