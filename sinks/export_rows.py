"""Streaming, time-ranged reads of the store's tables for `chatpipe export`, on a connection of its own.

The Store protocol has no bulk read by time range (its reads are per subaccount and paged by umid), so
this module opens its own read-only connection from the store URL and touches no Store internals. It
reads the tables the sink writes, with the column lists of `sinks.rows` (the single list both dialects
write), in constant memory:
- PostgreSQL: a named server-side cursor inside one REPEATABLE READ, READ ONLY transaction, fetched in
  batches (the count and the rows see one snapshot);
- SQLite: a read transaction (one WAL snapshot) and `fetchmany` batches.

Which rows a range `[since, until)` selects (the time each table is "about"):
- `messages`: the message's first event (the earliest `message_steps.first_event_at` of its steps), the
  time the analytics aggregates bucket a message by (docs/analytics.md);
- `steps`: the step's `first_event_at`; `events`: the event's `ts`; `inbound`: the message's `ts`;
- `aggregates` (`analytics_messages`, the hourly outbound aggregates): the UTC hour (its start).
Rows come ordered by their primary key (`umid`, then `step`, ...), so no sort is needed.

Values come back typed alike from both dialects: aware UTC datetimes, bools, ints, floats, text.
PII: the columns only a clear policy fills (`msisdn`, `user_name`, `latitude`, `longitude`, `raw_json`)
are left out unless `PiiPolicy.clear`; masked numbers, their keyed hashes and masked content are
exported as stored.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Generator, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from sinks import rows as R
from sinks.rows import PiiPolicy
from sinks.store import sqlite_path

Kind = Literal["string", "int", "float", "bool", "timestamp"]

#: columns filled only under a clear PII policy (NULL otherwise): never exported unless clear
CLEAR_ONLY_COLUMNS: frozenset[str] = frozenset({"msisdn", "user_name", "latitude", "longitude", "raw_json"})
INT_COLUMNS: frozenset[str] = frozenset(
    {"version", "error_code", "step_count", "duplicates", "lineage", "step", "message_count"}
)
FLOAT_COLUMNS: frozenset[str] = frozenset({"latitude", "longitude"})


def kind_of(column: str) -> Kind:
    """The value kind of a stored column (what the writers type it as)."""
    if column in R.TIMESTAMP_COLUMNS:
        return "timestamp"
    if column in R.BOOLEAN_COLUMNS:
        return "bool"
    if column in INT_COLUMNS:
        return "int"
    if column in FLOAT_COLUMNS:
        return "float"
    return "string"


@dataclass(frozen=True)
class Table:
    """One exportable table: its SQL name, its columns (in `sinks.rows` order), its primary-key order
    and the SQL expression of the time a range selects on (over the alias `t`)."""

    name: str
    sql_name: str
    columns: tuple[str, ...]
    order: tuple[str, ...]
    time_expr: str
    where: str = ""
    kinds: tuple[tuple[str, Kind], ...] = ()

    def exported_columns(self, pii: PiiPolicy) -> tuple[str, ...]:
        return tuple(c for c in self.columns if pii.clear or c not in CLEAR_ONLY_COLUMNS)

    def kind(self, column: str) -> Kind:
        return dict(self.kinds).get(column) or kind_of(column)


#: the hourly outbound aggregates (`analytics_messages`, docs/analytics.md): one row per subaccount,
#: UTC hour, current channel, country and fallback path, with the messages counted once in their outcome
AGGREGATE_COLUMNS: tuple[str, ...] = (
    "sub_account_id", "hour", "channel", "country", "path", "first_channel", "steps",
    "messages", "pending", "sent", "delivered", "read", "failed", "final",
)  # fmt: skip
_AGGREGATE_KINDS: tuple[tuple[str, Kind], ...] = (
    ("hour", "timestamp"),
    *((c, "int") for c in AGGREGATE_COLUMNS[6:]),
)


TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        Table(
            "messages",
            "messages",
            R.MESSAGE_COLUMNS,
            ("umid",),
            "(SELECT min(s.first_event_at) FROM message_steps s WHERE s.umid = t.umid)",
        ),
        Table("steps", "message_steps", R.STEP_COLUMNS, ("umid", "step"), "t.first_event_at"),
        Table("events", "status_events", R.EVENT_COLUMNS, ("umid", "step", "ts", "state", "detail"), "t.ts"),
        Table("inbound", "inbound_messages", R.INBOUND_COLUMNS, ("umid",), "t.ts"),
        Table(
            "aggregates",
            "analytics_messages",
            AGGREGATE_COLUMNS,
            AGGREGATE_COLUMNS[:5],
            "t.hour",
            where="t.messages > 0",  # a row all messages moved away from holds zeros
            kinds=_AGGREGATE_KINDS,
        ),
    )
}


class RowReader(Protocol):
    def count(self, table: Table, columns: Sequence[str], since: datetime, until: datetime) -> int:
        """How many rows `batches` will yield for the same arguments (same snapshot)."""

    def batches(
        self, table: Table, columns: Sequence[str], since: datetime, until: datetime, batch: int
    ) -> Generator[list[tuple[Any, ...]], None, None]:
        """The rows of `table` in [since, until), `columns` in order, typed, at most `batch` a list."""

    def close(self) -> None: ...


def _where(table: Table, mark: str) -> str:
    where = f"{table.time_expr} >= {mark} AND {table.time_expr} < {mark}"
    return f"{where} AND {table.where}" if table.where else where


def _select(table: Table, columns: Sequence[str], mark: str) -> str:
    cols = ", ".join(f"t.{c}" for c in columns)
    order = ", ".join(f"t.{c}" for c in table.order)
    return f"SELECT {cols} FROM {table.sql_name} t WHERE {_where(table, mark)} ORDER BY {order}"


def _count(table: Table, mark: str) -> str:
    return f"SELECT count(*) FROM {table.sql_name} t WHERE {_where(table, mark)}"


def _converters(table: Table, columns: Sequence[str]) -> list[tuple[int, Kind]]:
    kinds = [(i, table.kind(c)) for i, c in enumerate(columns)]
    return [(i, k) for i, k in kinds if k in ("timestamp", "bool")]


class SqliteReader:
    """Reads a SQLite store file read-only; timestamps come back from their fixed ISO text."""

    def __init__(self, path: str) -> None:
        uri = path if path == ":memory:" else f"file:{path}?mode=ro"
        self._conn = sqlite3.connect(uri, uri=path != ":memory:", isolation_level=None, timeout=30)
        self._conn.execute("BEGIN")  # one snapshot for the count and the rows

    def count(self, table: Table, columns: Sequence[str], since: datetime, until: datetime) -> int:
        (n,) = self._conn.execute(_count(table, "?"), (R.fixed_iso(since), R.fixed_iso(until))).fetchone()
        return int(n)

    def batches(
        self, table: Table, columns: Sequence[str], since: datetime, until: datetime, batch: int
    ) -> Generator[list[tuple[Any, ...]], None, None]:
        convert = _converters(table, columns)
        with closing(self._conn.cursor()) as cur:
            cur.execute(_select(table, columns, "?"), (R.fixed_iso(since), R.fixed_iso(until)))
            while rows := cur.fetchmany(batch):
                if convert:
                    rows = [_typed(r, convert) for r in rows]
                yield rows

    def close(self) -> None:
        self._conn.rollback()
        self._conn.close()


def _typed(row: tuple[Any, ...], convert: list[tuple[int, Kind]]) -> tuple[Any, ...]:
    values = list(row)
    for i, kind in convert:
        v = values[i]
        if v is None:
            continue
        if kind == "timestamp":
            values[i] = datetime.fromisoformat(v).astimezone(UTC)
        else:
            values[i] = bool(v)
    return tuple(values)


class PostgresReader:
    """Reads a PostgreSQL store through a named (server-side) cursor in one read-only snapshot."""

    def __init__(self, url: str) -> None:
        import psycopg

        self._conn = psycopg.connect(url, connect_timeout=10, autocommit=True)
        self._conn.execute("SET TIME ZONE 'UTC'")
        self._conn.autocommit = False
        self._conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        self._conn.read_only = True  # the first statement starts the one snapshot every read sees
        self._cursors = 0

    def count(self, table: Table, columns: Sequence[str], since: datetime, until: datetime) -> int:
        row = self._conn.execute(_count(table, "%s"), (since, until)).fetchone()
        return int(row[0]) if row else 0

    def batches(
        self, table: Table, columns: Sequence[str], since: datetime, until: datetime, batch: int
    ) -> Generator[list[tuple[Any, ...]], None, None]:
        self._cursors += 1
        with self._conn.cursor(name=f"chatpipe_export_{self._cursors}") as cur:
            cur.itersize = batch
            cur.execute(_select(table, columns, "%s"), (since, until))
            while rows := cur.fetchmany(batch):
                yield rows

    def close(self) -> None:
        self._conn.rollback()
        self._conn.close()


def open_reader(url: str) -> RowReader:
    """A reader of the store named by `url` (`sqlite:///path` or `postgresql://...`); ValueError for
    another scheme, the driver's error when the database cannot be opened."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "sqlite":
        return SqliteReader(sqlite_path(url))
    if scheme in ("postgresql", "postgres"):
        return PostgresReader(url)
    raise ValueError(f"unsupported store URL scheme {scheme!r}: use sqlite:///path or postgresql://...")
