"""Every topic is a public API: a plain confluent-kafka consumer, knowing nothing of chatpipe, reads it.

chatpipe's codec writes a realistic record to each topic of the embedded Tansu broker; a stock
`DeserializingConsumer` with `AvroDeserializer` pointed at the registry reads it back. Partitions are
assigned explicitly at the produced offset (no group join: Tansu joins are slow), and every record has a
key unique to the run. The docker tier runs the registry contract checks chatpipe relies on against
Confluent's own `cp-schema-registry`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from confluent_kafka import DeserializingConsumer, Message, Producer, TopicPartition
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import StringDeserializer

from schemas.catalog import TOPICS, TopicSpec, load_schema
from schemas.codec import Codecs, TopicCodec
from schemas.evolution import cmd_register, register_all
from tests.fixtures.records import TO_DICT, plain, sample
from tests.support.containers import production_parts

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def codecs(registry_url: str) -> Codecs:
    return Codecs.connect(registry_url)


def codec_for(codecs: Codecs, spec: TopicSpec) -> TopicCodec[Any]:
    return next(c for c in codecs.all() if c.spec is spec)


def produce(bootstrap: str, topic: str, key: str, value: bytes) -> Message:
    delivered: list[Message] = []

    def on_delivery(err: Any, msg: Message) -> None:
        assert err is None, err
        delivered.append(msg)

    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, key=key.encode(), value=value, on_delivery=on_delivery)
    assert producer.flush(30) == 0, "record not delivered"
    [msg] = delivered
    return msg


def read_back(bootstrap: str, registry_url: str, at: Message, key: str) -> Message:
    consumer = DeserializingConsumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"chatpipe-readable-{RUN}",
            "enable.auto.commit": False,
            "key.deserializer": StringDeserializer("utf_8"),
            "value.deserializer": AvroDeserializer(SchemaRegistryClient({"url": registry_url})),
        }
    )
    try:
        consumer.assign([TopicPartition(at.topic(), at.partition(), at.offset())])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            if msg.key() == key:
                return msg
        raise AssertionError(f"record {key} not read back from {at.topic()}[{at.partition()}]@{at.offset()}")
    finally:
        consumer.close()


@pytest.mark.parametrize("spec", TOPICS, ids=[t.name for t in TOPICS])
def test_plain_confluent_consumer_reads_every_topic(
    spec: TopicSpec, codecs: Codecs, broker: str, registry_url: str
) -> None:
    key = str(uuid.uuid4())  # umid or errorId (a uuid logical type), unique to this run
    model = sample(spec, key=key)
    codec = codec_for(codecs, spec)

    written = produce(broker, spec.name, key, codec.encode(model))
    msg = read_back(broker, registry_url, written, key)

    value = msg.value()
    expected = TO_DICT[spec.schema_file](model)
    assert plain(value) == expected  # uuid logical values come back as uuid.UUID
    for name in ("receivedAt", "updatedAt"):
        if name in value:
            assert isinstance(value[name], datetime) and value[name].utcoffset() is not None
    if "body" in value:
        assert isinstance(value["body"], bytes) and value["body"] == model.body
    assert codec.decode(written.value()) == model  # and chatpipe reads its own record back


def test_register_command_registers_every_subject(
    registry_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cmd_register(registry_url) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(TOPICS)
    for spec, line in zip(TOPICS, out, strict=True):
        assert line.startswith("ok") and spec.subject in line and "id=" in line


def test_register_command_reports_an_unreachable_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert cmd_register("http://127.0.0.1:9") == 2
    assert "UNREACHABLE" in capsys.readouterr().out


# --- the contract chatpipe needs from any registry ----------------------------------------------------


def check_registry_contract(url: str) -> None:
    """Register every subject, test a compatible and an incompatible next version, fetch by id."""
    ids = register_all(url)
    assert set(ids) == {t.subject for t in TOPICS}
    assert register_all(url) == ids  # idempotent

    client = SchemaRegistryClient({"url": url})
    state = next(t for t in TOPICS if t.schema_file == "message_state.avsc")
    schema = json.loads(load_schema(state.schema_file))
    optional = {
        **schema,
        "fields": [*schema["fields"], {"name": "tenant", "type": ["null", "string"], "default": None}],
    }
    required = {**schema, "fields": [*schema["fields"], {"name": "tenant", "type": "string"}]}
    assert client.test_compatibility(state.subject, Schema(json.dumps(optional), "AVRO")) is True
    assert client.test_compatibility(state.subject, Schema(json.dumps(required), "AVRO")) is False

    for spec in TOPICS:
        fetched = json.loads(client.get_schema(ids[spec.subject]).schema_str)
        ours = json.loads(load_schema(spec.schema_file))
        assert fetched["name"] == ours["name"]
        assert [f["name"] for f in fetched["fields"]] == [f["name"] for f in ours["fields"]]
        latest = client.get_latest_version(spec.subject)
        assert latest.schema_id == ids[spec.subject]


def test_embedded_registry_honours_the_contract(registry_url: str) -> None:
    check_registry_contract(registry_url)


@pytest.fixture(scope="module")
def confluent_registry() -> Iterator[str]:
    with production_parts() as parts:
        yield parts["CHATPIPE_SCHEMA_REGISTRY_URL"]


@pytest.mark.docker
def test_confluent_registry_honours_the_same_contract(confluent_registry: str) -> None:
    check_registry_contract(confluent_registry)
