"""Analytics aggregates against known truth, in SQLite and PostgreSQL.

The simulator's traffic plan (`chatpipe.proof.traffic.generate`) is the truth: every message's events per
step, its recipient's country, every inbound message. The receipts it would POST are parsed by ingest's
parser and folded by the processor's pure state machine, version by version, as the state topic would
carry them; the store's aggregates must equal what the plan says, computed here on its own (never by
`sinks.aggregates.contribution`), also after the whole state topic is delivered again.
"""

from __future__ import annotations

import dataclasses
import random
import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from chatpipe.proof.traffic import Message, Traffic, TrafficConfig, generate
from chatpipe.proof.truth import expected_message
from ingest.parse import parse_webhook
from processors.state import apply
from schemas.models import InboundMessage, MessageState
from sinks import aggregates as A
from sinks.analytics_sql import POSTGRES_DDL, Query
from sinks.connect import open_store
from sinks.postgres import PostgresStore
from sinks.rows import PiiPolicy
from sinks.store import Store
from tests.support.postgres import store_url

pytestmark = pytest.mark.integration

PII = PiiPolicy(hash_key=b"analytics-test-key")
START = datetime(2026, 3, 1, 22, 0, tzinfo=UTC)
SINCE, UNTIL = START - timedelta(days=1), START + timedelta(days=3)
FAILURES = {"undelivered", "rejected", "failed", "error"}
RANK = {"queued": 1, "accepted": 1, "sent": 2, "delivered": 3, "read": 4, **dict.fromkeys(FAILURES, 3)}
NO_READ = {"sms", "zalonotification", "linenotification"}


@dataclass(frozen=True)
class Dataset:
    traffic: Traffic
    versions: list[MessageState]  # every version the processor emitted, in emission order
    inbound: list[InboundMessage]


def build(messages: int = 600, seed: int = 11) -> Dataset:
    traffic = generate(
        TrafficConfig(messages=messages, seed=seed, start=START, malformed_share=0.0, inbound_share=0.3,
                      spread=4 * 3600.0)
    )  # fmt: skip
    states: dict[str, MessageState] = {}
    versions: list[MessageState] = []
    inbound: list[InboundMessage] = []
    for w in traffic.webhooks:
        event = parse_webhook(w.body, w.at or START)
        if isinstance(event, InboundMessage):
            inbound.append(event)
            continue
        out = apply(states.get(event.umid), event, now=w.at or START, lineage=7)
        if out.changed:
            states[event.umid] = out.state
            versions.append(out.state)
    return Dataset(traffic, versions, inbound)


# --- the truth, from the plan ------------------------------------------------------------------


def _country(m: Message) -> str:
    # a message has the recipient's number unless every step is LINE addressed by LINE id
    on_line_only = all(s.channel in ("line", "linenotification") for s in m.steps) and m.user.line_id
    return "unknown" if on_line_only else m.user.country


def _final(last_channel: str, last_state: str, read: bool) -> bool:
    if read:
        return True
    ok = last_state not in FAILURES
    if last_channel in NO_READ:
        return ok and RANK.get(last_state, 0) >= 3
    if last_channel == "line":
        return ok and RANK.get(last_state, 0) >= 2
    return False


def truth(ds: Dataset) -> dict[str, Any]:
    funnel: Counter[tuple[Any, ...]] = Counter()
    latency: Counter[tuple[Any, ...]] = Counter()
    errors: Counter[tuple[Any, ...]] = Counter()
    inbound: Counter[tuple[Any, ...]] = Counter()
    window: Counter[tuple[Any, ...]] = Counter()
    wa_sends: dict[tuple[str, str], list[datetime]] = {}
    outcome = {"sent": "sent", "delivered": "delivered", "read": "read", **dict.fromkeys(FAILURES, "failed")}
    for m in ds.traffic.messages:
        exp = expected_message(m)
        events = [e for s in m.steps for e in s.events]
        hour = min(e.at for e in events).replace(minute=0, second=0, microsecond=0)
        path = ">".join(s.channel for s in exp.steps)
        country = _country(m)
        key = (m.sub_account_id, hour, exp.steps[-1].channel, country, path)
        o = outcome.get(exp.state, "pending")
        read_at = min((e.at for e in events if e.state == "read"), default=None)
        funnel[(*key, "messages")] += 1
        funnel[(*key, o)] += 1
        funnel[(*key, "final")] += _final(exp.steps[-1].channel, exp.state, read_at is not None)
        sent = min((e.at for e in events if e.state in ("sent", "delivered", "read")), default=None)
        delivered = min((e.at for e in events if e.state in ("delivered", "read")), default=None)
        base = key[:4]
        if sent and delivered:
            latency[(*base, "deliver", A.latency_bucket((delivered - sent).total_seconds()))] += 1
        if delivered and read_at:
            latency[(*base, "read", A.latency_bucket((read_at - delivered).total_seconds()))] += 1
        for s in exp.steps:
            if s.state in FAILURES and s.error_code is not None:
                errors[(m.sub_account_id, hour, s.channel, country, s.error_code)] += 1
        for s in m.steps:
            if s.channel == "whatsapp":
                at = min(e.at for e in s.events)
                wa_sends.setdefault((m.sub_account_id, m.user.msisdn), []).append(at)
    for i in ds.traffic.inbound:
        hour = i.at.replace(minute=0, second=0, microsecond=0)
        country = A.country_of(None, i.user.msisdn)
        kind = ("Interactive", i.type) if i.type in ("button_reply", "list_reply") else (i.type, "")
        inbound[(i.sub_account_id, hour, i.channel, country, *kind)] += 1
        if i.channel == "whatsapp" and i.user.msisdn:
            sends = wa_sends.get((i.sub_account_id, i.user.msisdn), [])
            window[(i.sub_account_id, hour, country, "inbound")] += 1
            window[(i.sub_account_id, hour, country, "answered")] += any(
                i.at <= t < i.at + timedelta(hours=24) for t in sends
            )
    return {
        "funnel": +funnel, "latency": +latency, "errors": +errors, "inbound": +inbound, "window": +window,
    }  # fmt: skip


# --- the store's numbers -----------------------------------------------------------------------


def observed(store: Store, subs: tuple[str, ...]) -> dict[str, Any]:
    funnel: Counter[tuple[Any, ...]] = Counter()
    latency: Counter[tuple[Any, ...]] = Counter()
    errors: Counter[tuple[Any, ...]] = Counter()
    inbound: Counter[tuple[Any, ...]] = Counter()
    window: Counter[tuple[Any, ...]] = Counter()
    by = ("channel", "country")
    for sub in subs:
        for r in _fine_funnel(store, sub):
            key = (sub, r["bucket"], r["channel"], r["country"], r["path"])
            for c in A.MESSAGE_COUNTERS:
                funnel[(*key, c)] += r[c]
        for metric in A.METRICS:
            for r in store.analytics(Query("latency", sub, SINCE, UNTIL, "hour", group_by=by, metric=metric)):
                key = (sub, r["bucket"], r["channel"], r["country"], metric, r["bucket_index"])
                latency[key] += r["count"]
        for r in store.analytics(Query("errors", sub, SINCE, UNTIL, "hour", group_by=by)):
            errors[(sub, r["bucket"], r["channel"], r["country"], r["error_code"])] += r["count"]
        for country in _countries(store, sub):
            for r in store.analytics(Query("inbound", sub, SINCE, UNTIL, "hour", country=country)):
                key = (sub, r["bucket"], r["channel"], country, r["type"], r["interactive_type"])
                inbound[key] += r["count"]
        for r in store.analytics(Query("window", sub, SINCE, UNTIL, "hour", group_by=("country",))):
            window[(sub, r["bucket"], r["country"], "inbound")] += r["inbound"]
            window[(sub, r["bucket"], r["country"], "answered")] += r["answered"]
    return {
        "funnel": +funnel, "latency": +latency, "errors": +errors, "inbound": +inbound, "window": +window,
    }  # fmt: skip


def _fine_funnel(store: Store, sub: str) -> Iterator[dict[str, Any]]:
    """Funnel rows per hour x channel x country x path: the fallback view filtered by each country and
    current channel."""
    for country in _countries(store, sub):
        rows = store.analytics(Query("fallback", sub, SINCE, UNTIL, "hour", country=country))
        for r in rows:
            yield {**r, "country": country, "channel": r["path"].rsplit(">", 1)[-1]}


def _countries(store: Store, sub: str) -> list[str]:
    rows = store.analytics(Query("funnel", sub, SINCE, UNTIL, "total", group_by=("country",)))
    return sorted({r["country"] for r in rows} | set(A.CALLING_CODES.values()) | {"unknown"})


# --- tests -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return build()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Store]:
    s = open_store(store_url(request, tmp_path), PII)
    s.migrate()
    yield s
    s.close()


def _write(store: Store, ds: Dataset, batch: int, rng: random.Random) -> None:
    """Every version in emission order, in batches; the inbound messages shuffled, half of them before
    any state and the rest between the state batches (both orders of a window's two sides)."""
    inbound = list(ds.inbound)
    rng.shuffle(inbound)
    half = len(inbound) // 2
    store.write_inbound(inbound[:half])
    rest = inbound[half:]
    chunks = max(1, -(-len(ds.versions) // batch))
    step = -(-len(rest) // chunks)
    for n, i in enumerate(range(0, len(ds.versions), batch)):
        store.write_states(ds.versions[i : i + batch])
        store.write_inbound(rest[n * step : (n + 1) * step])


def test_every_aggregate_equals_the_truth_and_a_redelivery_changes_nothing(
    store: Store, dataset: Dataset
) -> None:
    expected = truth(dataset)
    assert all(expected.values()), "the dataset exercises every aggregate"
    subs = dataset.traffic.sub_accounts
    _write(store, dataset, 500, random.Random(2))
    first = observed(store, subs)
    for name in expected:
        assert first[name] == expected[name], name
    _days_equal_their_hours(store, subs)
    # the whole state topic (every version) and every inbound message again, in other batches
    _write(store, dataset, 170, random.Random(3))
    assert observed(store, subs) == first


def _days_equal_their_hours(store: Store, subs: tuple[str, ...]) -> None:
    """Day and total answers (whole days from the daily tables, the edges from the hourly ones) equal
    the sums of the hourly rows, over a range that starts and ends inside a day."""
    since, until = START + timedelta(minutes=90), START + timedelta(days=2, hours=5)
    views = {"funnel": "messages", "fallback": "messages", "latency": "count", "errors": "count",
             "inbound": "count", "window": "inbound"}  # fmt: skip
    for sub in subs:
        for view, counter in views.items():
            by_hour: Counter[Any] = Counter()
            for r in store.analytics(Query(view, sub, since, until, "hour")):
                by_hour[A.day_of(r["bucket"])] += r[counter]
            by_day: Counter[Any] = Counter()
            for r in store.analytics(Query(view, sub, since, until, "day")):
                by_day[r["bucket"]] += r[counter]
            assert +by_hour == +by_day, (sub, view)
            total = sum(r[counter] for r in store.analytics(Query(view, sub, since, until, "total")))
            assert total == sum(by_hour.values()), (sub, view)


def test_the_merge_path_and_a_new_lineage_keep_the_aggregates_exact(store: Store, dataset: Dataset) -> None:
    """PostgreSQL's conflict path (staging + upsert) and states of a new lineage (the processor's state
    lost: merged by content) move the aggregates like the fast path."""
    _write(store, dataset, 500, random.Random(2))
    first = observed(store, dataset.traffic.sub_accounts)
    latest: dict[str, MessageState] = {}
    for s in dataset.versions:
        latest[s.umid] = s
    # the same final states again, but as version 1 of another lineage: merged by content
    relined = [dataclasses.replace(s, version=1, lineage=99) for s in latest.values()]
    if isinstance(store, PostgresStore):
        for i in range(0, len(relined), 300):
            store._run(lambda conn, b=relined[i : i + 300]: store._merge_states(conn, b))
    else:
        store.write_states(relined)
    assert observed(store, dataset.traffic.sub_accounts) == first


def test_rows_stored_before_the_aggregates_existed_are_counted_by_migration_9(
    store: Store, dataset: Dataset, tmp_path: Any
) -> None:
    expected = truth(dataset)
    url = store.url if isinstance(store, PostgresStore) else f"sqlite:///{store.path}"  # type: ignore[attr-defined]
    blind = open_store(url, PII)
    blind.aggregates = False  # type: ignore[attr-defined]
    _write(blind, dataset, 500, random.Random(4))
    blind.close()
    assert observed(store, dataset.traffic.sub_accounts)["funnel"] == Counter()
    _forget_migration(url, 9)
    store.migrate()
    got = observed(store, dataset.traffic.sub_accounts)
    for name in expected:
        assert got[name] == expected[name], name


def _forget_migration(url: str, version: int) -> None:
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            conn.execute("DELETE FROM chatpipe_schema_migrations WHERE version = ?", (version,))
    else:
        with psycopg.connect(url) as conn:
            conn.execute("DELETE FROM chatpipe_schema_migrations WHERE version = %s", (version,))


def test_migration_9_counts_a_large_store_in_bounded_batches_resumed_after_an_interruption(
    store: Store, dataset: Dataset
) -> None:
    """Migration 9 commits one batch of at most `backfill_batch` rows at a time: interrupted (the
    process killed in the middle of a batch), it leaves the committed batches counted and the rest for
    the next `migrate`, which resumes after them; counting nothing twice, and nothing once more when run
    again."""
    expected = truth(dataset)
    subs = dataset.traffic.sub_accounts
    url = store.url if isinstance(store, PostgresStore) else f"sqlite:///{store.path}"  # type: ignore[attr-defined]
    blind = open_store(url, PII)
    blind.aggregates = False  # type: ignore[attr-defined]
    _write(blind, dataset, 500, random.Random(4))
    blind.close()
    _forget_migration(url, 9)
    messages = len({s.umid for s in dataset.versions})

    crashing = open_store(url, PII)
    crashing.backfill_batch = 100  # type: ignore[attr-defined]
    batch = crashing._backfill_batch  # type: ignore[attr-defined]
    calls = 0

    def killed_in_the_fourth_batch(*args: Any) -> bool:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise KeyboardInterrupt  # the batch's transaction is rolled back
        return bool(batch(*args))

    crashing._backfill_batch = killed_in_the_fourth_batch  # type: ignore[attr-defined]
    with pytest.raises(KeyboardInterrupt):
        crashing.migrate()
    crashing.close()
    partial = observed(store, subs)["funnel"]
    counted = sum(n for k, n in partial.items() if k[-1] == "messages")
    assert counted == 300  # three batches of 100 committed, the fourth rolled back

    batches = 0
    resume = store._backfill_batch  # type: ignore[attr-defined]

    def counting(*args: Any) -> bool:
        nonlocal batches
        batches += 1
        return bool(resume(*args))

    store.backfill_batch = 100  # type: ignore[attr-defined]
    store._backfill_batch = counting  # type: ignore[attr-defined]
    store.migrate()
    got = observed(store, subs)
    for name in expected:
        assert got[name] == expected[name], name
    assert batches >= -(-(messages - 300) // 100) + -(-len(dataset.inbound) // 100)
    store.migrate()  # recorded: nothing runs again
    assert observed(store, subs) == got


@pytest.mark.parametrize("store", ["postgresql"], indirect=True)
def test_migration_10_moves_the_whatsapp_sends_of_an_older_store_into_messages(
    store: Store, dataset: Dataset
) -> None:
    """A PostgreSQL store written before migration 10 kept its WhatsApp sends in analytics_wa_outbound:
    migrated, they are `messages.wa_at`, where the inbound messages written afterwards find their
    answers (the window share equals the truth)."""
    url = store.url  # type: ignore[attr-defined]
    inbound = list(dataset.inbound)
    random.Random(5).shuffle(inbound)
    for i in range(0, len(dataset.versions), 500):
        store.write_states(dataset.versions[i : i + 500])
    # back to the schema before migration 10, its sends where that schema kept them
    (outbound_ddl,) = [sql for sql in POSTGRES_DDL if "CREATE TABLE analytics_wa_outbound" in sql]
    (index_ddl,) = [sql for sql in POSTGRES_DDL if "INDEX analytics_wa_outbound" in sql]
    with psycopg.connect(url) as conn:
        sends = conn.execute("SELECT count(*) FROM messages WHERE wa_at IS NOT NULL").fetchone()
        assert sends and sends[0] > 0, "the dataset has WhatsApp sends"
        conn.execute(outbound_ddl)
        conn.execute(index_ddl)
        conn.execute(
            "INSERT INTO analytics_wa_outbound SELECT umid, sub_account_id, msisdn_hash, wa_at FROM messages"
            " WHERE wa_at IS NOT NULL"
        )
        conn.execute("ALTER TABLE messages DROP COLUMN wa_at")
        conn.execute("DELETE FROM chatpipe_schema_migrations WHERE version = 10")
    older = open_store(url, PII)
    older.migrate()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM messages WHERE wa_at IS NOT NULL").fetchone() == sends
        assert conn.execute("SELECT to_regclass('analytics_wa_outbound')").fetchone() == (None,)
    older.write_inbound(inbound)
    window = truth(dataset)["window"]
    assert any(k[-1] == "answered" for k in window), "some inbound messages are answered"
    assert observed(older, dataset.traffic.sub_accounts)["window"] == window
    older.close()


@pytest.mark.parametrize("store", ["postgresql"], indirect=True)
def test_the_aggregate_tables_leave_room_for_hot_updates(store: Store) -> None:
    """Migration 11: every aggregate table, hourly and daily, keeps half of each page free for the new
    versions of its rows (HOT updates), and the counts stay right (`test_...equal_the_truth` above)."""
    with psycopg.connect(store.url) as conn:  # type: ignore[attr-defined]
        found = conn.execute(
            "SELECT relname, reloptions FROM pg_class WHERE relname LIKE 'analytics\\_%' AND relkind = 'r'"
            " AND relname NOT IN ('analytics_wa_inbound', 'analytics_backfill', 'analytics_error_codes')"
        ).fetchall()
    assert len(found) == 10
    assert {name: options for name, options in found} == {name: ["fillfactor=50"] for name, _ in found}
