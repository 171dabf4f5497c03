"""AsyncProducer against the real embedded broker: when delivery reports are served."""

from __future__ import annotations

import asyncio
import time

import pytest

from ingest.publisher import AsyncProducer, producer_config
from schemas.catalog import RECEIPTS

pytestmark = pytest.mark.integration


async def test_a_busy_loop_serves_acks_without_waiting_for_the_timer(broker: str) -> None:
    # timers far beyond the test: only the poll of each loop iteration that publishes can serve the ack
    producer = AsyncProducer(producer_config(broker), poll_interval=60.0, idle_interval=60.0)
    producer.start()
    try:
        first = producer.publish(RECEIPTS.name, b"busy-loop", b"first")
        deadline = time.monotonic() + 20
        while not first.done() and time.monotonic() < deadline:
            producer.publish(RECEIPTS.name, b"busy-loop", b"more")  # an iteration that publishes
            await asyncio.sleep(0.005)
        assert first.done(), "the ack was not served by the iterations that published"
        assert first.exception() is None
    finally:
        assert producer.close(timeout=10) == 0


async def test_an_idle_loop_serves_acks_from_its_timer(broker: str) -> None:
    producer = AsyncProducer(producer_config(broker), poll_interval=0.001, idle_interval=0.05)
    producer.start()
    try:
        await asyncio.wait_for(producer.publish(RECEIPTS.name, b"idle-loop", b"only"), 20)
    finally:
        assert producer.close(timeout=10) == 0
