"""The Faust shell around the pure state machine: batches in, versions out, timers for expiry.

`Folder` holds the per-worker state of the shell; `install_agents` wires it into the Faust app:

- one agent reads receipts with `take_events` (at most `batch_size` per batch, all partitions of this
  worker), groups them by partition and umid, and calls `apply_many` ONCE per umid per batch;
- a timer calls `expire` for the keys that are due on the partitions this worker owns, then retires final
  states (GONE markers) and finally deletes them, so the table stays bounded;
- an in-memory cache of decoded states (per partition, bounded, dropped on every rebalance) means the
  table's Avro is decoded only on a cache miss.

Writes bypass Faust's per-key `table[key] = ...` (which needs the current event for the partition and
costs a changelog future per key): the shell writes the partition's RocksDB with one WriteBatch per
batch and the changelog with a confluent-kafka producer, then tells Faust the persisted changelog offset.

Processing guarantee (at-least-once, outputs idempotent and monotonic), per batch and in this order:
    1. compute every new value; write them to RocksDB (one WriteBatch per partition);
    2. send them to the changelog and wait for the acks (on Tansu: then one marker record per partition,
       alone in its batch, so ListOffsets gives the true end to the next recovery);
    3. send the changed states to the state topic and wait for the acks;
    4. ack the events to Faust; offsets are committed only for acked events.
Steps 2-4 run in a sender task, so the agent folds the next batches (step 1) while the broker acks
earlier ones: at most `in_flight` folded batches wait, and the sender takes all that wait as ONE send
(one changelog flush, one marker flush, one state flush for all of them), in the order they were folded.
Each stored value carries the highest input offset folded into it. After a crash the input is replayed
from the last commit. Every receipt is applied again (the pure core is idempotent: one already folded is a
duplicate); when a batch brings nothing new for a key but holds receipts at or below its stored offset,
the stored value may never have been emitted (a crash between 1 and 3), so it is sent again (changelog
and state topic), byte for byte. The offset is never used to skip a receipt: Faust redelivers what was
not committed, but not always in offset order within one process (a rebalance drops buffered events and
fetches them again later), so "at or below the stored offset" does not prove "already folded".
Because the changelog is acked before a version is emitted (2 before 3), any emitted version is in the
changelog, so a worker that restores from it (RocksDB lost) never computes a second, different content
under a version that was already emitted: no lost and no contradicting transition. A version may be
emitted twice with the same content (only the `duplicates` counters, never emitted on their own, can
differ); sinks ignore versions they hold.

Poison records: a receipt the shell cannot fold never costs other receipts. One that does not decode, or
whose umid's fold fails (any exception from the pure core, the stored value or encoding the outputs), is
parked in `chatpipe.processor.dlq` (`DeadLetter`, source "processor": the record's bytes whole, the
reason, its topic/partition/offset/umid in `headers`), logged at ERROR and counted
(`chatpipe_processor_dead_letters_total`). A failed umid's writes are dropped from the batch and its
receipts re-folded one more at a time onto those that folded, so only the receipts that fail are parked
and the others are folded; the rest of the batch is folded as usual. Dead letters are sent with the state
records (step 3) and acknowledged before the batch's receipts are acked: none is lost. A retriable error
(`TransientError`: the registry or broker unavailable) is not the record's fault: it propagates (the
agent restarts, the receipts come again), it is never parked. The happy path pays one try block per umid,
nothing per receipt.
The conversation agents park poison inbound messages the same way, one message at a time
(`InboundPoison`). Each input has a dead-letter limit (`processors.dlqlimit`): when most of its recent
records were parked the worker stops (`halt`, exit 1) without acking the batch that tripped it.

Time: the timer's clock is the ingest clock of the partition (`received_at` of the newest receipt seen
on it), not the wall clock, so a worker catching up on a backlog never seals a message whose late
receipts are still in the backlog. An idle partition does not expire anything until traffic resumes.

Retention: a final state stays `final_retention` (ingest clock), then is replaced by a compact GONE marker
(its last version), which stays `tombstone_retention` and is then deleted. A receipt for a GONE umid is
absorbed (counted as `late`, nothing emitted), like a sealed message absorbs late receipts: re-creating a
state from it would emit a partial state (one receipt) over the complete final one. After the marker is
deleted too, a receipt starts a fresh state at version 1, which sinks ignore because they hold a higher
version (the only residual effect is that fresh fragment in the table until it expires in turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import random
import signal
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn

import rocksdict
from confluent_kafka import KafkaError, Producer
from faust.types import TP
from prometheus_client import CONTENT_TYPE_LATEST

from chatpipe.runtime import kafka
from chatpipe.runtime.patches import partition_db
from chatpipe.runtime.serve import always_ok, health_answer, metrics_answer
from processors.app import (
    GONE,
    LIVE,
    Processor,
    Stored,
    decode_stored,
    encode_stored,
    stored_header,
)
from processors.conversation import apply_inbound, conversation_key
from processors.dlqlimit import DlqLimitExceeded
from processors.state import apply_many, expire, expire_due
from schemas.errors import InvalidEvent, TransientError
from schemas.models import (
    DeadLetter,
    DeliveryReceipt,
    MessageState,
    MessageStep,
    StatusEvent,
    StatusEventRecord,
)

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: changelog key of the end-of-batch marker (value None: recovery deletes a key that never exists)
MARKER_KEY = b"\x00chatpipe-end-of-batch"
FLUSH_TIMEOUT = 30.0
#: `DeadLetter.code` of a record the processor could not fold (the sink's code for the same)
POISON_CODE = 1000
#: aiohttp refuses a charset inside content_type; Prometheus text is UTF-8 by definition
_METRICS_CONTENT_TYPE = "; ".join(p for p in CONTENT_TYPE_LATEST.split("; ") if not p.startswith("charset"))


def _us(t: datetime) -> int:
    d = t - _EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


@dataclass
class _Partition:
    """What this worker holds for one partition it owns; dropped on every rebalance."""

    # least recently written first; an OrderedDict because evicting from the front of a plain dict is
    # O(evicted so far) (iteration skips the deleted slots until the next resize): 10% of the worker's
    # CPU once the cache was full
    cache: OrderedDict[bytes, Stored] = field(default_factory=OrderedDict)
    watermark: datetime | None = None  # newest received_at seen (the timer's clock)
    heap: list[tuple[int, bytes]] | None = None  # (check_at, key); None until built from the table


@dataclass
class _Batch:
    """Writes of one batch (or one timer run), applied in the order of the module docstring."""

    values: dict[int, list[tuple[bytes, bytes | None]]] = field(default_factory=dict)  # p -> (key, value)
    emits: list[tuple[int, bytes, bytes]] = field(default_factory=list)  # (p, key, state avro)
    derived: list[tuple[str, int, bytes, bytes]] = field(default_factory=list)  # (topic, p, key, value)
    events: Sequence[Any] = ()  # the Faust events folded into this batch, acked once it is sent
    not_ours: set[int] = field(default_factory=set)  # ids of events of partitions revoked while they
    # waited: never acked here (acking them would commit offsets past receipts nobody processed)
    dead_letters: list[tuple[str, bytes, bytes]] = field(default_factory=list)  # (stage, key, value)

    def put(self, p: int, key: bytes, value: bytes | None) -> None:
        self.values.setdefault(p, []).append((key, value))


def merge(batches: Sequence[_Batch]) -> _Batch:
    """One send for several folded batches: their writes concatenated in folding order (a key written by
    two of them ends with the later value, in RocksDB as in the changelog)."""
    if len(batches) == 1:
        return batches[0]
    out = _Batch()
    for b in batches:
        for partition, kvs in b.values.items():
            out.values.setdefault(partition, []).extend(kvs)
        out.emits.extend(b.emits)
        out.derived.extend(b.derived)
        out.dead_letters.extend(b.dead_letters)
    return out


def _drop_key(out: _Batch, partition: int, key: bytes) -> None:
    """Remove every write of `key` on `partition` from `out` (one fold writes a key at most once)."""
    kvs = out.values.get(partition)
    if kvs is not None:
        kvs[:] = [kv for kv in kvs if kv[0] != key]
        if not kvs:
            del out.values[partition]
    out.emits[:] = [e for e in out.emits if e[0] != partition or e[1] != key]
    out.derived[:] = [d for d in out.derived if d[1] != partition or d[2] != key]


def _retriable(exc: BaseException) -> bool:
    """A dependency failed (`TransientError`: registry, broker), not the record: propagate, never park."""
    return getattr(exc, "retriable", False) is True


def _events_by_offset(out: _Batch, partition: int) -> dict[int, Any]:
    """The batch's events of `partition` by offset (to find a poison receipt's record bytes)."""
    return {ev.message.offset: ev for ev in out.events if ev.message.partition == partition}


def _check_at(due: datetime | None) -> int:
    """The timer's check time of a due time: -1 for never; a due time before the epoch is due at once."""
    return -1 if due is None else max(0, _us(due))


def dead_letter(
    codec: Any,
    what: str,
    stage: str,
    topic: str,
    partition: int,
    offset: int,
    umid: str,
    raw: bytes,
    reason: str,
    now: datetime,
) -> tuple[str, bytes, bytes]:
    """The dead letter of one poison record (`what`: receipt, inbound message) as (stage, key, value) for
    `chatpipe.processor.dlq`: the record's bytes whole, the reason, its position in `headers`; logs it at
    ERROR. The caller sends it, and acks the record only once the broker acked the letter."""
    error_id = str(uuid.uuid4())
    log.error(
        "poison %s parked (%s) topic=%s partition=%s offset=%s umid=%s error_id=%s: %s",
        what,
        stage,
        topic,
        partition,
        offset,
        umid,
        error_id,
        reason,
    )
    letter = DeadLetter(
        error_id=error_id,
        reason=f"{stage}: {topic}[{partition}]@{offset} umid={umid}: {reason}",
        code=POISON_CODE,
        http_status=0,
        source="processor",
        received_at=now,
        body=raw,
        headers=(
            ("topic", topic),
            ("partition", str(partition)),
            ("offset", str(offset)),
            ("umid", umid),
            ("stage", stage),
        ),
    )
    return stage, error_id.encode(), codec.encode(letter)


async def halt(p: Processor, exc: DlqLimitExceeded) -> NoReturn:
    """Stop the worker: the dead-letter limit tripped (a bad deploy, not bad records). The batch that
    tripped it is never acked, so its records stay uncommitted and come again after the fix; the worker
    exits 1 (`processors.runner`). Waits until the shutdown cancels the calling agent."""
    log.error(
        "dead-letter limit reached, the worker stops; the records of this batch are not acknowledged "
        "(they come again once the cause is fixed): %s",
        exc,
    )
    p.fatal.append(exc)
    os.kill(os.getpid(), signal.SIGTERM)  # Faust's own graceful stop, as an operator's would be
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


class Folder:
    """The shell: batches of receipts and timer runs -> RocksDB, changelog, state topic."""

    def __init__(self, p: Processor) -> None:
        self.p = p
        self.app = p.app
        self.codecs = p.codecs
        self.config = p.config
        self.rt = p.runtime
        self.metrics = p.metrics
        self.receipts_topic = p.receipts.get_topic_name()
        self.dlq_codec = p.codecs.processor_dlq if p.codecs is not None else None
        self._final_retention_us = int(p.runtime.final_retention.total_seconds() * 1_000_000)
        self.states_topic = p.states.get_topic_name()
        self.emit_derived = p.settings.emit_steps_and_events
        self.changelog_topic = p.table.changelog_topic.get_topic_name()
        self.parts: dict[int, _Partition] = {}
        self.changelog_producer = Producer(
            kafka.producer(p.settings, **{"linger.ms": 2, "client.id": "chatpipe-changelog"})
        )
        # state, step and history records: delivery reports for failures only (no Python call per record
        # acked); a failure reaches `_on_state` and fails the flush, as for the changelog
        self.state_producer = Producer(
            kafka.producer(
                p.settings,
                **{"linger.ms": 5, "client.id": "chatpipe-state", "delivery.report.only.error": True},
                on_delivery=self._on_state,
            )
        )
        self._lineages = random.Random()  # seeded from the OS: lineages of new states
        self._errors: list[str] = []
        self._changelog_offsets: dict[int, int] = {}
        self._waiting: list[_Batch] = []  # folded, not yet taken by the sender
        self._progress = asyncio.Event()  # set when the sender takes batches or fails
        self._sender: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self.limit = p.runtime.dlq_limit()  # the dead-letter limit of the receipts
        self.last_reason = ""

    # --- partitions ----------------------------------------------------------------------------

    def owned(self) -> set[int]:
        topic = self.receipts_topic
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == topic}

    def reset(self) -> None:
        """Forget everything held in memory (a rebalance: another worker may write these keys now)."""
        self.parts.clear()

    def _db(self, partition: int) -> Any:
        return partition_db(self.p.table.data, partition)

    def _part(self, partition: int) -> _Partition:
        part = self.parts.get(partition)
        if part is None:
            part = self.parts[partition] = _Partition()
        return part

    def _load(self, partition: int, part: _Partition, key: bytes) -> Stored | None:
        hit = part.cache.get(key)
        if hit is not None:
            return hit
        raw = self._db(partition).get(key)
        return None if raw is None else decode_stored(raw, self.codecs)

    def _remember(self, part: _Partition, key: bytes, stored: Stored | None) -> None:
        cache = part.cache
        if stored is None:
            cache.pop(key, None)
            return
        cache[key] = stored
        cache.move_to_end(key)
        limit = self.rt.cache_size // max(1, len(self.parts))
        while len(cache) > limit:
            cache.popitem(last=False)

    def _schedule(self, part: _Partition, key: bytes, check_at: int) -> None:
        if part.heap is not None and check_at >= 0:
            heapq.heappush(part.heap, (check_at, key))

    def _derive(
        self,
        out: _Batch,
        partition: int,
        key: bytes,
        state: MessageState,
        new_events: Sequence[tuple[int, StatusEvent]],
        prev: MessageState | None = None,
    ) -> None:
        """The step records that changed since `prev` (all of them without `prev`) and the newly
        recorded status events (history topic) of a new version. A step record changes with its step
        (status, history, counters) and with the step count; a step the core left untouched is the same
        object in both states, so an unchanged step is recognised by identity (never re-encoded)."""
        if not self.emit_derived:
            return
        steps, events = self.codecs.steps, self.codecs.events
        n = len(state.steps)
        before = prev.steps if prev is not None and len(prev.steps) == n else ()
        for i, step in enumerate(state.steps):
            if before and before[i] is step:
                continue
            record = MessageStep(state.umid, state.sub_account_id, state.version, n, step)
            out.derived.append((steps.spec.name, partition, key, steps.encode(record)))
        for number, event in new_events:
            channel = state.steps[number - 1].channel if 0 < number <= n else ""
            record = StatusEventRecord(
                state.umid, state.sub_account_id, channel, number, state.version, event
            )
            out.derived.append((events.spec.name, partition, key, events.encode(record)))

    # --- the batch -----------------------------------------------------------------------------

    def fold(self, events: Sequence[Any], now: datetime) -> _Batch:
        """Synchronous part of a batch: group, apply, write RocksDB, update the cache. No awaits."""
        owned = self.owned()
        groups: dict[int, dict[bytes, list[tuple[int, DeliveryReceipt]]]] = {}
        decode = self.codecs.receipts.decode
        invalid = 0
        undecodable: list[tuple[str, bytes, bytes]] = []
        skipped: set[int] = set()
        for ev in events:
            msg = ev.message
            partition = msg.partition
            if partition not in owned:  # revoked while buffered: the new owner reads it again
                skipped.add(id(ev))
                continue
            try:
                receipt = decode(ev.value)
            except Exception as exc:  # InvalidEvent, or anything a mapping raises: park it, go on
                if _retriable(exc):  # the registry is unreachable: not the record's fault, retried
                    raise
                reason = exc.reason if isinstance(exc, InvalidEvent) else f"{type(exc).__name__}: {exc}"
                umid = msg.key.decode("utf-8", "replace") if isinstance(msg.key, bytes) else "-"
                undecodable.append(
                    self._dead_letter("decode", msg.topic, partition, msg.offset, umid, ev.value, reason, now)
                )
                invalid += 1
                continue
            part = self._part(partition)
            if part.watermark is None or receipt.received_at > part.watermark:
                part.watermark = receipt.received_at
            groups.setdefault(partition, {}).setdefault(receipt.umid.encode(), []).append(
                (msg.offset, receipt)
            )
        if invalid:
            self.metrics.events.labels("invalid").inc(invalid)

        out = _Batch(events=events, not_ours=skipped, dead_letters=undecodable)
        counts = {"applied": 0, "unchanged": 0, "duplicate": 0, "replayed": 0, "late": 0, "poison": 0}
        for partition, by_key in groups.items():
            part = self.parts[partition]
            assert part.watermark is not None
            wm_us = _us(part.watermark)
            for key, items in by_key.items():
                try:
                    new = self._fold_key(out, counts, partition, part, key, items, now, wm_us)
                except Exception as exc:  # a poison record: park what fails, fold the others
                    if _retriable(exc):
                        raise
                    new = self._fold_poisoned(out, counts, partition, part, key, items, now, wm_us, exc)
                if new is not None:
                    self._remember(part, key, new)
                    self._schedule(part, key, new.check_at)
        for outcome_name, n in counts.items():
            if n:
                self.metrics.events.labels(outcome_name).inc(n)
        dead = len(out.dead_letters)
        self.limit.record(len(events) - len(skipped) - dead, dead)
        if dead and self.limit.exceeded:  # before the local write: nothing of this batch is kept
            where = f"{self.receipts_topic}: {self.limit.describe()}"
            raise DlqLimitExceeded(f"{where}; last: {self.last_reason}")
        self._write_local(out)
        return out

    def _fold_key(
        self,
        out: _Batch,
        counts: dict[str, int],
        partition: int,
        part: _Partition,
        key: bytes,
        items: Sequence[tuple[int, DeliveryReceipt]],
        now: datetime,
        wm_us: int,
    ) -> Stored | None:
        """Fold one umid's receipts of the batch into `out` and `counts`; returns the value to cache and
        schedule (None: none). May raise anything the pure core, the stored value or the codecs raise: it
        then has written nothing to `counts` and, to `out`, only writes of `key` (`_drop_key` undoes them)."""
        stored = self._load(partition, part, key)
        if stored is not None and stored.kind == GONE:
            counts["late"] += len(items)
            return None
        config = self.config
        # Every receipt is applied, even one at or below the stored offset: Faust redelivers what was not
        # committed, but not necessarily in offset order within one process (a rebalance drops buffered
        # events and refetches them later), so "offset <= stored" does not prove "already folded". The pure
        # core is idempotent: a receipt already folded is a duplicate.
        last_offset = stored.offset if stored is not None else -1
        replayed = sum(1 for off, _ in items if off <= last_offset)
        prev = stored.state if stored is not None else None
        # a new state gets a random lineage (MessageState.lineage): sinks merge states of another lineage
        # by content, so a lost or rebuilt processor state never goes stale
        lineage = 0 if prev is not None else self._lineages.getrandbits(63) | 1
        outcome = apply_many(prev, [r for _, r in items], now=now, config=config, lineage=lineage)
        state = outcome.state
        check_at = wm_us + self._final_retention_us if state.final else _check_at(expire_due(state, config))
        last = max(last_offset, max(off for off, _ in items))
        if not outcome.changed and replayed and stored is not None:
            # possibly folded before a crash that came before its emission: send the stored value again,
            # byte for byte (same version, same content), with its steps and history
            assert stored.state is not None
            out.put(partition, key, encode_stored(stored))
            out.emits.append((partition, key, stored.avro))
            history = [(s.step, e) for s in stored.state.steps for e in s.history]
            self._derive(out, partition, key, stored.state, history)
            counts["replayed"] += replayed
            counts["duplicate"] += len(items) - replayed
            return None
        avro = self.codecs.state.encode(state)
        new = Stored(LIVE, last, check_at, state=state, avro=avro, version=state.version)
        out.put(partition, key, encode_stored(new))
        if outcome.changed:
            out.emits.append((partition, key, avro))
            self._derive(out, partition, key, state, outcome.new_events, prev)
        fresh = len(items) - replayed
        counts["replayed"] += replayed
        if outcome.changed:
            counts["applied"] += fresh
        elif outcome.duplicate:
            counts["duplicate"] += fresh
        else:
            counts["unchanged"] += fresh
        return new

    def _fold_poisoned(
        self,
        out: _Batch,
        counts: dict[str, int],
        partition: int,
        part: _Partition,
        key: bytes,
        items: Sequence[tuple[int, DeliveryReceipt]],
        now: datetime,
        wm_us: int,
        exc: Exception,
    ) -> Stored | None:
        """`key`'s receipts failed to fold together (`exc`): drop their writes, re-fold them one more at a
        time onto those that folded (a trial into a scratch batch), park the ones that fail and fold the
        others. Only on failure: the happy path never comes here."""
        _drop_key(out, partition, key)
        failed: list[tuple[tuple[int, DeliveryReceipt], Exception]] = []
        good: list[tuple[int, DeliveryReceipt]] = []
        if len(items) == 1:
            failed.append((items[0], exc))
        else:
            for item in items:
                try:
                    self._fold_key(_Batch(), dict.fromkeys(counts, 0), partition, part, key, [*good, item],
                                   now, wm_us)  # fmt: skip
                except Exception as trial_exc:
                    if _retriable(trial_exc):
                        raise
                    failed.append((item, trial_exc))
                else:
                    good.append(item)
        new = None
        if good:
            try:
                new = self._fold_key(out, counts, partition, part, key, good, now, wm_us)
            except Exception as again:  # folded as a trial, not now: park them all rather than guess
                if _retriable(again):
                    raise
                _drop_key(out, partition, key)
                failed.extend((item, again) for item in good)
        events = _events_by_offset(out, partition)
        for (offset, receipt), error in failed:
            ev = events.get(offset)
            topic = ev.message.topic if ev is not None else self.receipts_topic
            raw = ev.value if ev is not None else b""
            reason = f"{type(error).__name__}: {error}"
            out.dead_letters.append(
                self._dead_letter("fold", topic, partition, offset, receipt.umid, raw, reason, now)
            )
        counts["poison"] += len(failed)
        return new

    def _dead_letter(
        self,
        stage: str,
        topic: str,
        partition: int,
        offset: int,
        umid: str,
        raw: bytes,
        reason: str,
        now: datetime,
    ) -> tuple[str, bytes, bytes]:
        """The dead letter of one receipt, (stage, key, value) for `_Batch.dead_letters`; logs it."""
        assert self.dlq_codec is not None
        self.last_reason = reason
        return dead_letter(self.dlq_codec, "receipt", stage, topic, partition, offset, umid, raw, reason, now)

    def _write_local(self, out: _Batch) -> None:
        for partition, kvs in out.values.items():
            wb = rocksdict.WriteBatch(raw_mode=True)
            for key, value in kvs:
                if value is None:
                    wb.delete(key)
                else:
                    wb.put(key, value)
            self._db(partition).write(wb)

    # --- sending -------------------------------------------------------------------------------

    def _on_changelog(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._errors.append(f"changelog partition={msg.partition()}: {err}")
            return
        p, off = msg.partition(), msg.offset()
        if off > self._changelog_offsets.get(p, -1):
            self._changelog_offsets[p] = off

    def _on_state(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._errors.append(f"state partition={msg.partition()}: {err}")

    async def _flush(self, producer: Producer) -> None:
        loop = asyncio.get_running_loop()
        left = await loop.run_in_executor(None, producer.flush, FLUSH_TIMEOUT)
        if self._errors or left:
            errors, self._errors = self._errors, []
            raise TransientError(f"produce failed ({left} unacknowledged): {'; '.join(errors[:5])}")

    def _produce(
        self, producer: Producer, topic: str, partition: int, key: bytes, value: bytes | None, callback: Any
    ) -> None:
        while True:
            try:
                if callback is None:
                    producer.produce(topic, value, key, partition=partition)
                else:
                    producer.produce(topic, value, key, partition=partition, on_delivery=callback)
                return
            except BufferError:
                producer.poll(0.05)

    async def send(self, out: _Batch) -> None:
        """Changelog (acked, then the end markers), then the state topic (acked). See the docstring."""
        if out.values:
            self._changelog_offsets.clear()
            cp = self.changelog_producer
            for partition, kvs in out.values.items():
                for key, value in kvs:
                    self._produce(cp, self.changelog_topic, partition, key, value, self._on_changelog)
            await self._flush(cp)
            if self.rt.changelog_one_record_per_batch:
                for partition in out.values:
                    self._produce(cp, self.changelog_topic, partition, MARKER_KEY, None, self._on_changelog)
                await self._flush(cp)
            store = self.p.table.data
            for partition, offset in self._changelog_offsets.items():
                if partition in self.parts:  # still ours
                    store.set_persisted_offset(TP(self.changelog_topic, partition), offset)
        if out.emits or out.dead_letters:
            sp = self.state_producer
            for partition, key, avro in out.emits:
                self._produce(sp, self.states_topic, partition, key, avro, None)
            for topic, partition, key, value in out.derived:
                self._produce(sp, topic, partition, key, value, None)
            if out.dead_letters:
                assert self.dlq_codec is not None
                dlq = self.dlq_codec.spec.name
                for _, key, value in out.dead_letters:
                    self._produce(sp, dlq, -1, key, value, None)  # -1: the partitioner's choice
            await self._flush(sp)  # the dead letters are acked before their receipts are (`_ack`)
            self.metrics.states_emitted.inc(len(out.emits))
            for stage, _, _ in out.dead_letters:
                self.metrics.dead_letters.labels(stage).inc()

    # --- the pipeline --------------------------------------------------------------------------

    async def submit(self, events: Sequence[Any]) -> None:
        """Fold one batch now and queue it for the sender; waits while `in_flight` batches wait."""
        await self._room()
        try:
            out = self.fold(events, datetime.now(UTC))
        except DlqLimitExceeded as exc:
            await halt(self.p, exc)
        self._enqueue(out)

    async def _room(self) -> None:
        while True:
            if self._failure is not None:
                # raised once (the agent crashes and Faust restarts it); the batches still waiting go out
                # with the next sender, the failed ones' receipts stay unacked and come again
                failure, self._failure = self._failure, None
                raise TransientError(f"the sender failed: {failure!r}") from failure
            if len(self._waiting) < self.rt.in_flight:
                return
            self._progress.clear()
            await self._progress.wait()

    def _enqueue(self, out: _Batch) -> None:
        # no await between `_room` and here: batches are queued in the order they were folded
        self._waiting.append(out)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_loop(), name="chatpipe-sender")
        self._progress.set()

    async def _send_loop(self) -> None:
        try:
            while True:
                while not self._waiting:
                    self._progress.clear()
                    await self._progress.wait()
                batches, self._waiting = self._waiting, []
                self._progress.set()  # room again for the folder
                await self.send(merge(batches))
                for out in batches:
                    self._ack(out)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.error("sending folded batches failed: %r", exc)
            self._failure = exc
            self._progress.set()
            raise

    def _ack(self, out: _Batch) -> None:
        skipped = out.not_ours
        if skipped:
            log.info("%d buffered receipts of revoked partitions left for their new owner", len(skipped))
        for event in out.events:
            if id(event) not in skipped:
                event.ack()

    async def stop(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sender

    # --- the timer -----------------------------------------------------------------------------

    def _build_heap(self, partition: int, part: _Partition) -> None:
        """Schedule every key of the partition from the stored headers (no Avro decoding)."""
        heap: list[tuple[int, bytes]] = []
        skip = self.p.table.data.offset_key
        for key, raw in self._db(partition).items():
            if key in (skip, MARKER_KEY) or not raw:
                continue
            _, _, check_at = stored_header(raw)
            if check_at >= 0:
                heap.append((check_at, key))
        heapq.heapify(heap)
        part.heap = heap

    def expire_due(self, limit: int = 20_000) -> _Batch:
        """Synchronous part of a timer run: seal, retire and delete what is due; at most `limit` keys."""
        out = _Batch()
        rt, config = self.rt, self.config
        final_retention = int(rt.final_retention.total_seconds() * 1_000_000)
        tomb_retention = int(rt.tombstone_retention.total_seconds() * 1_000_000)
        interval = int(rt.expire_interval * 1_000_000)
        counts = {"sealed": 0, "retired": 0, "deleted": 0}
        done = 0
        for partition in sorted(self.owned()):
            part = self._part(partition)
            if part.watermark is None:
                continue
            if part.heap is None:
                self._build_heap(partition, part)
            heap = part.heap
            assert heap is not None
            clock = part.watermark
            wm_us = _us(clock)
            while heap and heap[0][0] <= wm_us and done < limit:
                check_at, key = heapq.heappop(heap)
                try:
                    stored = self._load(partition, part, key)
                except Exception as exc:  # an undecodable value cannot expire: left as it is, unscheduled
                    log.error("expiry skips undecodable value partition=%s key=%r: %r", partition, key, exc)
                    continue
                if stored is None or stored.check_at != check_at:
                    continue  # superseded by a later write (which scheduled itself)
                done += 1
                new: Stored | None
                if stored.kind == GONE:
                    out.put(partition, key, None)
                    self._remember(part, key, None)
                    counts["deleted"] += 1
                    continue
                state = stored.state
                assert state is not None
                if state.final:
                    new = Stored(GONE, stored.offset, wm_us + tomb_retention, version=state.version)
                    counts["retired"] += 1
                else:
                    marks = len(out.emits), len(out.derived)
                    try:
                        sealed = expire(state, now=clock, config=config)
                        if sealed is not None:
                            avro = self.codecs.state.encode(sealed)
                            out.emits.append((partition, key, avro))
                            self._derive(out, partition, key, sealed, (), state)  # steps unchanged
                    except Exception as exc:  # never seen (the core never raises): left unsealed
                        del out.emits[marks[0] :], out.derived[marks[1] :]
                        log.error("expiry failed partition=%s umid=%s: %r", partition, state.umid, exc)
                        continue
                    if sealed is not None:
                        new = Stored(
                            LIVE,
                            stored.offset,
                            wm_us + final_retention,
                            state=sealed,
                            avro=avro,
                            version=sealed.version,
                        )
                        counts["sealed"] += 1
                    else:  # not due after all: look again later
                        later = _check_at(expire_due(state, config))
                        if 0 <= later <= wm_us:
                            later = wm_us + interval
                        new = Stored(
                            LIVE, stored.offset, later, state=state, avro=stored.avro, version=stored.version
                        )
                out.put(partition, key, encode_stored(new))
                self._remember(part, key, new)
                self._schedule(part, key, new.check_at)
        if done:
            log.info(
                "expiry sealed=%d retired=%d deleted=%d",
                counts["sealed"],
                counts["retired"],
                counts["deleted"],
            )
        self._write_local(out)
        return out

    async def tick(self) -> None:
        if self.app.rebalancing or self.app.tables.recovery.in_recovery:
            return
        while True:
            await self._room()
            out = self.expire_due()
            if not out.values:
                return
            self._enqueue(out)


async def take_batches(queue: Any, size: int, within: float) -> AsyncIterator[list[Any]]:
    """Batches from a Faust channel queue: wait for one event, then take what is queued (no await per
    event) until `size` events or `within` seconds since the first."""
    loop = asyncio.get_running_loop()
    get_nowait = queue.get_nowait
    while True:
        try:
            first = await queue.get()
        except StopAsyncIteration:  # the channel is closing (worker stopping)
            return
        batch = [first]
        deadline = loop.time() + within
        while len(batch) < size:
            try:
                batch.append(get_nowait())
            except asyncio.QueueEmpty:
                if loop.time() >= deadline:
                    break
                await asyncio.sleep(0.002)  # let the fetcher and conductor fill the queue
        yield batch


def install_agents(p: Processor) -> Folder:
    folder = Folder(p)
    rt = p.runtime

    @p.app.agent(p.receipts, name="message-state")
    async def fold_receipts(stream: Any) -> None:
        # Faust's Stream costs ~85 us per event (processors, sensors, per-event awaits; 11.9k/s with
        # take_events). The agent's channel iterator is registered with the conductor like the stream's
        # would be; its queue holds decoded Events, drained here in bulk. Acks go to the consumer after
        # the batch is fully processed and acknowledged by the broker (at-least-once).
        channel = aiter(stream.channel)
        try:
            async for events in take_batches(channel.queue, rt.batch_size, rt.batch_within):
                await folder.submit(events)
        finally:
            await folder.stop()  # what was not sent is not acked: it comes again (at-least-once)

    @p.app.timer(interval=rt.expire_interval)
    async def expire_states() -> None:
        await folder.tick()

    @p.app.on_partitions_revoked.connect
    async def on_revoked(app: Any, revoked: Any, **kwargs: Any) -> None:
        folder.reset()

    @p.app.on_partitions_assigned.connect
    async def on_assigned(app: Any, assigned: Any, **kwargs: Any) -> None:
        folder.reset()

    install_conversation_agents(p)

    @p.app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        status, body = health_answer(always_ok)
        return web.json(body, status=status)

    @p.app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        return web.bytes(metrics_answer(p.metrics_registry), content_type=_METRICS_CONTENT_TYPE)

    return folder


class InboundPoison:
    """Poison inbound messages, for one of the conversation agents (one input, one dead-letter limit).

    What the receipt path does, one record at a time: a message that does not decode, or that cannot be
    folded into its conversation (any non-retriable exception from the codecs, the stored conversation or
    the pure core), is parked in `chatpipe.processor.dlq` (`dead_letter`), counted in
    `chatpipe_processor_dead_letters_total{stage}` and acked by the broker before the agent goes on (its
    record is acked only then). A retriable error propagates. The producer is made at the first dead
    letter: the happy path pays one `DlqLimit.record` per message."""

    def __init__(self, p: Processor) -> None:
        self.p = p
        self.limit = p.runtime.dlq_limit()
        self._producer: Producer | None = None
        self._errors: list[str] = []

    def passed(self) -> None:
        self.limit.record(1, 0)

    async def park(self, event: Any, stage: str, umid: str, exc: Exception) -> None:
        """Park `event`'s record; raises `exc` when it is retriable; stops the worker (`halt`) when the
        dead-letter limit trips."""
        if _retriable(exc):
            raise exc
        reason = exc.reason if isinstance(exc, InvalidEvent) else f"{type(exc).__name__}: {exc}"
        msg, codec = event.message, self.p.codecs.processor_dlq
        _, key, value = dead_letter(
            codec, "inbound message", stage, msg.topic, msg.partition, msg.offset, umid, event.value,
            reason, datetime.now(UTC),
        )  # fmt: skip
        if self._producer is None:
            config = kafka.producer(self.p.settings, **{"client.id": "chatpipe-inbound-dlq"})
            self._producer = Producer(config)
        producer = self._producer
        producer.produce(codec.spec.name, value, key, on_delivery=self._on_delivery)
        left = await asyncio.get_running_loop().run_in_executor(None, producer.flush, FLUSH_TIMEOUT)
        if left or self._errors:
            errors, self._errors = self._errors, []
            raise TransientError(f"dead letter not acknowledged ({left} left): {'; '.join(errors[:5])}")
        self.p.metrics.dead_letters.labels(stage).inc()
        self.limit.record(0, 1)
        if self.limit.exceeded:  # the parked record is safe in the DLQ; the ones behind it stay unread
            await halt(self.p, DlqLimitExceeded(f"{msg.topic}: {self.limit.describe()}; last: {reason}"))

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err))


def _key_text(key: Any) -> str:
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else "-"


def install_conversation_agents(p: Processor) -> None:
    """Inbound messages -> conversations. Two plain Faust agents (inbound volume is far below receipts):
    re-key each message by its conversation, then fold it into the conversation table and emit changes.
    Replays after a crash are harmless: a umid already folded is a duplicate (`recent_umids`). A message
    either agent cannot decode or fold is parked (`InboundPoison`) and the agent goes on."""
    codecs, metrics = p.codecs, p.metrics
    table = p.conversation_table
    rekey_poison, fold_poison = InboundPoison(p), InboundPoison(p)

    @p.app.agent(p.inbound, name="conversation-rekey")
    async def rekey(stream: Any) -> None:
        async for event in stream.events():
            try:
                msg = codecs.inbound.decode(event.value)
                key = conversation_key(msg).encode()
            except Exception as exc:
                metrics.events.labels("invalid").inc()
                await rekey_poison.park(event, "inbound_decode", _key_text(event.message.key), exc)
                continue
            await p.by_conversation.send(key=key, value=event.value)
            rekey_poison.passed()

    @p.app.agent(p.by_conversation, name="conversations")
    async def fold_conversations(stream: Any) -> None:
        async for event in stream.events():
            umid = "-"
            try:
                msg = codecs.inbound_by_conversation.decode(event.value)
                umid = msg.umid
                previous = table.get(event.key)
                prev = codecs.conversations.decode(previous) if previous is not None else None
                conv, changed = apply_inbound(prev, msg, now=datetime.now(UTC))
                value = codecs.conversations.encode(conv)
            except Exception as exc:
                stage = "inbound_fold" if umid != "-" else "inbound_decode"
                await fold_poison.park(event, stage, umid, exc)
                continue
            table[event.key] = value
            if changed:
                await p.conversations.send(key=event.key, value=value)
                metrics.events.labels("inbound").inc()
            else:
                metrics.events.labels("inbound_duplicate").inc()
            fold_poison.passed()
