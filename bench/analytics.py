"""Analytics queries over 1M messages, PostgreSQL and SQLite, same run.

    python bench/analytics.py [--messages 1000000] [--days 30] [--repeat 5] [--skip-sqlite] [--skip-postgres]

Loading: through the REAL write path, `Store.write_states` in batches of 5,000 (so the aggregate tables
are maintained incrementally, exactly as the sink does) and `Store.write_inbound` for 10% inbound
messages; the load rate is printed. One subaccount holds every message (a query is always scoped to one
subaccount, so this is the largest query one can ask), spread over `--days` days: 7 paths
(`whatsapp`, `whatsapp>sms`, `whatsapp>viber>sms`, `viber>sms`, `sms`, `rcs>sms`, `linenotification>sms`),
10 countries, realistic outcomes, error codes and log-normal delivery/read times.

Then every view of the read API (`Store.analytics` + the JSON shaping of `sinks.api_analytics`, the API's
work without HTTP) over the whole range (`last_day`: over its last 24 hours), `--repeat` times each:
median and worst in ms (goal: < 200 ms). Messages arrive in time order (as a sink sees them), so a batch
touches a few hours' aggregate rows.
PostgreSQL runs on a throw-away server (tests/support/postgres.py, fsync=off); before querying it the
tables are `VACUUM ANALYZE`d (what autovacuum does after such a load). SQLite: a temp file, WAL.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psycopg

from schemas.models import InboundContent, InboundMessage, Interactive, MessageState, StatusEvent, Step, User
from sinks.analytics_sql import Query
from sinks.api_analytics import shape
from sinks.postgres import PostgresStore
from sinks.rows import PiiPolicy
from sinks.sqlite import SqliteStore
from sinks.store import Store
from tests.support.postgres import PostgresServer, fresh_database

PII = PiiPolicy(hash_key=b"bench-key")
SUB = "bench_big"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
PATHS = (
    (("whatsapp",), 30), (("whatsapp", "sms"), 20), (("whatsapp", "viber", "sms"), 10),
    (("viber", "sms"), 10), (("sms",), 15), (("rcs", "sms"), 10), (("linenotification", "sms"), 5),
)  # fmt: skip
COUNTRIES = ("+65", "+60", "+63", "+62", "+66", "+81", "+84", "+91", "+44", "+55")
STEP_ERRORS = {
    "whatsapp": (1018, 1022, 1051, 1024),
    "viber": (2008, 2007, 2009),
    "rcs": (15, 1),
    "sms": (41, 46, 36),
    "linenotification": (1, 57),
}
NO_READ = {"sms", "linenotification"}


def _ev(state: str, at: datetime, code: int | None = None) -> StatusEvent:
    return StatusEvent(state, at, error_code=code)


def _step(n: int, channel: str, events: list[StatusEvent]) -> Step:
    last = max(events, key=lambda e: (e.state != "sent", e.timestamp))
    sent = [e.timestamp for e in events if e.state in ("sent", "delivered", "read")]
    delivered = [e.timestamp for e in events if e.state in ("delivered", "read")]
    read = [e.timestamp for e in events if e.state == "read"]
    failed = last.state == "undelivered"
    return Step(
        step=n, channel=channel, state=last.state, status_timestamp=last.timestamp,
        first_event_at=events[0].timestamp, error_code=last.error_code, history=tuple(events),
        sent_at=min(sent, default=None), delivered_at=min(delivered, default=None),
        read_at=min(read, default=None), failed_at=last.timestamp if failed else None,
    )  # fmt: skip


def message(i: int, n: int, rnd: random.Random, days: int) -> MessageState:
    path = rnd.choices([p for p, _ in PATHS], [w for _, w in PATHS])[0]
    at = T0 + timedelta(seconds=(i + rnd.random()) * days * 86400 / n)  # in time order, as a sink sees them
    steps: list[Step] = []
    for n, channel in enumerate(path, 1):
        events = [_ev("queued", at), _ev("sent", at + timedelta(seconds=0.2))]
        delay = timedelta(seconds=rnd.lognormvariate(math.log(3), 1.2))
        if n < len(path):  # an earlier step failed: fall back
            events.append(_ev("undelivered", at + delay, rnd.choice(STEP_ERRORS[channel])))
            at += delay + timedelta(seconds=rnd.choice((60, 120, 300)))
        else:
            r = rnd.random()
            if r < 0.03:
                events = events[:1]
            elif r < 0.10:
                pass  # still sent
            elif r < 0.20:
                events.append(_ev("undelivered", at + delay, rnd.choice(STEP_ERRORS[channel])))
            else:
                events.append(_ev("delivered", at + delay))
                if channel not in NO_READ and rnd.random() < 0.45:
                    read_delay = timedelta(seconds=rnd.lognormvariate(math.log(300), 1.5))
                    events.append(_ev("read", at + delay + read_delay))
        steps.append(_step(n, channel, events))
    last = steps[-1]
    sent = [s.sent_at for s in steps if s.sent_at]
    delivered = [s.delivered_at for s in steps if s.delivered_at]
    read = [s.read_at for s in steps if s.read_at]
    return MessageState(
        umid=f"{i:012d}-bench", sub_account_id=SUB, version=1, state=last.state,
        status_timestamp=last.status_timestamp, steps=tuple(steps), updated_at=last.status_timestamp,
        error_code=last.error_code, user=User(msisdn=f"{rnd.choice(COUNTRIES)}9{rnd.randrange(10**8):08d}"),
        first_sent_at=min(sent, default=None), delivered_at=min(delivered, default=None),
        read_at=min(read, default=None), final=bool(read) or last.state in ("delivered", "undelivered"),
    )  # fmt: skip


def inbound(i: int, n: int, rnd: random.Random, days: int) -> InboundMessage:
    at = T0 + timedelta(seconds=(i + rnd.random() * 10) * days * 86400 / n)
    kind = rnd.choices(("Text", "Image", "button_reply", "list_reply"), (70, 10, 15, 5))[0]
    interactive = Interactive(kind) if kind.endswith("_reply") else None
    return InboundMessage(
        umid=f"{i:012d}-inbound", sub_account_id=SUB, timestamp=at, channel=rnd.choice(("whatsapp", "viber")),
        type="Interactive" if interactive else kind, received_at=at, raw_json="{}",
        user=User(msisdn=f"{rnd.choice(COUNTRIES)}9{rnd.randrange(10**8):08d}"),
        content=InboundContent(text="hi", interactive=interactive),
    )  # fmt: skip


def batches(n: int, days: int, size: int = 5000) -> Iterator[tuple[list[MessageState], list[InboundMessage]]]:
    rnd = random.Random(17)
    for start in range(0, n, size):
        stop = min(n, start + size)
        yield (
            [message(i, n, rnd, days) for i in range(start, stop)],
            [inbound(i, n, rnd, days) for i in range(start, stop) if i % 10 == 0],
        )


QUERIES: tuple[tuple[str, dict[str, object]], ...] = (
    ("funnel", {"granularity": "total", "group_by": ("channel",)}),
    ("funnel", {"granularity": "day"}),
    ("funnel", {"granularity": "hour", "group_by": ("channel", "country"), "last_day": True}),
    ("fallback", {"granularity": "total"}),
    ("latency", {"granularity": "total", "metric": "deliver"}),
    ("latency", {"granularity": "day", "metric": "read", "group_by": ("channel",)}),
    ("errors", {"granularity": "total"}),
    ("inbound", {"granularity": "day"}),
    ("window", {"granularity": "total"}),
)


def load(store: Store, n: int, days: int) -> None:
    seconds = 0.0
    for states, msgs in batches(n, days):  # generated outside the timing
        start = time.perf_counter()
        store.write_states(states)
        store.write_inbound(msgs)
        seconds += time.perf_counter() - start
    print(f"  loaded {n:,} messages (+{n // 10:,} inbound) by the real write path in {seconds:.1f}s"
          f" = {n / seconds:,.0f} messages/s, aggregates maintained on the way")  # fmt: skip


def query_all(store: Store, days: int, repeat: int) -> list[float]:
    worst_all = []
    until = T0 + timedelta(days=days, hours=1)
    for view, kw in QUERIES:
        since = until - timedelta(days=1) if kw.get("last_day") else T0
        q = Query(view, SUB, since, until, **{k: v for k, v in kw.items() if k != "last_day"})  # type: ignore[arg-type]
        times, answer = [], None
        for _ in range(repeat):
            t = time.perf_counter()
            answer = shape(q, store.analytics(q))
            times.append((time.perf_counter() - t) * 1000)
        assert answer is not None
        total = sum(r.get("messages", 0) for r in answer["data"])
        label = f"{view} {' '.join(f'{k}={v}' for k, v in kw.items())}"
        note = f"{len(answer['data']):>5} rows" + (f", {total:,} messages" if total else "")
        print(f"  {label:<62} median {statistics.median(times):7.1f} ms, worst {max(times):7.1f} ms ({note})")
        worst_all.append(max(times))
    return worst_all


def verdict(name: str, worst: Sequence[float]) -> None:
    met = "met" if max(worst) < 200 else "NOT met"
    print(f"  {name}: slowest query {max(worst):.1f} ms (goal < 200 ms): {met}")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--skip-sqlite", action="store_true")
    p.add_argument("--skip-postgres", action="store_true")
    args = p.parse_args(argv)
    results = {}
    if not args.skip_postgres:
        with PostgresServer() as server:
            print(f"PostgreSQL ({server.bindir}, fsync=off)")
            url = fresh_database(server, "analytics")
            store = PostgresStore(url, PII)
            store.migrate()
            load(store, args.messages, args.days)
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE")
            results["PostgreSQL"] = query_all(store, args.days, args.repeat)
            store.close()
    if not args.skip_sqlite:
        with tempfile.TemporaryDirectory(prefix="chatpipe-bench-") as tmp:
            import sqlite3

            print(f"SQLite {sqlite3.sqlite_version} (file, WAL)")
            store = SqliteStore(os.path.join(tmp, "chatpipe.db"), PII)
            store.migrate()
            load(store, args.messages, args.days)
            results["SQLite"] = query_all(store, args.days, args.repeat)
            store.close()
    for name, worst in results.items():
        verdict(name, worst)


if __name__ == "__main__":
    main()
