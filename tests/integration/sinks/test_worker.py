"""The sink worker end to end: real Tansu, real registry, real PostgreSQL and SQLite; nothing mocked.

MessageState versions are produced to `chatpipe.messages.state` with the codec (keyed by umid, several
versions per umid in scrambled order, some redelivered); the worker, run in a thread, must leave exactly
the highest version per umid. Conversations likewise on `chatpipe.conversations.state` (keyed by the
conversation key). Every test uses its own prefix and consumer group (shared broker).
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from chatpipe.runtime.config import Settings
from schemas.catalog import CONVERSATIONS, MESSAGE_STATE, SINK_DLQ
from schemas.codec import Codecs
from schemas.models import Conversation, MessageState
from sinks.worker import SinkWorker
from tests.integration.sinks.test_store import conversation_versions, versions
from tests.support.kafka import read_topic
from tests.support.postgres import PostgresServer, fresh_database

pytestmark = pytest.mark.integration

Query = Callable[[str], list[tuple[Any, ...]]]


@pytest.fixture(scope="module")
def codecs(registry_url: str) -> Codecs:
    return Codecs.connect(registry_url)


def stream(prefix: str, umids: int, seed: int) -> tuple[list[MessageState], dict[str, MessageState]]:
    """Records for `umids` messages: 1-4 versions each (the highest always present), scrambled across
    versions and umids, plus redeliveries; and the ground truth (highest version per umid)."""
    rnd = random.Random(seed)
    records: list[MessageState] = []
    truth: dict[str, MessageState] = {}
    for i in range(umids):
        v = versions(f"{prefix}-{i:04d}")
        top = rnd.randint(1, 4)
        chosen = [v[n] for n in range(1, top + 1) if n == top or rnd.random() < 0.7]
        records += chosen + rnd.sample(chosen, k=min(len(chosen), rnd.randint(0, 2)))
        truth[v[top].umid] = v[top]
    rnd.shuffle(records)
    return records, truth


def produce(bootstrap: str, codecs: Codecs, topic: str, values: list[tuple[str, bytes]]) -> dict[int, int]:
    """Produce (key, value) pairs; returns the next offset per partition after our records."""
    ends: dict[int, int] = {}
    errors: list[Any] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(err)
        else:
            ends[msg.partition()] = max(ends.get(msg.partition(), 0), msg.offset() + 1)

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    for key, value in values:
        producer.produce(topic, value, key.encode(), on_delivery=delivered)
        producer.poll(0)
    assert producer.flush(30) == 0
    assert not errors, errors
    return ends


def produce_states(bootstrap: str, codecs: Codecs, states: list[MessageState]) -> dict[int, int]:
    return produce(bootstrap, codecs, MESSAGE_STATE.name, [(s.umid, codecs.state.encode(s)) for s in states])


def wait_committed(
    bootstrap: str, group: str, ends: dict[int, int], timeout: float = 40.0, topic: str = MESSAGE_STATE.name
) -> None:
    """Until `group` committed at least `ends` on `topic` (offsets from the producer's delivery reports:
    Tansu's ListOffsets cannot be trusted)."""
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        wanted = [TopicPartition(topic, p) for p in ends]
        deadline = time.monotonic() + timeout
        while True:
            got = {tp.partition: tp.offset for tp in probe.committed(wanted, timeout=10)}
            if all(got[p] >= end for p, end in ends.items()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"group {group} committed {got}, expected at least {ends}")
            time.sleep(0.2)
    finally:
        probe.close()


class Running:
    """A SinkWorker in a thread."""

    def __init__(self, settings: Settings, group: str) -> None:
        self.worker = SinkWorker(settings, group=group, batch_size=500)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.worker.assigned.wait(30), "sink worker got no partitions"

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(20)
        assert not self.thread.is_alive()
        assert self.error is None, repr(self.error)


def pg_query(url: str) -> Query:
    def query(sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(url) as conn:
            return conn.execute(sql).fetchall()

    return query


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, Query]:
    """(store URL, query function) of an empty store."""
    if request.param == "sqlite":
        path = str(tmp_path / "sink.db")

        def query(sql: str) -> list[tuple[Any, ...]]:
            with sqlite3.connect(path) as conn:
                return conn.execute(sql).fetchall()

        return f"sqlite:///{path}", query
    url = fresh_database(request.getfixturevalue("postgres_server"), "sink")
    return url, pg_query(url)


def settings_for(broker: str, registry_url: str, url: str) -> Settings:
    return Settings(kafka_bootstrap=broker, schema_registry_url=registry_url, store_url=url)


def snapshot(query: Query, prefix: str) -> dict[str, list[tuple[Any, ...]]]:
    like = f"'{prefix}-%'"
    return {
        "messages": query(
            f"SELECT umid, version, state, step_count, channel_path FROM messages WHERE umid LIKE {like}"
            " ORDER BY umid"
        ),
        "steps": query(
            f"SELECT umid, step, channel, state, version FROM message_steps WHERE umid LIKE {like}"
            " ORDER BY umid, step"
        ),
        "events": query(
            f"SELECT umid, step, state FROM status_events WHERE umid LIKE {like}"
            " ORDER BY umid, step, ts, state"
        ),
    }


def expected(truth: dict[str, MessageState]) -> dict[str, list[tuple[Any, ...]]]:
    """The tables an exact sink leaves: the highest version's rows; its history holds every event of the
    earlier versions (each version's history extends the previous one's)."""
    ordered = [truth[u] for u in sorted(truth)]
    return {
        "messages": [(s.umid, s.version, s.state, len(s.steps), s.channel_path) for s in ordered],
        "steps": [(s.umid, st.step, st.channel, st.state, s.version) for s in ordered for st in s.steps],
        "events": [
            (s.umid, st.step, e.state)
            for s in ordered
            for st in s.steps
            for e in sorted(st.history, key=lambda e: (e.timestamp, e.state))
        ],
    }


def wait_for(
    query: Query, prefix: str, want: dict[str, list[tuple[Any, ...]]], timeout: float = 40.0
) -> None:
    deadline = time.monotonic() + timeout
    got: Any = None
    while time.monotonic() < deadline:
        try:
            got = snapshot(query, prefix)
        except (psycopg.OperationalError, sqlite3.OperationalError) as exc:  # database restarting
            got = exc
        if got == want:
            return
        time.sleep(0.2)
    raise AssertionError(f"tables never matched the ground truth; last seen {got!r}")


# --- tests -------------------------------------------------------------------------------------


def test_rows_equal_ground_truth_and_a_full_redelivery_changes_nothing(
    broker: str, registry_url: str, codecs: Codecs, store: tuple[str, Query]
) -> None:
    url, query = store
    prefix = f"gt-{uuid.uuid4().hex[:8]}"
    records, truth = stream(prefix, umids=150, seed=1)
    settings = settings_for(broker, registry_url, url)
    want = expected(truth)

    first = Running(settings, group=f"sink-{prefix}-1")
    try:
        # in two halves: the second overlaps batches already written
        produce_states(broker, codecs, records[: len(records) // 2])
        ends = produce_states(broker, codecs, records[len(records) // 2 :])
        wait_for(query, prefix, want)
        wait_committed(broker, f"sink-{prefix}-1", ends)
    finally:
        first.stop()
    before = snapshot(query, prefix)
    assert before == want

    # a new consumer group reads the whole topic again from offset 0: nothing changes
    second = Running(settings, group=f"sink-{prefix}-2")
    try:
        wait_committed(broker, f"sink-{prefix}-2", ends)
    finally:
        second.stop()
    assert snapshot(query, prefix) == before
    written = second.worker.metrics_registry.get_sample_value(
        "chatpipe_sink_records_total", {"topic": MESSAGE_STATE.name, "outcome": "written"}
    )
    assert written is not None and written >= len(records)


def conversation_stream(
    prefix: str, keys: int, seed: int
) -> tuple[list[Conversation], dict[str, Conversation]]:
    """Like `stream`, for conversations of subaccount `prefix`: 1-4 versions per conversation."""
    rnd = random.Random(seed)
    records: list[Conversation] = []
    truth: dict[str, Conversation] = {}
    for i in range(keys):
        v = conversation_versions(f"U.{i:04d}", msisdn=f"+6581{i:06d}", sub=prefix, n=4)
        top = rnd.randint(1, 4)
        chosen = [v[n - 1] for n in range(1, top + 1) if n == top or rnd.random() < 0.7]
        records += chosen + rnd.sample(chosen, k=min(len(chosen), rnd.randint(0, 2)))
        truth[v[top - 1].key] = v[top - 1]
    rnd.shuffle(records)
    return records, truth


def conversation_rows(query: Query, sub: str) -> list[tuple[Any, ...]]:
    return query(
        "SELECT user_key, version, message_count, last_umid, msisdn_masked FROM conversations"
        f" WHERE sub_account_id = '{sub}' ORDER BY user_key"
    )


def test_conversation_rows_equal_the_highest_version_per_key(
    broker: str, registry_url: str, codecs: Codecs, store: tuple[str, Query]
) -> None:
    url, query = store
    prefix = f"cv-{uuid.uuid4().hex[:8]}"
    records, truth = conversation_stream(prefix, keys=120, seed=3)
    want = [
        (c.user_key, c.version, c.message_count, c.last_umid, c.user.msisdn[:-4] + "xxxx")  # type: ignore[index]
        for c in sorted(truth.values(), key=lambda c: c.user_key)
    ]
    group = f"sink-{prefix}"
    running = Running(settings_for(broker, registry_url, url), group=group)
    try:
        ends = produce(
            broker, codecs, CONVERSATIONS.name, [(c.key, codecs.conversations.encode(c)) for c in records]
        )
        deadline = time.monotonic() + 40
        while (got := conversation_rows(query, prefix)) != want:
            assert time.monotonic() < deadline, f"conversations never matched the ground truth: {got!r}"
            time.sleep(0.2)
        wait_committed(broker, group, ends, topic=CONVERSATIONS.name)
    finally:
        running.stop()
    written = running.worker.metrics_registry.get_sample_value(
        "chatpipe_sink_records_total", {"topic": CONVERSATIONS.name, "outcome": "written"}
    )
    assert written is not None and written >= len(records)  # the topic also holds other tests' records

    # a redelivery of every version (a new group from offset 0) changes nothing
    before = query(f"SELECT * FROM conversations WHERE sub_account_id = '{prefix}' ORDER BY key_hash")
    again = Running(settings_for(broker, registry_url, url), group=f"{group}-2")
    try:
        wait_committed(broker, f"{group}-2", ends, topic=CONVERSATIONS.name)
    finally:
        again.stop()
    assert query(f"SELECT * FROM conversations WHERE sub_account_id = '{prefix}' ORDER BY key_hash") == before


def test_a_database_restart_mid_load_loses_nothing(
    broker: str, registry_url: str, codecs: Codecs, postgres_server: PostgresServer
) -> None:
    url = fresh_database(postgres_server, "sink")
    query = pg_query(url)
    prefix = f"rs-{uuid.uuid4().hex[:8]}"
    records, truth = stream(prefix, umids=300, seed=2)
    chunks = [records[i : i + 60] for i in range(0, len(records), 60)]
    running = Running(settings_for(broker, registry_url, url), group=f"sink-{prefix}")
    try:
        produce_states(broker, codecs, chunks[0])
        deadline = time.monotonic() + 30
        while not query(f"SELECT 1 FROM messages WHERE umid LIKE '{prefix}-%' LIMIT 1"):
            assert time.monotonic() < deadline, "nothing written before the restart"
            time.sleep(0.1)
        postgres_server.stop()
        try:
            for chunk in chunks[1:]:  # produced while the database is down
                produce_states(broker, codecs, chunk)
                time.sleep(0.05)
            time.sleep(1.5)  # the worker retries (and fails) meanwhile
            assert running.worker.metrics_registry.get_sample_value("chatpipe_sink_store_up") == 0
        finally:
            postgres_server.start()
        wait_for(query, prefix, expected(truth))
        assert running.thread.is_alive()
    finally:
        running.stop()


def test_an_undecodable_record_is_dead_lettered_and_the_worker_keeps_going(
    broker: str, registry_url: str, codecs: Codecs, tmp_path: Any
) -> None:
    path = str(tmp_path / "dlq.db")
    prefix = f"dl-{uuid.uuid4().hex[:8]}"
    good = [versions(f"{prefix}-{i}")[4] for i in range(3)]
    garbage = [
        (f"{prefix}-bad-1", f"not avro at all {prefix}".encode()),
        (f"{prefix}-bad-2", bytes([0, 0x7F, 0xFF, 0xFF, 0xFF]) + f"unknown schema {prefix}".encode()),
    ]
    conversation_garbage = (f"{prefix}|whatsapp|ch-1|u", f"not a conversation {prefix}".encode())
    running = Running(settings_for(broker, registry_url, f"sqlite:///{path}"), group=f"sink-{prefix}")
    try:
        produce(
            broker,
            codecs,
            MESSAGE_STATE.name,
            [(good[0].umid, codecs.state.encode(good[0])), *garbage]
            + [(s.umid, codecs.state.encode(s)) for s in good[1:]],
        )

        def query(sql: str) -> list[tuple[Any, ...]]:
            with sqlite3.connect(path) as conn:
                return conn.execute(sql).fetchall()

        produce(broker, codecs, CONVERSATIONS.name, [conversation_garbage])
        wait_for(query, prefix, expected({s.umid: s for s in good}))
        # the worker keeps going: every bad record reaches the DLQ while it runs (the conversation topic
        # is consumed independently of the state topic, so wait for it rather than stop early)
        bodies = {value: key for key, value in [*garbage, conversation_garbage]}
        wanted = {f"{prefix}-bad-1", f"{prefix}-bad-2", conversation_garbage[0]}
        deadline = time.monotonic() + 30
        while True:
            letters = [codecs.sink_dlq.decode(m.value()) for m in read_topic(broker, SINK_DLQ.name, idle=1.0)]
            ours = {bodies[d.body]: d for d in letters if d.body in bodies}
            if set(ours) == wanted or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        running.stop()

    assert set(ours) == wanted
    for key, letter in ours.items():
        assert letter.source == "sink"
        topic = CONVERSATIONS.name if key == conversation_garbage[0] else MESSAGE_STATE.name
        assert letter.reason.startswith(f"{topic}[")
    assert "magic byte" in ours[f"{prefix}-bad-1"].reason
    assert "unknown schema id" in ours[f"{prefix}-bad-2"].reason
