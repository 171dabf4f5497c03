"""The sink worker (`chatpipe sink`): consume the message-state, inbound and conversation topics, write
batches to the store.

At-least-once: offsets are committed only after the batch's transaction committed. Writes are idempotent
and monotonic (version guard in the upsert), so a redelivered batch changes nothing. Undecodable records
go to the sink dead-letter topic with the reason; a store outage pauses consumption and retries the same
batch until it succeeds; a schema registry outage while decoding is retried the same way (never
dead-lettered).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from prometheus_client import CollectorRegistry

from chatpipe.runtime import kafka
from chatpipe.runtime.config import Settings
from chatpipe.runtime.metric_defs import SinkMetrics
from schemas.catalog import CONVERSATIONS, INBOUND, MESSAGE_STATE
from schemas.codec import Codecs
from schemas.errors import InvalidEvent, TransientError
from schemas.models import Conversation, DeadLetter, InboundMessage, MessageState
from sinks.connect import open_store
from sinks.rows import PiiPolicy
from sinks.store import Store

log = logging.getLogger(__name__)

SINK_GROUP = "chatpipe-sink"

T = TypeVar("T")


def consumer_config(settings: Settings, group: str = SINK_GROUP) -> dict[str, Any]:
    return kafka.consumer(
        settings,
        group,
        **{
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            "fetch.wait.max.ms": 50,
            "partition.assignment.strategy": "cooperative-sticky",
        },
    )


def pii_policy(settings: Settings) -> PiiPolicy:
    key = (settings.pii_hash_key or "").encode()
    return PiiPolicy(clear=settings.pii_clear, hash_key=key)


class SinkWorker:
    def __init__(
        self,
        settings: Settings,
        store: Store | None = None,
        codecs: Codecs | None = None,
        batch_size: int = 2000,
        metrics_registry: CollectorRegistry | None = None,
        group: str = SINK_GROUP,
    ) -> None:
        """`group` is the consumer group (a new group reads the topics from their start)."""
        self.settings = settings
        self.group = group
        self.store = store or open_store(settings.store_url, pii_policy(settings))
        self.codecs = codecs or Codecs.connect(settings.schema_registry_url)
        self.batch_size = batch_size
        self.metrics_registry = metrics_registry or CollectorRegistry()
        self.metrics = SinkMetrics(self.metrics_registry)
        self._stop = threading.Event()
        self._assigned = threading.Event()
        self._consumer: Consumer | None = None
        self._dlq = Producer(kafka.producer(settings))

    @property
    def assigned(self) -> threading.Event:
        """Set once the consumer group gave this worker its partitions."""
        return self._assigned

    def stop(self) -> None:
        self._stop.set()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("sink assigned %s", ",".join(f"{p.topic}[{p.partition}]" for p in partitions))
        self._assigned.set()

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        self.store.migrate()
        self.metrics.store_up.set(1)
        consumer = Consumer(consumer_config(self.settings, self.group))
        self._consumer = consumer
        consumer.subscribe([MESSAGE_STATE.name, INBOUND.name, CONVERSATIONS.name], on_assign=self._on_assign)
        ready_sent = False
        try:
            while not self._stop.is_set():
                messages = consumer.consume(num_messages=self.batch_size, timeout=0.2)
                if not ready_sent and self._assigned.is_set():
                    ready_sent = True
                    if on_ready is not None:
                        on_ready()
                if messages:
                    self._handle(consumer, messages)
        finally:
            consumer.close()
            self._dlq.flush(10)
            self.store.close()

    def _handle(self, consumer: Consumer, messages: list[Message]) -> None:
        states: list[MessageState] = []
        inbound: list[InboundMessage] = []
        conversations: list[Conversation] = []
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error: %s", err)
                continue
            topic = msg.topic()
            try:
                if topic == MESSAGE_STATE.name:
                    states.append(self._decode(self.codecs.state.decode, msg))
                elif topic == INBOUND.name:
                    inbound.append(self._decode(self.codecs.inbound.decode, msg))
                elif topic == CONVERSATIONS.name:
                    conversations.append(self._decode(self.codecs.conversations.decode, msg))
            except (InvalidEvent, KeyError, TypeError, ValueError) as exc:
                self._dead_letter(msg, str(getattr(exc, "reason", exc)))
        self._write_with_retry(consumer, states, inbound, conversations)
        consumer.commit(asynchronous=False)

    def _decode(self, decode: Callable[[bytes], T], msg: Message) -> T:
        """Decode one record; a registry outage (TransientError) is waited out, not dead-lettered."""
        delay = 0.5
        while True:
            try:
                return decode(msg.value() or b"")
            except TransientError as exc:
                if self._stop.is_set():
                    raise
                log.warning(
                    "cannot decode topic=%s partition=%s offset=%s yet, retrying in %.1fs: %s",
                    msg.topic(),
                    msg.partition(),
                    msg.offset(),
                    delay,
                    exc,
                )
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)

    def _write_with_retry(
        self,
        consumer: Consumer,
        states: list[MessageState],
        inbound: list[InboundMessage],
        conversations: list[Conversation],
    ) -> None:
        delay = 0.5
        paused: list[TopicPartition] = []
        while True:
            started = time.perf_counter()
            try:
                if states:
                    self.store.write_states(states)
                if inbound:
                    self.store.write_inbound(inbound)
                if conversations:
                    self.store.write_conversations(conversations)
            except TransientError as exc:
                self.metrics.store_up.set(0)
                if not paused:
                    paused = consumer.assignment()
                    consumer.pause(paused)
                log.warning("store unavailable, retrying batch in %.1fs: %s", delay, exc)
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline and not self._stop.is_set():
                    consumer.poll(0.1)  # keep group membership while paused
                if self._stop.is_set():
                    raise
                delay = min(delay * 2, 10.0)
                continue
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
            self.metrics.rows.labels(MESSAGE_STATE.name, "written").inc(len(states))
            self.metrics.rows.labels(INBOUND.name, "written").inc(len(inbound))
            self.metrics.rows.labels(CONVERSATIONS.name, "written").inc(len(conversations))
            if paused:
                consumer.resume(paused)
                self.metrics.store_up.set(1)
                log.info("store back, consumption resumed")
            return

    def _dead_letter(self, msg: Message, reason: str) -> None:
        error_id = str(uuid.uuid4())
        log.error(
            "sink dead-letter topic=%s partition=%s offset=%s error_id=%s: %s",
            msg.topic(),
            msg.partition(),
            msg.offset(),
            error_id,
            reason,
        )
        letter = DeadLetter(
            error_id=error_id,
            reason=f"{msg.topic()}[{msg.partition()}]@{msg.offset()}: {reason}",
            code=1000,
            http_status=0,
            source="sink",
            received_at=datetime.now(UTC),
            body=msg.value() or b"",
        )
        codec = self.codecs.sink_dlq
        self._dlq.produce(codec.spec.name, codec.encode(letter), error_id.encode())
        self._dlq.flush(10)
        self.metrics.rows.labels(msg.topic(), "dead_letter").inc()
