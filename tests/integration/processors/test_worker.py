"""The message-state worker against the real embedded broker and registry: nothing mocked.

The worker runs as `python -m chatpipe.cli worker` subprocesses. Receipts (multi-step fallback chains,
scrambled, duplicated) are produced with chatpipe's codec keyed by umid; the state topic is read back and
compared with the ground truth: the pure `apply` folded over each umid's receipts. States are compared
ignoring `version`, `updatedAt` and the `duplicates` counters (at-least-once may count a redelivered
receipt; the counters are never emitted on their own).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from chatpipe.broker import free_port, start_tansu
from chatpipe.runtime.topics import ensure_topics
from processors.state import apply
from schemas import mapping
from schemas.catalog import MESSAGE_STATE, MESSAGE_STEPS, RECEIPTS
from schemas.codec import Codecs
from schemas.models import DeliveryReceipt, MessageState, Status, User
from tests.support.kafka import discard_broker, read_topic

pytestmark = pytest.mark.integration

PARTITIONS = 4
READY_TIMEOUT = 90.0
T0 = datetime(2026, 7, 1, 8, 0, tzinfo=UTC)
NOW = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)


# --- processes -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh Tansu for this module (its consumer group and table start empty)."""
    port = free_port()
    proc = start_tansu("127.0.0.1", port, tmp_path_factory.mktemp("broker") / "tansu.log")
    address = f"127.0.0.1:{port}"
    try:
        ensure_topics(address, PARTITIONS)
        yield address
    finally:
        discard_broker(proc)


@pytest.fixture(scope="module")
def codecs(registry_url: str) -> Codecs:
    c = Codecs.connect(registry_url)
    c.register_all()
    return c


class Worker:
    """One `chatpipe worker` subprocess."""

    def __init__(
        self, bootstrap: str, registry_url: str, state_dir: Path, logs: Path, name: str, **extra_env: str
    ) -> None:
        self.port = free_port()
        self.ready = logs / f"{name}.ready"
        self.ready.unlink(missing_ok=True)
        self.log_path = logs / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATPIPE_")}
        env.update(
            CHATPIPE_KAFKA_BOOTSTRAP=bootstrap,
            CHATPIPE_SCHEMA_REGISTRY_URL=registry_url,
            CHATPIPE_STATE_DIR=str(state_dir),
            CHATPIPE_PARTITIONS=str(PARTITIONS),
            CHATPIPE_EMBEDDED_BROKER="1",
            CHATPIPE_WORKER_WEB_PORT=str(self.port),
            CHATPIPE_READY_FILE=str(self.ready),
            CHATPIPE_LOG_LEVEL=os.environ.get("TEST_WORKER_LOG_LEVEL", "WARNING"),
        )
        env.update(extra_env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chatpipe.cli", "worker"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"worker exited {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"worker not ready in {timeout}s:\n{self.tail()}")
            time.sleep(0.1)

    def processed(self) -> float:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return 0.0
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("chatpipe_processor_events_total{")
        )

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


@pytest.fixture()
def workers(bootstrap: str, registry_url: str, tmp_path: Path) -> Iterator[Any]:
    started: list[Worker] = []

    def start(state_dir: Path, name: str, **extra_env: str) -> Worker:
        w = Worker(bootstrap, registry_url, state_dir, tmp_path, name, **extra_env)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


# --- receipts and ground truth ---------------------------------------------------------------------

CHAINS = [
    ["whatsapp"],
    ["sms"],
    ["viber", "sms"],
    ["whatsapp", "sms"],
    ["viber", "whatsapp", "sms"],
    ["rcs", "viber", "whatsapp", "sms"],
]


def receipts_for(umid: str, rng: random.Random) -> list[DeliveryReceipt]:
    chain = rng.choice(CHAINS)
    t = T0 + timedelta(seconds=rng.randrange(3600))
    user = User(msisdn=f"+6500{rng.randrange(10**6):06d}")
    out: list[DeliveryReceipt] = []
    for i, channel in enumerate(chain):
        last = i == len(chain) - 1
        states = ["queued", "sent"] + (["undelivered"] if not last else ["delivered"])
        if last and channel != "sms" and rng.random() < 0.6:
            states.append("read")
        if last and rng.random() < 0.1:
            states.append("sent")  # a late, lower-ranked receipt
        for st in states:
            t += timedelta(milliseconds=rng.randrange(50, 5000))
            code = 15 if st == "undelivered" else None
            status = Status(
                st,
                t,
                "delivered_to_recipient" if st == "delivered" else None,
                code,
                "Invalid destination" if code else None,
            )
            received = t + timedelta(seconds=rng.random() * 90)
            out.append(
                DeliveryReceipt(
                    umid, "acme", channel, status, received, "{}", user=user, client_message_id=f"c-{umid}"
                )
            )
    out += [rng.choice(out) for _ in range(len(out) // 5)]  # 8x8 retries: exact duplicates
    return out


def workload(prefix: str, umids: int, seed: int) -> list[DeliveryReceipt]:
    rng = random.Random(seed)
    receipts = [r for u in range(umids) for r in receipts_for(f"{prefix}-{u:06d}", rng)]
    rng.shuffle(receipts)  # scrambled across umids and within each umid
    return receipts


def truth(receipts: list[DeliveryReceipt]) -> dict[str, MessageState]:
    states: dict[str, MessageState] = {}
    for r in receipts:
        states[r.umid] = apply(states.get(r.umid), r, now=NOW).state
    return states


def comparable(state: MessageState) -> dict[str, Any]:
    d = mapping.state_to_dict(state)
    for k in ("version", "updatedAt", "duplicates", "lineage"):  # lineage: random per new state
        d.pop(k)
    for s in d["steps"]:
        s.pop("duplicates")
    return d


def produce(bootstrap: str, codecs: Codecs, receipts: list[DeliveryReceipt]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    for r in receipts:
        producer.produce(RECEIPTS.name, codecs.receipts.encode(r), r.umid.encode())
        producer.poll(0)
    assert producer.flush(30) == 0


def emitted(bootstrap: str, codecs: Codecs, prefix: str) -> list[tuple[int, int, MessageState]]:
    """(partition, offset, state) of every state record of this test's umids, in topic order."""
    out = []
    for m in read_topic(bootstrap, MESSAGE_STATE.name, timeout=60, idle=1.5):
        if m.key().decode().startswith(prefix + "-"):
            out.append((m.partition(), m.offset(), codecs.state.decode(m.value())))
    out.sort(key=lambda x: (x[0], x[1]))
    return out


def wait_for_truth(
    bootstrap: str, codecs: Codecs, prefix: str, expected: dict[str, MessageState], timeout: float = 90.0
) -> list[tuple[int, int, MessageState]]:
    """Read the state topic until every umid's highest version equals the ground truth."""
    deadline = time.monotonic() + timeout
    while True:
        records = emitted(bootstrap, codecs, prefix)
        latest: dict[str, MessageState] = {}
        for _, _, s in records:
            if s.umid not in latest or s.version > latest[s.umid].version:
                latest[s.umid] = s
        wrong = [u for u, s in expected.items() if u not in latest or comparable(latest[u]) != comparable(s)]
        if not wrong:
            return records
        if time.monotonic() > deadline:
            u = wrong[0]
            got = comparable(latest[u]) if u in latest else None
            history = [(p, o, st.version, st.state, len(st.steps)) for p, o, st in records if st.umid == u]
            pytest.fail(
                f"{len(wrong)} of {len(expected)} umids differ from the ground truth after "
                f"{timeout}s; first {u}, emitted (partition, offset, version, state, steps): "
                f"{history}\n got      {got}\n expected {comparable(expected[u])}"
            )
        time.sleep(1.0)


def assert_monotonic(records: list[tuple[int, int, MessageState]]) -> None:
    """Per umid, in the order emitted: versions never go down, and one version has one content."""
    last: dict[str, MessageState] = {}
    partition_of: dict[str, int] = {}
    for partition, offset, s in records:
        assert partition_of.setdefault(s.umid, partition) == partition, f"{s.umid} on two partitions"
        prev = last.get(s.umid)
        if prev is not None:
            assert s.version >= prev.version, f"{s.umid}: version {s.version} after {prev.version} @{offset}"
            if s.version == prev.version:
                assert comparable(s) == comparable(prev), f"{s.umid}: version {s.version} with two contents"
        last[s.umid] = s


def wait_processed(workers: list[Worker], at_least: float, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(w.processed() for w in workers) < at_least:
        for w in workers:
            if w.proc.poll() is not None:
                pytest.fail(f"worker exited {w.proc.returncode}:\n{w.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"processed {sum(w.processed() for w in workers)} < {at_least}")
        time.sleep(0.1)


# --- tests -----------------------------------------------------------------------------------------


def test_scrambled_duplicated_receipts_give_the_ground_truth(
    bootstrap: str, codecs: Codecs, workers: Any, tmp_path: Path
) -> None:
    receipts = workload("a", 2000, seed=1)
    expected = truth(receipts)
    assert sum(len(s.steps) > 1 for s in expected.values()) > 800  # many fallback chains
    worker = workers(tmp_path / "w1", "w1")
    worker.wait_ready()
    produce(bootstrap, codecs, receipts)
    records = wait_for_truth(bootstrap, codecs, "a", expected)
    assert_monotonic(records)
    assert {p for p, _, _ in records} == set(range(PARTITIONS))
    # apply_many per batch: far fewer versions than receipts, never more than one per receipt
    per_umid = defaultdict(set)
    for _, _, s in records:
        per_umid[s.umid].add(s.version)
    assert max(len(v) for v in per_umid.values()) <= max(
        len([r for r in receipts if r.umid == u]) for u in per_umid
    )
    # the step topic carries only the steps a version changed: the latest record per (umid, step)
    # must still be that step of the final state (so no change was left out)
    latest: dict[tuple[str, int], Any] = {}
    for m in read_topic(bootstrap, MESSAGE_STEPS.name, timeout=60, idle=1.5):
        if m.key().decode().startswith("a-"):
            rec = codecs.steps.decode(m.value())
            k = (rec.umid, rec.step.step)
            if k not in latest or rec.message_version >= latest[k].message_version:
                latest[k] = rec
    assert len(latest) == sum(len(s.steps) for s in expected.values())
    for umid, state in expected.items():
        for step in state.steps:
            got = mapping.step_to_dict(latest[(umid, step.step)].step)
            want = mapping.step_to_dict(step)
            got.pop("duplicates")
            want.pop("duplicates")
            assert got == want, f"{umid} step {step.step}"


def test_kill_9_mid_stream_then_restart_with_and_without_local_state(
    bootstrap: str, codecs: Codecs, workers: Any, tmp_path: Path
) -> None:
    receipts = workload("b", 2000, seed=2)
    expected = truth(receipts)
    third = len(receipts) // 3
    kept = tmp_path / "kept"

    first = workers(kept, "b1")
    first.wait_ready()
    base = first.processed()
    produce(bootstrap, codecs, receipts[:third])
    wait_processed([first], base + third // 3)
    first.kill9()  # mid-stream: some batches done, later ones not (or not committed)

    second = workers(kept, "b2")  # same STATE_DIR: RocksDB kept, changelog tail recovered
    produce(bootstrap, codecs, receipts[third : 2 * third])
    second.wait_ready()
    wait_processed([second], third // 2)
    second.kill9()

    third_worker = workers(tmp_path / "wiped", "b3")  # RocksDB gone: the changelog must restore it all
    produce(bootstrap, codecs, receipts[2 * third :])
    third_worker.wait_ready()
    records = wait_for_truth(bootstrap, codecs, "b", expected, timeout=120)
    assert_monotonic(records)


def test_two_workers_share_the_partitions_and_agree_with_the_ground_truth(
    bootstrap: str, codecs: Codecs, workers: Any, tmp_path: Path
) -> None:
    receipts = workload("c", 2000, seed=3)
    expected = truth(receipts)
    one = workers(tmp_path / "c1", "c1")
    two = workers(tmp_path / "c2", "c2")
    one.wait_ready()
    two.wait_ready()
    produce(bootstrap, codecs, receipts)
    records = wait_for_truth(bootstrap, codecs, "c", expected, timeout=120)
    assert_monotonic(records)
    assert one.processed() > 0 and two.processed() > 0, "both workers must have taken partitions"
