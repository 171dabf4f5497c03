"""An asyncio face on confluent-kafka's producer: `await publish(...)` returns once the broker acked.

librdkafka does the batching (linger) and retries; delivery reports are served by one background thread
that resolves the waiting futures in batches (one loop wake-up per poll, not one per message).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from confluent_kafka import KafkaError, Producer

from schemas.errors import TransientError

log = logging.getLogger(__name__)


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """Durable defaults: acks=all, idempotence (no duplicates from librdkafka retries), short linger."""
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 2,
        "batch.num.messages": 10000,
        "compression.type": "none",
        "message.timeout.ms": 10000,
        "queue.buffering.max.messages": 200000,
        "socket.keepalive.enable": True,
    }
    config.update(overrides)
    return config


class ProduceFailed(TransientError):
    def __init__(self, error: KafkaError | str) -> None:
        super().__init__(str(error))
        self.error = error


class AsyncProducer:
    def __init__(self, config: dict[str, Any]) -> None:
        self._producer = Producer({**config, "error_cb": self._on_error})
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: list[tuple[asyncio.Future[None], KafkaError | None]] = []
        self._running = False
        self._thread: threading.Thread | None = None
        self._last_error: str | None = None
        self._last_ok = 0.0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._running = True
        self._thread = threading.Thread(target=self._poll_forever, name="kafka-delivery", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        """True when the last delivery succeeded more recently than the last broker-level error."""
        return self._last_error is None

    def _on_error(self, err: KafkaError) -> None:
        self._last_error = str(err)
        log.warning("kafka producer error: %s", err)

    def _on_delivery(self, fut: asyncio.Future[None], err: KafkaError | None, _msg: Any) -> None:
        self._done.append((fut, err))

    def _poll_forever(self) -> None:
        loop = self._loop
        assert loop is not None
        while self._running:
            self._producer.poll(0.05)
            if self._done:
                batch, self._done = self._done, []
                try:
                    loop.call_soon_threadsafe(_resolve, batch)
                except RuntimeError:  # loop closed during shutdown
                    return
                if any(err is None for _, err in batch):
                    self._last_error = None
                    self._last_ok = time.monotonic()

    def publish(self, topic: str, key: bytes, value: bytes) -> asyncio.Future[None]:
        """Queue one record; the returned future resolves on ack or fails with ProduceFailed."""
        assert self._loop is not None, "start() first"
        fut: asyncio.Future[None] = self._loop.create_future()
        try:
            self._producer.produce(topic, value, key, on_delivery=lambda e, m: self._on_delivery(fut, e, m))
        except BufferError as exc:
            fut.set_exception(ProduceFailed(f"local producer queue full: {exc}"))
        except Exception as exc:  # KafkaException for unknown topic etc.
            fut.set_exception(ProduceFailed(str(exc)))
        return fut

    def flush(self, timeout: float = 10.0) -> int:
        """Wait for outstanding deliveries; returns the number still undelivered."""
        return int(self._producer.flush(timeout))

    def close(self, timeout: float = 10.0) -> int:
        """Stop the delivery thread, then flush here; call from the event loop's thread."""
        self._running = False
        if self._thread is not None:
            self._thread.join(timeout=2)
        remaining = self.flush(timeout)
        # deliveries reported during the final flush ran in this thread: resolve them here
        if self._done:
            _resolve(self._done)
            self._done = []
        return remaining


def _resolve(batch: list[tuple[asyncio.Future[None], KafkaError | None]]) -> None:
    for fut, err in batch:
        if fut.done():
            continue
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(ProduceFailed(err))
