"""SQLite store: the embedded default (stdlib sqlite3, WAL mode, executemany upserts).

The worker and the read API may be separate processes on the same file: WAL lets readers run while a
batch is written, `busy_timeout` makes a second writer wait instead of failing, and every write batch
starts with `BEGIN IMMEDIATE` so the version check and the upserts see one consistent database.
Timestamps are stored as fixed-width ISO 8601 UTC text (`2020-06-17T04:17:21.060000Z`), which sorts
chronologically. One connection per store, guarded by a lock (the API may call from worker threads).
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import threading
from collections.abc import Generator, Iterator, Sequence
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from typing import Any

from processors.join import descends, join
from schemas.errors import TransientError
from schemas.models import Conversation, InboundMessage, MessageState
from sinks import aggregates as A
from sinks import analytics_sql as Q
from sinks import export_rows as X
from sinks import rows as R
from sinks.rows import PiiPolicy
from sinks.store import (
    DEFAULT_LIMIT,
    MIGRATIONS_TABLE,
    LookupRecord,
    RowStream,
    StoredMessage,
    clamp_limit,
    equalities,
    inbound_filters,
    message_filters,
    paginate,
)

BUSY_TIMEOUT_MS = 30_000
BACKFILL_BATCH = 5000

MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (
        1,
        "initial schema",
        (
            """
            CREATE TABLE messages (
                umid              TEXT PRIMARY KEY,
                sub_account_id    TEXT NOT NULL,
                version           INTEGER NOT NULL,
                state             TEXT NOT NULL,
                detail            TEXT,
                error_code        INTEGER,
                error_message     TEXT,
                status_at         TEXT NOT NULL,
                channel_path      TEXT NOT NULL,
                current_channel   TEXT NOT NULL,
                fell_back         INTEGER NOT NULL,
                step_count        INTEGER NOT NULL,
                first_sent_at     TEXT,
                delivered_at      TEXT,
                read_at           TEXT,
                final             INTEGER NOT NULL,
                duplicates        INTEGER NOT NULL DEFAULT 0,
                msisdn_masked     TEXT,
                msisdn_hash       TEXT,
                msisdn            TEXT,
                channel_user_id   TEXT,
                batch_id          TEXT,
                client_message_id TEXT,
                client_batch_id   TEXT,
                updated_at        TEXT NOT NULL
            )
            """,
            "CREATE INDEX messages_client_message_id ON messages (sub_account_id, client_message_id)",
            "CREATE INDEX messages_batch_id ON messages (sub_account_id, batch_id)",
            "CREATE INDEX messages_updated_at ON messages (sub_account_id, updated_at)",
            """
            CREATE TABLE message_steps (
                umid            TEXT NOT NULL,
                step            INTEGER NOT NULL,
                channel         TEXT NOT NULL,
                state           TEXT NOT NULL,
                detail          TEXT,
                error_code      INTEGER,
                error_message   TEXT,
                status_at       TEXT NOT NULL,
                first_event_at  TEXT NOT NULL,
                sent_at         TEXT,
                delivered_at    TEXT,
                read_at         TEXT,
                failed_at       TEXT,
                channel_id      TEXT,
                country         TEXT,
                content_type    TEXT,
                created_at      TEXT,
                duplicates      INTEGER NOT NULL DEFAULT 0,
                version         INTEGER NOT NULL,
                PRIMARY KEY (umid, step)
            )
            """,
            "CREATE INDEX message_steps_channel_day ON message_steps (channel, status_at)",
            """
            CREATE TABLE status_events (
                umid           TEXT NOT NULL,
                step           INTEGER NOT NULL,
                sub_account_id TEXT NOT NULL,
                channel        TEXT NOT NULL,
                state          TEXT NOT NULL,
                detail         TEXT,
                error_code     INTEGER,
                error_message  TEXT,
                ts             TEXT NOT NULL
            )
            """,
            "CREATE UNIQUE INDEX status_events_dedup"
            " ON status_events (umid, step, state, coalesce(detail, ''), ts)",
            """
            CREATE TABLE inbound_messages (
                umid                         TEXT PRIMARY KEY,
                sub_account_id               TEXT NOT NULL,
                channel                      TEXT NOT NULL,
                channel_id                   TEXT,
                type                         TEXT NOT NULL,
                ts                           TEXT NOT NULL,
                received_at                  TEXT NOT NULL,
                msisdn_masked                TEXT,
                msisdn_hash                  TEXT,
                msisdn                       TEXT,
                channel_user_id              TEXT,
                user_name                    TEXT,
                text                         TEXT,
                url                          TEXT,
                payload                      TEXT,
                latitude                     REAL,
                longitude                    REAL,
                reply_to_umid                TEXT,
                interactive_type             TEXT,
                button_reply_id              TEXT,
                button_reply_title           TEXT,
                list_reply_id                TEXT,
                list_reply_title             TEXT,
                list_reply_description       TEXT,
                nfm_response_json            TEXT,
                call_permission_response     TEXT,
                call_permission_is_permanent INTEGER,
                call_permission_expires_at   TEXT,
                call_permission_source       TEXT,
                version                      INTEGER,
                raw_json                     TEXT
            )
            """,
            "CREATE INDEX inbound_by_user"
            " ON inbound_messages (sub_account_id, channel_id, channel_user_id, ts)",
            "CREATE INDEX inbound_by_msisdn"
            " ON inbound_messages (sub_account_id, channel_id, msisdn_hash, ts)",
        ),
    ),
    # PostgreSQL's migration 2 (lighter indexes on messages) has nothing to change here; kept as a
    # no-op so that one version number means the same schema change in both dialects.
    (2, "lighter indexes on messages (PostgreSQL only)", ()),
    (
        3,
        "conversations",
        (
            """
            CREATE TABLE conversations (
                key_hash                  TEXT PRIMARY KEY,
                conversation_key          TEXT,
                sub_account_id            TEXT NOT NULL,
                channel                   TEXT NOT NULL,
                channel_id                TEXT,
                user_key                  TEXT,
                user_key_hash             TEXT,
                msisdn_masked             TEXT,
                msisdn_hash               TEXT,
                msisdn                    TEXT,
                channel_user_id           TEXT,
                version                   INTEGER NOT NULL,
                first_inbound_at          TEXT NOT NULL,
                last_inbound_at           TEXT NOT NULL,
                last_umid                 TEXT NOT NULL,
                last_type                 TEXT NOT NULL,
                last_reply_to_umid        TEXT,
                window_open_until         TEXT,
                message_count             INTEGER NOT NULL,
                duplicates                INTEGER NOT NULL DEFAULT 0,
                counts_by_type            TEXT NOT NULL,
                call_permission           TEXT,
                call_permission_at        TEXT,
                call_permission_until     TEXT,
                call_permission_permanent INTEGER,
                updated_at                TEXT NOT NULL
            )
            """,
            "CREATE INDEX conversations_by_last_inbound"
            " ON conversations (sub_account_id, channel_id, last_inbound_at)",
            "CREATE INDEX conversations_by_user ON conversations (sub_account_id, channel_id, user_key_hash)",
            "CREATE INDEX conversations_by_msisdn ON conversations (sub_account_id, channel_id, msisdn_hash)",
        ),
    ),
    (4, "message_steps: BRIN for time ranges (PostgreSQL only)", ()),
    (
        5,
        "messages.lineage: states of another lineage are merged by content",
        ("ALTER TABLE messages ADD COLUMN lineage INTEGER NOT NULL DEFAULT 0",),
    ),
    (
        6,
        "reconciler: lookups, subaccount leases, open messages by age, channel ids of inbound messages",
        (
            """
            CREATE TABLE reconcile_checks (
                umid           TEXT PRIMARY KEY,
                sub_account_id TEXT NOT NULL,
                attempts       INTEGER NOT NULL,
                outcome        TEXT NOT NULL,
                checked_at     TEXT NOT NULL,
                next_due       TEXT NOT NULL,
                details        TEXT
            )
            """,
            """
            CREATE TABLE reconcile_leases (
                sub_account_id TEXT PRIMARY KEY,
                owner          TEXT NOT NULL,
                expires_at     TEXT NOT NULL
            )
            """,
            "CREATE INDEX messages_open ON messages (updated_at, umid) WHERE final = 0",
            "CREATE INDEX messages_open_by_subaccount ON messages (sub_account_id, updated_at, umid)"
            " WHERE final = 0",
            "CREATE INDEX inbound_channel_ids ON inbound_messages (sub_account_id, channel, channel_id)",
        ),
    ),
    (*Q.MIGRATION, Q.SQLITE_DDL),
    (*Q.BACKFILL, ()),  # SqliteStore.migrate runs it in batches (_backfill_batch)
)


def _columns(cols: Sequence[str]) -> str:
    return ", ".join(cols)


def _params(cols: Sequence[str]) -> str:
    return ", ".join("?" for _ in cols)


_UPSERT_MESSAGE = (
    f"INSERT INTO messages ({_columns(R.MESSAGE_COLUMNS)}) VALUES ({_params(R.MESSAGE_COLUMNS)})"
    " ON CONFLICT (umid) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in R.MESSAGE_COLUMNS if c != "umid")
    + " WHERE excluded.version > messages.version"
)
_INSERT_STEP = f"INSERT INTO message_steps ({_columns(R.STEP_COLUMNS)}) VALUES ({_params(R.STEP_COLUMNS)})"
_INSERT_EVENT = (
    f"INSERT INTO status_events ({_columns(R.EVENT_COLUMNS)}) VALUES ({_params(R.EVENT_COLUMNS)})"
    " ON CONFLICT DO NOTHING"
)
_INSERT_INBOUND = (
    f"INSERT INTO inbound_messages ({_columns(R.INBOUND_COLUMNS)}) VALUES ({_params(R.INBOUND_COLUMNS)})"
    " ON CONFLICT (umid) DO NOTHING"
)
_UPSERT_CONVERSATION = (
    f"INSERT INTO conversations ({_columns(R.CONVERSATION_COLUMNS)})"
    f" VALUES ({_params(R.CONVERSATION_COLUMNS)})"
    " ON CONFLICT (key_hash) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in R.CONVERSATION_COLUMNS if c != "key_hash")
    + " WHERE excluded.version > conversations.version"
)
# the user's own conversation first (keyed by `user`), then the most recent; key_hash breaks ties
_GET_CONVERSATION = (
    "SELECT * FROM conversations WHERE sub_account_id = ? AND channel_id = ?"
    " AND (user_key_hash = ? OR msisdn_hash = ?)"
    " ORDER BY user_key_hash = ? DESC, last_inbound_at DESC, key_hash LIMIT 1"
)
_IN_JSON = "umid IN (SELECT value FROM json_each(?))"
_VERSIONS = f"SELECT umid, version, lineage FROM messages WHERE {_IN_JSON}"
_LOAD_MESSAGES = f"SELECT * FROM messages WHERE {_IN_JSON}"
_LOAD_STEPS = f"SELECT * FROM message_steps WHERE {_IN_JSON}"
_LOAD_EVENTS = f"SELECT * FROM status_events WHERE {_IN_JSON}"
_OLD_MESSAGES = f"SELECT {', '.join(A.MESSAGE_FACT_COLUMNS)} FROM {{messages}} WHERE {_IN_JSON}"
_OLD_STEPS = f"SELECT {', '.join(A.STEP_FACT_COLUMNS)} FROM {{steps}} WHERE {_IN_JSON}"
_AGG_UPSERTS = Q.upserts("?")
_WA_ANSWERED = (
    "SELECT 1 FROM analytics_wa_outbound WHERE sub_account_id = ? AND wa_user = ?"
    " AND wa_at >= ? AND wa_at < ? LIMIT 1"
)
_WA_INBOUND_AROUND = (
    "SELECT umid, ts, hour, country, answered FROM analytics_wa_inbound"
    " WHERE sub_account_id = ? AND wa_user = ? AND ts > ? AND ts <= ?"
)
_WA_INBOUND_ANY = "SELECT 1 FROM analytics_wa_inbound WHERE sub_account_id = ? LIMIT 1"
_INSERT_WA_OUTBOUND = (
    "INSERT OR REPLACE INTO analytics_wa_outbound (umid, sub_account_id, wa_user, wa_at) VALUES (?, ?, ?, ?)"
)
# migration 9 (sinks.analytics_sql): the facts of stored messages not counted yet, computed by SQLite into
# temp tables; the aggregates' deltas and the WhatsApp sends from them
_AGG_TEMP = (
    f"CREATE TEMP TABLE IF NOT EXISTS agg_facts ({', '.join(Q.FACT_COLUMNS)})",
    f"CREATE TEMP TABLE IF NOT EXISTS agg_error_facts ({', '.join(Q.ERROR_FACT_COLUMNS)})",
    "CREATE TEMP TABLE IF NOT EXISTS agg_rewindow (sub, usr, at)",
    *Q.SQLITE_CALLING_CODES,
)
_AGG_CLEAR = tuple(f"DELETE FROM temp.{t}" for t in ("agg_facts", "agg_error_facts", "agg_rewindow"))
_FACTS = (
    f"INSERT INTO temp.agg_facts ({', '.join(Q.FACT_COLUMNS)})"
    f" {Q.facts(Q.SQLITE, 'messages', 'message_steps', 1)}",
    f"INSERT INTO temp.agg_error_facts ({', '.join(Q.ERROR_FACT_COLUMNS)})"
    f" {Q.error_facts(Q.SQLITE, 'message_steps', 1)}",
)
_ODD = "SELECT DISTINCT umid FROM temp.agg_facts WHERE plain = 0"
_DROP_ODD = (
    f"DELETE FROM temp.agg_facts WHERE {_IN_JSON}",
    f"DELETE FROM temp.agg_error_facts WHERE {_IN_JSON}",
)
_AGG_DELTAS = tuple(
    Q.upsert_from(Q.SQLITE, n, f"({sql}) AS d", daily=daily)
    for n, sql in Q.delta_selects(Q.SQLITE, "temp.agg_facts", "temp.agg_error_facts").items()
    for daily in (False, True)
)
# the WhatsApp sends of the counted messages (none stored before: they were not counted)
_SENT = "FROM temp.agg_facts WHERE wa_at IS NOT NULL AND wa_user IS NOT NULL"
_NEW_SENDS = (
    "INSERT INTO analytics_wa_outbound (umid, sub_account_id, wa_user, wa_at)"
    f" SELECT umid, sub_account_id, wa_user, wa_at {_SENT}",
    f"INSERT INTO temp.agg_rewindow (sub, usr, at) SELECT sub_account_id, wa_user, wa_at {_SENT}",
)
_BACKFILL_MOVE = (
    "INSERT INTO analytics_backfill (source, after) VALUES (?, ?)"
    " ON CONFLICT (source) DO UPDATE SET after = excluded.after"
)


def _shift(ts: str, sign: str) -> str:
    """SQL of a stored timestamp `ts` moved by the WhatsApp window (`sinks.aggregates.WINDOW`), forward
    (`sign` '+') or back ('-'): the same fixed-width text."""
    seconds = int(A.WINDOW.total_seconds())
    moved = f"strftime('%Y-%m-%dT%H:%M:%S', substr({ts}, 1, 19), '{sign}{seconds} seconds')"
    return f"({moved} || substr({ts}, 20))"


# the inbound WhatsApp messages whose window holds a send of agg_rewindow (t - 24 h < ts <= t), with
# whether a send answers them now
_REWINDOW = (
    "SELECT DISTINCT i.umid, i.sub_account_id, i.hour, i.country, i.answered, EXISTS (SELECT 1"
    " FROM analytics_wa_outbound o WHERE o.sub_account_id = i.sub_account_id AND o.wa_user = i.wa_user"
    f" AND o.wa_at >= i.ts AND o.wa_at < {_shift('i.ts', '+')}) AS now"
    " FROM temp.agg_rewindow q JOIN analytics_wa_inbound i ON i.sub_account_id = q.sub AND i.wa_user = q.usr"
    f" AND i.ts > {_shift('q.at', '-')} AND i.ts <= q.at"
)
_INSERT_WA_INBOUND = (
    "INSERT INTO analytics_wa_inbound (umid, sub_account_id, wa_user, ts, hour, country, answered)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (umid) DO NOTHING"
)


def _when(value: Any) -> Any:
    """A timestamp column the row factory left as text, parsed (None and datetimes pass)."""
    return from_text(value) if isinstance(value, str) else value


_NUMBER = R.MESSAGE_COLUMNS.index("msisdn")
_MASKED = R.MESSAGE_COLUMNS.index("msisdn_masked")
_HASH = R.MESSAGE_COLUMNS.index("msisdn_hash")


def _upsert(conn: sqlite3.Connection, name: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """Add `rows` (`sinks.analytics_sql` upsert rows) to the hourly table `name` and its daily table."""
    if rows:
        conn.executemany(_AGG_UPSERTS[name], map(_adapt_values, rows))
        conn.executemany(_AGG_UPSERTS[name + "_daily"], map(_adapt_values, Q.daily_rows(name, rows)))


_CANDIDATES = (
    "SELECT m.umid, m.sub_account_id, m.final, m.status_at, m.updated_at, m.channel_path,"
    " coalesce(c.attempts, 0) AS attempts"
    " FROM messages m {index} LEFT JOIN reconcile_checks c ON c.umid = m.umid"
    " WHERE m.final = 0 AND m.updated_at < ? AND m.status_at < ? AND (c.next_due IS NULL OR c.next_due <= ?)"
)
_LEASE = (
    "INSERT INTO reconcile_leases (sub_account_id, owner, expires_at) VALUES (?, ?, ?)"
    " ON CONFLICT (sub_account_id) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at"
    " WHERE reconcile_leases.expires_at <= ? OR reconcile_leases.owner = excluded.owner"
)
_RECORD_LOOKUP = (
    "INSERT INTO reconcile_checks (umid, sub_account_id, attempts, outcome, checked_at, next_due, details)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (umid) DO UPDATE SET attempts = excluded.attempts,"
    " outcome = excluded.outcome, checked_at = excluded.checked_at, next_due = excluded.next_due,"
    " details = coalesce(excluded.details, reconcile_checks.details)"
    " WHERE excluded.checked_at >= reconcile_checks.checked_at"
)
# the channel's smallest and largest channelId on the subaccount's inbound messages (each is one probe of
# inbound_channel_ids: SQLite's min/max optimisation wants one aggregate per query)
_CHANNEL_ID_MIN = (
    "SELECT min(channel_id) AS v FROM inbound_messages WHERE sub_account_id = ? AND channel = ?"
    " AND channel_id IS NOT NULL"
)
_CHANNEL_ID_MAX = _CHANNEL_ID_MIN.replace("min(", "max(")


def to_text(value: datetime) -> str:
    return R.fixed_iso(value)


def from_text(value: str) -> datetime:
    return datetime.fromisoformat(value)


#: datetime -> its text, for the timestamps a batch repeats (a step's times recur in its history and in
#: its message's row); cleared when it reaches _TEXT_CACHE_SIZE
_TEXT_CACHE: dict[datetime, str] = {}
_TEXT_CACHE_SIZE = 1 << 16


def _adapt_value(v: Any) -> Any:
    if isinstance(v, datetime):
        text = _TEXT_CACHE.get(v)
        if text is None:
            if len(_TEXT_CACHE) >= _TEXT_CACHE_SIZE:
                _TEXT_CACHE.clear()
            text = _TEXT_CACHE[v] = to_text(v)
        return text
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, separators=(",", ":"))
    return v


def _adapt_values(values: Sequence[Any]) -> tuple[Any, ...]:
    """A row tuple with datetimes as fixed ISO text, booleans as 0/1 and dicts as JSON (SQLite's
    storage)."""
    return tuple(map(_adapt_value, values))


def _adapt(row: R.Row, columns: Sequence[str]) -> tuple[Any, ...]:
    return _adapt_values([row[c] for c in columns])


def _row(cursor: sqlite3.Cursor, values: tuple[Any, ...]) -> R.Row:
    out = {}
    for (name, *_), v in zip(cursor.description, values, strict=True):
        if v is not None and name in R.TIMESTAMP_COLUMNS:
            v = from_text(v)
        out[name] = v
    return out


def _connect_read_only(path: str) -> sqlite3.Connection:
    """A connection that cannot write (`mode=ro`): the file must exist."""
    uri = path if path == ":memory:" else f"file:{path}?mode=ro"
    return sqlite3.connect(
        uri,
        uri=path != ":memory:",
        timeout=BUSY_TIMEOUT_MS / 1000,
        isolation_level=None,
        check_same_thread=False,
    )


def _end_stream(conn: sqlite3.Connection, own: bool, lock: threading.RLock) -> None:
    conn.rollback()
    if own:
        conn.close()
    else:
        lock.release()


class SqliteStore:
    """See `sinks.store.Store` for the contract."""

    def __init__(
        self, path: str, pii: PiiPolicy, *, aggregates: bool = True, read_only: bool = False
    ) -> None:
        self.path = path
        self.pii = pii
        self.aggregates = aggregates  # False: analytics tables not maintained (benchmarks only)
        self.read_only = read_only  # `open_store(read_only=True)`: the file must exist, writes fail
        self.backfill_batch = BACKFILL_BATCH  # rows a transaction of migration 9 counts
        self._lock = threading.RLock()
        if read_only:
            self._conn = _connect_read_only(path)
        else:
            if path != ":memory:":
                parent = os.path.dirname(os.path.abspath(path))
                os.makedirs(parent, exist_ok=True)
            self._conn = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
        self._conn.row_factory = _row
        self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if path != ":memory:" and not read_only:
            self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding the write lock from its start."""
        if self.read_only:  # not a TransientError: retrying cannot help
            raise PermissionError(f"{self!r} was opened read-only")
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:  # database is locked past busy_timeout
                raise TransientError(f"sqlite: cannot start a write transaction: {exc}") from exc
            try:
                yield conn
            except sqlite3.OperationalError as exc:
                conn.rollback()
                raise TransientError(f"sqlite: write failed: {exc}") from exc
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    def migrate(self) -> None:
        """Apply the migrations not recorded yet in one write transaction; migration 9 (the analytics
        backfill) in bounded batches, one transaction each (`_backfill_batch`), resumed where it stopped
        after an interruption."""
        while self._migrate_up_to_backfill():
            while not self._backfill_batch():
                pass

    def _migrate_up_to_backfill(self) -> bool:
        """Apply what precedes the backfill (or follows it); True when the backfill is due."""
        with self._write() as conn:
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            applied = {r["version"] for r in conn.execute(f"SELECT version FROM {MIGRATIONS_TABLE}")}
            for version, name, statements in MIGRATIONS:
                if version in applied:
                    continue
                if version == Q.BACKFILL[0]:
                    return True
                for sql in statements:
                    conn.execute(sql)
                self._record(conn, version, name)
            return False

    @staticmethod
    def _record(conn: sqlite3.Connection, version: int, name: str) -> None:
        conn.execute(
            f"INSERT INTO {MIGRATIONS_TABLE} (version, name, applied_at) VALUES (?, ?, ?)",
            (version, name, to_text(datetime.now(UTC))),
        )

    def _backfill_batch(self) -> bool:
        """One transaction of migration 9 (as `PostgresStore._backfill_batch`): the next `backfill_batch`
        messages, or once they are all counted the next inbound messages, and the position, together.
        True when done (migration 9 recorded)."""
        with self._write() as conn:
            if conn.execute(
                f"SELECT 1 FROM {MIGRATIONS_TABLE} WHERE version = ?", (Q.BACKFILL[0],)
            ).fetchone():
                return True
            conn.execute(Q.BACKFILL_PROGRESS_DDL)
            after = {
                r["source"]: r["after"] for r in conn.execute("SELECT source, after FROM analytics_backfill")
            }
            n = self.backfill_batch
            if after.get("messages") != Q.BACKFILL_DONE:
                found = conn.execute(
                    "SELECT umid FROM messages WHERE umid > ? ORDER BY umid LIMIT ?",
                    (after.get("messages", ""), n),
                ).fetchall()
                umids = [r["umid"] for r in found]
                if umids:
                    self._maintain_sql(conn, json.dumps(umids))
                conn.execute(_BACKFILL_MOVE, ("messages", umids[-1] if len(umids) == n else Q.BACKFILL_DONE))
                return False
            rows = conn.execute(
                "SELECT * FROM inbound_messages WHERE umid > ? ORDER BY umid LIMIT ?",
                (after.get("inbound", ""), n),
            ).fetchall()
            if rows:
                self._count_inbound(conn, rows)
                conn.execute(_BACKFILL_MOVE, ("inbound", rows[-1]["umid"]))
                return False
            conn.execute("DELETE FROM analytics_backfill")
            self._record(conn, *Q.BACKFILL)
            return True

    def write_states(self, states: Sequence[MessageState]) -> int:
        if not states:
            return 0
        with self._write() as conn:
            umids = json.dumps(list(dict.fromkeys(s.umid for s in states)))
            held = {r["umid"]: (r["version"], r["lineage"]) for r in conn.execute(_VERSIONS, (umids,))}
            load = functools.partial(self._load_states, conn)
            merged = R.resolve_lineages(states, held, load, join, descends)
            advancing = [s for s in merged.states if s.umid not in held or s.version > held[s.umid][0]]
            if not advancing:
                return 0
            old = self._old_contributions(conn, [s.umid for s in advancing if s.umid in held])
            messages: list[tuple[Any, ...]] = []
            steps: list[tuple[Any, ...]] = []
            events: list[tuple[Any, ...]] = []
            for s in advancing:
                messages.append(_adapt_values(R.message_values(s, self.pii, merged.msisdn.get(s.umid))))
                steps.extend(map(_adapt_values, R.step_values(s)))
                events.extend(map(_adapt_values, R.event_values(s)))
            conn.executemany(_UPSERT_MESSAGE, messages)
            replaced = [(s.umid,) for s in advancing if s.umid in held]
            conn.executemany("DELETE FROM message_steps WHERE umid = ?", replaced)
            conn.executemany(_INSERT_STEP, steps)
            conn.executemany(_INSERT_EVENT, events)
            if self.aggregates:
                self._maintain(conn, advancing, messages, old)
            return len(advancing)

    def _old_contributions(self, conn: sqlite3.Connection, umids: list[str]) -> dict[str, A.Contribution]:
        """The contributions of the stored messages `umids` (before their rows are replaced)."""
        if not umids or not self.aggregates:
            return {}
        return self._contributions(conn, umids, "messages", "message_steps")

    def _maintain(
        self,
        conn: sqlite3.Connection,
        advancing: Sequence[MessageState],
        rows: Sequence[tuple[Any, ...]],
        old: dict[str, A.Contribution],
    ) -> None:
        """Add `new - old` contribution of every advancing message (`rows`: their `messages` rows) to the
        analytics tables, in the write's transaction."""
        changes = A.Changes()
        contribution, note = A.contribution, changes.note
        for s, row in zip(advancing, rows, strict=True):
            note(s.umid, old.get(s.umid), contribution(s, row[_NUMBER] or row[_MASKED], row[_HASH]))
        changes.settle()
        self._apply_changes(conn, changes)

    def _apply_changes(self, conn: sqlite3.Connection, changes: A.Changes) -> None:
        """Write what `changes` change in the analytics tables, the WhatsApp windows included."""
        conn.executemany("DELETE FROM analytics_wa_outbound WHERE umid = ?", [(u,) for u in changes.gone])
        conn.executemany(_INSERT_WA_OUTBOUND, map(_adapt_values, changes.outbound))
        self._apply(conn, changes.deltas())
        if changes.rewindow:  # (one writer at a time: BEGIN IMMEDIATE orders the window's two sides)
            # only subaccounts that ever got a WhatsApp inbound message have windows to check
            subs = {k[0] for k in changes.rewindow}
            subs = {sub for sub in subs if conn.execute(_WA_INBOUND_ANY, (sub,)).fetchone() is not None}
            keys = [k for k in changes.rewindow if k[0] in subs]
            if keys:
                self._rewindow(conn, keys)

    @staticmethod
    def _apply(conn: sqlite3.Connection, deltas: A.Deltas) -> None:
        _upsert(conn, "messages", A.message_rows(deltas))
        _upsert(conn, "latency", A.latency_rows(deltas))
        _upsert(conn, "errors", A.error_rows(deltas))

    @staticmethod
    def _answered(conn: sqlite3.Connection, sub: str, user: str, ts: datetime) -> int:
        found = conn.execute(_WA_ANSWERED, (sub, user, to_text(ts), to_text(ts + A.WINDOW))).fetchone()
        return 1 if found else 0

    def _rewindow(self, conn: sqlite3.Connection, keys: Sequence[tuple[str, str, datetime]]) -> None:
        """Recompute `answered` of the WhatsApp inbound messages whose window holds one of `keys`'
        times (an outbound WhatsApp message appeared, moved or went), and move the window counts."""
        seen: set[str] = set()
        window: dict[tuple[str, datetime, str], list[int]] = {}
        for sub, user, at in keys:
            rows = conn.execute(_WA_INBOUND_AROUND, (sub, user, to_text(at - A.WINDOW), to_text(at)))
            for r in rows.fetchall():
                if r["umid"] in seen:
                    continue
                seen.add(r["umid"])
                now = self._answered(conn, sub, user, _when(r["ts"]))
                if now != r["answered"]:
                    conn.execute(
                        "UPDATE analytics_wa_inbound SET answered = ? WHERE umid = ?", (now, r["umid"])
                    )
                    key = (sub, _when(r["hour"]), r["country"])
                    window.setdefault(key, [0, 0])[1] += now - r["answered"]
        _upsert(conn, "window", [(*k, *v) for k, v in sorted(window.items())])

    # --- analytics: SQLite's own computation (sinks.analytics_sql), migration 9 ------------

    @staticmethod
    def _agg_tables(conn: sqlite3.Connection) -> None:
        """The temp tables `_maintain_sql` uses (every batch: a rolled back one takes them away)."""
        for sql in _AGG_TEMP:
            conn.execute(sql)

    def _maintain_sql(self, conn: sqlite3.Connection, umids: str) -> None:
        """Count the stored messages `umids` (a JSON list), not counted yet (migration 9), in the
        analytics tables: SQLite computes their contributions from their rows, except for the messages
        that are not plain (`sinks.analytics_sql`), which the Python definition counts; then the windows
        of their sends."""
        self._agg_tables(conn)
        for sql in _FACTS:
            conn.execute(sql, {"umids": umids})
        odd = [r["umid"] for r in conn.execute(_ODD)]
        if odd:
            for sql in _DROP_ODD:
                conn.execute(sql, (json.dumps(odd),))
        for sql in (*_AGG_DELTAS, *_NEW_SENDS):
            conn.execute(sql)
        if odd:
            self._maintain_in_python(conn, odd)
        self._rewindow_sql(conn)
        for sql in _AGG_CLEAR:
            conn.execute(sql)

    def _maintain_in_python(self, conn: sqlite3.Connection, umids: list[str]) -> None:
        """`_maintain_sql` of the messages the SQL leaves out: `contribution_from_tuples`, `_maintain`'s
        application of the changes."""
        new = self._contributions(conn, umids, "messages", "message_steps")
        changes = A.Changes()
        for umid in umids:
            changes.record(umid, None, new.get(umid))
        self._apply_changes(conn, changes)

    @staticmethod
    def _contributions(
        conn: sqlite3.Connection, umids: list[str], messages: str, steps: str
    ) -> dict[str, A.Contribution]:
        """The contributions (`contribution_from_tuples`) of the messages `umids` stored in tables
        `messages` / `steps`."""
        arg = (json.dumps(umids),)
        cur = conn.cursor()
        cur.row_factory = None  # plain tuples, timestamps parsed here (only the few the facts need)
        found: dict[str, list[tuple[Any, ...]]] = {}
        for u, n, channel, state, code, first, country in cur.execute(_OLD_STEPS.format(steps=steps), arg):
            found.setdefault(u, []).append((u, n, channel, state, code, _when(first), country))
        out = {}
        for m in cur.execute(_OLD_MESSAGES.format(messages=messages), arg).fetchall():
            fact = (*m[:4], _when(m[4]), _when(m[5]), _when(m[6]), *m[7:])
            c = A.contribution_from_tuples(fact, found.get(m[0], []))
            if c is not None:
                out[m[0]] = c
        return out

    @staticmethod
    def _rewindow_sql(conn: sqlite3.Connection) -> None:
        """Recompute `answered` of the WhatsApp inbound messages whose window holds a send of
        temp.agg_rewindow (one that appeared, moved or went), and move the window counts."""
        window: dict[tuple[str, datetime, str], list[int]] = {}
        for r in conn.execute(_REWINDOW).fetchall():
            if r["now"] != r["answered"]:
                conn.execute(
                    "UPDATE analytics_wa_inbound SET answered = ? WHERE umid = ?", (r["now"], r["umid"])
                )
                key = (r["sub_account_id"], _when(r["hour"]), r["country"])
                window.setdefault(key, [0, 0])[1] += r["now"] - r["answered"]
        _upsert(conn, "window", [(*k, *v) for k, v in sorted(window.items()) if v[1]])

    @staticmethod
    def _load_states(conn: sqlite3.Connection, umids: list[str]) -> dict[str, tuple[MessageState, R.Row]]:
        """The stored states of `umids` (those that have a row), rebuilt from their rows."""
        if not umids:
            return {}
        arg = (json.dumps(umids),)
        steps: dict[str, list[R.Row]] = {}
        for r in conn.execute(_LOAD_STEPS, arg):
            steps.setdefault(r["umid"], []).append(r)
        events: dict[str, list[R.Row]] = {}
        for r in conn.execute(_LOAD_EVENTS, arg):
            events.setdefault(r["umid"], []).append(r)
        return {
            m["umid"]: (R.state_from_rows(m, steps.get(m["umid"], []), events.get(m["umid"], [])), m)
            for m in conn.execute(_LOAD_MESSAGES, arg)
        }

    def write_inbound(self, msgs: Sequence[InboundMessage]) -> int:
        if not msgs:
            return 0
        rows = [R.inbound_row(m, self.pii) for m in msgs]
        with self._write() as conn:
            held: set[str] = set()
            if self.aggregates:
                arg = (json.dumps(list({m.umid for m in msgs})),)
                held = {
                    r["umid"]
                    for r in conn.execute(f"SELECT umid FROM inbound_messages WHERE {_IN_JSON}", arg)
                }
            cur = conn.executemany(_INSERT_INBOUND, [_adapt(r, R.INBOUND_COLUMNS) for r in rows])
            if self.aggregates:
                first = {r["umid"]: r for r in reversed(rows)}  # the first row of each umid wins
                self._count_inbound(conn, [r for u, r in first.items() if u not in held])
            return max(cur.rowcount, 0)

    def _count_inbound(self, conn: sqlite3.Connection, rows: Sequence[R.Row]) -> None:
        """Count newly stored inbound messages (their rows) by type; WhatsApp ones in the window table."""
        counts: dict[tuple[Any, ...], int] = {}
        window: dict[tuple[str, datetime, str], list[int]] = {}
        facts: list[tuple[Any, ...]] = []
        for r in rows:
            key = A.inbound_key(r)
            counts[key] = counts.get(key, 0) + 1
            user = r["msisdn_hash"]
            if key[2] == A.WHATSAPP and user is not None:
                answered = self._answered(conn, key[0], user, r["ts"])
                facts.append(_adapt_values((r["umid"], key[0], user, r["ts"], key[1], key[3], answered)))
                w = window.setdefault((key[0], key[1], key[3]), [0, 0])
                w[0] += 1
                w[1] += answered
        _upsert(conn, "inbound", [(*k, n) for k, n in sorted(counts.items())])
        conn.executemany(_INSERT_WA_INBOUND, facts)
        _upsert(conn, "window", [(*k, *v) for k, v in sorted(window.items())])

    def analytics(self, query: Q.Query) -> list[dict[str, Any]]:
        sql, params = Q.select(query, "?", "substr(hour, 1, 10) || 'T00:00:00.000000Z'")
        found = self._read(sql, [_adapt_value(p) for p in params])
        for r in found:
            r["bucket"] = _when(r["bucket"])
        return found

    def write_conversations(self, convs: Sequence[Conversation]) -> int:
        latest = R.latest_conversations(convs)
        if not latest:
            return 0
        rows = [_adapt_values(R.conversation_values(c, self.pii)) for c in latest]
        with self._write() as conn:
            before = conn.total_changes
            conn.executemany(_UPSERT_CONVERSATION, rows)
            return conn.total_changes - before  # an upsert stopped by the version guard changes nothing

    def get_conversation(self, sub_account_id: str, channel_id: str, user: str) -> R.Row | None:
        hashed = self.pii.hash_msisdn(user)
        found = self._read(_GET_CONVERSATION, (sub_account_id, channel_id, hashed, hashed, hashed))
        return found[0] if found else None

    def _read(self, sql: str, params: Sequence[Any]) -> list[R.Row]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.OperationalError as exc:
                raise TransientError(f"sqlite: read failed: {exc}") from exc

    def get_message(self, sub_account_id: str, umid: str) -> StoredMessage | None:
        with self._lock:
            self._conn.execute("BEGIN")  # one snapshot for both reads
            try:
                found = self._read(
                    "SELECT * FROM messages WHERE umid = ? AND sub_account_id = ?", (umid, sub_account_id)
                )
                steps = self._read("SELECT * FROM message_steps WHERE umid = ? ORDER BY step", (umid,))
                looked = self._read("SELECT details FROM reconcile_checks WHERE umid = ?", (umid,))
                missing = {r["channel"] for r in steps if r["channel_id"] is None} if found else set()
                ids = {c: v for c in missing if (v := self._only_channel_id(sub_account_id, c)) is not None}
            finally:
                self._conn.rollback()
        if not found:
            return None
        details = json.loads(looked[0]["details"]) if looked and looked[0]["details"] else None
        return StoredMessage(found[0], tuple(steps), details, ids, self.pii.clear)

    def _only_channel_id(self, sub_account_id: str, channel: str) -> str | None:
        """The channelId of the subaccount's inbound messages on `channel` when there is exactly one."""
        low = self._read(_CHANNEL_ID_MIN, (sub_account_id, channel))[0]["v"]
        if low is None or low != self._read(_CHANNEL_ID_MAX, (sub_account_id, channel))[0]["v"]:
            return None
        return str(low)

    def list_messages(
        self,
        sub_account_id: str,
        *,
        client_message_id: str | None = None,
        batch_id: str | None = None,
        after: str | None = None,
        limit: int = DEFAULT_LIMIT,
    ) -> tuple[list[R.Row], str | None]:
        limit = clamp_limit(limit)
        filters = message_filters(sub_account_id, client_message_id, batch_id)
        where, params = equalities(filters, "?")
        if after is not None:
            where.append("umid > ?")
            params.append(after)
        found = self._read(
            f"SELECT * FROM messages WHERE {' AND '.join(where)} ORDER BY umid LIMIT ?", (*params, limit + 1)
        )
        return paginate(found, limit, lambda row: row["umid"])

    def list_inbound(
        self,
        sub_account_id: str,
        *,
        channel_id: str | None = None,
        channel_user_id: str | None = None,
        msisdn: str | None = None,
        after: str | None = None,
        limit: int = DEFAULT_LIMIT,
    ) -> tuple[list[R.Row], str | None]:
        limit = clamp_limit(limit)
        filters = inbound_filters(self.pii, sub_account_id, channel_id, channel_user_id, msisdn)
        where, params = equalities(filters, "?")
        if after is not None:
            when, umid = R.parse_inbound_cursor(after)
            ts = to_text(when)
            where.append("(ts > ? OR (ts = ? AND umid > ?))")
            params.extend([ts, ts, umid])
        found = self._read(
            f"SELECT * FROM inbound_messages WHERE {' AND '.join(where)} ORDER BY ts, umid LIMIT ?",
            (*params, limit + 1),
        )
        return paginate(found, limit, R.inbound_cursor)

    def stream(self, table: str, since: datetime, until: datetime, *, batch: int = 5000) -> RowStream:
        """A read transaction (one WAL snapshot) on a read-only connection of its own, `fetchmany`
        batches; timestamps come back from their fixed ISO text. A `:memory:` store has no file another
        connection could open: its stream uses the store's connection, which it holds until closed."""
        spec = X.TABLES[table]
        columns = spec.exported_columns(self.pii)
        convert = X.converters(spec, columns)
        own = self.path != ":memory:"
        conn = _connect_read_only(self.path) if own else self._conn
        if not own:
            self._lock.acquire()
        bounds = (R.fixed_iso(since), R.fixed_iso(until))
        try:
            conn.execute("BEGIN")  # one snapshot for the count and the rows
            with closing(conn.cursor()) as cur:
                cur.row_factory = None
                (total,) = cur.execute(X.count_sql(spec, "?"), bounds).fetchone()
        except BaseException:
            _end_stream(conn, own, self._lock)
            raise

        def batches() -> Generator[list[tuple[Any, ...]], None, None]:
            with closing(conn.cursor()) as cur:
                cur.row_factory = None
                cur.execute(X.select_sql(spec, columns, "?"), bounds)
                while rows := cur.fetchmany(batch):
                    yield [X.typed(r, convert) for r in rows] if convert else rows

        kinds = tuple(spec.kind(c) for c in columns)
        return RowStream(columns, kinds, int(total), batches(), lambda: _end_stream(conn, own, self._lock))

    # --- reconciliation ----------------------------------------------------------------------------

    def reconcile_candidates(
        self,
        cutoff: datetime,
        now: datetime,
        *,
        sub_account_id: str | None = None,
        after: tuple[datetime, str] | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        c = to_text(cutoff)
        index = "messages_open" if sub_account_id is None else "messages_open_by_subaccount"
        sql = _CANDIDATES.format(index=f"INDEXED BY {index}")
        params: list[Any] = [c, c, to_text(now)]
        if sub_account_id is not None:
            sql += " AND m.sub_account_id = ?"
            params.append(sub_account_id)
        if after is not None:
            a = to_text(after[0])
            sql += " AND (m.updated_at > ? OR (m.updated_at = ? AND m.umid > ?))"
            params.extend([a, a, after[1]])
        sql += " ORDER BY m.updated_at, m.umid LIMIT ?"
        params.append(max(1, int(limit)))
        return [dict(r) for r in self._read(sql, params)]

    def lease_subaccounts(
        self, owner: str, sub_account_ids: Sequence[str], now: datetime, until: datetime
    ) -> list[str]:
        subs = list(dict.fromkeys(sub_account_ids))
        if not subs:
            return []
        u, n = to_text(until), to_text(now)
        with self._write() as conn:
            conn.executemany(_LEASE, [(sub, owner, u, n) for sub in subs])
            held = conn.execute(
                "SELECT sub_account_id FROM reconcile_leases WHERE owner = ?"
                " AND sub_account_id IN (SELECT value FROM json_each(?))",
                (owner, json.dumps(subs)),
            ).fetchall()
        mine = {r["sub_account_id"] for r in held}
        return [sub for sub in subs if sub in mine]

    def release_subaccounts(self, owner: str, sub_account_ids: Sequence[str], free_at: datetime) -> None:
        if not sub_account_ids:
            return
        with self._write() as conn:
            conn.execute(
                "UPDATE reconcile_leases SET expires_at = ? WHERE owner = ?"
                " AND sub_account_id IN (SELECT value FROM json_each(?))",
                (to_text(free_at), owner, json.dumps(list(sub_account_ids))),
            )

    def record_lookups(self, lookups: Sequence[LookupRecord]) -> None:
        if not lookups:
            return
        rows = [
            (
                x.umid,
                x.sub_account_id,
                x.attempts,
                x.outcome,
                to_text(x.checked_at),
                to_text(x.next_due),
                None if x.details is None else json.dumps(list(x.details)),
            )
            for x in lookups
        ]
        with self._write() as conn:
            conn.executemany(_RECORD_LOOKUP, rows)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
