"""An asyncio face on confluent-kafka's producer: `await publish(...)` returns once the broker acked.

librdkafka does the batching (linger) and retries; its delivery reports are served on the event loop, so
one poll serves every report that arrived meanwhile: once per loop iteration that published records, and
by a short timer while records are in flight.

A producer librdkafka can no longer deliver with (fenced, fatal, or after timed-out messages) is replaced by
a new one with the same config (`AsyncProducer.replace`): what the old one held fails, new records go to the
new one. Measured on Tansu 0.6 (issue 20): after a broker pause longer than `message.timeout.ms` the
idempotent producer's timed-out records fail with `_MSG_TIMED_OUT` (`fatal()` False), librdkafka then bumps
the producer epoch itself (KIP-360, no InitProducerId), and Tansu answers every later batch with
`PRODUCER_FENCED` (`fatal()` False, no error callback) for as long as that producer lives. A new producer
gets a new producer id and delivers at once. Apache Kafka accepts the bumped epoch; replacing costs it only
the idempotence of the records then in flight (they are spooled and sent again: at-least-once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, Producer

from chatpipe.runtime import kafka
from chatpipe.runtime.config import Settings
from schemas.errors import TransientError

log = logging.getLogger(__name__)


def producer_config(settings: Settings | str, **overrides: Any) -> dict[str, Any]:
    """Durable defaults: acks=all, short linger; idempotence (no duplicates from librdkafka's retries) as
    CHATPIPE_KAFKA_IDEMPOTENCE says, and the connection and security, from `chatpipe.runtime.kafka`. A
    bare bootstrap string is a PLAINTEXT cluster with no other client setting (tests and benchmarks on
    the embedded broker)."""
    if isinstance(settings, str):
        settings = Settings(kafka_bootstrap=settings)
    defaults: dict[str, Any] = {
        "linger.ms": 2,
        "batch.num.messages": 10000,
        "compression.type": "none",
        "message.timeout.ms": 10000,
        "queue.buffering.max.messages": 200000,
        "socket.keepalive.enable": True,
        # a broker that comes back is found within a second (librdkafka's default backs off up to 10 s)
        "reconnect.backoff.max.ms": 1000,
    }
    return kafka.producer(settings, **{**defaults, **overrides})


#: delivery errors after which the producer is replaced: librdkafka's idempotence state cannot be trusted
#: (fenced, sequence or epoch errors), or a message timed out (on Tansu the producer is fenced from then on)
REPLACE_ON = frozenset(
    {
        KafkaError._FATAL,
        KafkaError.PRODUCER_FENCED,
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.INVALID_PRODUCER_ID_MAPPING,
    }
)


def replace_cause(err: KafkaError) -> str | None:
    """Why a delivery or client error calls for a new producer ("fatal", "fenced", "timed_out",
    "idempotence"), or None when the producer is fine (the error is the record's or transient)."""
    if err.fatal() or err.code() == KafkaError._FATAL:
        return "fatal"
    if err.code() not in REPLACE_ON:
        return None
    if err.code() == KafkaError.PRODUCER_FENCED:
        return "fenced"
    if err.code() in (KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT):
        return "timed_out"
    return "idempotence"


class ProduceFailed(TransientError):
    def __init__(self, error: KafkaError | str, detail: str = "") -> None:
        super().__init__(f"{error} ({detail})" if detail else str(error))
        self.error = error


class AsyncProducer:
    """Delivery reports are served on the event loop by `poll(0)`: once per loop iteration that published
    (a `call_soon` from the first `publish` of the iteration), and from a loop timer, every `poll_interval`
    while records await their ack and every `idle_interval` otherwise (for error callbacks). Each report
    resolves its future right there: no thread, no GIL hand-offs, no cross-thread wake-ups per batch.

    The per-iteration poll matters when the loop is busy: an iteration that handles a burst of webhooks
    takes milliseconds, and acks that came back meanwhile would otherwise wait for the timer. Measured on
    bench/ingest.py's stack, interleaved rounds: +9-11% webhooks/s alone, +5-6% beside the worker and the
    sink; alone, the event loop then waits for acks 1% of the time instead of 12%.

    Replacement: a delivery report or client error that `replace_cause` names schedules `replace` (at most
    one per `min_replace_interval`); the owner may call `replace` itself (a drain that makes no progress).
    The old producer's queued and in-flight records are purged: their futures fail with `ProduceFailed`
    (`_PURGE_QUEUE`/`_PURGE_INFLIGHT`; an in-flight one may still have reached the broker) and it is polled
    by its own timer until it holds nothing, then dropped. Nothing of this runs on the happy path: the
    checks sit in the error branch of the delivery callback.
    """

    def __init__(
        self,
        config: dict[str, Any],
        poll_interval: float = 0.001,
        idle_interval: float = 0.05,
        min_replace_interval: float = 1.0,
    ) -> None:
        if not 0 < poll_interval <= idle_interval:
            raise ValueError(f"need 0 < poll_interval <= idle_interval, got {poll_interval}, {idle_interval}")
        if min_replace_interval < 0:
            raise ValueError(f"min_replace_interval must be >= 0, got {min_replace_interval}")
        #: what every producer, the first and each replacement, is built from
        self.config = dict(config)
        self._producer = self._new_producer()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.poll_interval = poll_interval
        self.idle_interval = idle_interval
        self.min_replace_interval = min_replace_interval
        self._timer: asyncio.TimerHandle | None = None
        self._fast = False  # the pending timer is a poll_interval one
        self._soon = False  # a poll is queued for the next loop iteration
        self._running = False
        self._delivered_ok = False
        self._last_error: str | None = None
        self._last_ok = 0.0
        self._retired: list[tuple[Producer, str]] = []  # replaced producers still holding records, and why
        self._retired_timer: asyncio.TimerHandle | None = None
        self._serving_retired: str | None = None  # while serving a replaced producer's reports: why replaced
        self._replace_timer: asyncio.TimerHandle | None = None
        self._replaced_at = -float("inf")
        #: how many times the producer was replaced, and why the last time
        self.replacements = 0
        self.last_replace_reason: str | None = None
        #: called with the cause ("fatal", "fenced", "timed_out", "idempotence" or the caller's) on each
        self.on_replace: Callable[[str], None] | None = None

    def _new_producer(self) -> Producer:
        return Producer(dict(self.config, error_cb=self._on_error))

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._running = True
        self._schedule(self.idle_interval)

    @property
    def healthy(self) -> bool:
        """True when the last delivery succeeded more recently than the last broker-level error."""
        return self._last_error is None

    def _on_error(self, err: KafkaError) -> None:
        self._last_error = str(err)
        log.warning("kafka producer error: %s", err)
        if err.fatal() and self._serving_retired is None:
            self._replace_soon("fatal", err)

    def _on_delivery(self, fut: asyncio.Future[None], err: KafkaError | None, _msg: Any) -> None:
        if err is None:
            self._delivered_ok = True
            if not fut.done():
                fut.set_result(None)
            return
        if self._replace_timer is None and self._serving_retired is None:
            cause = replace_cause(err)
            if cause is not None:
                self._replace_soon(cause, err)
        if not fut.done():
            # a purged record names why its producer was replaced
            why = self._serving_retired
            fut.set_exception(ProduceFailed(err, "" if why is None else f"producer replaced: {why}"))

    def _replace_soon(self, cause: str, err: KafkaError) -> None:
        """Replace the producer from the loop, not from inside its poll (which is running the callback)."""
        if self._replace_timer is not None or self._loop is None or not self._running:
            return
        delay = max(0.0, self._replaced_at + self.min_replace_interval - time.monotonic())
        self._replace_timer = self._loop.call_later(delay, self._replace_now, cause, str(err))

    def _replace_now(self, cause: str, error: str) -> None:
        self._replace_timer = None
        self.replace(cause, error)

    def replace(self, cause: str, detail: str = "") -> None:
        """Put a new producer (same config) in place of the current one; call from the loop's thread, never
        from a delivery callback. The old one's records fail (see the class docstring); returns at once."""
        if self._replace_timer is not None:
            self._replace_timer.cancel()
            self._replace_timer = None
        old, self._producer = self._producer, self._new_producer()
        self._replaced_at = time.monotonic()
        self.replacements += 1
        self.last_replace_reason = f"{cause}: {detail}" if detail else cause
        self._last_error = f"producer replaced ({self.last_replace_reason})"
        held = len(old)
        old.purge(in_queue=True, in_flight=True, blocking=False)
        self._retired.append((old, self.last_replace_reason))
        log.warning(
            "kafka producer replaced (%s); the %d records it held fail and are spooled or stay in the spool",
            self.last_replace_reason,
            held,
        )
        self._serve_retired()
        if self.on_replace is not None:
            self.on_replace(cause)

    def _serve_retired(self) -> None:
        """Serve the reports of replaced producers; drop those that hold nothing any more."""
        if self._retired_timer is not None:
            self._retired_timer.cancel()
            self._retired_timer = None
        try:
            for old, why in self._retired:
                self._serving_retired = why
                old.poll(0)
        finally:
            self._serving_retired = None
        self._retired = [(old, why) for old, why in self._retired if len(old)]
        if self._retired and self._loop is not None and self._running:
            self._retired_timer = self._loop.call_later(0.01, self._serve_retired)

    def broker_metadata(self, timeout: float) -> Any:
        """Ask the broker for cluster metadata (blocking, any thread); raises KafkaException if unanswered."""
        return self._producer.list_topics(timeout=timeout)

    def _schedule(self, delay: float) -> None:
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._fast = delay <= self.poll_interval
        self._timer = self._loop.call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._fast = False
        self._serve()
        if self._running:
            self._schedule(self.poll_interval if len(self._producer) else self.idle_interval)

    def _poll_soon(self) -> None:
        self._soon = False
        if self._running:
            self._serve()

    def _serve(self) -> None:
        self._producer.poll(0)  # runs the delivery and error callbacks, here on the loop's thread
        if self._delivered_ok:
            self._delivered_ok = False
            self._last_error = None
            self._last_ok = time.monotonic()

    def publish(self, topic: str, key: bytes, value: bytes) -> asyncio.Future[None]:
        """Queue one record; the returned future resolves on ack or fails with ProduceFailed.

        Call from the event loop's thread (the one `start()` ran on).
        """
        assert self._loop is not None, "start() first"
        fut: asyncio.Future[None] = self._loop.create_future()
        try:
            self._producer.produce(topic, value, key, on_delivery=partial(self._on_delivery, fut))
        except BufferError as exc:
            fut.set_exception(ProduceFailed(f"local producer queue full: {exc}"))
            return fut
        except Exception as exc:  # KafkaException for unknown topic etc.
            fut.set_exception(ProduceFailed(str(exc)))
            return fut
        if self._running:
            if not self._soon:
                self._soon = True
                self._loop.call_soon(self._poll_soon)
            if not self._fast:  # an ack is awaited: poll soon rather than at the idle pace
                self._schedule(self.poll_interval)
        return fut

    def flush(self, timeout: float = 10.0) -> int:
        """Wait (blocking) for outstanding deliveries, resolving their futures; returns how many are left
        (replaced producers' records included)."""
        deadline = time.monotonic() + timeout
        remaining = int(self._producer.flush(timeout))
        self._serve()
        try:
            for old, why in self._retired:
                self._serving_retired = why  # flush serves its reports too
                old.flush(max(0.0, deadline - time.monotonic()))
        finally:
            self._serving_retired = None
        self._serve_retired()
        return remaining + sum(len(old) for old, _why in self._retired)

    def close(self, timeout: float = 10.0) -> int:
        """Stop polling, then flush here; call from the event loop's thread."""
        self._running = False
        for handle in (self._timer, self._replace_timer, self._retired_timer):
            if handle is not None:
                handle.cancel()
        self._timer = self._replace_timer = self._retired_timer = None
        self._fast = False
        return self.flush(timeout)
