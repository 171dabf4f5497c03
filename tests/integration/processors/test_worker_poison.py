"""One bad record never costs other records: poison receipts among valid ones, real broker, real worker.

Issue 20: a receipt timestamped `9999-12-31T23:59:59Z` made the pure core overflow; Faust restarted the
agent and 477, then 500, of the 500 valid receipts of the same burst never reached the state topic. Here
the same burst carries every kind of record the worker cannot fold as it is, produced together with 500
valid receipts on the real Tansu broker and read back from the real topics (nothing mocked):

- receipts at the end of the calendar (a delivery and a failure at 9999-12-31T23:59:59Z): no longer
  poison, the core saturates its due times (processors.state "Time range"), so they are folded;
- a timestamp past year 9999 (a long no datetime holds; any non-Python producer can write it) and a
  record that is not Avro at all: undecodable, parked (stage decode);
- a umid whose stored state does not decode (a corrupt changelog record, recovered into RocksDB before
  the burst): its receipts cannot be folded, parked (stage fold); no other umid is touched.

Every valid receipt must reach the state topic with the state the pure core gives, the poison must be in
`chatpipe.processor.dlq` with its reason, record bytes and position, the metric must count it, and the
worker must go on folding receipts posted afterwards.

The inbound path (the conversation agents) gets the same treatment: a WhatsApp message at the end of the
calendar (it made `apply_inbound` overflow and stopped the conversations agent), two undecodable messages
and one whose stored conversation does not decode, among valid messages of many conversations.
"""

from __future__ import annotations

import io
import json
import random
import struct
import subprocess
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fastavro
import pytest
from aiokafka.partitioner import DefaultPartitioner
from confluent_kafka import Consumer, Producer, TopicPartition

from chatpipe.runtime.topics import PROCESSOR_APP_ID
from processors.app import LIVE, Stored, encode_stored
from processors.conversation import apply_inbound, conversation_key
from schemas import mapping
from schemas.catalog import (
    CONVERSATIONS,
    INBOUND,
    INBOUND_BY_CONVERSATION,
    PROCESSOR_DLQ,
    RECEIPTS,
    load_schema,
)
from schemas.codec import Codecs
from schemas.models import Conversation, DeliveryReceipt, InboundContent, InboundMessage, Status, User
from schemas.timefmt import parse_iso8601
from tests.integration.processors import test_worker as tp
from tests.support.kafka import read_topic

pytestmark = pytest.mark.integration

# the fixtures of the processor tests: a fresh broker for this module, the registry's codecs, workers
bootstrap = tp.bootstrap
codecs = tp.codecs
workers = tp.workers

END = "9999-12-31T23:59:59Z"
CHANGELOG = "chatpipe-processor-message_state-changelog"


def edge_receipts() -> list[DeliveryReceipt]:
    """The receipts that crashed the worker: a delivery and a failure at the end of the calendar."""
    t = parse_iso8601(END)
    user = User(msisdn="+6590000000")
    out = []
    for umid, final in (("e-delivered", "delivered"), ("e-failed", "undelivered")):
        for state, ts in (("sent", tp.T0), (final, t)):
            out.append(DeliveryReceipt(umid, "acme", "whatsapp", Status(state, ts), tp.T0, "{}", user=user))
    return out


def beyond_the_calendar(codecs: Codecs) -> bytes:
    """A receipt whose status timestamp (timestamp-micros) is 10000-01-01: valid Avro, no datetime."""
    r = DeliveryReceipt("x-beyond", "acme", "sms", Status("delivered", tp.T0), tp.T0, "{}", user=User())
    d = mapping.receipt_to_dict(r)
    d["status"]["timestamp"] = 253_402_300_800_000_000
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(json.loads(load_schema(RECEIPTS.schema_file))), d)
    return struct.pack(">bI", 0, codecs.receipts.schema_id) + buf.getvalue()


def corrupt_the_stored_state(bootstrap: str, umid: str) -> None:
    """A changelog record for `umid` whose state does not decode; the worker recovers it into RocksDB.
    Produced alone (Tansu's ListOffsets needs one record per batch to give the true end to recovery)."""
    value = encode_stored(Stored(LIVE, -1, -1, avro=b"\x00\x00\x00\x00\x01not a state"))
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(CHANGELOG, value, umid.encode())  # keyed like the receipts: the same partition
    assert producer.flush(30) == 0


def produce_burst(bootstrap: str, records: list[tuple[bytes, bytes]]) -> dict[bytes, tuple[int, int]]:
    """Produce (key, value) records together; returns value -> (partition, offset) as acked."""
    where: dict[bytes, tuple[int, int]] = {}

    def acked(err: Any, msg: Any) -> None:
        assert err is None, err
        where[msg.value()] = (msg.partition(), msg.offset())

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    for key, value in records:
        producer.produce(RECEIPTS.name, value, key, on_delivery=acked)
        producer.poll(0)
    assert producer.flush(30) == 0
    return where


def dead_letter_counts(port: int) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("chatpipe_processor_dead_letters_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('stage="', 1)[1].split('"', 1)[0]] = float(value)
    return out


def test_poison_receipts_are_parked_and_every_valid_receipt_of_the_burst_is_folded(
    bootstrap: str, codecs: Codecs, workers: Any, tmp_path: Path
) -> None:
    valid = tp.workload("v", 150, seed=20)[:500]
    assert len(valid) == 500
    edges = edge_receipts()
    expected = tp.truth(valid)
    expected_edges = tp.truth(edges)
    corrupt_the_stored_state(bootstrap, "x-corrupt")
    corrupt = [
        DeliveryReceipt("x-corrupt", "acme", "sms", Status(s, tp.T0), tp.T0, "{}", user=User())
        for s in ("sent", "delivered")
    ]
    undecodable = [beyond_the_calendar(codecs), b'{"not": "avro"}']

    worker = workers(tmp_path / "w", "w")
    worker.wait_ready()
    records = [(r.umid.encode(), codecs.receipts.encode(r)) for r in valid + edges + corrupt]
    records += [(b"x-undecodable", raw) for raw in undecodable]
    random.Random(20).shuffle(records)
    where = produce_burst(bootstrap, records)

    records_out = tp.wait_for_truth(bootstrap, codecs, "v", expected, timeout=120)
    tp.assert_monotonic(records_out)
    tp.wait_for_truth(bootstrap, codecs, "e", expected_edges, timeout=60)  # folded, not parked

    letters = [
        codecs.processor_dlq.decode(m.value())
        for m in read_topic(bootstrap, PROCESSOR_DLQ.name, expect=4, timeout=90)
    ]
    parked = {letter.body: letter for letter in letters}
    poison = undecodable + [codecs.receipts.encode(r) for r in corrupt]
    assert sorted(parked) == sorted(poison), [x.reason for x in letters]
    for body, letter in parked.items():
        partition, offset = where[body]
        headers = dict(letter.headers)
        assert letter.source == "processor" and letter.reason
        assert headers["topic"] == RECEIPTS.name
        assert (headers["partition"], headers["offset"]) == (str(partition), str(offset))
        assert f"{RECEIPTS.name}[{partition}]@{offset}" in letter.reason
    assert "date value out of range" in parked[undecodable[0]].reason
    assert {dict(x.headers)["stage"] for x in letters if dict(x.headers)["umid"] == "x-corrupt"} == {"fold"}

    deadline = time.monotonic() + 30
    while dead_letter_counts(worker.port) != {"decode": 2.0, "fold": 2.0}:
        assert time.monotonic() < deadline, dead_letter_counts(worker.port)
        time.sleep(0.2)
    assert "poison receipt parked (fold)" in worker.tail(200_000)
    assert "umid=x-corrupt" in worker.tail(200_000)

    # the worker goes on: receipts posted afterwards are folded too
    later = tp.workload("w", 40, seed=21)
    tp.produce(bootstrap, codecs, later)
    tp.wait_for_truth(bootstrap, codecs, "w", tp.truth(later), timeout=90)
    assert worker.proc.poll() is None


# --- inbound messages ------------------------------------------------------------------------------

CONVERSATIONS_CHANGELOG = "chatpipe-processor-conversations-changelog"


def inbound(user: str, umid: str, at: datetime, channel: str = "whatsapp") -> InboundMessage:
    return InboundMessage(
        umid=umid, sub_account_id="acme", timestamp=at, channel=channel, type="Text", received_at=tp.T0,
        raw_json="{}", channel_id="c-1", user=User(msisdn=user), content=InboundContent(text="hi"),
    )  # fmt: skip


def conversation_truth(messages: list[InboundMessage]) -> dict[str, Conversation]:
    out: dict[str, Conversation] = {}
    for m in messages:
        key = conversation_key(m)
        out[key] = apply_inbound(out.get(key), m, now=tp.NOW)[0]
    return out


def comparable_conversation(c: Conversation) -> tuple[Any, ...]:
    return (c.message_count, c.last_umid, c.first_inbound_at, c.last_inbound_at, c.window_open_until)


def wait_for_conversations(
    bootstrap: str, codecs: Codecs, expected: dict[str, Conversation], timeout: float = 90.0
) -> None:
    """Read the conversations topic until each expected conversation's latest version is the truth."""
    deadline = time.monotonic() + timeout
    while True:
        latest: dict[str, Conversation] = {}
        for m in read_topic(bootstrap, CONVERSATIONS.name, timeout=30, idle=1.5):
            c = codecs.conversations.decode(m.value())
            if c.key in expected and (c.key not in latest or c.version > latest[c.key].version):
                latest[c.key] = c
        wrong = [
            k for k, c in expected.items()
            if k not in latest or comparable_conversation(latest[k]) != comparable_conversation(c)
        ]  # fmt: skip
        if not wrong:
            return
        assert time.monotonic() < deadline, (len(wrong), wrong[:3], [latest.get(k) for k in wrong[:1]])
        time.sleep(1.0)


def beyond_the_calendar_inbound(codecs: Codecs) -> bytes:
    """An inbound message timestamped 10000-01-01 (valid Avro, no datetime)."""
    d = mapping.inbound_to_dict(inbound("+6590000001", "i-beyond", tp.T0))
    d["timestamp"] = 253_402_300_800_000_000
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(json.loads(load_schema(INBOUND.schema_file))), d)
    return struct.pack(">bI", 0, codecs.inbound.schema_id) + buf.getvalue()


def corrupt_the_stored_conversation(bootstrap: str, key: bytes) -> None:
    """A changelog record for conversation `key` that does not decode, on the partition Faust's producer
    (aiokafka's murmur2 partitioner) gives the key: the worker recovers it into its table."""
    partition = DefaultPartitioner()(key, list(range(tp.PARTITIONS)), list(range(tp.PARTITIONS)))
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(
        CONVERSATIONS_CHANGELOG, b"\x00\x00\x00\x00\x01not a conversation", key, partition=partition
    )
    assert producer.flush(30) == 0


def test_poison_inbound_messages_are_parked_and_every_valid_conversation_is_folded(
    bootstrap: str, codecs: Codecs, workers: Any, tmp_path: Path
) -> None:
    rng = random.Random(22)
    valid = [
        inbound(f"+65911{u:05d}", f"i-{u}-{n}", tp.T0 + timedelta(minutes=rng.randint(0, 600)),
                "whatsapp" if u % 2 else "sms")
        for u in range(30) for n in range(2)
    ]  # fmt: skip
    end = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    edge = [inbound("+6590000002", "i-edge-1", tp.T0), inbound("+6590000002", "i-edge-2", end)]
    corrupt = inbound("+6590000003", "i-corrupt", tp.T0)
    corrupt_the_stored_conversation(bootstrap, conversation_key(corrupt).encode())
    undecodable = [beyond_the_calendar_inbound(codecs), b'{"not": "avro"}']

    worker = workers(tmp_path / "w", "w")
    worker.wait_ready()
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for m in [*valid[:30], *edge, corrupt]:
        producer.produce(INBOUND.name, codecs.inbound.encode(m), m.umid.encode())
    for raw in undecodable:
        producer.produce(INBOUND.name, raw, b"i-undecodable")
    for m in valid[30:]:  # behind the poison, on every partition
        producer.produce(INBOUND.name, codecs.inbound.encode(m), m.umid.encode())
    assert producer.flush(30) == 0

    wait_for_conversations(bootstrap, codecs, conversation_truth(valid + edge))
    (edge_key,) = conversation_truth(edge)
    poison = {*undecodable, codecs.inbound.encode(corrupt)}
    deadline = time.monotonic() + 60
    while True:
        letters = [codecs.processor_dlq.decode(m.value()) for m in read_topic(bootstrap, PROCESSOR_DLQ.name)]
        parked = {x.body: x for x in letters if dict(x.headers)["topic"].startswith("chatpipe.inbound")}
        if set(parked) >= poison or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert set(parked) == poison, [x.reason for x in parked.values()]
    stages = {body: dict(x.headers)["stage"] for body, x in parked.items()}
    assert stages == {undecodable[0]: "inbound_decode", undecodable[1]: "inbound_decode",
                      codecs.inbound.encode(corrupt): "inbound_fold"}  # fmt: skip
    assert "date value out of range" in parked[undecodable[0]].reason
    assert dict(parked[codecs.inbound.encode(corrupt)].headers)["umid"] == "i-corrupt"
    assert edge_key  # folded, window saturated (compared above): not parked
    deadline = time.monotonic() + 30
    while dead_letter_counts(worker.port).get("inbound_decode") != 2.0:
        assert time.monotonic() < deadline, dead_letter_counts(worker.port)
        time.sleep(0.2)
    assert dead_letter_counts(worker.port).get("inbound_fold") == 1.0
    assert "poison inbound message parked (inbound_fold)" in worker.tail(200_000)

    # the agents go on: messages posted afterwards are folded too
    later = [inbound(f"+65922{u:05d}", f"i-later-{u}", tp.T0) for u in range(5)]
    for m in later:
        producer.produce(INBOUND.name, codecs.inbound.encode(m), m.umid.encode())
    assert producer.flush(30) == 0
    wait_for_conversations(bootstrap, codecs, conversation_truth(later))
    assert worker.proc.poll() is None
    # and every record, poison included, is acked: the worker's commits reach the end of both inputs
    for topic in (INBOUND.name, INBOUND_BY_CONVERSATION.name):
        deadline = time.monotonic() + 60
        while (lag := uncommitted(bootstrap, topic)) != 0:
            assert time.monotonic() < deadline, f"{topic}: {lag} records never committed"
            time.sleep(1.0)


def uncommitted(bootstrap: str, topic: str) -> int:
    """Records of `topic` past the worker's committed offsets (its consumer group). The ends are read,
    not listed: Tansu answers the base offset of the last batch + 1 (docs/embedded-broker.md)."""
    ends: dict[int, int] = {}
    for m in read_topic(bootstrap, topic, timeout=30, idle=1.5):
        ends[m.partition()] = max(ends.get(m.partition(), 0), m.offset() + 1)
    config = {"bootstrap.servers": bootstrap, "group.id": PROCESSOR_APP_ID, "enable.auto.commit": False}
    consumer = Consumer(config)
    try:
        committed = consumer.committed([TopicPartition(topic, p) for p in ends], timeout=10)
        return sum(max(0, ends[c.partition] - max(c.offset, 0)) for c in committed)
    finally:
        consumer.close()


def test_a_bad_deploy_trips_the_dead_letter_limit_and_the_worker_stops_leaving_the_batch_uncommitted(
    bootstrap: str, codecs: Codecs, workers: Any, tmp_path: Path
) -> None:
    """Every record "poison" (here: not Avro at all, as a worker with a wrong codec would see them): the
    worker must not swallow the stream into the DLQ. It stops (exit 1) with an ERROR naming the ratio and
    the last reason, and the records of the tripping batch are not committed."""
    limit = {"CHATPIPE_PROCESSOR_DLQ_WINDOW": "20", "CHATPIPE_PROCESSOR_DLQ_MIN": "5"}
    worker = workers(tmp_path / "w", "w", **limit)
    worker.wait_ready()
    before = uncommitted(bootstrap, RECEIPTS.name)
    produce_burst(bootstrap, [(f"x-deploy-{i}".encode(), b"not avro %d" % i) for i in range(8)])
    try:
        code = worker.proc.wait(90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not stop:\n{worker.tail()}")
    log = worker.tail(200_000)
    assert code == 1, log[-3000:]
    assert "dead-letter limit reached" in log and "records dead-lettered (" in log, log[-3000:]
    assert "not Confluent-framed Avro" in log  # the last reason
    assert uncommitted(bootstrap, RECEIPTS.name) > before
