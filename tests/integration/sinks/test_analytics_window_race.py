"""The WhatsApp 24 h window share under two concurrent sink processes on PostgreSQL.

One store writes an inbound WhatsApp message, another the reply to the same user (a WhatsApp send inside the
window), each in its own transaction on its own connection. The interleaving is forced, not timed: the
first writer stops inside its transaction right after it has read the other side (a subclass hook), the
second then runs until it either finishes or waits on a lock held by the first (observed in
pg_stat_activity), and only then does the first commit. Without an ordering guarantee both miss each other
(each read the other side before it committed) and the inbound message stays unanswered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from schemas.models import InboundMessage, MessageState, StatusEvent, Step, User
from sinks.postgres import _STRIPE, PostgresStore, window_stripes
from sinks.rows import PiiPolicy
from tests.support.postgres import PostgresServer, fresh_database

pytestmark = pytest.mark.integration

PII = PiiPolicy(hash_key=b"window-race")
T0 = datetime(2026, 5, 1, 9, 30, tzinfo=UTC)
NUMBER = "+6581234567"
WAIT_S = 120  # generous: only a broken test waits this long


class Paused(PostgresStore):
    """A store whose transaction stops after reading the window's other side, until released."""

    def __init__(self, url: str, hook: str) -> None:
        super().__init__(url, PII)
        self.hook = hook
        self.reached = threading.Event()
        self.release = threading.Event()

    def _pause(self) -> None:
        self.reached.set()
        assert self.release.wait(WAIT_S), "never released"

    def _count_inbound(self, conn: Any, rows: Any) -> None:
        super()._count_inbound(conn, rows)
        if self.hook == "inbound":
            self._pause()

    def _flush(self, conn: Any, changes: Any) -> None:
        super()._flush(conn, changes)
        if self.hook == "states":
            self._pause()


def _inbound() -> InboundMessage:
    return InboundMessage(
        umid="in-1", sub_account_id="Acme", timestamp=T0, channel="whatsapp", type="Text", received_at=T0,
        raw_json="{}", user=User(msisdn=NUMBER),
    )  # fmt: skip


def _reply() -> MessageState:
    at = T0 + timedelta(hours=3)
    step = Step(step=1, channel="whatsapp", state="sent", status_timestamp=at, first_event_at=at, sent_at=at,
                history=(StatusEvent("sent", at),))  # fmt: skip
    return MessageState(umid="out-1", sub_account_id="Acme", version=1, state="sent", status_timestamp=at,
                        steps=(step,), updated_at=at, user=User(msisdn=NUMBER), first_sent_at=at)  # fmt: skip


@pytest.fixture
def url(postgres_server: PostgresServer) -> Iterator[str]:
    url = fresh_database(postgres_server, "race")
    PostgresStore(url, PII).migrate()
    yield url


def _blocked_or_done(url: str, pid: int, thread: threading.Thread) -> str:
    """Wait until `thread` finished or the backend `pid` waits on a lock (whichever comes first)."""
    with psycopg.connect(url, autocommit=True) as watch:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if not thread.is_alive():
                return "done"
            row = watch.execute(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
            if row and row[0] == "Lock":
                return "blocked"
            time.sleep(0.01)
    raise AssertionError("the second writer neither finished nor waited")


@pytest.mark.parametrize("first", ["inbound", "states"])
def test_an_inbound_message_and_its_reply_written_concurrently_count_as_answered(
    url: str, first: str
) -> None:
    paused = Paused(url, hook=first)
    other = PostgresStore(url, PII)
    errors: list[BaseException] = []

    def run(fn: Any) -> threading.Thread:
        def target() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=target)
        t.start()
        return t

    write_inbound = lambda s: lambda: s.write_inbound([_inbound()])  # noqa: E731
    write_reply = lambda s: lambda: s.write_states([_reply()])  # noqa: E731
    a = run(write_inbound(paused) if first == "inbound" else write_reply(paused))
    assert paused.reached.wait(WAIT_S)
    b = run(write_reply(other) if first == "inbound" else write_inbound(other))
    second = _blocked_or_done(url, other._conn.info.backend_pid, b)  # type: ignore[union-attr]
    paused.release.set()
    a.join(WAIT_S)
    b.join(WAIT_S)
    assert not errors, errors
    with psycopg.connect(url) as conn:
        answered = conn.execute("SELECT answered FROM analytics_wa_inbound WHERE umid = 'in-1'").fetchone()
        window = conn.execute("SELECT sum(inbound), sum(answered) FROM analytics_window").fetchone()
        daily = conn.execute("SELECT sum(inbound), sum(answered) FROM analytics_window_daily").fetchone()
    assert answered == (1,), f"the second writer ({second}) and the first missed each other"
    assert window == (1, 1) and daily == (1, 1)
    paused.close()
    other.close()


def test_the_servers_window_stripes_are_the_sinks(url: str) -> None:
    """Migration 9's backfill locks stripes computed by the server (`_LOCK_WINDOWS`), writes lock stripes
    computed by the sink (`window_stripes`): the same (subaccount, user) must get the same stripe."""
    pairs = [
        *(("sub-1", u) for u in ("ab" * 32, "0f" + "cd" * 31, "00", "AB" * 32, "a", "ag12")),
        ("sub-2", "ab" * 32),
        ("sub_2", "user é 😀"),
        ("acme.co&x", ""),
    ]
    with psycopg.connect(url) as conn:
        got = conn.execute(
            f"SELECT {_STRIPE} FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS q(sub, usr, n)"
            " ORDER BY n",
            ([p[0] for p in pairs], [p[1] for p in pairs]),
        ).fetchall()
    assert [r[0] for r in got] == [window_stripes([p])[0] for p in pairs]
    assert window_stripes(pairs + pairs[:1]) == sorted({window_stripes([p])[0] for p in pairs})
