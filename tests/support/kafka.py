"""Reading topics back in tests, without consumer groups (Tansu group joins take seconds), and throwing
a test's broker away.

End offsets from ListOffsets are wrong on Tansu (docs/embedded-broker.md), so `read_topic` never trusts them:
it reads every partition from the start until it has `expect` records or nothing new came for `idle` s.
"""

from __future__ import annotations

import subprocess
import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition


def read_topic(
    bootstrap: str, topic: str, expect: int | None = None, timeout: float = 30.0, idle: float = 2.0
) -> list[Message]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-reader-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        out: list[Message] = []
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            if expect is not None and len(out) >= expect:
                break
            if expect is None and time.monotonic() - last_new > idle:
                break
            batch = consumer.consume(num_messages=10000, timeout=0.2)
            good = [m for m in batch if m.error() is None]
            if good:
                out.extend(good)
                last_new = time.monotonic()
        return out
    finally:
        consumer.close()


def discard_broker(proc: subprocess.Popen[bytes]) -> None:
    """End a test's throw-away Tansu (memory storage) at once. SIGTERM makes Tansu wait about 5 s for its
    connected clients to leave; a broker whose records are thrown away has nothing to finish."""
    proc.kill()
    proc.wait(10)
