"""sinks.analytics_sql, the analytics tables' SQL text and its pure helpers: queries are validated, every
placeholder gets its parameter, whole days come from the daily tables and the rest of the range from the
hourly ones with nothing counted twice or left out, and `daily_rows` rolls hours up as the daily tables
keep them. The SQL's results are checked on real stores in tests/integration/sinks/test_analytics_store.py."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sinks.analytics_sql import (
    GRANULARITIES,
    GROUPABLE,
    VIEWS,
    Query,
    daily_rows,
    pg_type,
    pg_unnest_upserts,
    select,
    upserts,
)

T0 = datetime(2026, 6, 1, tzinfo=UTC)
DAY = "substr(hour, 1, 10)"

hours = st.integers(min_value=0, max_value=24 * 10).map(lambda h: T0 + timedelta(hours=h))
queries = st.builds(
    Query,
    view=st.sampled_from(VIEWS),
    sub_account_id=st.just("acme-01"),
    since=hours,
    until=hours,
    granularity=st.sampled_from(GRANULARITIES),
    channel=st.none() | st.just("whatsapp"),
    country=st.none() | st.just("SG"),
    group_by=st.lists(st.sampled_from(GROUPABLE), unique=True).map(tuple),
    metric=st.sampled_from(["deliver", "read"]),
)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"view": "nope"}, "unknown view"),
        ({"granularity": "week"}, "granularity must be one of hour, day, total"),
        ({"group_by": ("path",)}, "groupBy must name channel or country, got 'path'"),
        ({"metric": "sent"}, "metric must be deliver or read"),
    ],
)
def test_a_query_out_of_its_vocabulary_is_refused(kw: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"view": "funnel", "sub_account_id": "a", "since": T0, "until": T0, **kw}
    with pytest.raises(ValueError, match=message):
        Query(**args)


@given(queries)
def test_every_placeholder_has_its_parameter_and_the_subaccount_is_always_a_filter(q: Query) -> None:
    sql, params = select(q, "?", DAY)
    assert sql.count("?") == len(params)
    assert sql.count("sub_account_id = ?") == params.count("acme-01") >= 1
    assert ("?" in sql) and "acme-01" not in sql  # values only as parameters


@given(queries)
def test_the_range_is_split_into_whole_days_and_the_hours_around_them_without_overlap(q: Query) -> None:
    sql, params = select(q, "?", DAY)
    times = [p for p in params if isinstance(p, datetime)]
    if "_daily" not in sql:
        assert times == [q.since, q.until]
        return
    assert q.granularity != "hour"
    since, lo, hi, until, lo2, hi2 = times
    assert (since, until, lo2, hi2) == (q.since, q.until, lo, hi)
    # hourly [since, lo) + daily [lo, hi) + hourly [hi, until): the query's range, each hour once
    assert since <= lo < hi <= until
    for edge in (lo, hi):
        assert edge.utcoffset() == timedelta(0)
        assert edge == edge.replace(hour=0, minute=0, second=0, microsecond=0)
    assert lo - since < timedelta(days=1) and until - hi < timedelta(days=1)


def test_hour_granularity_never_reads_the_daily_tables() -> None:
    q = Query("funnel", "a", T0 - timedelta(days=3), T0 + timedelta(days=3), granularity="hour")
    sql, _ = select(q, "?", DAY)
    assert "_daily" not in sql and sql.startswith("SELECT hour AS bucket")


@pytest.mark.parametrize(
    ("view", "table"),
    [
        ("funnel", "analytics_messages"),
        ("fallback", "analytics_messages"),
        ("latency", "analytics_latency"),
        ("errors", "analytics_errors"),
        ("inbound", "analytics_inbound"),
        ("window", "analytics_window"),
    ],
)
def test_each_view_reads_its_table(view: str, table: str) -> None:
    sql, _ = select(Query(view, "a", T0, T0 + timedelta(days=2), granularity="total"), "%s", "x")
    assert f"FROM {table} " in sql and f"FROM {table}_daily " in sql and "%s" in sql


def test_upserts_add_counters_on_conflict_for_every_hourly_and_daily_table() -> None:
    statements = upserts("?")
    assert set(statements) == {
        f"{n}{d}" for n in ("messages", "latency", "errors", "inbound", "window") for d in ("", "_daily")
    }
    for name, sql in statements.items():
        cols = sql[sql.index("(") + 1 : sql.index(")")].split(", ")
        assert sql.count("?") == len(cols)
        assert f"INSERT INTO analytics_{name} (" in sql and " ON CONFLICT (sub_account_id, hour" in sql
    assert "count = analytics_errors.count + excluded.count" in statements["errors"]
    assert "answered = analytics_window_daily.answered + excluded.answered" in statements["window_daily"]


def test_postgres_unnest_upserts_have_one_typed_array_per_column() -> None:
    for name, sql in pg_unnest_upserts().items():
        cols = sql[sql.index("r (") + 3 : sql.index(")")].split(", ")
        assert sql.count("%b::") == len(cols)
        assert f"INSERT INTO analytics_{name} AS t" in sql
        assert f"INSERT INTO analytics_{name}_daily AS t" in sql
    assert "%b::timestamptz[]" in pg_unnest_upserts()["errors"]
    assert [pg_type(c) for c in ("hour", "count", "error_code", "channel")] == [
        "timestamptz",
        "bigint",
        "bigint",
        "text",
    ]


# --- daily_rows: the hourly rows rolled up --------------------------------------------------------

error_rows = st.lists(
    st.tuples(
        st.sampled_from(["a", "b"]),
        hours,
        st.sampled_from(["sms", "whatsapp"]),
        st.just("SG"),
        st.sampled_from([1018, 1022]),
        st.integers(-3, 3),
    ),
    max_size=40,
)


@given(error_rows)
def test_daily_rows_sum_each_days_counters_and_drop_zeros(rows: list[tuple[Any, ...]]) -> None:
    expected: dict[tuple[Any, ...], int] = defaultdict(int)
    for sub, hour, channel, country, code, count in rows:
        expected[(sub, hour.replace(hour=0), channel, country, code)] += count
    got = daily_rows("errors", rows)
    assert got == sorted((*k, v) for k, v in expected.items() if v != 0)


def test_daily_rows_keep_the_columns_set_on_insert_and_add_every_counter() -> None:
    h = T0 + timedelta(hours=5)
    rows = [
        ("a", h, "sms", "SG", "whatsapp>sms", "whatsapp", 2, 1, 0, 1, 0, 0, 0, 1),
        ("a", h + timedelta(hours=3), "sms", "SG", "whatsapp>sms", "whatsapp", 2, 1, 0, 0, 1, 0, 0, 1),
        ("a", h + timedelta(days=1), "sms", "SG", "whatsapp>sms", "whatsapp", 2, 1, 1, 0, 0, 0, 0, 0),
        ("a", h + timedelta(days=1), "sms", "SG", "whatsapp>sms", "whatsapp", 2, -1, -1, 0, 0, 0, 0, 0),
    ]
    day = [("a", T0, "sms", "SG", "whatsapp>sms", "whatsapp", 2, 2, 0, 1, 1, 0, 0, 2)]  # the next day: zeros
    assert daily_rows("messages", rows) == day
