"""Sink write paths side by side, same run, same database server.

    python bench/sinks.py [--rows 200000] [--updates 0.2] [--batch 5000] [--naive-rows 20000]

One stream of MessageState records (`--rows`, of which `--updates` are newer versions of umids written in an
earlier batch) is written to a throw-away PostgreSQL 15 (tests/support/postgres.py) three ways:

- chatpipe: `PostgresStore.write_states` per batch (rows.py conversion, COPY into TEMP staging tables,
  INSERT ... SELECT ... ON CONFLICT (umid) DO UPDATE ... WHERE excluded.version > version, steps replaced
  and events appended for the advanced umids; one transaction per batch);
- row-at-a-time: the same logical writes with one statement per table row (INSERT ... ON CONFLICT for
  the message, DELETE + INSERT per step, INSERT ... ON CONFLICT DO NOTHING per event), measured twice:
  committing after every message ("commit/row") and one transaction per batch ("txn/batch"); run on the
  first `--naive-rows` records of the stream (it is slow) and reported in records/s;
- raw COPY: the same messages/steps/events rows (pre-converted tuples, every record of the stream) COPYed
  in binary format into empty tables of the same columns without keys or indexes, in one transaction:
  the floor of getting those bytes in (excludes the rows.py conversion chatpipe's path pays).

Then the same for SQLite (a temp file, WAL, synchronous=NORMAL): chatpipe's executemany path, row-at-a-time
with a commit per message, and a raw executemany INSERT into keyless empty tables. SQLite is report-only.
"rows/s" counts MessageState records (one per umid version), not physical rows; the physical row
counts are printed alongside. The test server runs with fsync=off, which flatters commit-per-row.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psycopg

from schemas.models import MessageState, StatusEvent, Step, User
from sinks import rows as R
from sinks import sqlite as sqlite_sink
from sinks.postgres import PostgresStore
from sinks.rows import PiiPolicy
from sinks.sqlite import SqliteStore
from tests.support.postgres import PostgresServer, fresh_database

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


def _state(umid: str, version: int, steps: tuple[Step, ...], rnd: random.Random) -> MessageState:
    last = steps[-1]
    return MessageState(
        umid=umid,
        sub_account_id=f"sub_{rnd.randrange(20):02d}",
        version=version,
        state=last.state,
        detail=last.detail,
        status_timestamp=last.status_timestamp,
        steps=steps,
        updated_at=last.status_timestamp + timedelta(milliseconds=5),
        user=User(msisdn=f"+659{rnd.randrange(10**7):07d}"),
        batch_id=f"batch-{rnd.randrange(1000)}",
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
            out.append(_state(old.umid, old.version + 1, steps, rnd))
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
        m, st = R.state_rows(s, PII)
        messages.append(R.as_tuple(m, R.MESSAGE_COLUMNS))
        steps.extend(R.as_tuple(r, R.STEP_COLUMNS) for r in st)
        events.extend(R.as_tuple(r, R.EVENT_COLUMNS) for r in R.status_event_rows(s))
    return messages, steps, events


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def report(label: str, records: int, seconds: float, extra: str = "") -> float:
    rate = records / seconds
    print(f"  {label:<34} {records:>9,} records in {seconds:7.2f}s = {rate:>10,.0f} records/s {extra}")
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
                m, steps = R.state_rows(s, PII)
                cur = conn.execute(_PG_UPSERT, R.as_tuple(m, R.MESSAGE_COLUMNS))
                if cur.fetchone() is not None:
                    conn.execute("DELETE FROM message_steps WHERE umid = %s", (s.umid,))
                    for r in steps:
                        conn.execute(_PG_STEP, R.as_tuple(r, R.STEP_COLUMNS))
                    for e in R.status_event_rows(s):
                        conn.execute(_PG_EVENT, R.as_tuple(e, R.EVENT_COLUMNS))
                if commit_per_row:
                    conn.commit()
            conn.commit()


def pg_raw_copy(url: str, rows: tuple[list[tuple[Any, ...]], ...]) -> None:
    tables = (
        ("raw_messages", "messages", R.MESSAGE_COLUMNS),
        ("raw_steps", "message_steps", R.STEP_COLUMNS),
        ("raw_events", "status_events", R.EVENT_COLUMNS),
    )
    with psycopg.connect(url) as conn:
        for raw, like, _ in tables:
            conn.execute(f"CREATE TABLE {raw} (LIKE {like} INCLUDING DEFAULTS)")
        conn.commit()
        start = time.perf_counter()
        with conn.cursor() as cur:
            for (raw, _, cols), data in zip(tables, rows, strict=True):
                types = dict(
                    conn.execute(
                        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
                        " WHERE attrelid = %s::regclass AND attnum > 0",
                        (raw,),
                    ).fetchall()
                )
                with cur.copy(f"COPY {raw} ({', '.join(cols)}) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types([types[c] for c in cols])
                    for row in data:
                        copy.write_row(row)
        conn.commit()
        pg_raw_copy.seconds = time.perf_counter() - start  # type: ignore[attr-defined]


def bench_postgres(batches: list[list[MessageState]], naive: list[list[MessageState]], n: int) -> None:
    with PostgresServer() as server:
        print(f"PostgreSQL ({server.bindir}, fsync=off), batch={len(batches[0]):,}")
        url = fresh_database(server, "bench")
        store = PostgresStore(url, PII)
        store.migrate()
        seconds = timed(lambda: [store.write_states(b) for b in batches])
        store.close()
        with psycopg.connect(url) as conn:
            counts = [
                conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # type: ignore[index]
                for t in ("messages", "message_steps", "status_events")
            ]
        fast = report(
            "chatpipe batch upsert (COPY+merge)",
            n,
            seconds,
            f"[messages={counts[0]:,} steps={counts[1]:,} events={counts[2]:,}]",
        )

        naive_n = sum(len(b) for b in naive)
        rates = {}
        for label, per_row in (("row-at-a-time, commit/row", True), ("row-at-a-time, txn/batch", False)):
            url2 = fresh_database(server, "naive")
            PostgresStore(url2, PII).migrate()
            rates[label] = report(
                label, naive_n, timed(lambda u=url2, p=per_row: pg_row_at_a_time(u, naive, p))
            )

        rows = physical_rows([s for b in batches for s in b])
        url3 = fresh_database(server, "raw")
        PostgresStore(url3, PII).migrate()
        pg_raw_copy(url3, rows)
        total = sum(len(r) for r in rows)
        copy_rate = report(
            "raw COPY (keyless empty tables)",
            n,
            pg_raw_copy.seconds,  # type: ignore[attr-defined]
            f"[{total:,} physical rows]",
        )
        print(
            f"  ratio chatpipe / row-at-a-time commit/row : {fast / rates['row-at-a-time, commit/row']:6.1f}x"
        )
        print(
            f"  ratio chatpipe / row-at-a-time txn/batch  : {fast / rates['row-at-a-time, txn/batch']:6.1f}x"
        )
        print(f"  ratio raw COPY / chatpipe                 : {copy_rate / fast:6.2f}x (goal <= 3)")
        print(f"  goal >= 50k records/s                     : {'met' if fast >= 50_000 else 'NOT met'}")


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


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000, help="MessageState records in the stream")
    p.add_argument("--updates", type=float, default=0.2, help="share of records updating an earlier umid")
    p.add_argument("--batch", type=int, default=5_000, help="records per write_states batch")
    p.add_argument("--naive-rows", type=int, default=20_000, help="records for the row-at-a-time runs")
    p.add_argument("--skip-sqlite", action="store_true")
    args = p.parse_args(argv)

    t = time.perf_counter()
    batches = workload(args.rows, args.updates, args.batch)
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
    bench_postgres(batches, naive, n)
    if not args.skip_sqlite:
        bench_sqlite(batches, naive, n)


if __name__ == "__main__":
    main()
