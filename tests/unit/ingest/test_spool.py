"""The ingest spool (`ingest.spool`): real files in tmp_path, real fsyncs, child processes killed mid-write.

Nothing here mocks the filesystem; disk failures are provoked with RLIMIT_FSIZE in a child process.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ingest.spool import (
    HEADER,
    AsyncSpool,
    Spool,
    SpoolCorrupt,
    SpoolError,
    SpoolFull,
    SpoolLocked,
    SpoolRecord,
    record_size,
    segment_name,
)
from schemas.errors import ChatpipeError

REPO = Path(__file__).resolve().parents[3]
ALL = 1 << 30


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("spool-*.log"))


def rec(i: int, size: int = 10) -> tuple[str, bytes, bytes]:
    return ("chatpipe.receipts", f"umid-{i}".encode(), bytes([i % 256]) * size)


def contents(spool: Spool) -> list[tuple[str, bytes, bytes]]:
    return [(r.topic, r.key, r.value) for r in spool.peek(ALL)]


# ------------------------------------------------------------------ basics


def test_append_peek_ack_are_in_order(tmp_path: Path) -> None:
    with Spool(tmp_path / "s") as spool:
        seqs = [spool.append(*rec(i)) for i in range(5)]
        assert seqs == [1, 2, 3, 4, 5]
        assert spool.peek() == [SpoolRecord(i + 1, *rec(i)) for i in range(5)]
        assert spool.peek(2) == [SpoolRecord(1, *rec(0)), SpoolRecord(2, *rec(1))]
        assert spool.depth == 5
        assert spool.size_bytes == sum(record_size(*rec(i)) for i in range(5))

        spool.ack(2)
        assert [r.seq for r in spool.peek()] == [3, 4, 5]
        assert spool.depth == 3
        assert spool.size_bytes == sum(record_size(*rec(i)) for i in range(2, 5))
        spool.ack(1)  # behind the pointer: a no-op
        assert spool.depth == 3
        with pytest.raises(ValueError, match="last appended record is 5"):
            spool.ack(6)

        assert spool.append_many([rec(5), rec(6)]) == [6, 7]
        spool.ack(7)
        assert spool.peek() == []
        assert (spool.depth, spool.size_bytes) == (0, 0)


def test_reopen_keeps_unacked_records_and_the_ack_pointer(tmp_path: Path) -> None:
    d = tmp_path / "s"
    with Spool(d) as spool:
        spool.append_many([rec(i) for i in range(6)])
        spool.ack(4)
    with Spool(d) as spool:
        assert spool.peek() == [SpoolRecord(5, *rec(4)), SpoolRecord(6, *rec(5))]
        assert spool.acked == 4
        assert spool.size_bytes == record_size(*rec(4)) + record_size(*rec(5))
        assert spool.append(*rec(6)) == 7
        spool.ack(7)
    with Spool(d) as spool:  # everything delivered: seqs are never reused
        assert spool.depth == 0
        assert spool.append(*rec(7)) == 8


def test_full_at_the_bound_and_space_returns_after_ack(tmp_path: Path) -> None:
    size = record_size(*rec(0))
    with Spool(tmp_path / "s", max_bytes=3 * size) as spool:
        spool.append_many([rec(0), rec(1), rec(2)])
        with pytest.raises(SpoolFull) as err:
            spool.append(*rec(3))
        assert isinstance(err.value, ChatpipeError) and err.value.retriable
        assert spool.depth == 3 and spool.size_bytes == 3 * size
        spool.ack(1)
        assert spool.append(*rec(3)) == 4
        with pytest.raises(SpoolFull):  # a group is all or nothing
            spool.append_many([rec(4), rec(5)])
        assert [r.seq for r in spool.peek()] == [2, 3, 4]


def test_invalid_settings_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        Spool(tmp_path / "a", max_bytes=0)
    with pytest.raises(ValueError, match="segment_bytes"):
        Spool(tmp_path / "b", segment_bytes=HEADER.size)


def test_second_opener_on_the_same_directory_fails(tmp_path: Path) -> None:
    d = tmp_path / "s"
    first = Spool(d)
    with pytest.raises(SpoolLocked, match="in use by another Spool"):
        Spool(d)
    code = f"from pathlib import Path; from ingest.spool import Spool; Spool(Path({str(d)!r}))"
    child = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert child.returncode != 0 and "SpoolLocked" in child.stderr
    first.close()
    first.close()  # idempotent
    with pytest.raises(SpoolError, match="closed"):
        first.peek()
    Spool(d).close()  # released on close


def test_appender_and_drainer_threads_run_concurrently(tmp_path: Path) -> None:
    """The request path appends while the drainer peeks and acks across rotating, deleted segments."""
    d = tmp_path / "s"
    spool = Spool(d, segment_bytes=600, fsync=False)
    total = 3000
    seen: list[SpoolRecord] = []
    errors: list[BaseException] = []

    def appender() -> None:
        try:
            i = 0
            while i < total:
                n = min(1 + i % 7, total - i)
                spool.append_many([rec(j, size=j % 50) for j in range(i, i + n)])
                i += n
        except BaseException as exc:
            errors.append(exc)

    def drainer() -> None:
        try:
            while len(seen) < total:
                batch = spool.peek(1 + len(seen) % 13)
                if batch:
                    seen.extend(batch)
                    spool.ack(batch[-1].seq)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=appender), threading.Thread(target=drainer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert seen == [SpoolRecord(j + 1, *rec(j, size=j % 50)) for j in range(total)]
    assert (spool.depth, spool.size_bytes) == (0, 0)
    assert len(segments(d)) == 1
    spool.close()


# ------------------------------------------------------------------ recovery


@pytest.mark.parametrize("cut", [1, HEADER.size - 1, HEADER.size, HEADER.size + 5, -1])
def test_torn_tail_is_truncated_and_complete_records_survive(tmp_path: Path, cut: int) -> None:
    d = tmp_path / "s"
    with Spool(d) as spool:
        spool.append_many([rec(i, size=40) for i in range(3)])
    [seg] = segments(d)
    last_start = 2 * record_size(*rec(0, size=40))
    full = seg.stat().st_size
    cut_at = last_start + cut if cut > 0 else full + cut
    os.truncate(seg, cut_at)
    with Spool(d) as spool:
        assert contents(spool) == [rec(0, 40), rec(1, 40)]
        assert seg.stat().st_size == last_start
        assert spool.append(*rec(9)) == 3  # the torn record was never acknowledged: its seq is reused
    with Spool(d) as spool:
        assert contents(spool) == [rec(0, 40), rec(1, 40), rec(9)]


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00" * 4096,
        b"\xde\xad\xbe\xef" * 3,
        b"CS\x01",
        b"CS\x01\x00" + b"\x00" * 40,
        b"CS" + random.Random(0).randbytes(100),
    ],
    ids=["zeros", "junk", "magic-only", "fake-header", "magic-random"],
)
def test_garbage_after_the_last_record_is_a_torn_tail(tmp_path: Path, garbage: bytes) -> None:
    d = tmp_path / "s"
    with Spool(d) as spool:
        spool.append_many([rec(i) for i in range(3)])
        spool.ack(1)
    [seg] = segments(d)
    size = seg.stat().st_size
    with seg.open("ab") as f:
        f.write(garbage)
    with Spool(d) as spool:
        assert contents(spool) == [rec(1), rec(2)]
        assert seg.stat().st_size == size


@pytest.mark.parametrize(
    "where",
    [0, 4, 9, HEADER.size - 1, HEADER.size + 3, -1],
    ids=["magic", "crc", "seq", "value-len", "payload", "last-byte"],
)
def test_a_flipped_byte_in_the_middle_record_is_a_hard_error(tmp_path: Path, where: int) -> None:
    d = tmp_path / "s"
    with Spool(d) as spool:
        spool.append_many([rec(i, size=30) for i in range(3)])
    [seg] = segments(d)
    size = record_size(*rec(0, size=30))
    at = size + where if where >= 0 else 2 * size + where
    data = bytearray(seg.read_bytes())
    data[at] ^= 0x40
    seg.write_bytes(bytes(data))
    with pytest.raises(SpoolCorrupt) as err:
        Spool(d)
    assert err.value.path == seg and err.value.offset == size
    assert str(seg) in str(err.value) and f"offset {size}" in str(err.value)
    assert seg.read_bytes() == bytes(data)  # nothing was truncated or skipped
    with pytest.raises(SpoolCorrupt):  # and the lock was released: a repeat open says the same
        Spool(d)


def test_damage_in_a_sealed_segment_is_a_hard_error_even_at_its_end(tmp_path: Path) -> None:
    d = tmp_path / "s"
    with Spool(d, segment_bytes=100) as spool:
        for i in range(4):
            spool.append(*rec(i, size=50))
    first = segments(d)[0]
    os.truncate(first, first.stat().st_size - 3)
    with pytest.raises(SpoolCorrupt, match=first.name):
        Spool(d, segment_bytes=100)


def test_a_missing_segment_is_a_hard_error(tmp_path: Path) -> None:
    d = tmp_path / "s"
    with Spool(d, segment_bytes=100) as spool:
        for i in range(4):
            spool.append(*rec(i, size=50))
    segs = segments(d)
    assert len(segs) == 4
    segs[1].unlink()
    with pytest.raises(SpoolCorrupt, match="starts at 3"):
        Spool(d, segment_bytes=100)
    segs[0].unlink()
    with pytest.raises(SpoolCorrupt, match=r"records 1\.\.2 are missing"):
        Spool(d, segment_bytes=100)


def test_segments_rotate_and_fully_acked_ones_are_deleted(tmp_path: Path) -> None:
    d = tmp_path / "s"
    size = record_size(*rec(0, size=60))
    with Spool(d, segment_bytes=3 * size) as spool:
        for i in range(10):
            spool.append(*rec(i, size=60))
        assert [p.name for p in segments(d)] == [segment_name(n) for n in (1, 4, 7, 10)]
        spool.ack(2)
        assert len(segments(d)) == 4  # segment 1 still holds seq 3
        spool.ack(3)
        assert [p.name for p in segments(d)] == [segment_name(n) for n in (4, 7, 10)]
        spool.ack(8)
        assert [p.name for p in segments(d)] == [segment_name(n) for n in (7, 10)]
        assert [r.seq for r in spool.peek()] == [9, 10]
        spool.ack(10)
        assert [p.name for p in segments(d)] == [segment_name(10)]  # the active one stays
        assert spool.append(*rec(10, size=60)) == 11
        assert [p.name for p in segments(d)] == [segment_name(10)]
    with Spool(d, segment_bytes=3 * size) as spool:
        assert [r.seq for r in spool.peek()] == [11]


def test_a_crash_between_ack_and_segment_deletion_is_finished_on_open(tmp_path: Path) -> None:
    d = tmp_path / "s"
    with Spool(d, segment_bytes=100) as spool:
        for i in range(4):
            spool.append(*rec(i, size=50))
        first = segments(d)[0]
        saved = first.read_bytes()
        spool.ack(2)
        assert not first.exists()
    first.write_bytes(saved)  # as if the unlink never reached the disk
    with Spool(d, segment_bytes=100) as spool:
        assert not first.exists()
        assert [r.seq for r in spool.peek()] == [3, 4]


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from ingest.spool import Spool

    spool = Spool(Path(sys.argv[1]), segment_bytes=8192)
    i = 0
    while True:
        # varied sizes so records straddle pages and segments rotate
        seq = spool.append("chatpipe.inbound", b"k%d" % i, b"v%d-" % i * (1 + i % 37))
        print(seq, i, flush=True)
        i += 1
    """
)


def test_sigkill_mid_stream_loses_no_acknowledged_record(tmp_path: Path) -> None:
    d = tmp_path / "s"
    reported: dict[int, int] = {}
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(d)], cwd=REPO, stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None
        for line in child.stdout:
            seq, i = map(int, line.split())
            reported[seq] = i
            if len(reported) == 300:
                child.send_signal(signal.SIGKILL)
                break
        for line in child.stdout:  # printed before the kill, hence durable too
            seq, i = map(int, line.split())
            reported[seq] = i
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    with Spool(d, segment_bytes=8192) as spool:
        found = {r.seq: r for r in spool.peek(ALL)}
    assert len(segments(d)) > 1
    assert sorted(found) == list(range(1, len(found) + 1))
    assert len(found) - len(reported) in (0, 1)  # at most the one appended but not yet reported
    for seq, i in reported.items():
        assert found[seq] == SpoolRecord(seq, "chatpipe.inbound", b"k%d" % i, b"v%d-" % i * (1 + i % 37))


FULL_DISK_CHILD = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    from ingest.spool import Spool

    spool = Spool(Path(sys.argv[1]), segment_bytes=1 << 20)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (5000, 5000))  # writes past 5000 bytes fail with EFBIG
    ok = 0
    for i in range(100):
        try:
            spool.append("t", b"k", b"x" * 300)
            ok += 1
        except OSError as exc:
            print("error", exc.errno, ok, spool.depth, flush=True)
    """
)


def test_a_failed_write_is_rolled_back_and_raises_oserror(tmp_path: Path) -> None:
    d = tmp_path / "s"
    out = subprocess.run(
        [sys.executable, "-c", FULL_DISK_CHILD, str(d)], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    errors = [line.split() for line in out if line.startswith("error")]
    assert len(errors) > 50
    ok = int(errors[0][2])
    assert all(int(e[2]) == ok and int(e[3]) == ok for e in errors)  # depth unchanged by failures
    with Spool(d) as spool:  # no torn tail: the partial write was truncated away
        assert [r.seq for r in spool.peek(ALL)] == list(range(1, ok + 1))
        assert segments(d)[0].stat().st_size == ok * record_size("t", b"k", b"x" * 300)


# ------------------------------------------------------------------ property: any interleaving


class SpoolMachine(RuleBasedStateMachine):
    """Any interleaving of append / append_many / ack / reopen / torn tail: peek() is exactly the
    appended-but-unacked records, in order, with consecutive seqs that are never reused."""

    MAX_BYTES = 1500
    SEGMENT_BYTES = 200

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="spool-prop-"))
        self.spool = self._open()
        self.model: list[SpoolRecord] = []
        self.next_seq = 1

    def _open(self) -> Spool:
        return Spool(self.dir, max_bytes=self.MAX_BYTES, segment_bytes=self.SEGMENT_BYTES, fsync=False)

    def _model_bytes(self) -> int:
        return sum(record_size(r.topic, r.key, r.value) for r in self.model)

    items = st.tuples(st.sampled_from(["a", "b.c", "ü"]), st.binary(max_size=20), st.binary(max_size=120))

    @rule(items=st.lists(items, min_size=1, max_size=5))
    def append_many(self, items: list[tuple[str, bytes, bytes]]) -> None:
        need = sum(record_size(*item) for item in items)
        if self._model_bytes() + need > self.MAX_BYTES:
            try:
                self.spool.append_many(items)
            except SpoolFull:
                return
            raise AssertionError("expected SpoolFull")
        seqs = self.spool.append_many(items) if len(items) > 1 else [self.spool.append(*items[0])]
        assert seqs == list(range(self.next_seq, self.next_seq + len(items)))
        self.model += [SpoolRecord(s, *item) for s, item in zip(seqs, items, strict=True)]
        self.next_seq += len(items)

    @precondition(lambda self: self.model)
    @rule(n=st.integers(min_value=0, max_value=8))
    def ack(self, n: int) -> None:
        upto = self.model[min(n, len(self.model) - 1)].seq
        self.spool.ack(upto)
        self.model = [r for r in self.model if r.seq > upto]

    @rule(back=st.integers(min_value=0, max_value=3))
    def ack_behind_is_a_noop(self, back: int) -> None:
        self.spool.ack(self.spool.acked - back)

    @rule()
    def reopen(self) -> None:
        self.spool.close()
        self.spool = self._open()

    @rule(garbage=st.binary(min_size=1, max_size=64))
    def torn_tail_then_reopen(self, garbage: bytes) -> None:
        self.spool.close()
        segs = segments(self.dir)
        if segs:
            with segs[-1].open("ab") as f:
                f.write(garbage)
        self.spool = self._open()

    @invariant()
    def peek_is_the_unacked_records_in_order(self) -> None:
        assert self.spool.peek(ALL) == self.model
        assert self.spool.depth == len(self.model)
        assert self.spool.size_bytes == self._model_bytes()
        if self.model:
            assert self.spool.peek(2) == self.model[:2]

    def teardown(self) -> None:
        self.spool.close()
        shutil.rmtree(self.dir, ignore_errors=True)


SpoolMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_any_interleaving_keeps_peek_equal_to_the_unacked_records = SpoolMachine.TestCase


# ------------------------------------------------------------------ async: group commit and drain


async def test_concurrent_appends_are_group_committed_and_durable(tmp_path: Path) -> None:
    d = tmp_path / "s"
    spool = Spool(d)
    aspool = AsyncSpool(spool)
    fsyncs_before = spool.fsyncs
    seqs = await asyncio.gather(*(aspool.append(*rec(i)) for i in range(500)))
    assert sorted(seqs) == list(range(1, 501))
    assert seqs == list(range(1, 501))  # arrival order is spool order
    used = spool.fsyncs - fsyncs_before
    assert 0 < used < 50, used
    assert spool.commits < 50
    await aspool.close()
    with Spool(d) as reopened:
        assert contents(reopened) == [rec(i) for i in range(500)]


async def test_group_commit_refuses_only_what_does_not_fit(tmp_path: Path) -> None:
    size = record_size(*rec(0))
    aspool = AsyncSpool(Spool(tmp_path / "s", max_bytes=6 * size))
    results = await asyncio.gather(*(aspool.append(*rec(i)) for i in range(10)), return_exceptions=True)
    assert results[:6] == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(r, SpoolFull) for r in results[6:])
    assert aspool.depth == 6
    await aspool.close()


async def test_drain_publishes_in_order_acks_and_empties_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", segment_bytes=512)
    aspool = AsyncSpool(spool)
    for i in range(23):
        await aspool.append(*rec(i))
    loop = asyncio.get_running_loop()
    sent: list[tuple[str, bytes, bytes]] = []

    def publish(topic: str, key: bytes, value: bytes) -> asyncio.Future[None]:
        # like AsyncProducer.publish: enqueue now, resolve later (here in reverse order)
        sent.append((topic, key, value))
        fut: asyncio.Future[None] = loop.create_future()
        loop.call_later(0.001 * (30 - len(sent) % 30), fut.set_result, None)
        return fut

    assert await aspool.drain(publish, batch=5) == 23
    assert sent == [rec(i) for i in range(23)]
    assert spool.depth == 0 and spool.peek() == []
    assert len(segments(tmp_path / "s")) == 1
    assert await aspool.drain(publish) == 0
    await aspool.close()


async def test_drain_stops_at_the_first_failure_and_keeps_the_rest(tmp_path: Path) -> None:
    d = tmp_path / "s"
    aspool = AsyncSpool(Spool(d))
    for i in range(20):
        await aspool.append(*rec(i))
    sent: list[bytes] = []

    async def flaky(topic: str, key: bytes, value: bytes) -> None:
        sent.append(key)
        if key == b"umid-7":  # seq 8
            raise ConnectionError("broker went away")

    assert await aspool.drain(flaky, batch=5) == 7
    assert isinstance(aspool.last_drain_error, ConnectionError)
    assert sent[:8] == [f"umid-{i}".encode() for i in range(8)]
    assert [r.seq for r in aspool.spool.peek()] == list(range(8, 21))
    await aspool.close()

    aspool = AsyncSpool(Spool(d))  # the rest survives a restart and drains later, in order
    resent: list[bytes] = []

    async def ok(topic: str, key: bytes, value: bytes) -> None:
        resent.append(key)

    assert await aspool.drain(ok) == 13
    assert resent == [f"umid-{i}".encode() for i in range(7, 20)]
    assert aspool.last_drain_error is None and aspool.depth == 0
    await aspool.close()


async def test_drain_stops_when_publish_refuses_synchronously(tmp_path: Path) -> None:
    aspool = AsyncSpool(Spool(tmp_path / "s"))
    for i in range(4):
        await aspool.append(*rec(i))
    loop = asyncio.get_running_loop()

    def publish(topic: str, key: bytes, value: bytes) -> asyncio.Future[None]:
        if key == b"umid-2":
            raise BufferError("local queue full")
        fut: asyncio.Future[None] = loop.create_future()
        fut.set_result(None)
        return fut

    assert await aspool.drain(publish) == 2
    assert [r.seq for r in aspool.spool.peek()] == [3, 4]
    await aspool.close()
