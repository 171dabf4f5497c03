"""The analytics tables (migration 8, both dialects) and the read queries over them. Pure: SQL text only.

Tables (docs/analytics.md describes them for analysts):
- `analytics_messages`: per (subaccount, hour, current channel, country, path) the messages counted once
  in their current outcome (`pending`, `sent`, `delivered`, `read`, `failed`), `final`, and `messages`;
- `analytics_latency`: per (subaccount, hour, channel, country, metric `deliver`|`read`, bucket) a count
  (`sinks.aggregates.latency_bucket`);
- `analytics_errors`: per (subaccount, hour, failed step's channel, country, error code) a count;
- `analytics_inbound`: per (subaccount, hour, channel, country, type, interactive type or '') a count;
- `analytics_window`: per (subaccount, hour of the inbound message, country) WhatsApp inbound messages
  and how many of them were answered inside the 24 h window;
- `analytics_error_codes`: 8x8's meaning of each delivery error code (`sinks.error_codes`), to join;
- `analytics_wa_outbound` (umid, subaccount, keyed hash of the number, first WhatsApp event) and
  `analytics_wa_inbound` (with `answered`): the two sides the window share matches; not for analysts.
What a message contributes is computed from its `messages` and `message_steps` rows
(`sinks.aggregates.contribution_from_rows`), read back (or returned by the DELETE) when a new state
replaces them; migration 9 adds the rows stored before migration 8.

Hours are UTC hour starts: fixed-width ISO text in SQLite (`2026-01-01T10:00:00.000000Z`), timestamptz
in PostgreSQL. A counter row may hold zeros after messages moved away from it; reads ignore them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sinks.error_codes import ERROR_CODES

VIEWS = ("funnel", "fallback", "latency", "errors", "inbound", "window")
GRANULARITIES = ("hour", "day", "total")
GROUPABLE = ("channel", "country")

_KEY = "sub_account_id {t}, hour {ts}, channel {t}, country {t}"


def _ddl(t: str, ts: str, i: str, after: str = "") -> tuple[str, ...]:
    """Migration 8 in a dialect: text type `t`, timestamp type `ts`, integer type `i`, `after` each
    aggregate table (SQLite: WITHOUT ROWID, so a range of one subaccount's hours is read in key order)."""
    key = _KEY.format(t=f"{t} NOT NULL", ts=f"{ts} NOT NULL")
    counters = ", ".join(
        f"{c} {i} NOT NULL DEFAULT 0"
        for c in ("messages", "pending", "sent", "delivered", "read", "failed", "final")
    )
    aggregates = tuple(
        re.sub(r"^CREATE TABLE (analytics_\w+) ", rf"CREATE TABLE \g<1>{suffix} ", sql)
        for suffix in ("", "_daily")
        for sql in (
            f"CREATE TABLE analytics_messages ({key}, path {t} NOT NULL, first_channel {t} NOT NULL,"
            f" steps {i} NOT NULL, {counters},"
            " PRIMARY KEY (sub_account_id, hour, channel, country, path))" + after,
            f"CREATE TABLE analytics_latency ({key}, metric {t} NOT NULL, bucket {i} NOT NULL,"
            f" count {i} NOT NULL DEFAULT 0,"
            " PRIMARY KEY (sub_account_id, hour, channel, country, metric, bucket))" + after,
            f"CREATE TABLE analytics_errors ({key}, error_code {i} NOT NULL, count {i} NOT NULL DEFAULT 0,"
            " PRIMARY KEY (sub_account_id, hour, channel, country, error_code))" + after,
            f"CREATE TABLE analytics_inbound ({key}, type {t} NOT NULL, interactive_type {t} NOT NULL,"
            f" count {i} NOT NULL DEFAULT 0,"
            " PRIMARY KEY (sub_account_id, hour, channel, country, type, interactive_type))" + after,
            f"CREATE TABLE analytics_window (sub_account_id {t} NOT NULL, hour {ts} NOT NULL,"
            f" country {t} NOT NULL, inbound {i} NOT NULL DEFAULT 0, answered {i} NOT NULL DEFAULT 0,"
            " PRIMARY KEY (sub_account_id, hour, country))" + after,
        )
    )
    return (
        *aggregates,
        f"CREATE TABLE analytics_wa_outbound (umid {t} PRIMARY KEY, sub_account_id {t} NOT NULL,"
        f" wa_user {t} NOT NULL, wa_at {ts} NOT NULL)",
        "CREATE INDEX analytics_wa_outbound_user ON analytics_wa_outbound (sub_account_id, wa_user, wa_at)",
        f"CREATE TABLE analytics_wa_inbound (umid {t} PRIMARY KEY, sub_account_id {t} NOT NULL,"
        f" wa_user {t} NOT NULL, ts {ts} NOT NULL, hour {ts} NOT NULL, country {t} NOT NULL,"
        f" answered {i} NOT NULL)",
        "CREATE INDEX analytics_wa_inbound_user ON analytics_wa_inbound (sub_account_id, wa_user, ts)",
        f"CREATE TABLE analytics_error_codes (error_code {i} PRIMARY KEY, reason {t} NOT NULL,"
        f" description {t} NOT NULL)",
        "INSERT INTO analytics_error_codes (error_code, reason, description) VALUES "
        + ", ".join(
            f"({code}, {_literal(r)}, {_literal(d)})" for code, (r, d) in sorted(ERROR_CODES.items())
        ),
    )


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


SQLITE_DDL = _ddl("TEXT", "TEXT", "INTEGER", " WITHOUT ROWID")
POSTGRES_DDL = _ddl("text", "timestamptz", "bigint")
MIGRATION = (8, "analytics aggregates")
#: the aggregates of the rows stored before migration 8, computed by the store in Python
BACKFILL = (9, "analytics aggregates: backfill from the stored rows")

MESSAGE_AGG_COLUMNS: tuple[str, ...] = (
    "sub_account_id", "hour", "channel", "country", "path", "first_channel", "steps",
    "messages", "pending", "sent", "delivered", "read", "failed", "final",
)  # fmt: skip
_COUNTERS = ("messages", "pending", "sent", "delivered", "read", "failed", "final")


def upserts(mark: str) -> dict[str, str]:
    """The `+=` upserts of each aggregate table (hourly `name`, daily `name_daily`), one row per
    execution, with placeholder `mark`."""
    out = {}
    for name, (key, extra, counters) in _ALL_TABLES.items():
        cols = (*key, *extra, *counters)
        sets = ", ".join(f"{c} = analytics_{name}.{c} + excluded.{c}" for c in counters)
        out[name] = (
            f"INSERT INTO analytics_{name} ({', '.join(cols)}) VALUES ({', '.join(mark for _ in cols)})"
            f" ON CONFLICT ({', '.join(key)}) DO UPDATE SET {sets}"
        )
    return out


@dataclass(frozen=True, slots=True)
class Query:
    """One analytics read: a view of one subaccount over the hours `since` <= hour < `until`."""

    view: str
    sub_account_id: str
    since: datetime
    until: datetime
    granularity: str = "day"
    channel: str | None = None
    country: str | None = None
    group_by: tuple[str, ...] = ()
    metric: str = "deliver"

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise ValueError(f"unknown view {self.view!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}")
        for g in self.group_by:
            if g not in GROUPABLE:
                raise ValueError(f"groupBy must name {' or '.join(GROUPABLE)}, got {g!r}")
        if self.metric not in ("deliver", "read"):
            raise ValueError("metric must be deliver or read")


def select(q: Query, mark: str, day: str) -> tuple[str, list[Any]]:
    """The SQL of `q` for a dialect: placeholder `mark`, `day` an expression of `hour` giving the
    start of its UTC day. Rows carry `bucket` (the hour, the day, or NULL), the grouping keys, and
    the summed counters; ordered by bucket then keys."""
    bucket = {"hour": "hour", "day": day, "total": "NULL"}[q.granularity]
    keys: list[str] = []
    if q.view == "funnel":
        table = "analytics_messages"
        keys = list(q.group_by)
        fell_back = 'SUM(CASE WHEN steps > 1 THEN messages ELSE 0 END) AS "fellBack"'
        sums = [*(f"SUM({c}) AS {c}" for c in _COUNTERS), fell_back]
    elif q.view == "fallback":
        table = "analytics_messages"
        keys = ["path", "first_channel", "steps"]
        sums = [f"SUM({c}) AS {c}" for c in _COUNTERS]
    elif q.view == "latency":
        table = "analytics_latency"
        keys = [*q.group_by, "bucket_index"]
        sums = ["SUM(count) AS count"]
    elif q.view == "errors":
        table = "analytics_errors"
        keys = [*q.group_by, "error_code"]
        sums = ["SUM(count) AS count"]
    elif q.view == "inbound":
        table = "analytics_inbound"
        keys = ["channel", "type", "interactive_type"]
        sums = ["SUM(count) AS count"]
    else:
        table = "analytics_window"
        keys = [k for k in q.group_by if k == "country"]
        sums = ["SUM(inbound) AS inbound", "SUM(answered) AS answered"]
    filters, extra = [], []
    if q.view == "latency":
        filters.append(f"metric = {mark}")
        extra.append(q.metric)
    if q.channel is not None and q.view != "window":
        filters.append(f"{'first_channel' if q.view == 'fallback' else 'channel'} = {mark}")
        extra.append(q.channel)
    if q.country is not None:
        filters.append(f"country = {mark}")
        extra.append(q.country)
    more = "".join(f" AND {f}" for f in filters)
    lo, hi = _ceil_day(q.since), _floor_day(q.until)
    if q.granularity != "hour" and lo < hi:
        # whole days from the daily table, the hours before and after them from the hourly one
        source = (
            f"SELECT * FROM {table} WHERE sub_account_id = {mark}"
            f" AND ((hour >= {mark} AND hour < {mark}) OR (hour >= {mark} AND hour < {mark})){more}"
            f" UNION ALL SELECT * FROM {table}_daily WHERE sub_account_id = {mark}"
            f" AND hour >= {mark} AND hour < {mark}{more}"
        )
        params = [q.sub_account_id, q.since, lo, hi, q.until, *extra, q.sub_account_id, lo, hi, *extra]
    else:
        source = (
            f"SELECT * FROM {table} WHERE sub_account_id = {mark} AND hour >= {mark} AND hour < {mark}{more}"
        )
        params = [q.sub_account_id, q.since, q.until, *extra]
    cols = [("bucket AS bucket_index" if k == "bucket_index" else k) for k in keys]
    group = ["1", *(str(i + 2) for i in range(len(keys)))]
    sql = (
        f"SELECT {bucket} AS bucket{''.join(', ' + c for c in cols)}, {', '.join(sums)}"
        f" FROM ({source}) AS src GROUP BY {', '.join(group)} ORDER BY {', '.join(group)}"
    )
    return sql, params


def _floor_day(when: datetime) -> datetime:
    return when.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def _ceil_day(when: datetime) -> datetime:
    day = _floor_day(when)
    return day if day == when else day + timedelta(days=1)


_PG_TIMESTAMPS = frozenset({"hour", "ts", "wa_at"})
_PG_INTEGERS = frozenset(
    {*_COUNTERS, "steps", "bucket", "error_code", "count", "inbound", "answered", "deliver_bucket",
     "read_bucket"}
)  # fmt: skip


def pg_type(column: str) -> str:
    """The PostgreSQL type of an analytics column (for unnest() arrays)."""
    if column in _PG_TIMESTAMPS:
        return "timestamptz"
    return "bigint" if column in _PG_INTEGERS else "text"


_TABLE_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    # table: (key, other columns set on insert, counters added)
    "messages": (
        ("sub_account_id", "hour", "channel", "country", "path"),
        ("first_channel", "steps"),
        _COUNTERS,
    ),
    "latency": (("sub_account_id", "hour", "channel", "country", "metric", "bucket"), (), ("count",)),
    "errors": (("sub_account_id", "hour", "channel", "country", "error_code"), (), ("count",)),
    "inbound": (("sub_account_id", "hour", "channel", "country", "type", "interactive_type"), (), ("count",)),
    "window": (("sub_account_id", "hour", "country"), (), ("inbound", "answered")),
}


_ALL_TABLES = {**_TABLE_COLUMNS, **{f"{n}_daily": spec for n, spec in _TABLE_COLUMNS.items()}}


def daily_rows(name: str, rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Hourly upsert rows of table `name` (`(sub_account_id, hour, ...key, ...extra, ...counters)`)
    rolled up into the rows of its daily table: hours to their UTC day, counters added, zeros dropped."""
    key_len, extra_len, n = (len(x) for x in _TABLE_COLUMNS[name])
    out: dict[tuple[Any, ...], list[Any]] = {}
    for r in rows:
        key = (r[0], r[1].astimezone(UTC).replace(hour=0), *r[2:key_len])
        found = out.get(key)
        if found is None:
            out[key] = [*r[key_len:]]
        else:
            for i in range(extra_len, extra_len + n):
                found[i] += r[key_len + i]
    return [(*k, *v) for k, v in sorted(out.items()) if any(v[extra_len:])]


def pg_unnest_upserts() -> dict[str, str]:
    """The `+=` upserts of each aggregate table for PostgreSQL, one statement per batch and table: each
    column's values as one array parameter (binary: `%b`), `unnest`ed into the hourly table, and the
    same rows rolled up by the server into the daily table (what `daily_rows` computes: hours to their
    UTC day, counters added, zero rows dropped; in key order, as the hourly rows come)."""
    out = {}
    for name, (key, extra, counters) in _TABLE_COLUMNS.items():
        cols = (*key, *extra, *counters)
        arrays = ", ".join(f"%b::{pg_type(c)}[]" for c in cols)
        sets = ", ".join(f"{c} = t.{c} + excluded.{c}" for c in counters)
        conflict = f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {sets}"
        day_key = ["sub_account_id", "date_trunc('day', hour, 'UTC')", *key[2:]]
        sums = [f"sum({c})::bigint" for c in counters]
        # the columns set on insert (`extra`) are functions of the key: any value of the group will do
        out[name] = (
            f"WITH r ({', '.join(cols)}) AS (SELECT * FROM unnest({arrays})),"
            f" h AS (INSERT INTO analytics_{name} AS t ({', '.join(cols)}) SELECT * FROM r {conflict})"
            f" INSERT INTO analytics_{name}_daily AS t ({', '.join(cols)})"
            f" SELECT {', '.join([*day_key, *(f'min({c})' for c in extra), *sums])} FROM r"
            f" GROUP BY {', '.join(str(i + 1) for i in range(len(key)))}"
            f" HAVING {' OR '.join(f'{x} <> 0' for x in sums)}"
            f" ORDER BY {', '.join(str(i + 1) for i in range(len(key)))} {conflict}"
        )
    return out
