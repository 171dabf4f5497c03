"""The message-state processor side by side, same broker, same receipts, same run.

    python bench/processors.py [--receipts 200000] [--umids 50000] [--partitions 4] [--seed 7]
                               [--only worker|plain] [--umids 1000000 --receipts 2000000 for RSS at 1M]

A fresh Tansu broker and the embedded schema registry are started; the receipts (bench/state_core.py's
realistic mix: single-channel deliveries and reads, fallback chains up to 3 channels, ~8% exact
duplicates, arrival = event time + 0-90 s jitter) are encoded with chatpipe's codec and produced keyed by
umid BEFORE either consumer starts, so both read the same backlog:

(a) chatpipe's Faust worker (`python -m chatpipe.cli worker`, a subprocess, RocksDB table + changelog,
    embedded-broker settings): throughput from its /metrics counter chatpipe_processor_events_total,
    polled every 0.1 s (from the first poll that saw a non-zero count until it reached the total);
    its RSS (VmRSS) at the end;
(b) a plain confluent-kafka loop: consume -> decode -> group by umid per batch -> the same pure
    `apply_many` over a dict -> encode -> produce (no table, no changelog, no fault tolerance);
    throughput from its first consumed record until its last produce was acknowledged.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from bench.state_core import build
from chatpipe.broker import free_port, start_tansu, wait_for_port
from chatpipe.dev import ChildDied, ProcessGroup
from chatpipe.runtime.serve import serve_in_thread
from chatpipe.runtime.topics import ensure_topics
from processors.state import StateConfig, apply_many
from schemas.catalog import RECEIPTS
from schemas.codec import Codecs
from schemas.models import DeliveryReceipt, MessageState
from schemas.registry import create_registry_app

PLAIN_OUT = "bench.plain.state"
_COUNTER = re.compile(r"^chatpipe_processor_events_total\{[^}]*\} ([0-9.e+]+)$", re.M)


def produce_receipts(bootstrap: str, codecs: Codecs, receipts: list[DeliveryReceipt]) -> float:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    encode = codecs.receipts.encode
    t = time.perf_counter()
    for i, r in enumerate(receipts):
        while True:
            try:
                producer.produce(RECEIPTS.name, encode(r), r.umid.encode())
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10000 == 0:
            producer.poll(0)
    producer.flush(120)
    return time.perf_counter() - t


def events_total(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(v) for v in _COUNTER.findall(text))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process so far (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_worker(
    group: ProcessGroup, bootstrap: str, registry_url: str, partitions: int, total: int, broker_pid: int
) -> dict:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATPIPE_")}
    env.update(
        CHATPIPE_KAFKA_BOOTSTRAP=bootstrap,
        CHATPIPE_SCHEMA_REGISTRY_URL=registry_url,
        CHATPIPE_STATE_DIR=str(group.logs / "state"),
        CHATPIPE_PARTITIONS=str(partitions),
        CHATPIPE_EMBEDDED_BROKER="1",
        CHATPIPE_WORKER_WEB_PORT=str(port),
        CHATPIPE_LOG_LEVEL="WARNING",
    )
    t_start = time.perf_counter()
    profile = ["-m", "cProfile", "-o", os.environ["BENCH_PROFILE"]] if os.environ.get("BENCH_PROFILE") else []
    worker = group.spawn("worker", [sys.executable, *profile, "-m", "chatpipe.cli", "worker"], env)
    proc = worker.proc
    try:
        try:
            group.wait_ready([worker], 120, announce=False)
        except ChildDied as exc:
            raise RuntimeError(f"{exc}:\n{worker.tail(60)}") from exc
        wait_for_port("127.0.0.1", port)
        first_t = first_n = None
        n = 0.0
        deadline = time.perf_counter() + 1800
        while n < total:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited {proc.returncode}:\n{worker.tail(60)}")
            if time.perf_counter() > deadline:
                raise TimeoutError(f"worker processed {n:.0f} of {total}")
            n = events_total(port)
            now = time.perf_counter()
            if first_t is None and n > 0:
                first_t, first_n = now, n
                cpu0 = (cpu_seconds(proc.pid), cpu_seconds(broker_pid))
            time.sleep(0.1)
        last_t = time.perf_counter()
        cpu = (cpu_seconds(proc.pid) - cpu0[0], cpu_seconds(broker_pid) - cpu0[1])
        rss = rss_mb(proc.pid)
        assert first_t is not None and first_n is not None
        rate = (total - first_n) / max(last_t - first_t, 1e-9) if total > first_n else float("nan")
        wall = last_t - first_t
        return {
            "rate": rate,
            "rss": rss,
            "startup": first_t - t_start,
            "cpu": cpu[0] / wall,
            "broker_cpu": cpu[1] / wall,
        }
    finally:
        group.discard(worker)


def run_plain(bootstrap: str, codecs: Codecs, partitions: int, total: int, batch: int = 5000) -> dict:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bench-plain",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    consumer.assign([TopicPartition(RECEIPTS.name, p, OFFSET_BEGINNING) for p in range(partitions)])
    decode, encode = codecs.receipts.decode, codecs.state.encode
    config = StateConfig()
    table: dict[str, MessageState] = {}
    seen = 0
    first = None
    try:
        while seen < total:
            msgs = consumer.consume(num_messages=batch, timeout=1.0)
            if not msgs:
                continue
            if first is None:
                first = time.perf_counter()
            now = datetime.now(UTC)
            groups: dict[tuple[int, str], list[DeliveryReceipt]] = {}
            for m in msgs:
                if m.error() is not None:
                    continue
                seen += 1
                r = decode(m.value())
                groups.setdefault((m.partition(), r.umid), []).append(r)
            for (p, umid), rs in groups.items():
                o = apply_many(table.get(umid), rs, now=now, config=config)
                table[umid] = o.state
                if o.changed:
                    while True:
                        try:
                            producer.produce(PLAIN_OUT, encode(o.state), umid.encode(), partition=p)
                            break
                        except BufferError:
                            producer.poll(0.05)
            producer.poll(0)
        producer.flush(60)
        assert first is not None
        return {"rate": total / (time.perf_counter() - first), "umids": len(table)}
    finally:
        consumer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--receipts", type=int, default=200_000)
    ap.add_argument("--umids", type=int, default=50_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--only", choices=["worker", "plain"])
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, state)")
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-processors-"))
    # chatpipe dev's supervisor: tansu.log and worker.log in `workdir`, ready files, stops
    group = ProcessGroup(workdir, workdir / "run")
    port = free_port()
    tansu = group.adopt("tansu", start_tansu("127.0.0.1", port, workdir / "tansu.log")).proc
    bootstrap = f"127.0.0.1:{port}"
    try:
        rport = free_port()
        serve_in_thread(create_registry_app(workdir / "registry.json"), "127.0.0.1", rport)
        wait_for_port("127.0.0.1", rport)
        registry_url = f"http://127.0.0.1:{rport}"
        ensure_topics(bootstrap, args.partitions)
        admin = AdminClient({"bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic(PLAIN_OUT, args.partitions, 1)])[PLAIN_OUT].result()
        codecs = Codecs.connect(registry_url)
        codecs.register_all()

        t = time.perf_counter()
        receipts = build(args.receipts, args.umids, args.seed)
        umids = len({r.umid for r in receipts})
        print(f"built {len(receipts):,} receipts over {umids:,} umids in {time.perf_counter() - t:.1f}s")
        dt = produce_receipts(bootstrap, codecs, receipts)
        print(f"produced (encode + send) in {dt:.1f}s: {len(receipts) / dt:,.0f}/s")
        total = len(receipts)

        worker = plain = None
        if args.only in (None, "worker"):
            worker = run_worker(group, bootstrap, registry_url, args.partitions, total, tansu.pid)
            print(
                f"(a) chatpipe Faust worker: {worker['rate']:,.0f} receipts/s  "
                f"(ready + first batch after {worker['startup']:.1f}s; RSS at end {worker['rss']:,.0f} MB "
                f"holding {umids:,} umids; CPU while processing: worker {worker['cpu']:.2f} cores = "
                f"{worker['cpu'] / worker['rate'] * 1e6:.0f} us/receipt, broker {worker['broker_cpu']:.2f})"
            )
        if args.only in (None, "plain"):
            plain = run_plain(bootstrap, codecs, args.partitions, total)
            print(f"(b) plain confluent loop:  {plain['rate']:,.0f} receipts/s")
        if worker and plain:
            print(f"ratio worker / plain: {worker['rate'] / plain['rate']:.2f}")
    finally:
        group.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
