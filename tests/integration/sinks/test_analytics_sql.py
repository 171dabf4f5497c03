"""The analytics contributions computed by SQL (`sinks.analytics_sql.facts`) equal the pure Python definition
(`sinks.aggregates.contribution_from_rows`), in real SQLite and real PostgreSQL, on generated rows (the
SQL counts migration 9's batches; the write path uses the Python definition).

Rows are written straight into `messages` / `message_steps` with awkward values on purpose: channels and
countries in any case, padded with whitespace, non-ASCII (the SQL must flag those "not plain" and leave them
to Python), numbers with or without `+`, masked, empty; unordered and sparse step numbers; any state; any
durations (negative, sub-second, on a bucket boundary, years). Then, through the stores' real write path
and again through migration 9 from scratch, the aggregate tables must equal the totals of the Python
contributions of the stored rows, whichever of the two computed each message.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.rows import tuple_row

from schemas.models import MessageState, StatusEvent, Step, User
from sinks import aggregates as A
from sinks import analytics_sql as Q
from sinks.connect import open_store
from sinks.postgres import _OLD_MESSAGES, _OLD_STEPS, _old_contributions
from sinks.rows import PiiPolicy
from sinks.sqlite import SqliteStore, _adapt_values, from_text
from tests.support.postgres import store_url

pytestmark = pytest.mark.integration

PII = PiiPolicy(hash_key=b"sql-test-key")
T0 = datetime(2026, 3, 1, 22, 59, 59, 999_999, tzinfo=UTC)
_ids = itertools.count()

# text PostgreSQL can hold (no NUL); SQLite gets NUL too
weird = st.text(st.characters(blacklist_categories=("Cs",)), max_size=5)
CHANNELS = ["whatsapp", "WhatsApp", "SMS", "sms", "viber", " rcs", "line>x", "İ", "ß", "WHATSAPP\x00", ""]
COUNTRIES = [
    None,
    "",
    "sg",
    " SG ",
    "\x1cph\t",
    "\x0b\x1d\x1e\x1fde\r\n",
    "abcdefghijk",
    " ",
    "ß",
    "x\x85",
    "\x7fz",
]
NUMBERS = [None, "", "+6581234567", "+63922110xxxx", "6581234567", "+1", "+", "+8525551234", "+٣٣1", "+9999",
           "U4af49", "+2", "+21", "+2125", "+ 65", "65\x00"]  # fmt: skip
channels = st.sampled_from(CHANNELS) | weird
countries = st.sampled_from(COUNTRIES) | weird
numbers = st.sampled_from(NUMBERS) | weird
states = st.sampled_from(["queued", "sent", "delivered", "read", "undelivered", "rejected", "failed", "error",
                          "Sent", "unknown"])  # fmt: skip
offsets = st.sampled_from([0, 1, 999_999, 1_000_000, 1_189_207, 1_189_208, -3]) | st.integers(
    -(10**7), 10**14
)
times = st.datetimes(datetime(1900, 1, 1), datetime(2200, 1, 1), timezones=st.just(UTC))


@st.composite
def stored_messages(draw: st.DrawFn, nul: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One `messages` row and its `message_steps` rows (only what the facts read is meaningful)."""

    def text(s: st.SearchStrategy[Any]) -> Any:
        v = draw(s)
        return v if nul or v is None else v.replace("\x00", "")

    numbers_ = draw(st.lists(st.integers(-3, 40), min_size=0, max_size=4, unique=True))
    base = draw(times)
    steps = [
        {"umid": None, "step": n, "channel": text(channels), "state": draw(states),
         "error_code": draw(st.none() | st.sampled_from([1018, 41, 0])),
         "first_event_at": base + timedelta(microseconds=draw(offsets)), "country": text(countries)}
        for n in numbers_
    ]  # fmt: skip
    sent = draw(st.none() | st.just(base))
    delivered = None if sent is None and draw(st.booleans()) else base + timedelta(microseconds=draw(offsets))
    read = draw(st.none() | st.just(delivered + timedelta(microseconds=draw(offsets)) if delivered else None))
    umid = f"m{next(_ids)}"
    for s in steps:
        s["umid"] = umid
    message = {
        "umid": umid, "sub_account_id": draw(st.sampled_from(["Acme", "b\u00e9ta"])), "state": draw(states),
        "final": draw(st.booleans()), "first_sent_at": sent, "delivered_at": delivered, "read_at": read,
        "msisdn": text(numbers), "msisdn_masked": text(numbers),
        "msisdn_hash": draw(st.none() | st.just("h1")),
    }  # fmt: skip
    return message, steps


def _insert(store: Any, messages: list[tuple[dict[str, Any], list[dict[str, Any]]]]) -> None:
    """The rows as they are (the other NOT NULL columns filled with anything)."""
    filler = {"version": 1, "status_at": T0, "channel_path": "", "current_channel": "", "fell_back": False,
              "step_count": 0, "updated_at": T0}  # fmt: skip
    m_cols = [*A.MESSAGE_FACT_COLUMNS, *filler]
    s_cols = [*A.STEP_FACT_COLUMNS, "status_at", "version"]
    m_rows = [tuple({**m, **filler}[c] for c in m_cols) for m, _ in messages]
    s_rows = [
        tuple({**s, "status_at": T0, "version": 1}[c] for c in s_cols) for _, ss in messages for s in ss
    ]
    mark = "?" if isinstance(store, SqliteStore) else "%s"
    insert_m = f"INSERT INTO messages ({', '.join(m_cols)}) VALUES ({', '.join([mark] * len(m_cols))})"
    insert_s = f"INSERT INTO message_steps ({', '.join(s_cols)}) VALUES ({', '.join([mark] * len(s_cols))})"
    if isinstance(store, SqliteStore):
        with store._write() as conn:
            conn.executemany(insert_m, map(_adapt_values, m_rows))
            conn.executemany(insert_s, map(_adapt_values, s_rows))
    else:

        def work(conn: psycopg.Connection[Any]) -> None:
            with conn.cursor() as cur:
                cur.executemany(insert_m, m_rows)
                cur.executemany(insert_s, s_rows)

        store._run(work)


def _sql_contributions(store: Any, umids: list[str]) -> dict[str, tuple[A.Contribution, bool]]:
    """The contribution of each message by SQL (facts + error facts + the bucket SQL), and `plain`."""
    d = Q.SQLITE if isinstance(store, SqliteStore) else Q.PG
    sql = (
        f"SELECT f.*, {d.bucket('f.deliver_us')} AS deliver_bucket, {d.bucket('f.read_us')} AS read_bucket"
        f" FROM ({Q.facts(d, 'messages', 'message_steps', 1)}) AS f"
    )
    errors = Q.error_facts(d, "message_steps", 1)
    if isinstance(store, SqliteStore):
        with store._write() as conn:
            store._agg_tables(conn)
            arg = {"umids": json.dumps(umids)}
            facts = [dict(r) for r in conn.execute(sql, arg).fetchall()]
            errs = [dict(r) for r in conn.execute(errors, arg).fetchall()]
        for f in facts:
            f["hour"] = from_text(f["hour"])
            f["wa_at"] = f["wa_at"] and from_text(f["wa_at"])
    else:
        facts, errs = store._run(
            lambda conn: (conn.execute(sql, {"umids": umids}).fetchall(),
                          conn.execute(errors, {"umids": umids}).fetchall())
        )  # fmt: skip
    by_umid: dict[str, list[tuple[str, int]]] = {}
    for e in errs:
        by_umid.setdefault(e["umid"], []).append((e["channel"], e["error_code"]))
    out = {}
    for f in facts:
        c = A.NamedContribution(
            f["sub_account_id"], f["hour"], f["channel"], f["country"], f["path"], A.OUTCOMES[f["outcome"]],
            bool(f["final"]), None if f["deliver_us"] is None else f["deliver_bucket"],
            None if f["read_us"] is None else f["read_bucket"], tuple(sorted(by_umid.get(f["umid"], []))),
            f["wa_user"], f["wa_at"],
        )  # fmt: skip
        out[f["umid"]] = (c, bool(f["plain"]))
    return out


def _python(message: dict[str, Any], steps: list[dict[str, Any]]) -> A.Contribution | None:
    c = A.contribution_from_rows(message, steps)
    return None if c is None else A.named(c)._replace(errors=tuple(sorted(c[A.ERRORS])))


def _is_plain(message: dict[str, Any], steps: list[dict[str, Any]]) -> bool:
    last = max(steps, key=lambda s: s["step"])
    texts = [s["channel"] for s in steps] + [
        last["country"] or "",
        message["msisdn"] or message["msisdn_masked"] or "",
    ]
    return all(all("\x01" <= ch <= "\x7f" for ch in t) for t in texts)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    s = open_store(store_url(request, tmp_path_factory.mktemp("sql")), PII)
    s.migrate()
    yield s
    s.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_sql_contributions_equal_the_python_definition(store: Any, data: st.DataObject) -> None:
    messages = data.draw(
        st.lists(stored_messages(nul=isinstance(store, SqliteStore)), min_size=1, max_size=6)
    )
    _insert(store, messages)
    got = _sql_contributions(store, [m["umid"] for m, _ in messages])
    for message, steps in messages:
        expected = _python(message, steps)
        if expected is None:  # no steps: no contribution, no facts
            assert message["umid"] not in got
            continue
        sql, plain = got[message["umid"]]
        assert plain == _is_plain(message, steps), (message, steps)
        if plain:  # the others are the Python definition's to count (the stores route them there)
            assert sql == expected, (message, steps)


def test_every_listed_edge_case(store: Any) -> None:
    """The listed awkward values, each once, as the last step's country, the number and the channel."""
    nul = isinstance(store, SqliteStore)
    messages = []
    for i, (country, number, channel) in enumerate(itertools.zip_longest(COUNTRIES, NUMBERS, CHANNELS)):
        channel = "sms" if channel is None else channel
        if not nul:
            country, number, channel = (x and x.replace("\x00", "") for x in (country, number, channel))
        umid = f"edge{next(_ids)}"
        at = T0 + timedelta(microseconds=Q.LATENCY_THRESHOLDS_US[i] - (i % 2))  # on and off bucket bounds
        steps = [
            {"umid": umid, "step": 5, "channel": "whatsapp", "state": "undelivered", "error_code": 1018,
             "first_event_at": at, "country": None},
            {"umid": umid, "step": 9, "channel": channel, "state": "failed", "error_code": 41,
             "first_event_at": at, "country": country},
        ]  # fmt: skip
        message = {"umid": umid, "sub_account_id": "Acme", "state": "delivered", "final": True,
                   "first_sent_at": T0, "delivered_at": at, "read_at": at + (at - T0), "msisdn": number,
                   "msisdn_masked": "+658123xxxx", "msisdn_hash": "h"}  # fmt: skip
        messages.append((message, steps))
        alone = f"edge{next(_ids)}"  # the same last step alone
        messages.append(({**message, "umid": alone}, [{**steps[1], "umid": alone}]))
    _insert(store, messages)
    got = _sql_contributions(store, [m["umid"] for m, _ in messages])
    plain = 0
    for message, steps in messages:
        sql, is_plain = got[message["umid"]]
        assert is_plain == _is_plain(message, steps), (message, steps)
        if is_plain:
            plain += 1
            assert sql == _python(message, steps), (message, steps)
    assert plain >= len(messages) // 2


def test_integer_bucket_thresholds_equal_latency_bucket() -> None:
    for i, t in enumerate(Q.LATENCY_THRESHOLDS_US, 1):
        for d in (t - 1, t, t + 1):
            assert Q.bucket_of_us(d) == A.latency_bucket(timedelta(microseconds=d).total_seconds()), (i, d)


@given(st.integers(-(10**12), 10**16))
def test_integer_buckets_equal_latency_bucket_anywhere(d: int) -> None:
    assert Q.bucket_of_us(d) == A.latency_bucket(timedelta(microseconds=d).total_seconds())


# --- the whole write path: aggregate tables == totals of the Python contributions of the stored rows ----


def _state(umid: str, version: int, parts: list[tuple[str, str, int | None, int, str | None]],
           number: str | None, final: bool) -> MessageState:  # fmt: skip
    steps = []
    for n, (channel, state, code, offset, country) in enumerate(parts, 1):
        at = T0 + timedelta(seconds=offset)
        steps.append(Step(step=n, channel=channel, state=state, status_timestamp=at, first_event_at=at,
                          error_code=code, history=(StatusEvent(state, at, error_code=code),),
                          country=country,
                          sent_at=at))  # fmt: skip
    delivered = [s.status_timestamp for s in steps if s.state in ("delivered", "read")]
    return MessageState(
        umid=umid, sub_account_id="Acme", version=version, state=steps[-1].state,
        status_timestamp=steps[-1].status_timestamp, steps=tuple(steps), updated_at=T0,
        user=User(msisdn=number),
        first_sent_at=steps[0].sent_at, delivered_at=min(delivered, default=None), final=final,
    )  # fmt: skip


step_parts = st.tuples(
    st.sampled_from(["whatsapp", "sms", "viber", "WhatsApp", "whätsapp"]),
    states,
    st.none() | st.sampled_from([1018, 41]),
    st.integers(0, 7200),
    st.none() | st.sampled_from(["sg", "ß", " ph "]),
)
versions = st.lists(
    st.tuples(st.lists(step_parts, min_size=1, max_size=3), st.booleans()), min_size=1, max_size=3
)


def _table(store: Any, table: str) -> set[tuple[Any, ...]]:
    """A table's rows (those with a nonzero counter; hours and times as datetimes)."""
    if isinstance(store, SqliteStore):
        cur = store._conn.cursor()
        cur.row_factory = None
        rows = cur.execute(f"SELECT * FROM {table}").fetchall()
        at = 3 if table == "analytics_wa_outbound" else 1
        rows = [(*r[:at], from_text(r[at]), *r[at + 1 :]) for r in rows]
    else:
        if table == "analytics_wa_outbound":  # PostgreSQL keeps the sends in messages (migration 10)
            table = WA_SENDS_PG
        rows = store._run(lambda conn: [tuple(r.values()) for r in conn.execute(f"SELECT * FROM {table}")])
        table = "analytics_wa_outbound" if table == WA_SENDS_PG else table
    if table == "analytics_wa_outbound":
        return set(rows)
    counters = len(Q._TABLE_COLUMNS[table.removeprefix("analytics_").removesuffix("_daily")][2])
    return {tuple(r) for r in rows if any(r[-counters:])}


def _expected(store: Any) -> dict[str, set[tuple[Any, ...]]]:
    """What the tables must hold: the Python definition over every stored message's rows."""
    if isinstance(store, SqliteStore):
        with store._write() as conn:
            umids = [r["umid"] for r in conn.execute("SELECT umid FROM messages")]
            found = store._contributions(conn, umids, "messages", "message_steps")
    else:

        def work(conn: psycopg.Connection[Any]) -> dict[str, A.Contribution]:
            umids = [r["umid"] for r in conn.execute("SELECT umid FROM messages")]
            with conn.cursor(row_factory=tuple_row) as cur:
                return _old_contributions(
                    cur.execute(_OLD_MESSAGES, (umids,)).fetchall(),
                    cur.execute(_OLD_STEPS, (umids,)).fetchall(),
                )

        found = store._run(work)
    d = A.totals(found.values())
    out = {}
    for name, hourly in (
        ("messages", A.message_rows(d)),
        ("latency", A.latency_rows(d)),
        ("errors", A.error_rows(d)),
    ):
        out[f"analytics_{name}"] = {tuple(r) for r in hourly}
        out[f"analytics_{name}_daily"] = {tuple(r) for r in Q.daily_rows(name, hourly)}
    out["analytics_wa_outbound"] = {
        (u, c[A.SUB], c[A.USER], c[A.WHATSAPP_AT]) for u, c in found.items() if c[A.USER] and c[A.WHATSAPP_AT]
    }
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Any]:
    s = open_store(store_url(request, tmp_path), PiiPolicy(hash_key=b"k", clear=True))
    s.migrate()
    yield s
    s.close()


TABLES = (
    "messages", "message_steps", "status_events", "analytics_wa_outbound",
    *(f"analytics_{n}{d}" for n in ("messages", "latency", "errors") for d in ("", "_daily")),
)  # fmt: skip


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(versions, st.sampled_from(["+6581234567", "+1415555", None, "+٣٣1"])),
        min_size=1,
        max_size=8,
    )
)
def test_the_aggregates_equal_the_python_definition_of_the_stored_rows(
    fresh_store: Any, messages: list[tuple[list[tuple[list[Any], bool]], str | None]]
) -> None:
    """Every version of every message written in turn (plain and not plain ones mixed: SQL and Python
    each count theirs), then all again (a redelivery): after every batch the tables equal the Python
    totals of the stored rows."""
    store = fresh_store
    for table in TABLES:
        _truncate(store, table)
    base = next(_ids)
    batches: list[list[MessageState]] = []
    for i, (history, number) in enumerate(messages):
        for v, (parts, final) in enumerate(history):
            while len(batches) <= v:
                batches.append([])
            batches[v].append(_state(f"e{base}-{i}", v + 1, parts, number, final))
    for _ in range(2):
        for batch in batches:
            store.write_states(batch)
            for table, want in _expected(store).items():
                assert _table(store, table) == want, table
    # migration 9 counting the same rows from scratch (SQL facts, the others in Python) agrees
    for table in TABLES[3:]:
        _truncate(store, table)
    _truncate(store, "chatpipe_schema_migrations WHERE version = 9")
    store.backfill_batch = 3
    store.migrate()
    for table, want in _expected(store).items():
        assert _table(store, table) == want, table


WA_SENDS_PG = (
    "(SELECT umid, sub_account_id, msisdn_hash AS wa_user, wa_at FROM messages WHERE wa_at IS NOT NULL) AS s"
)


def _truncate(store: Any, table: str) -> None:
    if isinstance(store, SqliteStore):
        with store._write() as conn:
            conn.execute(f"DELETE FROM {table}")
    elif table == "analytics_wa_outbound":
        store._run(lambda conn: conn.execute("UPDATE messages SET wa_at = NULL"))
    else:
        store._run(lambda conn: conn.execute(f"DELETE FROM {table}"))
