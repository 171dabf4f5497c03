"""The store contract on real databases: SQLite (temp file) and PostgreSQL (throw-away server)."""

from __future__ import annotations

import dataclasses
import functools
import random
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from processors.conversation import apply_inbound
from schemas.errors import TransientError
from schemas.models import (
    CallPermissionReply,
    Conversation,
    InboundContent,
    InboundMessage,
    Interactive,
    MessageState,
    StatusEvent,
    Step,
    User,
)
from sinks import postgres as postgres_sink
from sinks import present
from sinks import rows as R
from sinks import sqlite as sqlite_sink
from sinks.connect import open_store
from sinks.rows import PiiPolicy
from sinks.store import Store
from tests.support.postgres import PostgresServer, fresh_database


class Shown:
    """A store's reads presented as the read API presents them (`sinks.present`): what these tests
    assert, so they hold the store's rows to 8x8's shapes."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def get_message(self, sub: str, umid: str) -> list[dict[str, Any]] | None:
        found = self.store.get_message(sub, umid)
        return None if found is None else present.stored_details(found)

    def list_messages(self, sub: str, **kw: Any) -> tuple[list[dict[str, Any]], str | None]:
        rows, cursor = self.store.list_messages(sub, **kw)
        return [present.summary_record(r) for r in rows], cursor

    def list_inbound(self, sub: str, **kw: Any) -> tuple[list[dict[str, Any]], str | None]:
        rows, cursor = self.store.list_inbound(sub, **kw)
        return [present.inbound_record(r) for r in rows], cursor

    def get_conversation(
        self, sub: str, channel_id: str, user: str, *, now: datetime
    ) -> dict[str, Any] | None:
        row = self.store.get_conversation(sub, channel_id, user)
        return None if row is None else present.conversation_record(row, now)


pytestmark = pytest.mark.integration

T0 = datetime(2020, 6, 17, 4, 15, 21, 60000, tzinfo=UTC)
SUB = "acme_01"
PII = PiiPolicy(hash_key=b"k")
TABLES = {
    "messages": "umid",
    "message_steps": "umid, step",
    "status_events": "umid, step, ts, state",
    "inbound_messages": "umid",
    "conversations": "key_hash",
}


# --- builders ----------------------------------------------------------------------------------


def mk_step(n: int, channel: str, states: list[tuple[str, int]], **kw: Any) -> Step:
    """A step whose history is `states` = [(state, seconds after T0)], the last one current."""
    history = tuple(StatusEvent(s, T0 + timedelta(seconds=t)) for s, t in states)
    last = history[-1]
    return Step(
        step=n,
        channel=channel,
        state=last.state,
        status_timestamp=last.timestamp,
        first_event_at=history[0].timestamp,
        history=history,
        **kw,
    )


def mk_state(umid: str, version: int, steps: tuple[Step, ...], *, sub: str = SUB, **kw: Any) -> MessageState:
    last = steps[-1]
    fields: dict[str, Any] = {
        "umid": umid,
        "sub_account_id": sub,
        "version": version,
        "state": last.state,
        "detail": last.detail,
        "error_code": last.error_code,
        "error_message": last.error_message,
        "status_timestamp": last.status_timestamp,
        "steps": steps,
        "updated_at": last.status_timestamp + timedelta(seconds=1),
        "user": User(msisdn="+639221101234"),
    }
    fields.update(kw)
    return MessageState(**fields)


def versions(umid: str) -> dict[int, MessageState]:
    """v1 queued on SMS, v2 sent, v3 SMS undelivered + WhatsApp sent (fallback), v4 WhatsApp read."""
    sms1 = mk_step(1, "sms", [("queued", 0)])
    sms2 = mk_step(1, "sms", [("queued", 0), ("sent", 1)])
    sms3 = mk_step(1, "sms", [("queued", 0), ("sent", 1), ("undelivered", 30)], failed_at=T0)
    wa3 = mk_step(2, "whatsapp", [("sent", 40)])
    wa4 = mk_step(2, "whatsapp", [("sent", 40), ("delivered", 50), ("read", 60)])
    return {
        1: mk_state(umid, 1, (sms1,)),
        2: mk_state(umid, 2, (sms2,)),
        3: mk_state(umid, 3, (sms3, wa3)),
        4: mk_state(umid, 4, (sms3, wa4), final=True),
    }


# every distinct (step, state) of the histories of `versions` up to v4, in time order
V4_EVENTS = [(1, "queued"), (1, "sent"), (1, "undelivered"), (2, "sent"), (2, "delivered"), (2, "read")]


# --- backends ----------------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    url: str
    store: Store
    query: Callable[[str], list[tuple[Any, ...]]]

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        return {t: self.query(f"SELECT * FROM {t} ORDER BY {order}") for t, order in TABLES.items()}

    def count(self, table: str) -> int:
        return int(self.query(f"SELECT count(*) FROM {table}")[0][0])

    def reopen(self, pii: PiiPolicy = PII) -> Store:
        self.store.close()
        self.store = open_store(self.url, pii)
        return self.store


def _sqlite_query(path: str) -> Callable[[str], list[tuple[Any, ...]]]:
    def query(sql: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(path) as conn:
            return conn.execute(sql).fetchall()

    return query


def _pg_query(url: str) -> Callable[[str], list[tuple[Any, ...]]]:
    def query(sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(url) as conn:
            return conn.execute(sql).fetchall()

    return query


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Backend]:
    if request.param == "sqlite":
        path = str(tmp_path / "chatpipe.db")
        url, query = f"sqlite:///{path}", _sqlite_query(path)
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = fresh_database(server)
        query = _pg_query(url)
    store = open_store(url, PII)
    store.migrate()
    b = Backend(request.param, url, store, query)
    yield b
    b.store.close()


# --- tests -------------------------------------------------------------------------------------


def test_migrate_twice_is_a_no_op(backend: Backend) -> None:
    backend.store.write_states([versions("m-1")[2]])
    before = backend.snapshot()
    backend.store.migrate()
    backend.reopen().migrate()
    migrations = sqlite_sink.MIGRATIONS if backend.name == "sqlite" else postgres_sink.MIGRATIONS
    assert backend.query("SELECT version FROM chatpipe_schema_migrations ORDER BY version") == [
        (version,) for version in sorted(v for v, _, _ in migrations)
    ]
    assert backend.snapshot() == before


def test_sqlite_memory_url_works() -> None:
    store = open_store("sqlite:///:memory:", PII)
    store.migrate()
    assert store.write_states([versions("m-1")[4]]) == 1
    assert Shown(store).get_message(SUB, "m-1") is not None
    store.close()


def test_unsupported_url_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        open_store("mysql://x", PII)


def test_get_message_answers_the_8x8_shape_for_a_multi_step_message(backend: Backend) -> None:
    umid = "dec02e44-c76f-4a0a-b69f-6ac2a4386eb9"
    viber = mk_step(
        1,
        "viber",
        [("sent", 0), ("undelivered", 60)],
        detail="rejected_by_operator",
        error_code=0,
        error_message="Invalid message length",
        channel_id="8e4d1303-5754-e911-8154-020897df5459",
        country="SG",
        content_type="Text",
        created_at=T0 - timedelta(minutes=2),
    )
    whatsapp = mk_step(
        2,
        "whatsapp",
        [("sent", 120), ("read", 600)],
        channel_id="904d1303-5754-e911-8154-020897df5459",
        country="SG",
        content_type="Text",
        created_at=T0,
    )
    state = mk_state(
        umid,
        7,
        (viber, whatsapp),
        sub="sub_account_id",
        user=User(msisdn="+639221101234", channel_user_id="string"),
        client_message_id="client message id",
        client_batch_id="client batch id",
        batch_id="c9c01382-38bf-4e27-8962-ae0684ab56c3",
    )
    assert backend.store.write_states([state]) == 1

    data = Shown(backend.store).get_message("sub_account_id", umid)

    # 8x8's first example, adapted: every optional key known (errorCode 0 is kept, not dropped).
    assert data is not None and len(data) == 2
    assert data[0] == {
        "umid": umid,
        "subAccountId": "sub_account_id",
        "channel": "Viber",
        "channelId": "8e4d1303-5754-e911-8154-020897df5459",
        "direction": "outbound",
        "country": "SG",
        "status": {
            "state": "undelivered",
            "detail": "rejected_by_operator",
            "errorCode": 0,
            "errorMessage": "Invalid message length",
            "timestamp": "2020-06-17T04:16:21.06Z",
        },
        "user": {"msisdn": "+63922110xxxx", "channelUserId": "string"},
        "contentType": "Text",
        "content": "**MASKED**",
        "createdAt": "2020-06-17T04:13:21.06Z",
        "clientMessageId": "client message id",
        "clientBatchId": "client batch id",
        "batchId": "c9c01382-38bf-4e27-8962-ae0684ab56c3",
        "step": 1,
    }
    # 8x8's second example (step 2, read): no detail/error keys, same keys otherwise.
    assert data[1] == {
        "umid": umid,
        "subAccountId": "sub_account_id",
        "channel": "WhatsApp",
        "channelId": "904d1303-5754-e911-8154-020897df5459",
        "direction": "outbound",
        "country": "SG",
        "status": {"state": "read", "timestamp": "2020-06-17T04:25:21.06Z"},
        "user": {"msisdn": "+63922110xxxx", "channelUserId": "string"},
        "contentType": "Text",
        "content": "**MASKED**",
        "createdAt": "2020-06-17T04:15:21.06Z",
        "clientMessageId": "client message id",
        "clientBatchId": "client batch id",
        "batchId": "c9c01382-38bf-4e27-8962-ae0684ab56c3",
        "step": 2,
    }


def test_unknown_fields_are_left_out_but_required_keys_stay(backend: Backend) -> None:
    backend.store.write_states([mk_state("m-1", 1, (mk_step(1, "sms", [("sent", 0)]),), user=User())])
    (record,) = Shown(backend.store).get_message(SUB, "m-1") or []
    assert record == {
        "umid": "m-1",
        "subAccountId": SUB,
        "channel": "SMS",
        "channelId": None,
        "direction": "outbound",
        "status": {"state": "sent", "timestamp": "2020-06-17T04:15:21.06Z"},
        "contentType": None,
        "content": "**MASKED**",
        "createdAt": "2020-06-17T04:15:21.06Z",
        "step": 1,
    }


def test_older_version_never_overwrites_newer(backend: Backend) -> None:
    v = versions("m-1")
    assert backend.store.write_states([v[3]]) == 1
    after_v3 = backend.snapshot()
    assert backend.store.write_states([v[2]]) == 0
    assert backend.store.write_states([v[1], v[2]]) == 0
    assert backend.snapshot() == after_v3
    data = Shown(backend.store).get_message(SUB, "m-1")
    assert data is not None and [r["channel"] for r in data] == ["SMS", "WhatsApp"]


@pytest.mark.parametrize("order", [(2, 3), (3, 2), (1, 3, 2, 3)])
def test_a_batch_with_several_versions_keeps_the_highest(backend: Backend, order: tuple[int, ...]) -> None:
    v = versions("m-1")
    assert backend.store.write_states([v[n] for n in order]) == 1
    assert backend.query("SELECT version, state, step_count FROM messages") == [(3, "sent", 2)]
    assert backend.query("SELECT step, version FROM message_steps ORDER BY step") == [(1, 3), (2, 3)]


def test_newer_version_replaces_the_steps(backend: Backend) -> None:
    v = versions("m-1")
    backend.store.write_states([v[1]])
    backend.store.write_states([v[4]])
    assert backend.query("SELECT step, state, version FROM message_steps ORDER BY step") == [
        (1, "undelivered", 4),
        (2, "read", 4),
    ]
    assert backend.query("SELECT version, state, fell_back FROM messages")[0][:2] == (4, "read")


def test_rewriting_the_same_batch_changes_nothing(backend: Backend) -> None:
    batch = [versions(f"m-{i}")[1 + i % 4] for i in range(20)]
    assert backend.store.write_states(batch) == 20
    first = backend.snapshot()
    assert backend.store.write_states(batch) == 0
    assert backend.store.write_states(list(reversed(batch))) == 0
    assert backend.snapshot() == first
    assert backend.count("messages") == 20


def test_redelivering_every_version_from_the_start_changes_nothing(backend: Backend) -> None:
    stream = [versions(f"m-{i}")[n] for n in (1, 2, 3, 4) for i in range(5)]
    for start in range(0, len(stream), 3):
        backend.store.write_states(stream[start : start + 3])
    final = backend.snapshot()
    backend.store.write_states(stream)
    for s in stream:
        backend.store.write_states([s])
    assert backend.snapshot() == final


def test_status_events_are_deduplicated(backend: Backend) -> None:
    v = versions("m-1")
    for n in (1, 2, 2, 3, 1, 4, 4):
        backend.store.write_states([v[n]])
    assert backend.query("SELECT step, state FROM status_events ORDER BY step, ts") == V4_EVENTS


def test_status_events_with_a_null_detail_are_deduplicated_too(backend: Backend) -> None:
    s1 = mk_state("m-1", 1, (mk_step(1, "sms", [("sent", 0)]),))
    s2 = mk_state("m-1", 2, (mk_step(1, "sms", [("sent", 0)], detail="x", duplicates=1),))
    backend.store.write_states([s1])
    backend.store.write_states([s2])
    assert backend.count("status_events") == 1


def test_a_subaccount_only_sees_its_own_messages(backend: Backend) -> None:
    backend.store.write_states(
        [versions("m-1")[2], mk_state("m-2", 1, (mk_step(1, "sms", [("sent", 0)]),), sub="other")]
    )
    assert Shown(backend.store).get_message("other", "m-1") is None
    assert Shown(backend.store).get_message(SUB, "m-2") is None
    assert Shown(backend.store).get_message(SUB, "nope") is None
    assert Shown(backend.store).get_message(SUB, "m-1") is not None
    assert [m["umid"] for m in Shown(backend.store).list_messages("other")[0]] == ["m-2"]


def test_list_messages_paginates_in_umid_order(backend: Backend) -> None:
    batch = [
        mk_state(
            f"m-{i:03d}",
            1,
            (mk_step(1, "sms", [("sent", i)]),),
            batch_id="b-even" if i % 2 == 0 else "b-odd",
            client_message_id=f"c-{i % 5}",
        )
        for i in range(25)
    ]
    backend.store.write_states(list(reversed(batch)))
    seen, cursor, pages = [], None, 0
    while True:
        page, cursor = Shown(backend.store).list_messages(SUB, after=cursor, limit=10)
        seen += [m["umid"] for m in page]
        pages += 1
        if cursor is None:
            break
    assert pages == 3
    assert seen == [f"m-{i:03d}" for i in range(25)]

    evens, nxt = Shown(backend.store).list_messages(SUB, batch_id="b-even", limit=100)
    assert nxt is None and [m["umid"] for m in evens] == [f"m-{i:03d}" for i in range(0, 25, 2)]
    by_client, _ = Shown(backend.store).list_messages(SUB, client_message_id="c-3")
    assert [m["umid"] for m in by_client] == ["m-003", "m-008", "m-013", "m-018", "m-023"]
    assert by_client[0]["status"] == {"state": "sent", "timestamp": "2020-06-17T04:15:24.06Z"}
    exact, nxt = Shown(backend.store).list_messages(SUB, limit=25)
    assert len(exact) == 25 and nxt is None


def inbound(umid: str, seconds: int, *, user: str = "6581968289", sub: str = SUB) -> InboundMessage:
    return InboundMessage(
        umid=umid,
        sub_account_id=sub,
        timestamp=T0 + timedelta(seconds=seconds),
        channel="whatsapp",
        type="Text",
        received_at=T0,
        raw_json='{"x": 1}',
        channel_id="ch-1",
        user=User(msisdn=f"+{user}", channel_user_id=user),
        content=InboundContent(text="hello"),
    )


def test_inbound_messages_are_idempotent_masked_and_listed_per_conversation(backend: Backend) -> None:
    msgs = [inbound(f"in-{i}", i % 7) for i in range(12)] + [inbound("in-x", 3, user="6599999999")]
    assert backend.store.write_inbound(msgs) == 13
    first = backend.snapshot()
    assert backend.store.write_inbound(msgs + msgs[:3]) == 0
    assert backend.snapshot() == first
    assert backend.query("SELECT DISTINCT text, raw_json, msisdn FROM inbound_messages") == [
        ("**MASKED**", None, None)
    ]

    seen, cursor = [], None
    while True:
        page, cursor = Shown(backend.store).list_inbound(
            SUB, channel_id="ch-1", channel_user_id="6581968289", after=cursor, limit=5
        )
        seen += [(m["timestamp"], m["umid"]) for m in page]
        if cursor is None:
            break
    assert len(seen) == 12 and seen == sorted(seen)
    by_msisdn, _ = Shown(backend.store).list_inbound(SUB, msisdn="+6599999999")
    assert [m["umid"] for m in by_msisdn] == ["in-x"]
    assert by_msisdn[0]["content"] == {"text": "**MASKED**"}
    assert Shown(backend.store).list_inbound("other")[0] == []


def test_clear_policy_keeps_content_and_numbers(backend: Backend) -> None:
    store = backend.reopen(PiiPolicy(clear=True))
    store.write_inbound([inbound("in-1", 0)])
    store.write_states([versions("m-1")[1]])
    assert backend.query("SELECT text, raw_json, msisdn FROM inbound_messages") == [
        ("hello", '{"x": 1}', "+6581968289")
    ]
    (record,) = Shown(store).get_message(SUB, "m-1") or []
    assert record["user"] == {"msisdn": "+639221101234"}


def test_postgres_restart_between_batches_loses_nothing(postgres_server: PostgresServer) -> None:
    url = fresh_database(postgres_server)
    store = open_store(url, PII)
    store.migrate()
    first = [versions(f"m-{i}")[2] for i in range(50)]
    second = [versions(f"m-{i}")[4] for i in range(50)] + [versions(f"n-{i}")[1] for i in range(50)]
    try:
        assert store.write_states(first) == 50
        postgres_server.stop()
        try:
            with pytest.raises(TransientError):
                store.write_states(second)
            with pytest.raises(TransientError):  # still down: reconnecting fails the same way
                store.write_states(second)
        finally:
            postgres_server.start()
        assert store.write_states(second) == 100
        assert store.write_states(second) == 0
    finally:
        store.close()
    query = _pg_query(url)
    assert query("SELECT count(*), min(version), max(version) FROM messages WHERE umid LIKE 'm-%'") == [
        (50, 4, 4)
    ]
    assert query("SELECT count(*) FROM messages WHERE umid LIKE 'n-%'") == [(50,)]
    assert query("SELECT count(*) FROM message_steps") == [(150,)]


def test_postgres_connection_killed_mid_session_reconnects(postgres_server: PostgresServer) -> None:
    url = fresh_database(postgres_server)
    store = open_store(url, PII)
    store.migrate()
    try:
        store.write_states([versions("m-1")[1]])
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        # the ended connection is replaced and the write tried once more on a fresh one
        assert store.write_states([versions("m-1")[2]]) == 1
        assert (Shown(store).get_message(SUB, "m-1") or [{}])[0]["status"]["state"] == "sent"
    finally:
        store.close()


def test_postgres_fast_and_merge_paths_leave_the_exact_final_rows(postgres_server: PostgresServer) -> None:
    # a shuffled stream mixing new umids, advances over stored rows, stale and redelivered versions, in
    # small batches: both write paths must end with exactly the highest version of every umid, only its
    # steps (none stale), and each distinct status event once
    stream = [versions(f"m-{i:02d}")[n] for i in range(12) for n in (1, 2, 3, 4, 2, 4)]
    random.Random(5).shuffle(stream)
    batches = [stream[i : i + 7] for i in range(0, len(stream), 7)]
    tables: dict[bool, dict[str, list[tuple[Any, ...]]]] = {}
    for merge in (False, True):
        url = fresh_database(postgres_server)
        store = postgres_sink.PostgresStore(url, PII)
        store.migrate()
        try:
            for batch in batches:
                if merge:
                    store._run(functools.partial(store._merge_states, states=R.latest_states(batch)))
                else:
                    store.write_states(batch)
            assert store.merge_fallbacks == 0
        finally:
            store.close()
        query = _pg_query(url)
        tables[merge] = {t: query(f"SELECT * FROM {t} ORDER BY {order}") for t, order in TABLES.items()}
        umids = [f"m-{i:02d}" for i in range(12)]
        assert query("SELECT umid, version, state FROM messages ORDER BY umid") == [
            (u, 4, "read") for u in umids
        ]
        assert query("SELECT umid, step, state, version FROM message_steps ORDER BY umid, step") == [
            row for u in umids for row in ((u, 1, "undelivered", 4), (u, 2, "read", 4))
        ]
        assert query("SELECT umid, step, state FROM status_events ORDER BY umid, step, ts") == [
            (u, step, state) for u in umids for step, state in V4_EVENTS
        ]
    assert tables[False] == tables[True]


def test_postgres_fast_path_falls_back_to_merge_on_a_unique_violation(
    postgres_server: PostgresServer,
) -> None:
    # events stored without their message (e.g. messages pruned, events kept): the fast path's COPY
    # hits the dedup index; the batch is written again by the merge path, nothing doubled
    url = fresh_database(postgres_server)
    store = postgres_sink.PostgresStore(url, PII)
    store.migrate()
    try:
        v = versions("m-1")
        with psycopg.connect(url) as conn:
            conn.execute(
                "INSERT INTO status_events (umid, step, sub_account_id, channel, state, ts)"
                " VALUES ('m-1', 1, %s, 'sms', 'queued', %s)",
                (SUB, T0),
            )
        assert store.write_states([v[3], versions("m-2")[1]]) == 2
        assert store.merge_fallbacks == 1
        assert store.write_states([v[4]]) == 1  # the fast path again
        assert store.merge_fallbacks == 1
    finally:
        store.close()
    query = _pg_query(url)
    assert query("SELECT umid, version FROM messages ORDER BY umid") == [("m-1", 4), ("m-2", 1)]
    assert query("SELECT count(*) FROM status_events WHERE umid = 'm-1'") == [(6,)]


def test_postgres_a_row_changed_after_the_version_read_is_never_overwritten(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # simulate a concurrent writer that stored v4 after this batch read the versions (seen as v0):
    # the guarded DELETE removes nothing, so the batch goes to the merge path, which keeps v4
    url = fresh_database(postgres_server)
    store = postgres_sink.PostgresStore(url, PII)
    store.migrate()
    try:
        v = versions("m-1")
        assert store.write_states([v[4]]) == 1
        before = _pg_query(url)("SELECT * FROM messages")
        monkeypatch.setattr(
            postgres_sink,
            "_HELD_VERSIONS",
            "SELECT umid, 0::bigint, lineage FROM messages WHERE umid = ANY(%s)",
        )
        assert store.write_states([v[2]]) == 0
        assert store.merge_fallbacks == 1
    finally:
        store.close()
    assert _pg_query(url)("SELECT * FROM messages") == before
    assert _pg_query(url)("SELECT step, version FROM message_steps ORDER BY step") == [(1, 4), (2, 4)]


# --- conversations -----------------------------------------------------------------------------

MSISDN = "+6581968289"


def conversation_versions(
    user: str | None = "BSUID.1",
    *,
    msisdn: str | None = MSISDN,
    sub: str = SUB,
    channel_id: str = "ch-1",
    n: int = 4,
) -> list[Conversation]:
    """Versions 1..n of one WhatsApp conversation, folded by the processor's pure function from
    realistic inbound messages: texts 10 s apart, the second one a call-permission answer (accept,
    temporary for 7 days) replying to an outbound message. `user` None: keyed by the number."""
    out: list[Conversation] = []
    conv = None
    for i in range(n):
        msg = inbound(f"{sub}-{user or 'by-number'}-{channel_id}-{i}", 10 * i, sub=sub)
        msg = dataclasses.replace(
            msg, channel_id=channel_id, user=User(msisdn=msisdn, channel_user_id=user, name="Jane Tan")
        )
        if i == 1:
            reply = CallPermissionReply("accept", False, T0 + timedelta(days=7), "user_action")
            msg = dataclasses.replace(
                msg,
                type="Interactive",
                reply_to_umid="out-1",
                content=InboundContent(
                    interactive=Interactive("callPermissionReply", call_permission_reply=reply)
                ),
            )
        conv, changed = apply_inbound(conv, msg, now=T0 + timedelta(seconds=10 * i, milliseconds=5))
        assert changed
        out.append(conv)
    return out


def test_conversation_answers_its_documented_shape(backend: Backend) -> None:
    v = conversation_versions()
    assert backend.store.write_conversations([v[3]]) == 1
    now = T0 + timedelta(hours=1)
    found = Shown(backend.store).get_conversation(SUB, "ch-1", "BSUID.1", now=now)
    assert found == {
        "subAccountId": SUB,
        "channel": "WhatsApp",
        "channelId": "ch-1",
        "user": {"msisdn": "+658196xxxx", "channelUserId": "BSUID.1"},
        "firstInboundAt": "2020-06-17T04:15:21.06Z",
        "lastInboundAt": "2020-06-17T04:15:51.06Z",
        "lastUmid": f"{SUB}-BSUID.1-ch-1-3",
        "lastType": "Text",
        "lastReplyToUmid": None,
        "windowOpenUntil": "2020-06-18T04:15:51.06Z",
        "windowOpen": True,
        "messageCount": 4,
        "countsByType": {"Interactive": 1, "Text": 3},
        "callPermission": {
            "response": "accept",
            "at": "2020-06-17T04:15:31.06Z",
            "until": "2020-06-24T04:15:21.06Z",
            "permanent": False,
            "granted": True,
        },
        "version": 4,
    }
    # the number finds the same conversation (through its keyed hash)
    assert Shown(backend.store).get_conversation(SUB, "ch-1", MSISDN, now=now) == found
    # time-dependent fields follow `now`: the window closes after 24 h, the permission after 7 days
    later = Shown(backend.store).get_conversation(SUB, "ch-1", "BSUID.1", now=T0 + timedelta(days=2))
    assert later is not None and later["windowOpen"] is False
    assert later["callPermission"]["granted"] is True
    expired = Shown(backend.store).get_conversation(SUB, "ch-1", "BSUID.1", now=T0 + timedelta(days=8))
    assert expired is not None and expired["callPermission"]["granted"] is False


def test_conversation_older_version_never_overwrites_newer(backend: Backend) -> None:
    v = conversation_versions()
    assert backend.store.write_conversations([v[2]]) == 1
    after = backend.snapshot()
    assert backend.store.write_conversations([v[1]]) == 0
    assert backend.store.write_conversations([v[0], v[1], v[2]]) == 0
    assert backend.snapshot() == after
    assert backend.store.write_conversations([v[3]]) == 1
    assert backend.query("SELECT version, message_count FROM conversations") == [(4, 4)]


@pytest.mark.parametrize("order", [(2, 3), (3, 2), (1, 3, 2, 3), (4, 1, 2)])
def test_a_conversation_batch_with_several_versions_keeps_the_highest(
    backend: Backend, order: tuple[int, ...]
) -> None:
    v = conversation_versions()
    assert backend.store.write_conversations([v[n - 1] for n in order]) == 1
    top = max(order)
    assert backend.query("SELECT version, message_count, last_umid FROM conversations") == [
        (top, top, v[top - 1].last_umid)
    ]


def test_rewriting_the_same_conversations_changes_nothing(backend: Backend) -> None:
    batch = [conversation_versions(f"U.{i}", msisdn=f"+65811100{i:02d}")[i % 4] for i in range(20)]
    assert backend.store.write_conversations(batch) == 20
    first = backend.snapshot()
    assert backend.store.write_conversations(batch) == 0
    assert backend.store.write_conversations(list(reversed(batch))) == 0
    assert backend.snapshot() == first
    assert backend.count("conversations") == 20


def test_a_conversation_keyed_by_the_number_is_found_by_the_number(backend: Backend) -> None:
    backend.store.write_conversations([conversation_versions(None, msisdn=MSISDN, n=2)[-1]])
    found = Shown(backend.store).get_conversation(SUB, "ch-1", MSISDN, now=T0)
    assert found is not None and found["user"] == {"msisdn": "+658196xxxx", "channelUserId": None}
    assert found["messageCount"] == 2
    assert Shown(backend.store).get_conversation(SUB, "ch-1", "6581968289", now=T0) is None
    assert Shown(backend.store).get_conversation(SUB, "ch-1", "+6581968288", now=T0) is None


def test_the_users_own_conversation_wins_over_one_sharing_the_number(backend: Backend) -> None:
    # the number wrote before WhatsApp gave a channelUserId: two conversations carry the same msisdn
    by_number = conversation_versions(None, msisdn=MSISDN, n=3)[-1]
    by_id = conversation_versions("BSUID.1", msisdn=MSISDN, n=1)[-1]
    backend.store.write_conversations([by_number, by_id])
    found = Shown(backend.store).get_conversation(SUB, "ch-1", MSISDN, now=T0)
    assert found is not None and found["messageCount"] == 3  # keyed by the number itself
    found = Shown(backend.store).get_conversation(SUB, "ch-1", "BSUID.1", now=T0)
    assert found is not None and found["messageCount"] == 1


def test_conversations_are_isolated_by_subaccount_and_channel(backend: Backend) -> None:
    mine = conversation_versions(n=2)[-1]
    theirs = conversation_versions(sub="other", n=3)[-1]
    elsewhere = conversation_versions(channel_id="ch-2", n=1)[-1]
    assert backend.store.write_conversations([mine, theirs, elsewhere]) == 3
    shown = Shown(backend.store)
    for user in ("BSUID.1", MSISDN):
        assert (shown.get_conversation(SUB, "ch-1", user, now=T0) or {})["messageCount"] == 2
        assert (shown.get_conversation("other", "ch-1", user, now=T0) or {})["messageCount"] == 3
        assert (shown.get_conversation(SUB, "ch-2", user, now=T0) or {})["messageCount"] == 1
        assert shown.get_conversation("nobody", "ch-1", user, now=T0) is None
        assert shown.get_conversation(SUB, "ch-3", user, now=T0) is None
    assert shown.get_conversation(SUB, "ch-1", "BSUID.2", now=T0) is None


def test_conversations_keep_no_number_in_clear_unless_the_policy_is_clear(backend: Backend) -> None:
    by_number = conversation_versions(None, msisdn=MSISDN, n=2)[-1]
    backend.store.write_conversations([by_number, conversation_versions(n=1)[-1]])
    rows = backend.query(
        "SELECT key_hash, conversation_key, user_key, msisdn_masked, msisdn FROM conversations"
        " ORDER BY user_key"
    )
    assert [r[1:] for r in rows] == [
        (None, "+658196xxxx", "+658196xxxx", None),
        (None, "BSUID.1", "+658196xxxx", None),
    ]
    everything = repr(backend.query("SELECT * FROM conversations"))
    assert "81968289" not in everything
    assert {r[0] for r in rows} == {
        PII.hash_key_text(by_number.key),
        PII.hash_key_text(f"{SUB}|whatsapp|ch-1|BSUID.1"),
    }

    store = backend.reopen(PiiPolicy(clear=True, hash_key=b"k"))
    store.write_conversations([dataclasses.replace(by_number, version=by_number.version + 1)])
    assert backend.query(
        f"SELECT conversation_key, user_key, msisdn FROM conversations WHERE key_hash = '{rows[0][0]}'"
    ) == [(by_number.key, MSISDN, MSISDN)]
    found = Shown(store).get_conversation(SUB, "ch-1", MSISDN, now=T0)
    assert found is not None and found["user"]["msisdn"] == MSISDN
    assert backend.count("conversations") == 2  # switching the policy never splits a conversation


# --- lineages: states folded by two processor lineages merge by content --------------------------------


def _receipt(state: str, seconds: int, channel: str = "whatsapp", msisdn: str | None = "+639221101234"):
    from schemas.models import DeliveryReceipt, Status

    ts = T0 + timedelta(seconds=seconds)
    return DeliveryReceipt(
        umid="m-1",
        sub_account_id=SUB,
        channel=channel,
        status=Status(state, ts),
        received_at=ts,
        raw_json="{}",
        user=User(msisdn=msisdn),
    )


def _folded(lineage: int, *receipts: Any, prev: MessageState | None = None) -> MessageState:
    from processors.state import apply_many

    state = apply_many(prev, receipts, now=T0 + timedelta(hours=1)).state
    return dataclasses.replace(state, lineage=lineage)


def _detail(backend: Backend) -> list[tuple[Any, ...]]:
    data = Shown(backend.store).get_message(SUB, "m-1") or []
    return [(r["step"], r["channel"], r["status"]["state"], r["status"]["timestamp"]) for r in data]


def test_a_state_of_a_new_lineage_moves_a_stored_state_on_instead_of_being_refused(backend: Backend) -> None:
    # before a restart: sent and delivered on WhatsApp (lineage 5, version 2)
    old = _folded(5, _receipt("sent", 1))
    old = _folded(5, _receipt("delivered", 2), prev=old)
    assert backend.store.write_states([old]) == 1
    # after it, the processor starts again from nothing: the read receipt alone is version 1 of lineage 9
    new = _folded(9, _receipt("read", 3))
    assert new.version == 1 < old.version
    assert backend.store.write_states([new]) == 1
    assert _detail(backend) == [(1, "WhatsApp", "read", "2020-06-17T04:15:24.06Z")]
    version, lineage, sent_at, delivered_at = backend.query(
        "SELECT version, lineage, first_sent_at, delivered_at FROM messages"
    )[0]
    assert (version, lineage) == (3, -1)
    assert sent_at is not None and delivered_at is not None  # the events of before the restart count
    assert backend.count("status_events") == 3
    # the old lineage redelivered, or the new one again: nothing changes
    snapshot = backend.snapshot()
    assert backend.store.write_states([old, new]) == 0
    assert backend.snapshot() == snapshot


def test_a_merged_row_keeps_merging_later_versions_of_the_new_lineage(backend: Backend) -> None:
    old = _folded(5, _receipt("sent", 1, "whatsapp"), _receipt("undelivered", 5, "whatsapp"))
    backend.store.write_states([old])
    new1 = _folded(9, _receipt("sent", 20, "sms"))
    new2 = _folded(9, _receipt("delivered", 25, "sms"), prev=new1)
    assert backend.store.write_states([new1]) == 1
    # new2 knows nothing of the WhatsApp step: taken by its version alone it would drop it
    assert backend.store.write_states([new2]) == 1
    steps = [(s, c, st) for s, c, st, _ in _detail(backend)]
    assert steps == [(1, "WhatsApp", "undelivered"), (2, "SMS", "delivered")]


@pytest.mark.parametrize("seed", range(6))
def test_any_order_of_two_lineages_states_converges_on_the_union(backend: Backend, seed: int) -> None:
    events = [_receipt("sent", 1), _receipt("delivered", 4), _receipt("sent", 10, "sms")]
    events.append(_receipt("read", 12))
    a1 = _folded(5, events[0])
    a2 = _folded(5, events[1], prev=a1)
    b1 = _folded(9, events[2])
    b2 = _folded(9, events[3], prev=b1)
    stream = [a1, a2, b1, b2, a2, b1]
    random.Random(seed).shuffle(stream)
    for i in range(0, len(stream), 2):
        backend.store.write_states(stream[i : i + 2])
    union = _folded(0, *events)
    expected = [(s.step, s.channel, s.state) for s in union.steps]
    assert [(s, c.lower(), st) for s, c, st, _ in _detail(backend)] == expected
    assert backend.count("status_events") >= len(events)


def test_a_merge_keeps_the_stored_masked_number_when_the_new_state_has_none(backend: Backend) -> None:
    backend.store.write_states([_folded(5, _receipt("sent", 1))])
    before = backend.query("SELECT msisdn_masked, msisdn_hash FROM messages")
    assert before[0][0] == "+63922110xxxx" and before[0][1]
    backend.store.write_states([_folded(9, _receipt("delivered", 2, msisdn=None))])
    after = backend.query("SELECT msisdn_masked, msisdn_hash, state FROM messages")
    assert after == [(*before[0], "delivered")]


def test_postgres_a_connection_the_server_ended_is_replaced_and_the_call_succeeds(
    postgres_server: PostgresServer,
) -> None:
    # a server restart or an idle timeout ends the store's open connection: the next read and the next
    # write must go through on a fresh one, not fail (the read API answered 500 on the first request)
    url = fresh_database(postgres_server)
    store = postgres_sink.PostgresStore(url, PII)
    store.migrate()
    try:
        v = versions("m-1")
        assert store.write_states([v[1]]) == 1
        for call in (lambda: Shown(store).get_message(SUB, "m-1"), lambda: store.write_states([v[2]])):
            with psycopg.connect(url) as admin:
                ended = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchall()
            assert ended and all(r[0] for r in ended)
            assert call()
        data = Shown(store).get_message(SUB, "m-1")
        assert data is not None and data[0]["status"]["state"] == "sent"
    finally:
        store.close()


def test_postgres_a_failed_batch_does_not_leave_the_next_without_its_staging_tables(
    postgres_server: PostgresServer,
) -> None:
    """The staging tables are created inside the transaction that first needs them: when that transaction
    fails (here a text PostgreSQL cannot store), they go with it, and the next batch on the same
    connection creates them again instead of failing on a missing table."""
    store = postgres_sink.PostgresStore(fresh_database(postgres_server), PII)
    store.migrate()
    try:
        bad = dataclasses.replace(inbound("in-bad", 0), channel_id="nul \x00 byte")
        with pytest.raises(psycopg.DataError):
            store.write_inbound([bad])
        assert store.write_inbound([inbound("in-1", 1)]) == 1
    finally:
        store.close()
