"""`chatpipe dev` with CHATPIPE_DEV_BROKER_STORAGE=disk: the embedded broker keeps its data in dev's own
object store (chatpipe.objectstore), so a kill -9 of the broker or of the object store under load loses no
acknowledged receipt and restarts only that child, and a restarted dev keeps topics, records and committed
offsets: receipts for earlier messages move their states on (same lineage, next version, even after the
processor rebuilds its table from the broker's changelog) and nothing is processed again from the start.

Real processes throughout (dev, Tansu on s3://, the object store, registry, ingest, worker, sink, SQLite).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from chatpipe.runtime.topics import PROCESSOR_APP_ID
from schemas.catalog import MESSAGE_STATE, RECEIPTS
from tests.support.dev import (
    DevProcess,
    Load,
    post_all,
    receipt,
    running_dev,
    wait_for_details,
    wait_until_stored,
)
from tests.support.kafka import read_topic

# minutes long: in the chaos tier (`scripts/test -m chaos`) so the default suite stays within its budget
pytestmark = [pytest.mark.integration, pytest.mark.chaos]

DISK = {"CHATPIPE_DEV_BROKER_STORAGE": "disk"}


def _pid(run_dir: Path, name: str) -> int:
    return int((run_dir / f"{name}.ready").read_text())


def _acked_at_least(load: Load, n: int, within: float = 60) -> None:
    """Until ingest has acknowledged `n` of the load's webhooks (the load runs before a kill)."""
    deadline = time.monotonic() + within
    while len(load.acked) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(load.acked) >= n, f"ingest acknowledged {len(load.acked)} webhooks in {within:.0f}s"


def _kill_9_and_wait(proc: DevProcess, run_dir: Path, name: str, load: Load) -> int:
    """kill -9 the child `name`, wait until dev has it back; returns the index of dev's line about it."""
    before = len(proc.lines)
    os.kill(_pid(run_dir, name), signal.SIGKILL)
    proc.wait_for(f"{name} exited with code -9; restarting it", 30, before)
    proc.wait_for(f"{name} ready again", 60, before)
    acked = len(load.acked)
    deadline = time.monotonic() + 60
    while len(load.acked) < acked + 20 and time.monotonic() < deadline:  # the load goes on against it
        time.sleep(0.5)
    assert len(load.acked) >= acked + 20, f"ingest acknowledged almost nothing after {name} came back"
    return before


def _versions(db: Path, umids: list[str]) -> dict[str, tuple[int, int]]:
    """(version, lineage) of each umid's stored state."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        marks = ",".join("?" * len(umids))
        rows = conn.execute(f"SELECT umid, version, lineage FROM messages WHERE umid IN ({marks})", umids)
        return {umid: (version, lineage) for umid, version, lineage in rows}


def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The offsets `group` committed on `topic` (read without joining the group)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=20)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


def _stop(proc: DevProcess) -> None:
    proc.proc.send_signal(signal.SIGINT)
    assert proc.proc.wait(90) == 0, proc.output()


def _moves_on(ingest: str, api: str, db: Path, umids: list[str], second: int) -> None:
    """A read receipt for each of `umids` lands on its stored state: same lineage, the next version."""
    before = _versions(db, umids)
    assert len(before) == len(umids)
    ts = f"2026-06-09T10:00:{second:02d}Z"
    post_all(ingest, [receipt(umid, "read", ts) for umid in umids])
    assert wait_for_details(api, {u: [(1, "WhatsApp", "read", ts)] for u in umids}, 120) == {}
    after = _versions(db, umids)
    assert after == {u: (v + 1, lineage) for u, (v, lineage) in before.items()}, (before, after)


#: Tansu 0.6.0 on s3 storage writes an idempotent producer's sequence (meta.json) before the record batch;
#: a kill -9 in between makes the restarted broker answer the retry DUPLICATE_SEQUENCE_NUMBER, which
#: librdkafka counts as delivered: acknowledged records lost (measured: 2 of 248 in this test, 6 in 12 kills
#: with a bare idempotent producer; 0 in 12 kills with enable.idempotence=false). chatpipe's producers
#: (ingest, processor, sink) are idempotent; until they are not on the disk-backed embedded broker, a kill -9
#: of Tansu under load can lose receipts.
# Tansu 0.6.0 on s3 persists a producer's sequence before its batch: dev turns idempotence off on
# its disk broker (Settings.kafka_idempotence), which is what the broker-kill test below relies on.


@pytest.mark.timeout(900)
def test_kill_9_of_the_object_store_under_load_and_a_restart_of_dev_keep_everything(tmp_path: Path) -> None:
    state = tmp_path / ".chatpipe"
    run_dir, db = state / "run", state / "chatpipe.db"
    with running_dev(tmp_path, **DISK) as (proc, ingest, _api):
        assert "on disk in .chatpipe/broker, fsync on" in proc.output(), proc.output()
        with Load(f"{ingest}/v1/webhooks/chatapps", rate=60) as load:
            _acked_at_least(load, 100)  # under load: about 2 s of it on a quiet machine
            at = _kill_9_and_wait(proc, run_dir, "objectstore", load)
            # only the object store came back: no service was restarted for it
            assert [line for line in proc.lines[at:] if "restarted (pid" in line] == [
                line for line in proc.lines[at:] if "objectstore restarted (pid" in line
            ], proc.output()
            time.sleep(2)
        acked = set(load.acked)  # >= 120: 100 before the kill, 20 after it (_kill_9_and_wait)
        missing = wait_until_stored(db, acked, timeout=180)
        assert not missing, f"{len(missing)} of {len(acked)} acknowledged never stored: {sorted(missing)[:5]}"
        bootstrap = proc.env_value("CHATPIPE_KAFKA_BOOTSTRAP")
        states_before = len(read_topic(bootstrap, MESSAGE_STATE.name, idle=5, timeout=120))
        assert states_before >= len(acked)
        _stop(proc)

    old = sorted(acked)
    with running_dev(tmp_path, **DISK) as (proc, ingest, api):
        out = proc.output()
        assert "kept from the last run" in out, out
        assert "the broker's topics, records and committed offsets" in out, out
        assert "rebuilt: the processor's state" not in out, out
        bootstrap = proc.env_value("CHATPIPE_KAFKA_BOOTSTRAP")
        # the worker's offsets on the receipts were kept: every receipt of the first run is behind them
        committed = _committed(bootstrap, PROCESSOR_APP_ID, RECEIPTS.name, 2)
        assert sum(committed.values()) >= len(acked), committed
        # the new receipts for old messages land on their states (the processor's local state was kept)
        _moves_on(ingest, api, db, old[:10], 30)
        # nothing was processed again from the start: the state topic has the old records and a few more
        states = read_topic(bootstrap, MESSAGE_STATE.name, idle=5, timeout=120)
        grew = len(states) - states_before
        assert 10 <= grew < len(acked) // 2, (states_before, len(states))
        _stop(proc)

    # the processor's local state is lost: it rebuilds its table from the broker's changelog, exactly
    shutil.rmtree(state / "processor")
    with running_dev(tmp_path, **DISK) as (proc, ingest, api):
        _moves_on(ingest, api, db, old[-10:], 40)


@pytest.mark.timeout(600)
def test_kill_9_of_the_broker_under_load_restarts_only_it_and_loses_no_acknowledged_receipt(
    tmp_path: Path,
) -> None:
    state = tmp_path / ".chatpipe"
    run_dir, db = state / "run", state / "chatpipe.db"
    with running_dev(tmp_path, **DISK) as (proc, ingest, _api):
        with Load(f"{ingest}/v1/webhooks/chatapps", rate=60) as load:
            _acked_at_least(load, 100)
            for _ in range(4):  # one kill loses a receipt about every other time on Tansu 0.6.0
                at = _kill_9_and_wait(proc, run_dir, "broker", load)
                restarted = proc.wait_for("broker restarted on", 5, at)
                assert "kept its records, topics and committed offsets" in proc.lines[restarted]
                # only the broker came back: no service was restarted for it
                assert not any("restarted (pid" in line for line in proc.lines[at:]), proc.output()
        acked = set(load.acked)
        missing = wait_until_stored(db, acked, timeout=180)
        assert not missing, f"{len(missing)} of {len(acked)} acknowledged never stored: {sorted(missing)[:5]}"
