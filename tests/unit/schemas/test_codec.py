"""Avro round trip of every documented webhook through the full codec: mapping + framing + fastavro.

The registry here is an in-process dictionary with the two calls `Registry` makes of the official client
(register_schema, get_schema); the real registry is covered by tests/integration.
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import types
import typing
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.parse import parse_webhook
from schemas import fastpath, mapping
from schemas.catalog import (
    CONVERSATIONS,
    INBOUND,
    INGEST_DLQ,
    MESSAGE_STATE,
    MESSAGE_STEPS,
    RECEIPTS,
    STATUS_EVENTS,
    TOPICS,
    TopicSpec,
    load_schema,
)
from schemas.codec import _HEADER, Codecs, Registry, TopicCodec
from schemas.errors import InvalidEvent
from schemas.models import DeadLetter, DeliveryReceipt, InboundMessage
from tests.fixtures.records import FROM_DICT, TO_DICT, sample
from tests.fixtures.webhooks import ALL, load

RECEIVED = datetime(2026, 11, 22, 12, 0, 0, 123456, tzinfo=UTC)


class InMemoryClient:
    def __init__(self) -> None:
        self.schemas: dict[int, str] = {}
        self.calls = 0

    def register_schema(self, subject: str, schema: object) -> int:
        self.calls += 1
        text = schema.schema_str  # type: ignore[attr-defined]
        for sid, existing in self.schemas.items():
            if existing == text:
                return sid
        sid = len(self.schemas) + 1
        self.schemas[sid] = text
        return sid

    def get_schema(self, schema_id: int) -> SimpleNamespace:
        self.calls += 1
        return SimpleNamespace(schema_str=self.schemas[schema_id])


@pytest.fixture()
def codecs() -> Codecs:
    return Codecs(Registry("memory://", client=InMemoryClient()))  # type: ignore[arg-type]


def test_every_topic_schema_is_self_contained_and_parses() -> None:
    for spec in TOPICS:
        schema = json.loads(load_schema(spec.schema_file))
        fastavro.parse_schema(schema)  # raises on a dangling named-type reference


@pytest.mark.parametrize("name", ALL)
def test_documented_webhook_round_trips_through_avro(name: str, codecs: Codecs) -> None:
    event = parse_webhook(load(name), RECEIVED)
    codec = codecs.receipts if isinstance(event, DeliveryReceipt) else codecs.inbound
    data = codec.encode(event)  # type: ignore[arg-type]
    magic, schema_id = struct.unpack_from(">bI", data)
    assert magic == 0 and schema_id == codec.schema_id
    assert codec.decode(data) == event


def test_dead_letter_round_trip_keeps_the_body_whole(codecs: Codecs) -> None:
    body = b'\xff\x00{"not": json'
    letter = DeadLetter(
        error_id="0b7d3bd6-52a4-4bd5-9a7f-3c9d4a1e0a11",
        reason="body: not UTF-8",
        code=1000,
        http_status=400,
        source="ingest",
        received_at=RECEIVED,
        body=body,
        headers=(("Content-Type", "application/json"), ("X-Forwarded-For", "52.220.117.120")),
        field="body",
        remote="127.0.0.1",
    )
    assert codecs.ingest_dlq.decode(codecs.ingest_dlq.encode(letter)) == letter


def test_registry_is_asked_once_per_schema_not_per_record(codecs: Codecs) -> None:
    client = codecs.registry._client
    events = [parse_webhook(load(n), RECEIVED) for n in ALL]
    for _ in range(3):
        for e in events:
            codec = codecs.receipts if isinstance(e, DeliveryReceipt) else codecs.inbound
            codec.decode(codec.encode(e))  # type: ignore[arg-type]
    assert client.calls == 2  # one registration per subject; decoding hits the id cache


def test_unframed_or_truncated_bytes_are_invalid_events(codecs: Codecs) -> None:
    event = parse_webhook(load("in_v3_whatsapp_text"), RECEIVED)
    assert isinstance(event, InboundMessage)
    data = codecs.inbound.encode(event)
    with pytest.raises(InvalidEvent, match="magic byte"):
        codecs.inbound.decode(b"\x01" + data[1:])
    with pytest.raises(InvalidEvent, match="undecodable"):
        codecs.inbound.decode(data[: len(data) // 2])


# --- the compiled fast path: fastavro's bytes and values exactly ---------------------------------------

FULL = {spec.schema_file: fastavro.parse_schema(json.loads(load_schema(spec.schema_file))) for spec in TOPICS}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@pytest.fixture()
def slow(codecs: Codecs) -> Codecs:
    """fastavro alone, on the same registry (same schema ids)."""
    return Codecs(codecs.registry, fast=False)


def fastavro_bytes(schema_file: str, record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, FULL[schema_file], record)
    return buf.getvalue()


def compiled_bytes(schema_file: str, record: dict[str, Any]) -> bytes:
    buf = bytearray()
    fastpath.compile_writer(json.loads(load_schema(schema_file)))(record, buf)  # no fallback here
    return bytes(buf)


def codec_for(codecs: Codecs, spec: TopicSpec) -> TopicCodec[Any]:
    return next(c for c in codecs.all() if c.spec is spec)


def assert_same_as_fastavro(codecs: Codecs, slow: Codecs, spec: TopicSpec, model: Any) -> None:
    """Fast encode == fastavro's bytes; fast decode == fastavro's dict and model, datetimes included."""
    codec = codec_for(codecs, spec)
    record = TO_DICT[spec.schema_file](model)
    expected = fastavro_bytes(spec.schema_file, record)
    assert compiled_bytes(spec.schema_file, record) == expected
    data = codec.encode(model)
    assert data == _HEADER.pack(0, codec.schema_id) + expected
    assert codec.encode_dict(record) == data
    read, end = fastpath.compile_reader(json.loads(load_schema(spec.schema_file)))(data, 5)
    assert end == len(data)
    assert read == fastavro.schemaless_reader(io.BytesIO(expected), FULL[spec.schema_file], None)
    assert codec.decode_dict(data) == read
    assert codec_for(slow, spec).encode(model) == data
    assert codec_for(slow, spec).decode_dict(data) == read
    assert codec.decode(data) == codec_for(slow, spec).decode(data) == FROM_DICT[spec.schema_file](read)


def test_every_topic_codec_compiles_its_fast_path(codecs: Codecs, slow: Codecs) -> None:
    for codec in codecs.all():
        assert codec._fast_write is not None and codec._fast_read is not None, codec.spec.name
    assert all(c._fast_write is None and c._fast_read is None for c in slow.all())
    # the hot topics also go straight to and from objects (mapping.*_BUILD); any other would be a fallback
    objects = {
        c.spec.name for c in codecs.all() if c._fast_build is not None and c._fast_write_obj is not None
    }
    assert objects == {RECEIPTS.name, MESSAGE_STATE.name, MESSAGE_STEPS.name, STATUS_EVENTS.name}


@pytest.mark.parametrize("spec", TOPICS, ids=[t.name for t in TOPICS])
def test_fast_path_matches_fastavro_on_every_topics_sample(
    spec: TopicSpec, codecs: Codecs, slow: Codecs
) -> None:
    model = sample(spec)
    assert_same_as_fastavro(codecs, slow, spec, model)
    assert codec_for(codecs, spec).decode(codec_for(codecs, spec).encode(model)) == model


@pytest.mark.parametrize("name", ALL)
def test_fast_path_matches_fastavro_on_every_webhook(name: str, codecs: Codecs, slow: Codecs) -> None:
    event = parse_webhook(load(name), RECEIVED)
    assert_same_as_fastavro(codecs, slow, RECEIPTS if isinstance(event, DeliveryReceipt) else INBOUND, event)


def test_decode_dict_keeps_aware_datetimes_and_uuids(codecs: Codecs) -> None:
    record = codecs.ingest_dlq.decode_dict(codecs.ingest_dlq.encode(sample(INGEST_DLQ)))
    assert record["receivedAt"] == RECEIVED and record["receivedAt"].tzinfo is not None
    assert isinstance(record["errorId"], uuid.UUID)  # as fastavro returns a `uuid` string
    state = codecs.state.decode_dict(codecs.state.encode(sample(MESSAGE_STATE)))
    assert all(isinstance(e["timestamp"], datetime) for s in state["steps"] for e in s["history"])


MICROS = [
    0,
    -1,
    1,
    (1 << 48) - 1,  # 7 varint bytes: just below the 8-byte fast window
    1 << 48,
    (1 << 55) - 1,
    1 << 55,  # 9 varint bytes
    -(1 << 48),
    (datetime(1, 1, 1, tzinfo=UTC) - EPOCH) // timedelta(microseconds=1),
    (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC) - EPOCH) // timedelta(microseconds=1),
    (datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC) - EPOCH) // timedelta(microseconds=1),
    (datetime(2026, 7, 3, 5, 0, 0, 999999, tzinfo=UTC) - EPOCH) // timedelta(microseconds=1),
]


@pytest.mark.parametrize("micros", MICROS)
def test_timestamps_at_every_varint_length_and_edge(micros: int, codecs: Codecs, slow: Codecs) -> None:
    at = EPOCH + timedelta(microseconds=micros)
    for spec, model in (
        (RECEIPTS, dataclasses.replace(sample(RECEIPTS), received_at=at)),
        (MESSAGE_STATE, dataclasses.replace(sample(MESSAGE_STATE), updated_at=at, read_at=at)),
    ):
        assert_same_as_fastavro(codecs, slow, spec, model)
        assert codec_for(codecs, spec).decode(codec_for(codecs, spec).encode(model)) == model


def test_other_timezones_encode_the_same_instant(codecs: Codecs, slow: Codecs) -> None:
    plus8 = RECEIVED.astimezone(timezone(timedelta(hours=8)))
    model = dataclasses.replace(sample(RECEIPTS), received_at=plus8)
    assert_same_as_fastavro(codecs, slow, RECEIPTS, model)
    assert codecs.receipts.decode(codecs.receipts.encode(model)).received_at == RECEIVED


def test_shared_and_equal_timestamps_in_one_record_are_each_written(codecs: Codecs, slow: Codecs) -> None:
    # the per-record timestamp cache: the same object twice, equal objects, then a different one
    state = sample(MESSAGE_STATE)
    same = RECEIVED
    model = dataclasses.replace(
        state, updated_at=same, read_at=same, first_sent_at=RECEIVED + timedelta(0), delivered_at=EPOCH
    )
    assert_same_as_fastavro(codecs, slow, MESSAGE_STATE, model)


def dict_cases() -> list[tuple[TopicSpec, Callable[[dict[str, Any]], None]]]:
    """Avro dicts the compiled writer does not take: fastavro (the fallback) decides."""

    def drop(key: str) -> Callable[[dict[str, Any]], None]:
        return lambda d: d.pop(key)

    def put(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
        return lambda d: d.__setitem__(key, value)

    return [
        (RECEIPTS, drop("batchId")),  # default filled by fastavro
        (MESSAGE_STATE, drop("final")),
        (RECEIPTS, put("receivedAt", 1_782_000_000_123_456)),  # an int for a timestamp
        (RECEIPTS, put("receivedAt", datetime(2026, 1, 2, 3, 4, 5, 6))),  # naive: fastavro's local time
        (RECEIPTS, put("batchId", ("string", "b-1"))),  # tuple notation
        (RECEIPTS, put("version", True)),  # not an Avro int in a union: fastavro refuses
        (RECEIPTS, put("version", 1 << 40)),  # out of int range in a union: fastavro refuses
        (INGEST_DLQ, put("errorId", uuid.UUID("0b7d3bd6-52a4-4bd5-9a7f-3c9d4a1e0a11"))),
        (INGEST_DLQ, put("body", bytearray(b"\x00\xff"))),
        (INGEST_DLQ, put("body", "text, not bytes")),
        (RECEIPTS, put("umid", 42)),
        (RECEIPTS, put("rawJson", "\ud800")),  # a lone surrogate: not UTF-8
        (INBOUND, lambda d: d["content"].__setitem__("latitude", 1)),  # an int for a double: fine
        (INBOUND, lambda d: d["content"].__setitem__("latitude", "1.5")),
        (MESSAGE_STATE, put("version", (1 << 63) - 1)),
        (MESSAGE_STATE, put("version", 1 << 63)),
        (MESSAGE_STATE, put("steps", ())),
        (CONVERSATIONS, put("countsByType", {"Text": -3, "Image": 1 << 40})),
    ]


@pytest.mark.parametrize("case", range(len(dict_cases())))
def test_records_the_fast_writer_does_not_take_behave_as_in_fastavro(case: int, codecs: Codecs) -> None:
    spec, change = dict_cases()[case]
    record = TO_DICT[spec.schema_file](sample(spec))
    change(record)
    codec = codec_for(codecs, spec)
    try:
        expected = _HEADER.pack(0, codec.schema_id) + fastavro_bytes(spec.schema_file, record)
    except Exception as exc:
        with pytest.raises(type(exc)):
            codec.encode_dict(record)
    else:
        assert codec.encode_dict(record) == expected


# --- hypothesis: any model of any topic --------------------------------------------------------------

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40) | st.sampled_from(
    ["", "é", "😀" * 3]
)
WHEN = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
) | st.sampled_from(
    [EPOCH, EPOCH - timedelta(microseconds=1), datetime(2026, 7, 3, 5, 0, 0, 999999, tzinfo=UTC)]
)
INT = st.integers(-(1 << 31), (1 << 31) - 1)
_SCALARS: dict[Any, st.SearchStrategy[Any]] = {
    str: TEXT,
    int: INT,
    bool: st.booleans(),
    float: st.floats(allow_nan=False),
    bytes: st.binary(max_size=64),
    datetime: WHEN,
}
# a `uuid` string must be a UUID to be read back (fastavro too parses it)
_FIELDS: dict[tuple[type, str], st.SearchStrategy[Any]] = {(DeadLetter, "error_id"): st.uuids().map(str)}


def strategy(tp: Any) -> st.SearchStrategy[Any]:
    """Values of a model field type: scalars, optionals, tuples, nested dataclasses."""
    if tp in _SCALARS:
        return _SCALARS[tp]
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return st.builds(
            tp,
            **{
                f.name: _FIELDS[tp, f.name] if (tp, f.name) in _FIELDS else strategy(hints[f.name])
                for f in dataclasses.fields(tp)
            },
        )
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return st.one_of(*(st.none() if a is type(None) else strategy(a) for a in args))
    if typing.get_origin(tp) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(strategy(args[0]), max_size=3).map(tuple)
        return st.tuples(*(strategy(a) for a in args))
    raise TypeError(tp)


MODELS = {spec: strategy(type(sample(spec))) for spec in TOPICS}


@pytest.mark.parametrize("spec", TOPICS, ids=[t.name for t in TOPICS])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fast_path_matches_fastavro_for_any_model(
    spec: TopicSpec, data: st.DataObject, codecs: Codecs, slow: Codecs
) -> None:
    assert_same_as_fastavro(codecs, slow, spec, data.draw(MODELS[spec]))


@pytest.mark.parametrize("spec", TOPICS, ids=[t.name for t in TOPICS])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_records_decode_or_fail_exactly_as_with_fastavro(
    spec: TopicSpec, data: st.DataObject, codecs: Codecs, slow: Codecs
) -> None:
    fast, reference = codec_for(codecs, spec), codec_for(slow, spec)
    blob = bytearray(fast.encode(sample(spec)))
    cut = data.draw(st.integers(5, len(blob)))
    for at, value in data.draw(
        st.lists(st.tuples(st.integers(5, len(blob) - 1), st.integers(0, 255)), max_size=3)
    ):
        blob[at] = value
    damaged = bytes(blob[:cut])

    def outcome(codec: TopicCodec[Any]) -> str:
        try:
            return repr(codec.decode_dict(damaged))
        except InvalidEvent:
            return "InvalidEvent"

    assert outcome(fast) == outcome(reference)


def test_objects_need_a_keyword_for_every_field_and_known_records() -> None:
    schema = json.loads(load_schema(RECEIPTS.schema_file))
    build = dict(mapping.RECEIPT_BUILD)
    ctor, keywords = build["io.chatpipe.common.User"]
    build["io.chatpipe.common.User"] = (ctor, {k: v for k, v in keywords.items() if k != "username"})
    with pytest.raises(fastpath.Unsupported, match="username"):
        fastpath.compile_reader(schema, build=build)
    with pytest.raises(fastpath.Unsupported, match="username"):
        fastpath.compile_writer(schema, build=build)
    with pytest.raises(fastpath.Unsupported, match="no such records"):
        fastpath.compile_writer(schema, build={**mapping.RECEIPT_BUILD, "io.chatpipe.Nope": (dict, {})})
    with pytest.raises(fastpath.Unsupported, match="no such records"):
        fastpath.compile_reader(schema, build={**mapping.RECEIPT_BUILD, "io.chatpipe.Nope": (dict, {})})


def test_receipts_from_another_writer_schema_are_resolved_not_built(codecs: Codecs) -> None:
    """Objects are built straight from the bytes only for data written with the codec's own schema."""
    model = parse_webhook(load("dr_v9_whatsapp_read"), RECEIVED)
    assert model.whatsapp_pricing_category is not None
    older = json.loads(load_schema(RECEIPTS.schema_file))
    older["fields"] = [f for f in older["fields"] if f["name"] != "whatsappPricingCategory"]
    writer_id = codecs.registry.register(RECEIPTS.subject, json.dumps(older))
    assert writer_id != codecs.receipts.schema_id
    record = {k: v for k, v in mapping.receipt_to_dict(model).items() if k != "whatsappPricingCategory"}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(older), record)
    old_data = _HEADER.pack(0, writer_id) + buf.getvalue()
    built: list[int] = []
    build = codecs.receipts._fast_build
    assert build is not None

    def spy(data: bytes, pos: int) -> Any:
        built.append(struct.unpack_from(">I", data, 1)[0])
        return build(data, pos)

    codecs.receipts._fast_build = spy
    assert codecs.receipts.decode(old_data) == dataclasses.replace(model, whatsapp_pricing_category=None)
    assert built == []  # resolved by fastavro, never read by the builder compiled for the new schema
    assert codecs.receipts.decode(codecs.receipts.encode(model)) == model
    assert built == [codecs.receipts.schema_id]
