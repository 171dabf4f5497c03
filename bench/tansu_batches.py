"""How the embedded broker's (Tansu's) cost per request grows with the batches a topic holds.

    /tmp/venv/bin/python bench/tansu_batches.py [--records 200000] [--seconds 6] [--partitions 6]

Two fresh Tansu brokers with chatpipe's topics, `--partitions` partitions each; everything goes to the
receipts topic. On each, the same probe runs before and
after loading `--records` records of 700 bytes:

- probe: for `--seconds`, a producer (acks=all, linger 5 ms) sends 50 records every 5 ms while a consumer
  (assigned to every partition at the end, no group) reads them; the broker's CPU (user + system, from
  /proc) is divided by the wall time;
- load: broker A gets the records in batches of at most 4 (linger 0, `batch.num.messages` 4: what ingest's
  one-ack-per-webhook traffic looks like), broker B gets the same records in large batches (linger 50 ms).

Same records, same probe: if the probe costs more only on A, what makes Tansu slower is the number of stored
batches, not of records or bytes. This is why `chatpipe dev` makes fewer partitions on its embedded broker
(chatpipe/dev.py EMBEDDED_PARTITIONS): librdkafka sends one batch per partition per linger.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition

from chatpipe.broker import free_port, start_tansu
from chatpipe.runtime.topics import ensure_topics
from schemas.catalog import RECEIPTS

TOPIC = RECEIPTS.name  # created with the rest of chatpipe's topics, as `chatpipe dev` does
VALUE = b"x" * 700


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def probe(bootstrap: str, broker_pid: int, partitions: int, seconds: float) -> tuple[float, int]:
    """(broker cores, records consumed) under a steady produce + tail-consume load."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "probe", "enable.auto.commit": False})
    consumer.assign([TopicPartition(TOPIC, p, OFFSET_END) for p in range(partitions)])
    consumer.poll(1.0)  # connected and positioned before the clock starts
    got = sent = 0
    cpu0, t0 = cpu_seconds(broker_pid), time.monotonic()
    while time.monotonic() - t0 < seconds:
        for _ in range(50):
            producer.produce(TOPIC, VALUE, str(sent).encode())
            sent += 1
        producer.poll(0)
        got += len(consumer.consume(1000, 0.005))
    cores = (cpu_seconds(broker_pid) - cpu0) / (time.monotonic() - t0)
    producer.flush(10)
    consumer.close()
    return cores, got


def load(bootstrap: str, records: int, small_batches: bool) -> float:
    """Send `records` records, acked; returns the seconds it took (progress printed every 10%)."""
    config = {"bootstrap.servers": bootstrap, "acks": "all"}
    config.update({"linger.ms": 0, "batch.num.messages": 4} if small_batches else {"linger.ms": 50})
    producer = Producer(config)
    t0 = time.monotonic()
    step = max(1, records // 10)
    for i in range(records):
        while True:
            try:
                producer.produce(TOPIC, VALUE, str(i).encode())
                break
            except BufferError:
                producer.poll(0.01)
        if (i + 1) % step == 0:
            print(f"    loaded {i + 1:,} records", flush=True)
    if producer.flush(120):
        raise RuntimeError("load not acked within 120 s")
    return time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each probe")
    parser.add_argument("--partitions", type=int, default=6)
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="chatpipe-bench-tansu-"))
    rows = []
    for label, small in (("batches of <= 4", True), ("large batches", False)):
        port = free_port()
        broker = start_tansu("127.0.0.1", port, logs / f"broker-{port}.log")
        bootstrap = f"127.0.0.1:{port}"
        try:
            ensure_topics(bootstrap, args.partitions)
            print(f"== broker loaded with {label}", flush=True)
            empty, got_empty = probe(bootstrap, broker.pid, args.partitions, args.seconds)
            took = load(bootstrap, args.records, small)
            full, got_full = probe(bootstrap, broker.pid, args.partitions, args.seconds)
        finally:
            broker.terminate()
            broker.wait(10)
        print(
            f"  probe on the empty topic: broker {empty:.2f} cores ({got_empty:,} records consumed)\n"
            f"  load: {args.records:,} records in {took:.1f} s\n"
            f"  probe after the load:     broker {full:.2f} cores ({got_full:,} records consumed)",
            flush=True,
        )
        rows.append((label, empty, full))
    print(f"\nbroker CPU of the same probe, after / before loading {args.records:,} records:")
    for label, empty, full in rows:
        print(
            f"  {label:16s} {full:.2f} / {empty:.2f} cores = {full / empty if empty else float('nan'):.1f}x"
        )


if __name__ == "__main__":
    main()
