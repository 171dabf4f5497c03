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
  `analytics_wa_inbound` (with `answered`): the two sides the window share matches; not for analysts
  (PostgreSQL's migration 10 moves the first into `messages.wa_at`).
What a message contributes is computed from its `messages` and `message_steps` rows
(`sinks.aggregates.contribution_from_rows`), read back (or returned by the DELETE) when a new state
replaces them; migration 9 adds the rows stored before migration 8, in bounded batches (`BACKFILL`),
computing them in SQL (`facts`).

Hours are UTC hour starts: fixed-width ISO text in SQLite (`2026-01-01T10:00:00.000000Z`), timestamptz
in PostgreSQL. A counter row may hold zeros after messages moved away from it; reads ignore them.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sinks import aggregates as A
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
#: the aggregates of the rows stored before migration 8, counted by the store in bounded batches (one
#: transaction each): messages by umid, then inbound messages by umid; the position in `analytics_backfill`
#: (source -> the last umid counted, or BACKFILL_DONE), emptied when migration 9 is recorded
BACKFILL = (9, "analytics aggregates: backfill from the stored rows")
BACKFILL_DONE = "\U0010ffff"  # after every umid: the messages are all counted
BACKFILL_PROGRESS_DDL = (
    "CREATE TABLE IF NOT EXISTS analytics_backfill (source TEXT PRIMARY KEY, after TEXT NOT NULL)"
)

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


# --- contributions in SQL: migration 9's backfill ------------------------------------------------
#
# What `sinks.aggregates.contribution_from_rows` computes in Python, computed by the database over stored
# rows, so that counting a large store costs no Python work per message (migration 9's batches: the
# stores' `_maintain_sql`). One row of "facts" per message: (umid, sign, sub_account_id, hour, channel,
# country, path, outcome, final, deliver_us, read_us, wa_user, wa_at, plain), `sign` +1 (-1 would take a
# message away); the aggregate deltas are their signed sums. The SQL reproduces the Python definition
# exactly for "plain" messages: every character of their step channels, last step country and number in
# U+0001..U+007F (ASCII without NUL), where lower(), upper(), trim() and substr() of both databases agree
# with Python's str methods. A message that is not plain is left out of the SQL and counted by the Python
# definition instead (`plain` is 0; the stores call `contribution_from_tuples` for it): exact for every
# input. The write path does not use it: measured on `bench/sinks.py`, reading a batch's rows back costs
# the database more than `contribution` costs Python (docs/analytics.md, "Cost and speed").
# tests/integration/test_analytics_sql.py checks SQL against Python on generated rows in both databases.

#: the ASCII characters str.strip() removes (str.isspace), for SQL's trim
ASCII_WHITESPACE = "".join(c for c in map(chr, range(128)) if c.isspace())
OUTCOME_INDEX: dict[str, int] = {o: i for i, o in enumerate(A.OUTCOMES)}  # facts' `outcome` column
FACT_COLUMNS: tuple[str, ...] = (
    "umid", "sign", "sub_account_id", "hour", "channel", "country", "path", "outcome", "final",
    "deliver_us", "read_us", "wa_user", "wa_at", "plain",
)  # fmt: skip
ERROR_FACT_COLUMNS: tuple[str, ...] = ("umid", "sign", "channel", "error_code")


def _threshold_us(lower: float) -> int:
    """The least whole number of microseconds `d` with `d / 10**6 >= lower`: `timedelta.total_seconds()`
    is that (correctly rounded) division, so a duration of `d` µs falls in bucket
    `#{i : d >= LATENCY_THRESHOLDS_US[i - 1]}` exactly as `latency_bucket(total_seconds())` says."""
    d = math.floor(lower * 10**6)
    while d / 10**6 >= lower:
        d -= 1
    while not d / 10**6 >= lower:
        d += 1
    return d


#: integer lower bounds (µs) of buckets 1..LAST_BUCKET (`_threshold_us`)
LATENCY_THRESHOLDS_US: tuple[int, ...] = tuple(
    _threshold_us(A.bucket_bounds(i)[0]) for i in range(1, A.LAST_BUCKET + 1)
)


def bucket_of_us(d: int) -> int:
    """`latency_bucket(d / 10**6)` by the integer thresholds (what the SQL computes)."""
    return bisect.bisect_right(LATENCY_THRESHOLDS_US, d)


def _sqlite_bucket(x: str, lo: int = 0, hi: int = A.LAST_BUCKET) -> str:
    """SQLite: how many thresholds are <= {x} (a binary search as nested CASEs: ~7 comparisons)."""
    if lo == hi:
        return str(lo)
    mid = (lo + hi) // 2
    return (
        f"CASE WHEN {x} < {LATENCY_THRESHOLDS_US[mid]} THEN {_sqlite_bucket(x, lo, mid)}"
        f" ELSE {_sqlite_bucket(x, mid + 1, hi)} END"
    )


def _sql_text(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


_FAILURES = ", ".join(_sql_text(s) for s in sorted(A.FAILURE_STATES))
_OUTCOME_SQL = (
    "CASE {state} "
    + " ".join(f"WHEN {_sql_text(s)} THEN {OUTCOME_INDEX[o]}" for s, o in sorted(A.OUTCOME.items()))
    + " ELSE 0 END"
)


@dataclass(frozen=True, slots=True)
class Dialect:
    """The SQL spellings that differ between the two databases (templates of `{x}` and friends)."""

    name: str
    lower: str  # ASCII lower case
    upper: str  # ASCII upper case
    trim: str  # str.strip() of ASCII whitespace
    plain: str  # true when every character is in U+0001..U+007F
    hour: str  # the UTC hour start of a stored timestamp
    day: str  # the UTC day start of a stored hour
    micros: str  # the duration from stored timestamp {b} to {a} (PostgreSQL: an interval; SQLite: µs)
    calling_code: str  # ISO code of calling code {x}, NULL when unlisted
    first_channel: str  # path.split('>', 1)[0]
    umids: str  # membership of column {x} in the batch's umid parameter
    collate: str  # appended to text keys when ordering like Python (code points)

    def bucket(self, x: str) -> str:
        """The latency bucket of duration {x} (`micros`): how many thresholds it reaches."""
        if self.name == "postgresql":  # intervals compare exactly, in whole microseconds
            bounds = ",".join(f'"{t} microseconds"' for t in LATENCY_THRESHOLDS_US)
            return f"width_bucket({x}, '{{{bounds}}}'::interval[])"
        return _sqlite_bucket(x)


_CODES_JSON = json.dumps(A.CALLING_CODES, sort_keys=True, separators=(",", ":"))
PG = Dialect(
    name="postgresql",
    lower='lower({x} COLLATE "C")',
    upper='upper({x} COLLATE "C")',
    trim="btrim({x}, " + "E'" + "".join(f"\\x{ord(c):02x}" for c in ASCII_WHITESPACE) + "')",
    plain="({x} ~ '^[\\x01-\\x7f]*$')",
    # date_bin from an origin before any Python datetime: integer arithmetic on UTC microseconds
    hour="date_bin('1 hour', {x}, TIMESTAMPTZ '0001-01-01 00:00:00+00')",
    day="date_bin('1 day', {x}, TIMESTAMPTZ '0001-01-01 00:00:00+00')",
    micros="({a} - {b})",
    calling_code=f"('{_CODES_JSON}'::jsonb ->> {{x}})",
    first_channel="split_part({x}, '>', 1)",
    umids="{x} = ANY(%(umids)b)",
    collate=' COLLATE "C"',
)
SQLITE = Dialect(
    name="sqlite",
    lower="lower({x})",
    upper="upper({x})",
    trim="trim({x}, char(" + ", ".join(str(ord(c)) for c in ASCII_WHITESPACE) + "))",
    plain="(length(CAST({x} AS BLOB)) = length({x}))",
    hour="(substr({x}, 1, 14) || '00:00.000000Z')",
    day="(substr({x}, 1, 11) || '00:00:00.000000Z')",
    micros=(
        "((unixepoch(substr({a}, 1, 19)) - unixepoch(substr({b}, 1, 19))) * 1000000"
        " + CAST(substr({a}, 21, 6) AS INTEGER) - CAST(substr({b}, 21, 6) AS INTEGER))"
    ),
    calling_code="(SELECT iso FROM temp.agg_calling_codes WHERE code = {x})",
    first_channel="substr({x}, 1, instr({x} || '>', '>') - 1)",
    umids="{x} IN (SELECT value FROM json_each(:umids))",
    collate="",
)
#: SQLite: the calling codes as a temp table (`Dialect.calling_code`), made once per connection
SQLITE_CALLING_CODES = (
    "CREATE TEMP TABLE IF NOT EXISTS agg_calling_codes (code TEXT PRIMARY KEY, iso TEXT NOT NULL)"
    " WITHOUT ROWID",
    "INSERT OR REPLACE INTO temp.agg_calling_codes (code, iso) VALUES "
    + ", ".join(f"({_sql_text(c)}, {_sql_text(i)})" for c, i in sorted(A.CALLING_CODES.items())),
)


def _f(template: str, **kw: str) -> str:
    """`template` with each `{name}` replaced (not str.format: the templates hold JSON braces)."""
    for name, value in kw.items():
        template = template.replace("{" + name + "}", value)
    return template


def _country(d: Dialect, country: str, number: str) -> str:
    """`country_of(country, number)` (for plain values): the details API's country stripped, upper-cased,
    at most 8 characters; else the calling code of the number's first 4 characters (`+` skipped)."""
    digits = (
        f"(CASE WHEN substr({number}, 1, 1) = '+' THEN substr({number}, 2, 3)"
        f" ELSE substr({number}, 1, 4) END)"
    )
    lookups = ", ".join(_f(d.calling_code, x=f"substr({digits}, 1, {n})") for n in (1, 2, 3))
    stripped = _f(d.upper, x=_f(d.trim, x=country))
    return (
        f"(CASE WHEN {country} <> '' THEN coalesce(nullif(substr({stripped}, 1, 8), ''), 'unknown')"
        f" WHEN {number} IS NULL OR {number} = '' THEN 'unknown'"
        f" ELSE coalesce({lookups}, 'unknown') END)"
    )


def facts(d: Dialect, messages: str, steps: str, sign: int) -> str:
    """SELECT of the facts (FACT_COLUMNS) of the messages in tables `messages` / `steps` (`messages` and
    `message_steps`, or the temp tables holding replaced rows) whose umid is in the `umids` parameter.
    One pass over the steps in (umid, step) order: window aggregates over each message's steps up to the
    current one, read at its last step (no later step), where they cover them all, in step order."""
    ch = _f(d.lower, x="channel")
    agg = "string_agg" if d.name == "postgresql" else "group_concat"
    steps_summary = (
        f"SELECT umid, {ch} AS channel, country, first_value(first_event_at) OVER w AS first_at,"
        # (SQLite's group_concat of nothing but '' is NULL)
        f" coalesce({agg}({ch}, '>') OVER w, '') AS path,"
        f" min(first_event_at) FILTER (WHERE {ch} = 'whatsapp') OVER w AS wa_at,"
        f" lead(step) OVER w AS next"
        f" FROM {steps} WHERE {_f(d.umids, x='umid')} WINDOW w AS (PARTITION BY umid ORDER BY step)"
    )
    number = "coalesce(nullif(m.msisdn, ''), m.msisdn_masked)"
    # PostgreSQL: the messages scan filtered by the umids too (an index scan, never a whole-table join)
    also = f" AND {_f(d.umids, x='m.umid')}" if d.name == "postgresql" else ""
    both = "m.delivered_at IS NOT NULL AND m.first_sent_at IS NOT NULL"
    plain_text = f"(s.path || coalesce(s.country, '') || coalesce({number}, ''))"
    return (
        f"SELECT m.umid, {sign} AS sign, m.sub_account_id, {_f(d.hour, x='s.first_at')} AS hour,"
        f" s.channel, {_country(d, 's.country', number)} AS country,"
        f" s.path, {_f(_OUTCOME_SQL, state='m.state')} AS outcome,"
        f" CASE WHEN m.final THEN 1 ELSE 0 END AS final,"
        f" CASE WHEN {both} THEN {_f(d.micros, a='m.delivered_at', b='m.first_sent_at')} END AS deliver_us,"
        f" CASE WHEN {both} AND m.read_at IS NOT NULL THEN {_f(d.micros, a='m.read_at', b='m.delivered_at')}"
        f" END AS read_us,"
        f" CASE WHEN s.wa_at IS NOT NULL THEN m.msisdn_hash END AS wa_user, s.wa_at,"
        f" CASE WHEN {_f(d.plain, x=plain_text)} THEN 1 ELSE 0 END AS plain"
        f" FROM ({steps_summary}) AS s JOIN {messages} m ON m.umid = s.umid"
        f" WHERE s.next IS NULL{also}"
    )


def error_facts(d: Dialect, steps: str, sign: int) -> str:
    """SELECT of the error facts (ERROR_FACT_COLUMNS): one row per failed step with an error code."""
    return (
        f"SELECT umid, {sign} AS sign, {_f(d.lower, x='channel')} AS channel, error_code FROM {steps}"
        f" WHERE {_f(d.umids, x='umid')} AND error_code IS NOT NULL AND state IN ({_FAILURES})"
    )


def _nonzero(cols: Sequence[str]) -> str:
    return "(" + " OR ".join(f"{c} <> 0" for c in cols) + ")"


def delta_selects(d: Dialect, f: str, e: str) -> dict[str, str]:
    """Per aggregate table, the SELECT of its hourly delta rows (its columns: key, extra, counters; zero
    rows left out) from the facts relation `f` and the error facts relation `e` (plain messages only)."""
    counters = (
        ["sum(sign) AS messages"]
        + [f"sum(CASE WHEN outcome = {i} THEN sign ELSE 0 END) AS {o}" for o, i in OUTCOME_INDEX.items()]
        + ["sum(final * sign) AS final"]
    )
    key = "sub_account_id, hour, channel, country"
    messages = (
        f"SELECT {key}, path, {_f(d.first_channel, x='path')} AS first_channel,"
        f" length(path) - length(replace(path, '>', '')) + 1 AS steps, {', '.join(counters)}"
        f" FROM {f} GROUP BY {key}, path"
    )
    latency = " UNION ALL ".join(
        f"SELECT {key}, '{metric}' AS metric, {d.bucket(col)} AS bucket, sum(sign) AS count FROM {f}"
        f" WHERE {col} IS NOT NULL GROUP BY 1, 2, 3, 4, 6"
        for metric, col in (("deliver", "deliver_us"), ("read", "read_us"))
    )
    errors = (
        f"SELECT g.sub_account_id, g.hour, e.channel, g.country, e.error_code, sum(e.sign) AS count"
        f" FROM {e} e JOIN {f} g ON g.umid = e.umid AND g.sign = e.sign"
        f" GROUP BY g.sub_account_id, g.hour, e.channel, g.country, e.error_code"
    )
    return {
        name: f"SELECT * FROM ({sql}) AS s WHERE {_nonzero(_TABLE_COLUMNS[name][2])}"
        for name, sql in (("messages", messages), ("latency", latency), ("errors", errors))
    }


def _order(d: Dialect, cols: Sequence[str]) -> str:
    """ORDER BY of key columns in Python's order (text by code point): every writer locks rows in it."""
    return ", ".join(f"{c}{d.collate}" if c not in ("hour", "bucket", "error_code") else c for c in cols)


def upsert_from(d: Dialect, name: str, source: str, *, daily: bool) -> str:
    """INSERT ... SELECT of hourly delta rows `source` (a relation with the table's columns) into table
    `name` (`daily`: rolled up into `name`_daily), adding the counters on conflict, in key order."""
    key, extra, counters = _TABLE_COLUMNS[name]
    cols = (*key, *extra, *counters)
    table = f"analytics_{name}{'_daily' if daily else ''}"
    sets = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in counters)
    if daily:
        sums = [f"sum({c})" + ("::bigint" if d.name == "postgresql" else "") for c in counters]
        select = (
            f"SELECT sub_account_id, {_f(d.day, x='hour')} AS hour, {', '.join(key[2:])},"
            f" {''.join(f'min({c}) AS {c}, ' for c in extra)}"
            f"{', '.join(f'{s} AS {c}' for s, c in zip(sums, counters, strict=True))}"
            f" FROM {source} GROUP BY sub_account_id, {_f(d.day, x='hour')}, {', '.join(key[2:])}"
            f" HAVING {_nonzero(sums)}"
        )
        select = f"SELECT * FROM ({select}) AS r WHERE true ORDER BY {_order(d, key)}"
    else:
        select = f"SELECT {', '.join(cols)} FROM {source} WHERE true ORDER BY {_order(d, key)}"
    conflict = f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {sets}"
    return f"INSERT INTO {table} ({', '.join(cols)}) {select} {conflict}"
