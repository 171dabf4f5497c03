"""Sink write paths side by side, same run, same database server.

    python bench/sinks.py [--rows 500000] [--updates 0.2] [--batch 5000] [--naive-rows 20000]

Units. A "record" is one MessageState version as it arrives on `chatpipe.messages.state`: what the issue
calls a "state row" ("500k state rows, 20% updates"), and the unit of the goals (rows/s, ratios). Each
record becomes several "table rows": its `messages` row, one `message_steps` row per step (all of them
rewritten when the message advances) and its `status_events` (the record carries the whole history; only
events not stored yet are table rows written). Both rates are printed.

One stream of records (`--rows`, of which `--updates` are newer versions of umids written in an earlier
batch; a newer version keeps the message's subaccount, number and ids) is written to a throw-away
PostgreSQL 15 (tests/support/postgres.py, fsync=off) three ways:

- chatpipe: `PostgresStore.write_states` per batch (read stored versions, delete the rows of advancing
  umids, binary COPY of messages/steps/new events straight into the tables; one transaction per batch),
  and its conflict fallback, the merge path (COPY into TEMP staging + INSERT ... ON CONFLICT ... WHERE
  excluded.version > version), forced, for reference;
- row-at-a-time: the same logical writes with one statement per table row (INSERT ... ON CONFLICT for
  the message, DELETE + INSERT per step, INSERT ... ON CONFLICT DO NOTHING per event), measured twice:
  committing after every message ("commit/row") and one transaction per batch ("txn/batch"); run on the
  first `--naive-rows` records of the stream (it is slow);
- raw COPY, two baselines, both of pre-converted tuples in binary format, in one transaction each, and
  both excluding the row building (masking, hashing, tuples) chatpipe's path pays:
  - keyless: every record's messages/steps/events rows (whole histories, so more rows than the store
    keeps) into empty tables of the same columns without keys or indexes: the floor of getting those
    bytes in;
  - real schema: the rows the store ends up holding (the highest version per umid with its steps, each
    distinct status event once; the keys forbid the duplicates) into the empty tables the migrations
    create, with every key and index: the floor of loading the same content into the same schema.
  The ratio against each is printed; the goal (<= 3x) is judged on both.

Then `synchronous_commit`, on a second, durable server (fsync=on, synchronous_commit=on): chatpipe's path
with the default (on) and with the opt-in `PostgresStore(..., synchronous_commit=False)`, on the first
`--durable-rows` records (skip with `--durable-rows 0`).

Then SQLite (a temp file, WAL, synchronous=NORMAL): chatpipe's executemany path, row-at-a-time with a
commit per message, and a raw executemany INSERT into keyless empty tables. SQLite is report-only.
The workload objects are frozen out of the garbage collector (`gc.freeze`) before any timing.

Analytics (`--aggregates`, or `--only-aggregates` for this comparison alone): chatpipe's sink with the
analytics aggregates maintained (the default) and without (`aggregates=False`), each round on two fresh
databases given the stream batch by batch in turn (`_interleaved`: both share the machine's load), for
`--aggregate-rounds` rounds, PostgreSQL and SQLite, in batches of `--aggregate-batch` records (default:
`chatpipe sink`'s batch, `SinkWorker`'s `batch_size`). Each batch is what the sink does with the records
one `consume()` returns: their Avro (the state topic's schema) decoded by the sink's codec, then
`write_states`; the Kafka client's fetch and commit are not measured. The cost is the drop in records/s
(goal: at most 15% of the sink's throughput), for the sink (decode + write) and, stricter, for the store's
write path alone; per wall-clock second and per CPU second of the sink and its PostgreSQL backend; judged
on the median of the rounds' costs, printed with their range; PostgreSQL's added CPU is split between the
sink's process and the server.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psycopg

from bench.codec import InMemoryClient
from chatpipe.runtime.tuning import tune_gc
from schemas.codec import Codecs, Registry
from schemas.models import MessageState, StatusEvent, Step, User
from sinks import rows as R
from sinks import sqlite as sqlite_sink
from sinks.postgres import PostgresStore
from sinks.rows import PiiPolicy
from sinks.sqlite import SqliteStore
from sinks.worker import SinkWorker
from tests.support.postgres import PostgresServer, fresh_database

#: `chatpipe sink`'s batch: the records one consume() returns at most (SinkWorker's default)
SINK_BATCH: int = inspect.signature(SinkWorker).parameters["batch_size"].default

T0 = datetime(2024, 1, 1, tzinfo=UTC)
PII = PiiPolicy(hash_key=b"bench-key")
CHANNELS = ("whatsapp", "sms", "viber", "rcs")


# --- workload ----------------------------------------------------------------------------------


def _step(n: int, channel: str, states: Sequence[str], at: datetime) -> Step:
    history = tuple(StatusEvent(s, at + timedelta(seconds=i)) for i, s in enumerate(states))
    last = history[-1]
    return Step(
        step=n,
        channel=channel,
        state=last.state,
        status_timestamp=last.timestamp,
        first_event_at=at,
        detail="delivered_to_recipient" if last.state == "delivered" else None,
        sent_at=at,
        delivered_at=last.timestamp if last.state in ("delivered", "read") else None,
        history=history,
    )


def _state(
    umid: str, version: int, steps: tuple[Step, ...], rnd: random.Random, old: MessageState | None = None
) -> MessageState:
    """A record; a newer version (`old` given) keeps the message's subaccount, number and batch."""
    last = steps[-1]
    return MessageState(
        umid=umid,
        sub_account_id=old.sub_account_id if old else f"sub_{rnd.randrange(20):02d}",
        version=version,
        state=last.state,
        detail=last.detail,
        status_timestamp=last.status_timestamp,
        steps=steps,
        updated_at=last.status_timestamp + timedelta(milliseconds=5),
        user=old.user if old else User(msisdn=f"+659{rnd.randrange(10**7):07d}"),
        batch_id=old.batch_id if old else f"batch-{rnd.randrange(1000)}",
        client_message_id=f"cm-{umid}",
        first_sent_at=steps[0].sent_at,
        delivered_at=last.delivered_at,
    )


def workload(n: int, update_ratio: float, batch: int, seed: int = 7) -> list[list[MessageState]]:
    """Batches of states: each batch holds new umids (v1: one step, sent -> delivered) and newer
    versions (v2: a fallback step added, or read) of umids written in the previous batch."""
    rnd = random.Random(seed)
    n_updates = int(n * update_ratio)
    n_new = n - n_updates
    per_batch_updates = max(1, round(batch * update_ratio))
    batches: list[list[MessageState]] = []
    previous: list[MessageState] = []
    made_new = made_updates = 0
    while made_new < n_new or made_updates < n_updates:
        out: list[MessageState] = []
        for old in rnd.sample(previous, min(len(previous), per_batch_updates, n_updates - made_updates)):
            at = old.status_timestamp + timedelta(seconds=30)
            if rnd.random() < 0.5:
                failed = _step(
                    1,
                    old.steps[0].channel,
                    [*(e.state for e in old.steps[0].history), "undelivered"],
                    old.steps[0].first_event_at,
                )
                steps = (failed, _step(2, "sms", ["sent", "delivered"], at))
            else:
                steps = (
                    _step(
                        1, old.steps[0].channel, ["sent", "delivered", "read"], old.steps[0].first_event_at
                    ),
                )
            out.append(_state(old.umid, old.version + 1, steps, rnd, old))
            made_updates += 1
        fresh = []
        while len(out) + len(fresh) < batch and made_new < n_new:
            at = T0 + timedelta(milliseconds=made_new)
            fresh.append(
                _state(
                    f"{made_new:08x}-bench",
                    1,
                    (_step(1, rnd.choice(CHANNELS), ["sent", "delivered"], at),),
                    rnd,
                )
            )
            made_new += 1
        out.extend(fresh)
        rnd.shuffle(out)
        batches.append(out)
        previous = fresh or previous
    return batches


def physical_rows(
    states: Sequence[MessageState],
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    messages, steps, events = [], [], []
    for s in states:
        messages.append(R.message_values(s, PII))
        steps.extend(R.step_values(s))
        events.extend(R.event_values(s))
    return messages, steps, events


def final_rows(
    states: Sequence[MessageState],
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """What an exact store holds after `states`: the highest version per umid (its message and step
    rows) and each distinct status event once (first seen)."""
    messages, steps = [], []
    events: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for s in states:
        for e in R.event_values(s):
            events.setdefault(R.event_key(e), e)
    for s in R.latest_states(states):
        messages.append(R.message_values(s, PII))
        steps.extend(R.step_values(s))
    return messages, steps, list(events.values())


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def report(label: str, records: int, seconds: float, table_rows: int | None = None, extra: str = "") -> float:
    rate = records / seconds
    rows = f" | {table_rows:>9,} table rows = {table_rows / seconds:>9,.0f} rows/s" if table_rows else ""
    print(f"  {label:<36} {records:>9,} records in {seconds:6.2f}s = {rate:>8,.0f} records/s{rows} {extra}")
    return rate


# --- PostgreSQL --------------------------------------------------------------------------------


def _insert(table: str, columns: Sequence[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('%s' for _ in columns)})"


_PG_UPSERT = (
    _insert("messages AS t", R.MESSAGE_COLUMNS)
    + " ON CONFLICT (umid) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in R.MESSAGE_COLUMNS if c != "umid")
    + " WHERE excluded.version > t.version RETURNING umid"
)
_PG_STEP = _insert("message_steps", R.STEP_COLUMNS)
_PG_EVENT = _insert("status_events", R.EVENT_COLUMNS) + " ON CONFLICT DO NOTHING"


def pg_row_at_a_time(url: str, batches: list[list[MessageState]], commit_per_row: bool) -> None:
    with psycopg.connect(url) as conn:
        for batch in batches:
            for s in batch:
                cur = conn.execute(_PG_UPSERT, R.message_values(s, PII))
                if cur.fetchone() is not None:
                    conn.execute("DELETE FROM message_steps WHERE umid = %s", (s.umid,))
                    for r in R.step_values(s):
                        conn.execute(_PG_STEP, r)
                    for e in R.event_values(s):
                        conn.execute(_PG_EVENT, e)
                if commit_per_row:
                    conn.commit()
            conn.commit()


_TABLES = (
    ("messages", R.MESSAGE_COLUMNS),
    ("message_steps", R.STEP_COLUMNS),
    ("status_events", R.EVENT_COLUMNS),
)


def pg_raw_copy(url: str, rows: tuple[list[tuple[Any, ...]], ...], *, keyless: bool) -> float:
    """Seconds to COPY `rows` (messages, steps, events tuples) in one transaction, either into keyless
    copies of the tables (`raw_<table>`, no key, no index) or into the migrated tables themselves."""
    with psycopg.connect(url) as conn:
        targets = []
        for table, cols in _TABLES:
            target = f"raw_{table}" if keyless else table
            if keyless:
                conn.execute(f"CREATE TABLE {target} (LIKE {table} INCLUDING DEFAULTS)")
            targets.append((target, cols))
        conn.commit()
        types = {
            (t, c): ty
            for t, c, ty in conn.execute(
                "SELECT attrelid::regclass::text, attname, format_type(atttypid, atttypmod) FROM pg_attribute"
                " WHERE attrelid = ANY(%s::regclass[]) AND attnum > 0",
                ([t for t, _ in targets],),
            ).fetchall()
        }
        start = time.perf_counter()
        with conn.cursor() as cur:
            for (target, cols), data in zip(targets, rows, strict=True):
                with cur.copy(f"COPY {target} ({', '.join(cols)}) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types([types[(target, c)] for c in cols])
                    for row in data:
                        copy.write_row(row)
        conn.commit()
        return time.perf_counter() - start


def table_rows_written(batches: list[list[MessageState]]) -> int:
    """Table rows an exact sink writes for this stream: a messages row and all step rows per advancing
    record, and each distinct status event once."""
    held: dict[str, int] = {}
    events: set[tuple[Any, ...]] = set()
    rows = 0
    for batch in batches:
        for s in R.latest_states(batch):
            if s.version > held.get(s.umid, -1):
                held[s.umid] = s.version
                rows += 1 + len(s.steps)
                events.update(R.event_key(e) for e in R.event_values(s))
    return rows + len(events)


def _write_all(store: PostgresStore, batches: list[list[MessageState]], merge: bool = False) -> None:
    for b in batches:
        if merge:
            latest = R.latest_states(b)
            store._run(lambda conn, latest=latest: store._merge_states(conn, latest))
        else:
            store.write_states(b)


def _counts(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [
            conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # type: ignore[index]
            for t in ("messages", "message_steps", "status_events")
        ]


def bench_postgres(
    batches: list[list[MessageState]], naive: list[list[MessageState]], n: int, table_rows: int
) -> None:
    with PostgresServer() as server:
        print(f"PostgreSQL ({server.bindir}, fsync=off, synchronous_commit=off), batch={len(batches[0]):,}")
        results: dict[str, list[int]] = {}
        rates: dict[str, float] = {}
        for label, merge in (("chatpipe batch path (COPY)", False), ("chatpipe merge path (forced)", True)):
            url = fresh_database(server, "bench")
            store = PostgresStore(url, PII)
            store.migrate()
            seconds = timed(lambda s=store, m=merge: _write_all(s, batches, m))
            fallbacks = store.merge_fallbacks
            store.close()
            results[label] = counts = _counts(url)
            extra = f"[tables: messages={counts[0]:,} steps={counts[1]:,} events={counts[2]:,}]"
            if not merge:
                extra += f" merge fallbacks={fallbacks}"
            rates[label] = report(label, n, seconds, table_rows, extra)
        if len(set(map(tuple, results.values()))) != 1:
            print(f"  !! the two chatpipe paths left different tables: {results}")
        fast = rates["chatpipe batch path (COPY)"]

        naive_n = sum(len(b) for b in naive)
        naive_rows = table_rows_written(naive)
        url1 = fresh_database(server, "same")
        store = PostgresStore(url1, PII)
        store.migrate()
        same = report(
            "chatpipe batch path, same records", naive_n, timed(lambda: _write_all(store, naive)), naive_rows
        )
        store.close()
        for label, per_row in (("row-at-a-time, commit/row", True), ("row-at-a-time, txn/batch", False)):
            url2 = fresh_database(server, "naive")
            PostgresStore(url2, PII).migrate()
            rates[label] = report(
                label, naive_n, timed(lambda u=url2, p=per_row: pg_row_at_a_time(u, naive, p)), naive_rows
            )

        everything = [s for b in batches for s in b]
        copy_rates: dict[str, float] = {}
        raw_copies: tuple[tuple[str, bool, Callable[[], tuple[list[tuple[Any, ...]], ...]], str], ...] = (
            ("raw COPY (keyless empty tables)", True, lambda: physical_rows(everything), "whole histories"),
            (
                "raw COPY (real schema, empty)",
                False,
                lambda: final_rows(everything),
                "the store's final rows",
            ),
        )
        for label, keyless, build, note in raw_copies:
            rows = build()
            url3 = fresh_database(server, "raw")
            PostgresStore(url3, PII).migrate()
            seconds = pg_raw_copy(url3, rows, keyless=keyless)
            copy_rates[label] = report(label, n, seconds, sum(len(r) for r in rows), f"({note})")
            del rows
        commit_row, txn_batch = rates["row-at-a-time, commit/row"], rates["row-at-a-time, txn/batch"]
        for name, naive_rate in (("commit/row", commit_row), ("txn/batch ", txn_batch)):
            print(
                f"  ratio chatpipe / row-at-a-time {name} : {fast / naive_rate:6.1f}x whole stream,"
                f" {same / naive_rate:6.1f}x same {naive_n:,} records (goal >= 20)"
            )
        for label, copy_rate in copy_rates.items():
            name = "(keyless) " if "keyless" in label else "(real schema)"
            print(f"  ratio raw COPY {name:<13} / chatpipe    : {copy_rate / fast:6.2f}x (goal <= 3)")
        print(
            f"  goal >= 50k state rows (records)/s        : {'met' if fast >= 50_000 else 'NOT met'}"
            f" ({fast:,.0f} records/s, {fast * table_rows / n:,.0f} table rows/s)"
        )


def bench_synchronous_commit(batches: list[list[MessageState]], limit: int) -> None:
    take, n = [], 0
    for b in batches:
        if n >= limit:
            break
        take.append(b)
        n += len(b)
    with PostgresServer(settings={"fsync": "on", "synchronous_commit": "on"}) as server:
        print(f"PostgreSQL, durable server (fsync=on, synchronous_commit=on), first {n:,} records")
        for label, sync in (
            ("chatpipe, synchronous_commit=on", True),
            ("chatpipe, synchronous_commit=off", False),
        ):
            url = fresh_database(server, "durable")
            store = PostgresStore(url, PII, synchronous_commit=sync)
            store.migrate()
            report(label, n, timed(lambda s=store: _write_all(s, take)))
            store.close()


# --- SQLite ------------------------------------------------------------------------------------


def sqlite_row_at_a_time(path: str, batches: list[list[MessageState]]) -> None:
    store = SqliteStore(path, PII)
    store.migrate()
    store.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    upsert = sqlite_sink._UPSERT_MESSAGE + " RETURNING umid"
    for batch in batches:
        for s in batch:
            m, steps = R.state_rows(s, PII)
            conn.execute("BEGIN IMMEDIATE")
            if conn.execute(upsert, sqlite_sink._adapt(m, R.MESSAGE_COLUMNS)).fetchall():
                conn.execute("DELETE FROM message_steps WHERE umid = ?", (s.umid,))
                for r in steps:
                    conn.execute(sqlite_sink._INSERT_STEP, sqlite_sink._adapt(r, R.STEP_COLUMNS))
                for e in R.status_event_rows(s):
                    conn.execute(sqlite_sink._INSERT_EVENT, sqlite_sink._adapt(e, R.EVENT_COLUMNS))
            conn.execute("COMMIT")
    conn.close()


def sqlite_raw(path: str, rows: tuple[list[tuple[Any, ...]], ...]) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    tables = (
        ("raw_messages", R.MESSAGE_COLUMNS),
        ("raw_steps", R.STEP_COLUMNS),
        ("raw_events", R.EVENT_COLUMNS),
    )
    for name, cols in tables:
        conn.execute(f"CREATE TABLE {name} ({', '.join(cols)})")
    adapted = [
        [sqlite_sink._adapt(dict(zip(cols, r, strict=True)), cols) for r in data]
        for (_, cols), data in zip(tables, rows, strict=True)
    ]
    start = time.perf_counter()
    conn.execute("BEGIN")
    for (name, cols), data in zip(tables, adapted, strict=True):
        conn.executemany(f"INSERT INTO {name} VALUES ({', '.join('?' for _ in cols)})", data)
    conn.execute("COMMIT")
    seconds = time.perf_counter() - start
    conn.close()
    return seconds


def bench_sqlite(batches: list[list[MessageState]], naive: list[list[MessageState]], n: int) -> None:
    print(f"SQLite {sqlite3.sqlite_version} (file, WAL, synchronous=NORMAL) - report only")
    with tempfile.TemporaryDirectory(prefix="chatpipe-bench-") as tmp:
        store = SqliteStore(os.path.join(tmp, "chatpipe.db"), PII)
        store.migrate()
        fast = report(
            "chatpipe executemany upsert", n, timed(lambda: [store.write_states(b) for b in batches])
        )
        store.close()
        naive_n = sum(len(b) for b in naive)
        slow = report(
            "row-at-a-time, commit/row",
            naive_n,
            timed(lambda: sqlite_row_at_a_time(os.path.join(tmp, "naive.db"), naive)),
        )
        rows = physical_rows([s for b in batches for s in b])
        raw = report("raw executemany (keyless tables)", n, sqlite_raw(os.path.join(tmp, "raw.db"), rows))
        print(f"  ratio chatpipe / row-at-a-time commit/row : {fast / slow:6.1f}x")
        print(f"  ratio raw insert / chatpipe               : {raw / fast:6.2f}x")


def _backend_cpu(pid: int) -> float:
    """CPU seconds (user + system) a local PostgreSQL backend has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


BOTH = (True, False)  # with the aggregates, without
#: what `_interleaved` sums per store: the store's write (wall, sink CPU, server CPU), the decoding (wall,
#: CPU)
Spent = tuple[float, float, float, float, float]


def _interleaved(
    stores: dict[bool, Any],
    records: list[list[bytes]],
    decode: Callable[[bytes], MessageState],
    backends: dict[bool, int],
) -> dict[bool, Spent]:
    """Give every batch to both stores (with aggregates: True; without: False) as `chatpipe sink` does,
    one store after the other, the order alternating from batch to batch: its Avro records decoded
    (`decode`: the sink's codec), then written (`write_states`). Per store the summed seconds of its
    batches (`Spent`); the server's are the CPU its backend used (a PostgreSQL backend works only for its
    own store)."""
    spent = {k: [0.0] * 5 for k in stores}
    server0 = {k: _backend_cpu(pid) for k, pid in backends.items()}
    for i, batch in enumerate(records):
        for k in (True, False) if i % 2 == 0 else (False, True):
            w0, c0 = time.perf_counter(), time.process_time()
            states = [decode(r) for r in batch]
            w1, c1 = time.perf_counter(), time.process_time()
            stores[k].write_states(states)
            w2, c2 = time.perf_counter(), time.process_time()
            got = spent[k]
            got[0] += w2 - w1
            got[1] += c2 - c1
            got[3] += w1 - w0
            got[4] += c1 - c0
    for k, pid in backends.items():
        spent[k][2] = _backend_cpu(pid) - server0[k]
    return {k: (v[0], v[1], v[2], v[3], v[4]) for k, v in spent.items()}


def bench_aggregates(batches: list[list[MessageState]], n: int, rounds: int, skip_sqlite: bool) -> None:
    """chatpipe's sink with and without analytics maintenance, side by side (module docstring).

    Each round gives the stream to two fresh databases at once, one with the aggregates and one without,
    batch by batch, alternating which goes first (`_interleaved`): the two runs share the machine's load
    from one second to the next, which whole runs one after the other did not (on this shared machine a
    run's speed drifts by 20% within a minute). Each batch is what `chatpipe sink` does with the records
    one `consume()` returns: their Avro decoded by the sink's codec, then `write_states` (not measured:
    the Kafka client's fetch and commit, in librdkafka's threads and C). A round's cost is the drop of its
    with-store's records/s against its without-store's, for the sink (decode + write: the goal's
    "throughput of the sink") and for the store's write path alone (stricter: the same added seconds over
    a smaller whole). Two measures each: per wall-clock second, and per CPU second (the sink process plus,
    for PostgreSQL, its server backend: what a saturated machine pays). Printed per round, then the median
    of the rounds' costs with their range; for PostgreSQL also where the added CPU goes (the sink's
    Python vs the server). The collector is tuned as `chatpipe sink` tunes it once started (`tune_gc`),
    for both stores."""
    tune_gc()
    codecs = Codecs(Registry("memory://", client=InMemoryClient()))  # type: ignore[arg-type]
    records = [[codecs.state.encode(s) for s in b] for b in batches]
    decode = codecs.state.decode

    def compare(name: str, run: Callable[[], dict[bool, Spent]]) -> None:
        runs: dict[bool, list[Spent]] = {True: [], False: []}
        for r in range(rounds):
            got = run()
            for k in BOTH:
                runs[k].append(got[k])
            a, b = got[False], got[True]
            split = (
                f" [sink {a[1]:.2f} -> {b[1]:.2f}s, server {a[2]:.2f} -> {b[2]:.2f}s]" if a[2] or b[2] else ""
            )
            print(
                f"  {name} round {r + 1}: decoding {a[3]:.2f} / {b[3]:.2f}s; writing: wall {a[0]:.2f} ->"
                f" {b[0]:.2f}s ({b[0] / a[0] - 1:+.1%}), CPU {_cpu(a):.2f} -> {_cpu(b):.2f}s"
                f" ({_cpu(b) / _cpu(a) - 1:+.1%}){split}"
            )
        for scope, measures in (
            ("sink (decode + write)", (("wall", _sink_wall), ("CPU", _sink_cpu))),
            ("write path alone", (("wall", _wall), ("CPU", _cpu))),
        ):
            for label, seconds in measures:
                costs = [1 - seconds(b) / seconds(a) for a, b in zip(runs[True], runs[False], strict=True)]
                cost = statistics.median(costs)
                without, with_ = (n / statistics.median(seconds(x) for x in runs[k]) for k in (False, True))
                verdict = "met" if cost <= 0.15 else "NOT met"
                print(
                    f"  {name} {scope}, {label:<4}: without aggregates {without:>8,.0f} records/s, with"
                    f" {with_:>8,.0f} records/s (medians of {rounds}); cost per round: median {cost:.1%}"
                    f" ({min(costs):.1%}..{max(costs):.1%}) (goal <= 15%): {verdict}"
                )
        if any(x[2] for x in runs[True]):
            sink = statistics.median(a[1] - b[1] for a, b in zip(runs[True], runs[False], strict=True))
            server = statistics.median(a[2] - b[2] for a, b in zip(runs[True], runs[False], strict=True))
            base = statistics.median(_sink_cpu(b) for b in runs[False])
            print(
                f"  {name} CPU added by the aggregates (median of the rounds): the sink's process"
                f" {sink:+.2f}s ({sink / n * 1e6:+.1f} us/record), the server {server:+.2f}s"
                f" ({server / n * 1e6:+.1f} us/record), of {base:.2f}s without (decoding included)"
            )

    with PostgresServer() as server:
        print(f"Analytics maintenance, PostgreSQL (fsync=off), {n:,} records, batch={len(batches[0]):,}")

        def pg() -> dict[bool, Spent]:
            stores = {k: PostgresStore(fresh_database(server, "agg"), PII, aggregates=k) for k in BOTH}
            for store in stores.values():
                store.migrate()
            backends = {k: store._connection().info.backend_pid for k, store in stores.items()}
            got = _interleaved(stores, records, decode, backends)
            for store in stores.values():
                store.close()
            return got

        compare("PostgreSQL", pg)
    if skip_sqlite:
        return
    print(f"Analytics maintenance, SQLite {sqlite3.sqlite_version} (file, WAL, synchronous=NORMAL)")
    with tempfile.TemporaryDirectory(prefix="chatpipe-bench-") as tmp:
        runs = iter(range(1_000))

        def lite() -> dict[bool, Spent]:
            stores = {
                k: SqliteStore(os.path.join(tmp, f"agg{next(runs)}.db"), PII, aggregates=k) for k in BOTH
            }
            for store in stores.values():
                store.migrate()
            got = _interleaved(stores, records, decode, {})
            for store in stores.values():
                store.close()
            return got

        compare("SQLite", lite)


def _wall(x: Spent) -> float:
    """The store's write, wall-clock seconds."""
    return x[0]


def _cpu(x: Spent) -> float:
    """The store's write: the sink's CPU seconds plus its server's."""
    return x[1] + x[2]


def _sink_wall(x: Spent) -> float:
    """Decoding and writing, wall-clock seconds."""
    return x[0] + x[3]


def _sink_cpu(x: Spent) -> float:
    """Decoding and writing: the sink's CPU seconds plus its server's."""
    return x[1] + x[2] + x[4]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=500_000, help="MessageState records in the stream")
    p.add_argument("--updates", type=float, default=0.2, help="share of records updating an earlier umid")
    p.add_argument("--batch", type=int, default=5_000, help="records per write_states batch")
    p.add_argument("--naive-rows", type=int, default=20_000, help="records for the row-at-a-time runs")
    p.add_argument("--durable-rows", type=int, default=100_000, help="records for synchronous_commit")
    p.add_argument("--skip-sqlite", action="store_true")
    p.add_argument("--aggregates", action="store_true", help="also compare with/without analytics")
    p.add_argument("--only-aggregates", action="store_true", help="only the with/without analytics runs")
    p.add_argument("--aggregate-rounds", type=int, default=2)
    p.add_argument(
        "--aggregate-batch",
        type=int,
        default=SINK_BATCH,
        help=f"records a batch in the with/without analytics runs (default: chatpipe sink's, {SINK_BATCH:,})",
    )
    args = p.parse_args(argv)

    t = time.perf_counter()
    batches = workload(args.rows, args.updates, args.aggregate_batch if args.only_aggregates else args.batch)
    n = sum(len(b) for b in batches)
    naive, taken = [], 0
    for b in batches:
        if taken >= args.naive_rows:
            break
        naive.append(b[: args.naive_rows - taken])
        taken += len(naive[-1])
    print(
        f"workload: {n:,} records ({args.updates:.0%} updates) in {len(batches)} batches,"
        f" built in {time.perf_counter() - t:.1f}s; row-at-a-time on the first {taken:,}"
    )
    gc.collect()
    gc.freeze()
    if args.only_aggregates:
        bench_aggregates(batches, n, args.aggregate_rounds, args.skip_sqlite)
        return
    table_rows = table_rows_written(batches)
    print(f"an exact sink writes {table_rows:,} table rows for them ({table_rows / n:.2f} per record)")
    bench_postgres(batches, naive, n, table_rows)
    if args.durable_rows:
        bench_synchronous_commit(batches, args.durable_rows)
    if not args.skip_sqlite:
        bench_sqlite(batches, naive, n)
    if args.aggregates:
        agg = (
            batches if args.aggregate_batch == args.batch else workload(n, args.updates, args.aggregate_batch)
        )
        gc.freeze()
        bench_aggregates(agg, n, args.aggregate_rounds, args.skip_sqlite)


if __name__ == "__main__":
    main()
