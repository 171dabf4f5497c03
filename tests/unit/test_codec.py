"""Avro round trip of every documented webhook through the full codec: mapping + framing + fastavro.

The registry here is an in-process dictionary with the two calls `Registry` makes of the official client
(register_schema, get_schema); the real registry is covered by tests/integration.
"""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime
from types import SimpleNamespace

import fastavro
import pytest

from ingest.parse import parse_webhook
from schemas.catalog import TOPICS, load_schema
from schemas.codec import Codecs, Registry
from schemas.errors import InvalidEvent
from schemas.models import DeadLetter, DeliveryReceipt, InboundMessage
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
