"""A local, fsynced, bounded, ordered spool for records the broker could not take.

When Kafka is unavailable or slow, ingest writes the already-encoded record (topic, key, value) here and
answers 2xx once `append` returned (the bytes are fsynced); a drainer later sends the records to Kafka in
order (`AsyncSpool.drain`) and acknowledges them (`ack`). Only a full (`SpoolFull`) or failing (`OSError`)
spool makes ingest answer 503.

On disk, one directory per spool, owned by one process (an `flock`ed `lock` file):

- `spool-<firstseq:020d>.log` segments: a sequence of records, each
  `HEADER (magic b"CS", version, flags, crc32, seq u64, topic_len u16, key_len u32, value_len u32)`
  followed by topic (UTF-8), key and value. Big-endian. The CRC32 covers the whole record but its own field.
  Sequence numbers start at 1 and are consecutive across segments; a segment is named by its first seq.
- `ack.json`: `{"acked": N}` -- every record with seq <= N was delivered. Replaced atomically
  (tmp + fsync + rename + fsync of the directory).

Recovery on open: segments are scanned and every record's CRC and seq checked. A bad record at the end of
the last segment with no valid record after it is a torn tail (a write cut short by a crash: it was never
acknowledged to anyone) and is truncated with a warning. Any other bad record -- in an older segment, or
followed by valid records -- is `SpoolCorrupt` naming the file and offset: nothing is skipped silently.

Not covered: a power loss (not a process crash) that persists later pages of an un-fsynced write before
earlier ones can leave valid records after a hole in the tail; that is reported as `SpoolCorrupt` too and
needs an operator (truncating the file at the reported offset discards only un-acknowledged writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import ChatpipeError

log = logging.getLogger(__name__)

MAGIC = b"CS"
VERSION = 1
# magic, version, flags, crc32, seq, topic_len, key_len, value_len
HEADER = struct.Struct(">2sBBIQHII")
_CRC_AT = 4  # the crc field occupies HEADER bytes [4:8]
_SEGMENT_RE = re.compile(r"^spool-(\d{20})\.log$")
ACK_FILE = "ack.json"
LOCK_FILE = "lock"

_fdatasync = getattr(os, "fdatasync", os.fsync)


class SpoolError(ChatpipeError):
    """Base of the spool's own errors (disk failures are plain `OSError`s)."""


class SpoolFull(SpoolError):
    """Appending would push the un-acknowledged bytes past `max_bytes`; retry once the drainer caught up."""

    retriable = True


class SpoolCorrupt(SpoolError):
    """The spool's files do not hold what the spool wrote; `path` and `offset` locate the first bad byte."""

    def __init__(self, message: str, path: Path | None = None, offset: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset


class SpoolLocked(SpoolError):
    """Another `Spool` (in this or another process) already owns the directory."""


@dataclass(frozen=True)
class SpoolRecord:
    seq: int
    topic: str
    key: bytes
    value: bytes


@dataclass(eq=False)
class _Segment:
    """A segment file. `size` and `next_seq` describe the committed (fsynced) records only."""

    first_seq: int
    path: Path
    size: int = 0
    next_seq: int = 0

    def __post_init__(self) -> None:
        if self.next_seq == 0:
            self.next_seq = self.first_seq


def segment_name(first_seq: int) -> str:
    return f"spool-{first_seq:020d}.log"


def encode_record(seq: int, topic: str, key: bytes, value: bytes) -> bytes:
    t = topic.encode()
    if len(t) > 0xFFFF:
        raise ValueError(f"topic name too long: {len(t)} bytes")
    header = HEADER.pack(MAGIC, VERSION, 0, 0, seq, len(t), len(key), len(value))
    crc = zlib.crc32(header[:_CRC_AT])
    crc = zlib.crc32(header[_CRC_AT + 4 :], crc)
    crc = zlib.crc32(t, crc)
    crc = zlib.crc32(key, crc)
    crc = zlib.crc32(value, crc)
    return b"".join((HEADER.pack(MAGIC, VERSION, 0, crc, seq, len(t), len(key), len(value)), t, key, value))


def record_size(topic: str, key: bytes, value: bytes) -> int:
    return HEADER.size + len(topic.encode()) + len(key) + len(value)


def _decode_at(data: bytes | memoryview, pos: int) -> tuple[SpoolRecord, int] | str:
    """Parse the record at `pos`: `(record, size)`, or the reason it is not a valid record."""
    if len(data) - pos < HEADER.size:
        return "incomplete header"
    magic, version, _flags, crc, seq, tlen, klen, vlen = HEADER.unpack_from(data, pos)
    if magic != MAGIC:
        return "bad magic"
    if version != VERSION:
        return f"unknown record version {version}"
    size = HEADER.size + tlen + klen + vlen
    if len(data) - pos < size:
        return "incomplete record"
    view = memoryview(data)
    check = zlib.crc32(view[pos : pos + _CRC_AT])
    check = zlib.crc32(view[pos + _CRC_AT + 4 : pos + size], check)
    if check != crc:
        return "crc mismatch"
    body = pos + HEADER.size
    try:
        topic = bytes(view[body : body + tlen]).decode()
    except UnicodeDecodeError:
        return "topic is not UTF-8"
    key = bytes(view[body + tlen : body + tlen + klen])
    value = bytes(view[body + tlen + klen : pos + size])
    return SpoolRecord(seq, topic, key, value), size


def _valid_record_after(data: bytes, pos: int, min_seq: int) -> int | None:
    """Offset of the first valid record after `pos` with seq >= min_seq (a sign of mid-file corruption)."""
    at = data.find(MAGIC, pos + 1)
    while at != -1:
        parsed = _decode_at(data, at)
        if not isinstance(parsed, str) and parsed[0].seq >= min_seq:
            return at
        at = data.find(MAGIC, at + 1)
    return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class Spool:
    """The synchronous spool. One instance per directory and process; thread-safe.

    `append`/`append_many` (the request path) may run concurrently with `peek`/`ack` (the drainer): they
    serialise on separate locks and only share a short critical section for the in-memory counters, so a
    drainer is never held up by an append's fsync and vice versa (except while deleting segments).
    """

    def __init__(
        self,
        directory: Path,
        max_bytes: int = 1 << 30,
        segment_bytes: int = 16 << 20,
        fsync: bool = True,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if segment_bytes <= HEADER.size:
            raise ValueError(
                f"segment_bytes must exceed the {HEADER.size}-byte record header, got {segment_bytes}"
            )
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._fsync_enabled = fsync
        #: instrumentation: fsync/fdatasync calls made (segments, ack file, directory) and append groups
        self.fsyncs = 0
        self.commits = 0

        self._lock = threading.Lock()  # in-memory state below; held briefly, never across I/O
        self._append_lock = threading.Lock()  # serialises writers; held across write + fsync
        self._drain_lock = threading.Lock()  # serialises peek/ack
        self._closed = False
        self._failed: OSError | None = None
        self._segments: list[_Segment] = []
        self._fd: int | None = None  # write fd of the active (last) segment
        self._acked = 0
        self._next_seq = 1
        self._unacked_bytes = 0
        self._head_seg: _Segment | None = None  # the segment and offset of record `acked + 1`
        self._head_off = 0

        created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        if created:
            self._fsync_dir(self.directory.parent)
        self._lock_fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLocked(
                f"spool directory {self.directory} is in use by another Spool (this or another process); "
                "give each ingest process its own spool directory"
            ) from None
        try:
            self._recover()
        except BaseException:
            self._release()
            raise

    # ---------------------------------------------------------------- recovery

    def _recover(self) -> None:
        d = self.directory
        for stale in d.glob(f"{ACK_FILE}.tmp*"):
            stale.unlink()
        found = sorted(
            (int(m.group(1)), d / name) for name in os.listdir(d) if (m := _SEGMENT_RE.match(name))
        )
        acked = self._read_ack(found)
        # segments whose every record is acknowledged (known from the next one's name) go unread
        while len(found) > 1 and found[1][0] - 1 <= acked:
            first, path = found.pop(0)
            log.info("spool %s: deleting fully acknowledged segment %s", d, path.name)
            path.unlink()
        if found and found[0][0] > acked + 1:
            first, path = found[0]
            raise SpoolCorrupt(
                f"spool {d}: records {acked + 1}..{first - 1} are missing (acknowledged up to {acked}, "
                f"oldest segment {path.name} starts at {first})",
                path,
                0,
            )
        head: tuple[_Segment, int] | None = None
        unacked = 0
        for i, (first, path) in enumerate(found):
            last = i == len(found) - 1
            seg = _Segment(first, path)
            data = path.read_bytes()
            pos, seq = 0, first
            while pos < len(data):
                parsed = _decode_at(data, pos)
                if isinstance(parsed, str):
                    self._bad_record(path, data, pos, seq, parsed, last)
                    data = data[:pos]
                    break
                rec, size = parsed
                if rec.seq != seq:
                    raise SpoolCorrupt(
                        f"spool segment {path} offset {pos}: record has seq {rec.seq}, expected {seq}",
                        path,
                        pos,
                    )
                if seq == acked + 1:
                    head = (seg, pos)
                if seq > acked:
                    unacked += size
                pos += size
                seq += 1
            seg.size, seg.next_seq = pos, seq
            if not last and seq != found[i + 1][0]:
                raise SpoolCorrupt(
                    f"spool segment {path} ends before seq {seq} but the next segment "
                    f"{found[i + 1][1].name} starts at {found[i + 1][0]}",
                    path,
                    pos,
                )
            self._segments.append(seg)

        if self._segments:
            active = self._segments[-1]
            self._next_seq = max(active.next_seq, acked + 1)
            if acked + 1 > active.next_seq:
                log.warning(
                    "spool %s: acknowledged up to %d but records end at %d; continuing at %d",
                    d,
                    acked,
                    active.next_seq - 1,
                    acked + 1,
                )
            self._fd = os.open(active.path, os.O_WRONLY | os.O_APPEND)
        else:
            self._next_seq = acked + 1
        self._acked = acked
        self._unacked_bytes = unacked
        if head is not None:
            self._head_seg, self._head_off = head
        elif self._segments:
            self._head_seg, self._head_off = self._segments[-1], self._segments[-1].size
        if self.depth:
            log.warning(
                "spool %s: %d undelivered records (%d bytes) left by a previous run",
                d,
                self.depth,
                self._unacked_bytes,
            )

    def _read_ack(self, found: list[tuple[int, Path]]) -> int:
        path = self.directory / ACK_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            acked = found[0][0] - 1 if found else 0
            if found:
                log.warning(
                    "spool %s: no %s; assuming everything before seq %d was delivered",
                    self.directory,
                    ACK_FILE,
                    acked + 1,
                )
            self._write_ack(acked)
            return acked
        try:
            acked = json.loads(raw)["acked"]
            if not isinstance(acked, int) or acked < 0:
                raise ValueError(acked)
        except (ValueError, KeyError, TypeError) as exc:
            raise SpoolCorrupt(f"spool ack pointer {path} is unreadable: {raw[:100]!r}", path, 0) from exc
        return acked

    def _bad_record(self, path: Path, data: bytes, pos: int, seq: int, reason: str, last: bool) -> None:
        """A bad record at `pos`: truncate it as a torn tail, or raise `SpoolCorrupt`."""
        if not last:
            raise SpoolCorrupt(
                f"spool segment {path} offset {pos}: {reason} (seq {seq}) in a sealed segment", path, pos
            )
        after = _valid_record_after(data, pos, seq)
        if after is not None:
            raise SpoolCorrupt(
                f"spool segment {path} offset {pos}: {reason} (seq {seq}), but valid records follow at "
                f"offset {after}: corruption in the middle of the spool, refusing to skip it",
                path,
                pos,
            )
        log.warning(
            "spool segment %s: torn tail at offset %d (%s, %d bytes) truncated; it was never acknowledged",
            path,
            pos,
            reason,
            len(data) - pos,
        )
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, pos)
            self._sync(fd)
        finally:
            os.close(fd)

    # ---------------------------------------------------------------- durability helpers

    def _sync(self, fd: int, data_only: bool = False) -> None:
        if self._fsync_enabled:
            (_fdatasync if data_only else os.fsync)(fd)
            self.fsyncs += 1

    def _fsync_dir(self, directory: Path) -> None:
        if not self._fsync_enabled:
            return
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._sync(fd)
        finally:
            os.close(fd)

    def _write_ack(self, acked: int) -> None:
        final = self.directory / ACK_FILE
        tmp = self.directory / f"{ACK_FILE}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, json.dumps({"acked": acked}).encode())
            self._sync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        self._fsync_dir(self.directory)

    # ---------------------------------------------------------------- writing

    def append(self, topic: str, key: bytes, value: bytes) -> int:
        """Spool one record; returns its seq once it is fsynced.

        Raises `SpoolFull` when the un-acknowledged bytes would exceed `max_bytes`, `OSError` when the disk
        fails (after an fsync failure the spool refuses further appends until it is reopened).
        """
        return self.append_many([(topic, key, value)])[0]

    def append_many(self, items: Sequence[tuple[str, bytes, bytes]]) -> list[int]:
        """Spool records as one group with one fsync; all or none (`SpoolFull` if they do not all fit)."""
        seqs, _ = self._commit(items, partial=False)
        return seqs

    def append_prefix(self, items: Sequence[tuple[str, bytes, bytes]]) -> tuple[list[int], int]:
        """Spool the longest prefix of `items` that fits, as one group with one fsync; returns (seqs of the
        admitted records, number admitted). Raises `SpoolFull` when not even the first record fits."""
        return self._commit(items, partial=True)

    def _commit(self, items: Sequence[tuple[str, bytes, bytes]], partial: bool) -> tuple[list[int], int]:
        """Write and fsync the records that fit. `partial`: admit the longest prefix that fits instead of
        all-or-nothing. Returns (seqs of the admitted records, number admitted)."""
        if not items:
            return [], 0
        with self._append_lock:
            self._check_open()
            if self._failed is not None:
                raise OSError(
                    errno.EIO, f"spool {self.directory} disabled after a disk failure: {self._failed}"
                )
            with self._lock:
                budget = self.max_bytes - self._unacked_bytes
                first = self._next_seq
            admitted, total = 0, 0
            for topic, key, value in items:
                size = record_size(topic, key, value)
                if total + size > budget:
                    break
                total += size
                admitted += 1
            if admitted < len(items) and (not partial or admitted == 0):
                raise SpoolFull(
                    f"spool {self.directory} is full: {self.max_bytes - budget} of {self.max_bytes} bytes "
                    f"undelivered, {len(items)} record(s) refused"
                )
            data = b"".join(encode_record(first + i, *items[i]) for i in range(admitted))
            active = self._segments[-1] if self._segments else None
            if (
                active is None
                or active.next_seq != first  # the ack pointer ran past the records: start afresh
                or (active.size > 0 and active.size + total > self.segment_bytes)
            ):
                active = self._rotate(first)
            assert self._fd is not None
            try:
                _write_all(self._fd, data)
            except OSError:
                try:
                    os.ftruncate(self._fd, active.size)
                except OSError as exc:
                    self._failed = exc
                raise
            try:
                self._sync(self._fd, data_only=True)
            except OSError as exc:
                # after a failed fsync the page cache may claim data the disk lost ("fsyncgate"): stop here
                self._failed = exc
                raise
            self.commits += 1
            with self._lock:
                active.size += total
                active.next_seq = first + admitted
                self._next_seq = first + admitted
                self._unacked_bytes += total
                if self._head_seg is None:
                    self._head_seg, self._head_off = active, 0
            return list(range(first, first + admitted)), admitted

    def _rotate(self, first_seq: int) -> _Segment:
        """Start a new active segment named `first_seq` (called with `_append_lock` held)."""
        path = self.directory / segment_name(first_seq)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            self._fsync_dir(self.directory)
        except OSError as exc:
            os.close(fd)
            self._failed = exc
            raise
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        seg = _Segment(first_seq, path)
        with self._lock:
            self._segments.append(seg)
        return seg

    # ---------------------------------------------------------------- reading and acknowledging

    def _normalize_head_locked(self) -> None:
        """Move the head off a segment that holds no un-acked record onto the next one (`_lock` held)."""
        seg = self._head_seg
        if seg is None:
            return
        i = self._segments.index(seg)
        while self._acked + 1 >= self._segments[i].next_seq and i + 1 < len(self._segments):
            i += 1
            self._head_off = 0
        self._head_seg = self._segments[i]

    def _snapshot(self) -> tuple[int, int, int, list[tuple[Path, int, int]]]:
        """(acked, next_seq, head offset, [(path, committed size, next_seq)] from the head segment on)."""
        with self._lock:
            self._check_open()
            self._normalize_head_locked()
            if self._head_seg is None:
                return self._acked, self._next_seq, 0, []
            i = self._segments.index(self._head_seg)
            segs = [(s.path, s.size, s.next_seq) for s in self._segments[i:]]
            return self._acked, self._next_seq, self._head_off, segs

    def _scan(
        self, max_records: int, read_bodies: bool
    ) -> Iterator[tuple[SpoolRecord | None, int, int, int]]:
        """Yield (record or None, size, segment index, offset after it) for un-acked records in order."""
        acked, _next, off, segs = self._snapshot()
        seq, n = acked + 1, 0
        for i, (path, size, seg_next) in enumerate(segs):
            if seq >= seg_next:
                off = 0
                continue
            with open(path, "rb") as f:
                f.seek(off)
                while off < size and n < max_records:
                    header = f.read(HEADER.size)
                    if len(header) < HEADER.size:
                        raise SpoolCorrupt(
                            f"spool segment {path} offset {off}: file shorter than expected", path, off
                        )
                    magic, _v, _fl, _crc, hseq, tlen, klen, vlen = HEADER.unpack(header)
                    rsize = HEADER.size + tlen + klen + vlen
                    rec: SpoolRecord | None = None
                    if read_bodies:
                        parsed = _decode_at(header + f.read(rsize - HEADER.size), 0)
                        if isinstance(parsed, str):
                            raise SpoolCorrupt(f"spool segment {path} offset {off}: {parsed}", path, off)
                        rec = parsed[0]
                    else:
                        f.seek(rsize - HEADER.size, os.SEEK_CUR)
                    if magic != MAGIC or hseq != seq:
                        raise SpoolCorrupt(
                            f"spool segment {path} offset {off}: expected record seq {seq}, found {hseq}",
                            path,
                            off,
                        )
                    off += rsize
                    yield rec, rsize, i, off
                    seq += 1
                    n += 1
            if n >= max_records:
                return
            off = 0

    def peek(self, max_records: int = 1000) -> list[SpoolRecord]:
        """Up to `max_records` un-acknowledged records, oldest first. Does not consume them: `ack` does."""
        with self._drain_lock:
            return [rec for rec, *_ in self._scan(max_records, read_bodies=True) if rec is not None]

    def ack(self, upto_seq: int) -> None:
        """Mark every record with seq <= `upto_seq` delivered (durably), then delete fully delivered segments.

        Acknowledging at or below the current pointer is a no-op; past the last appended record, `ValueError`.
        """
        with self._drain_lock:
            acked, next_seq, _off, _segs = self._snapshot()
            if upto_seq <= acked:
                return
            if upto_seq >= next_seq:
                raise ValueError(f"cannot ack seq {upto_seq}: the last appended record is {next_seq - 1}")
            freed, seg_index, off = 0, 0, 0
            for _rec, size, at_index, after in self._scan(upto_seq - acked, read_bodies=False):
                freed += size
                seg_index, off = at_index, after
            self._write_ack(upto_seq)
            with self._append_lock, self._lock:
                head_index = self._segments.index(self._head_seg) + seg_index  # type: ignore[arg-type]
                self._acked = upto_seq
                self._head_seg, self._head_off = self._segments[head_index], off
                self._unacked_bytes -= freed
                self._normalize_head_locked()
                victims = [s for s in self._segments[:-1] if s.next_seq - 1 <= upto_seq]
                self._segments = [s for s in self._segments if s not in victims]
            for seg in victims:
                seg.path.unlink()
            if victims:
                self._fsync_dir(self.directory)

    # ---------------------------------------------------------------- state

    @property
    def depth(self) -> int:
        """Records appended and not yet acknowledged."""
        with self._lock:
            return self._next_seq - 1 - self._acked

    @property
    def size_bytes(self) -> int:
        """Bytes of un-acknowledged records (what `max_bytes` bounds)."""
        with self._lock:
            return self._unacked_bytes

    @property
    def acked(self) -> int:
        with self._lock:
            return self._acked

    @property
    def failed(self) -> OSError | None:
        """The disk error that disabled appends, if any (readiness should report it)."""
        return self._failed

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolError(f"spool {self.directory} is closed")

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)

    def close(self) -> None:
        """Release the directory; idempotent. Everything appended is already durable."""
        with self._drain_lock, self._append_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            self._release()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        depth = self._next_seq - 1 - self._acked
        return f"Spool({str(self.directory)!r}, depth={depth}, bytes={self._unacked_bytes})"


class AsyncSpool:
    """asyncio face on `Spool`: group-committed appends and an in-order drain.

    `append` calls that arrive while a group is being written and fsynced are collected and written
    together as the next group (one fsync for all of them), in a dedicated thread; `drain` runs peek/ack in
    a second thread so it never queues behind appends.
    """

    def __init__(self, spool: Spool, max_group: int = 2048) -> None:
        if max_group < 1:
            raise ValueError(f"max_group must be >= 1, got {max_group}")
        self.spool = spool
        self.max_group = max_group
        self._pending: list[tuple[tuple[str, bytes, bytes], asyncio.Future[int]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-append")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-drain")
        self._drain_lock = asyncio.Lock()
        self.last_drain_error: BaseException | None = None
        #: the record the last failed drain stopped at (None once a drain batch succeeded)
        self.stopped_at: SpoolRecord | None = None

    async def append(self, topic: str, key: bytes, value: bytes) -> int:
        """Spool one record; returns its seq once fsynced. Raises like `Spool.append`."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._pending.append(((topic, key, value), fut))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                group = self._pending[: self.max_group]
                del self._pending[: self.max_group]
                items = [item for item, _ in group]
                try:
                    seqs, _n = await loop.run_in_executor(self._writer, self.spool.append_prefix, items)
                except BaseException as exc:
                    for _, fut in group:
                        if not fut.done():
                            fut.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        for _, fut in self._pending:
                            fut.cancel()
                        self._pending.clear()
                        raise
                    continue
                for i, (_, fut) in enumerate(group):
                    if fut.done():
                        continue  # the caller went away; the record is spooled regardless
                    if i < len(seqs):
                        fut.set_result(seqs[i])
                    else:
                        fut.set_exception(SpoolFull(f"spool {self.spool.directory} is full"))
        finally:
            self._flusher = None

    async def drain(self, publish: Callable[[str, bytes, bytes], Awaitable[None]], batch: int = 500) -> int:
        """Send spooled records through `publish` in order and ack them; returns how many were acked.

        Per batch, `publish` is called for every record in seq order and then all the awaitables are awaited
        together, so `publish` must enqueue its record before returning (as `AsyncProducer.publish` does,
        returning a future). On the first failed record the records before it are acked and the drain stops,
        leaving the failed one and the rest spooled (records after it may have been delivered too: they will
        be sent again, at-least-once). The error is kept in `last_drain_error`, the record in `stopped_at`.
        """
        loop = asyncio.get_running_loop()
        drained = 0
        async with self._drain_lock:
            while True:
                records = await loop.run_in_executor(self._reader, self.spool.peek, batch)
                if not records:
                    return drained
                pending: list[Awaitable[None]] = []
                failed_at: int | None = None
                error: BaseException | None = None
                for i, rec in enumerate(records):
                    try:
                        pending.append(publish(rec.topic, rec.key, rec.value))
                    except Exception as exc:  # publish refused synchronously
                        failed_at, error = i, exc
                        break
                results = await asyncio.gather(*pending, return_exceptions=True)
                for i, res in enumerate(results):
                    if isinstance(res, BaseException):
                        failed_at, error = i, res
                        break
                delivered = len(records) if failed_at is None else failed_at
                if delivered:
                    await loop.run_in_executor(self._reader, self.spool.ack, records[delivered - 1].seq)
                    drained += delivered
                if error is not None:
                    self.last_drain_error, self.stopped_at = error, records[delivered]
                    log.warning(
                        "spool drain stopped at seq %d (topic %s) after %d records: %s",
                        records[delivered].seq,
                        records[delivered].topic,
                        drained,
                        error,
                    )
                    return drained
                self.last_drain_error = self.stopped_at = None

    @property
    def depth(self) -> int:
        return self.spool.depth

    async def close(self) -> None:
        """Wait for queued appends, stop the threads and close the spool."""
        while self._flusher is not None:
            await asyncio.shield(self._flusher)
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)
        self.spool.close()
