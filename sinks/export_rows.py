"""Which rows of the store's tables a time range selects, for `Store.stream` (`chatpipe export`). Pure.

The table specs (`TABLES`: name, columns, primary-key order, the time a range selects on) and the SQL
text both dialects run (`select_sql`, `count_sql`); the dialects (`sinks.sqlite`, `sinks.postgres`) read
the rows on a read-only connection of their own, in constant memory. The column lists are those of
`sinks.rows` (the single list both dialects write).

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

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sinks import rows as R
from sinks.rows import PiiPolicy

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


def _where(table: Table, mark: str) -> str:
    where = f"{table.time_expr} >= {mark} AND {table.time_expr} < {mark}"
    return f"{where} AND {table.where}" if table.where else where


def select_sql(table: Table, columns: Sequence[str], mark: str) -> str:
    cols = ", ".join(f"t.{c}" for c in columns)
    order = ", ".join(f"t.{c}" for c in table.order)
    return f"SELECT {cols} FROM {table.sql_name} t WHERE {_where(table, mark)} ORDER BY {order}"


def count_sql(table: Table, mark: str) -> str:
    return f"SELECT count(*) FROM {table.sql_name} t WHERE {_where(table, mark)}"


def converters(table: Table, columns: Sequence[str]) -> list[tuple[int, Kind]]:
    """(index, kind) of the `columns` SQLite answers untyped (timestamps as text, booleans as 0/1)."""
    kinds = [(i, table.kind(c)) for i, c in enumerate(columns)]
    return [(i, k) for i, k in kinds if k in ("timestamp", "bool")]


def typed(row: tuple[Any, ...], convert: list[tuple[int, Kind]]) -> tuple[Any, ...]:
    """A SQLite row with the `converters` columns typed (aware UTC datetimes, bools)."""
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
