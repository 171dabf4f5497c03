"""sinks.aggregates: contributions, deltas, histograms, percentiles. Pure, no I/O."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.models import MessageState, StatusEvent, Step, User
from sinks import aggregates as A
from sinks.analytics_sql import Query, select
from sinks.rows import PiiPolicy, state_rows

T0 = datetime(2026, 1, 1, 10, 30, tzinfo=UTC)

durations = st.floats(min_value=-10.0, max_value=1e9, allow_nan=False)
histograms = st.dictionaries(st.integers(0, A.LAST_BUCKET), st.integers(1, 50), max_size=12)

contributions = st.builds(
    A.NamedContribution,
    sub_account_id=st.sampled_from(["s1", "s2"]),
    hour=st.sampled_from([T0.replace(minute=0), T0.replace(hour=11, minute=0)]),
    channel=st.sampled_from(["whatsapp", "sms"]),
    country=st.sampled_from(["SG", "unknown"]),
    path=st.sampled_from(["whatsapp", "whatsapp>sms", "sms"]),
    outcome=st.sampled_from(A.OUTCOMES),
    final=st.booleans(),
    deliver_bucket=st.none() | st.integers(0, A.LAST_BUCKET),
    read_bucket=st.none() | st.integers(0, A.LAST_BUCKET),
    errors=st.lists(
        st.tuples(st.sampled_from(["whatsapp", "sms"]), st.sampled_from([1018, 41])), max_size=2
    ).map(tuple),
    user=st.none() | st.just("h1"),
    whatsapp_at=st.none() | st.just(T0),
)


# --- histograms --------------------------------------------------------------------------------


@given(durations)
def test_a_duration_falls_inside_its_bucket(seconds: float) -> None:
    b = A.latency_bucket(seconds)
    lower, upper = A.bucket_bounds(b)
    assert 0 <= b <= A.LAST_BUCKET
    if b == 0:
        assert seconds < 1.0
    else:
        assert lower <= seconds and (upper is None or seconds < upper)


@given(durations, durations)
def test_buckets_keep_the_order_of_durations(a: float, b: float) -> None:
    if a <= b:
        assert A.latency_bucket(a) <= A.latency_bucket(b)


def test_buckets_are_log_spaced_about_19_percent_wide() -> None:
    assert A.latency_bucket(0.5) == 0
    assert A.latency_bucket(1.0) == 1
    assert A.latency_bucket(2.0) == 5
    assert A.latency_bucket(60.0) == 1 + math.floor(4 * math.log2(60))
    assert A.latency_bucket(math.inf) == A.LAST_BUCKET
    for i in range(1, A.LAST_BUCKET):
        lower, upper = A.bucket_bounds(i)
        assert upper == pytest.approx(lower * 2**0.25)


@given(histograms, histograms, histograms)
def test_merging_histograms_is_associative_and_commutative(a: dict, b: dict, c: dict) -> None:
    assert A.merge_histograms(A.merge_histograms(a, b), c) == A.merge_histograms(a, A.merge_histograms(b, c))
    assert A.merge_histograms(a, b) == A.merge_histograms(b, a)


@given(st.lists(durations, min_size=1, max_size=200), st.sampled_from([0.5, 0.9, 0.99, 1.0]))
def test_a_percentile_is_the_bucket_holding_the_true_rank(values: list[float], p: float) -> None:
    hist: dict[int, int] = {}
    for v in values:
        b = A.latency_bucket(v)
        hist[b] = hist.get(b, 0) + 1
    found = A.percentile(hist, p)
    assert found is not None
    true = sorted(values)[math.ceil(p * len(values)) - 1]
    assert found.bucket == A.latency_bucket(true)
    assert found.lower <= max(true, 0.0) and (found.upper is None or true < found.upper)


@given(st.lists(st.lists(durations, max_size=30), min_size=1, max_size=5))
def test_percentiles_of_merged_histograms_equal_those_of_all_the_durations(parts: list[list[float]]) -> None:
    def hist(vs: list[float]) -> dict[int, int]:
        h: dict[int, int] = {}
        for v in vs:
            h[A.latency_bucket(v)] = h.get(A.latency_bucket(v), 0) + 1
        return h

    merged = A.merge_histograms(*(hist(p) for p in parts))
    assert merged == A.merge_histograms(hist([v for p in parts for v in p]))
    assert A.percentile(merged, 0.9) == A.percentile(hist([v for p in parts for v in p]), 0.9)


def test_an_empty_histogram_has_no_percentile() -> None:
    assert A.percentile({}, 0.5) is None
    with pytest.raises(ValueError):
        A.percentile({1: 1}, 0)


# --- deltas ------------------------------------------------------------------------------------


@given(contributions)
def test_re_applying_the_same_state_changes_nothing(c: A.Contribution) -> None:
    d = A.Deltas()
    d.add(c)
    before = (dict(d.messages), dict(d.latency), dict(d.errors))
    d.change(c, c)
    assert (d.messages, d.latency, d.errors) == before


@given(
    st.dictionaries(st.sampled_from("abcdef"), st.lists(contributions | st.none(), min_size=1, max_size=6))
)
def test_a_message_counts_once_in_its_current_state_whatever_its_versions(
    histories: dict[str, list[A.Contribution | None]],
) -> None:
    """Applying every version of every message as `new - old` (including repeats) equals the totals of
    the current contributions alone."""
    d = A.Deltas()
    current: dict[str, A.Contribution | None] = {}
    for umid, versions in histories.items():
        for c in versions:
            d.change(current.get(umid), c)
            current[umid] = c
            d.change(current[umid], c)  # a redelivery of the same version
    expected = A.totals(current.values())
    assert (d.messages, d.latency, d.errors) == (expected.messages, expected.latency, expected.errors)
    # the stores' batch form: Changes counts the aggregated parts and expands them once
    changes, now = A.Changes(), {}
    for umid, versions in histories.items():
        for c in versions:
            changes.record(umid, now.get(umid), c)
            now[umid] = c
    got = changes.deltas()
    assert (got.messages, got.latency, got.errors) == (expected.messages, expected.latency, expected.errors)
    sends = {
        (c.sub_account_id, c.user, c.whatsapp_at) for c in now.values() if c and c.user and c.whatsapp_at
    }
    assert {o[1:] for o in changes.outbound} >= sends


@given(st.lists(st.tuples(contributions | st.none(), contributions | st.none()), max_size=8))
def test_counting_new_messages_in_bulk_equals_recording_each(pairs: list[tuple[Any, Any]]) -> None:
    """`Changes.record_new` (the stores' bulk form for messages without an old contribution) changes
    exactly what `record(umid, None, new)` of each does, also after other changes of the batch."""
    umids = [f"u{i}" for i in range(len(pairs))]
    one, bulk = A.Changes(), A.Changes()
    for umid, (old, _) in zip(umids, pairs, strict=True):
        one.record(umid + "-old", old, None)
        bulk.record(umid + "-old", old, None)
    for umid, (_, new) in zip(umids, pairs, strict=True):
        one.record(umid, None, new)
    bulk.record_new(umids, [new for _, new in pairs])
    assert {k: n for k, n in bulk.counts.items() if n} == {k: n for k, n in one.counts.items() if n}
    assert (bulk.gone, bulk.outbound, bulk.rewindow) == (one.gone, one.outbound, one.rewindow)


@given(st.lists(st.tuples(contributions | st.none(), contributions | st.none()), max_size=8))
def test_noting_changes_and_settling_them_counts_what_recording_each_does(
    pairs: list[tuple[Any, Any]],
) -> None:
    """`Changes.note` then `settle` (SQLite's form: messages without an old contribution counted in
    bulk at the end) counts what `record` of each message does."""
    one, noted = A.Changes(), A.Changes()
    for i, (old, new) in enumerate(pairs):
        one.record(f"u{i}", old, new)
        noted.note(f"u{i}", old, new)
    noted.settle()
    assert {k: n for k, n in noted.counts.items() if n} == {k: n for k, n in one.counts.items() if n}
    assert sorted(noted.rewindow) == sorted(one.rewindow)
    assert sorted(noted.outbound) == sorted(one.outbound) and noted.gone == one.gone
    assert not noted.fresh and not noted.fresh_umids


@given(contributions, contributions)
def test_taking_a_contribution_away_undoes_it(a: A.Contribution, b: A.Contribution) -> None:
    d = A.Deltas()
    d.add(a)
    d.change(a, b)
    d.change(b, a)
    d.add(a, -1)
    assert not d


# --- contributions of real states --------------------------------------------------------------


def _step(n: int, channel: str, events: list[tuple[str, int]], code: int | None = None, **kw: object) -> Step:
    hist = tuple(StatusEvent(s, T0 + timedelta(seconds=t), error_code=code) for s, t in events)
    last = hist[-1]
    sent = [e.timestamp for e in hist if e.state in ("sent", "delivered", "read")]
    return Step(
        step=n, channel=channel, state=last.state, status_timestamp=last.timestamp,
        first_event_at=hist[0].timestamp, error_code=last.error_code, history=hist,
        sent_at=min(sent) if sent else None, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def _state(steps: tuple[Step, ...], **kw: object) -> MessageState:
    last = steps[-1]
    return MessageState(
        umid="u-1", sub_account_id="sub", version=1, state=last.state, status_timestamp=last.status_timestamp,
        steps=steps, updated_at=T0, user=User(msisdn="+6581234567"), **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_a_fallback_message_counts_in_its_last_channel_with_its_path_latency_and_errors() -> None:
    wa = _step(1, "whatsapp", [("sent", 0), ("undelivered", 30)], code=1018)
    sms = _step(2, "sms", [("sent", 3700), ("delivered", 3710)])
    s = _state(
        (wa, sms),
        first_sent_at=T0,
        delivered_at=T0 + timedelta(seconds=3710),
        final=True,
    )
    c = A.contribution(s, "+658123xxxx", "h")
    assert c == A.NamedContribution(
        sub_account_id="sub", hour=T0.replace(minute=0), channel="sms", country="SG", path="whatsapp>sms",
        outcome="delivered", final=True, deliver_bucket=A.latency_bucket(3710), read_bucket=None,
        errors=(("whatsapp", 1018),), user="h", whatsapp_at=T0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("state", "outcome"),
    [("queued", "pending"), ("accepted", "pending"), ("unknown", "pending"), ("sent", "sent"),
     ("delivered", "delivered"), ("read", "read"), ("undelivered", "failed"), ("rejected", "failed"),
     ("failed", "failed"), ("error", "failed")],
)  # fmt: skip
def test_outcomes(state: str, outcome: str) -> None:
    assert A.outcome_of(state) == outcome


@pytest.mark.parametrize(
    ("country", "msisdn", "expected"),
    [("sg", "+6281234567", "SG"), (None, "+6281234567", "ID"), (None, "+63922110xxxx", "PH"),
     (None, "+14155550100", "US"), (None, "+8525551234", "HK"), (None, None, "unknown"),
     (None, "+9999", "unknown"), (None, "U4af4980629", "unknown")],
)  # fmt: skip
def test_country_from_the_details_api_else_the_calling_code(
    country: str | None, msisdn: str | None, expected: str
) -> None:
    assert A.country_of(country, msisdn) == expected


def test_the_user_is_kept_only_for_messages_with_a_whatsapp_step() -> None:
    sms = _state((_step(1, "sms", [("sent", 0)]),))
    wa = _state((_step(1, "whatsapp", [("sent", 0)]),))
    assert A.contribution(sms, "+658123xxxx", "h")[A.USER] is None  # type: ignore[index]
    assert A.contribution(wa, "+658123xxxx", "h")[A.USER] == "h"  # type: ignore[index]


# 8x8 spells channels either way
channels = st.sampled_from(["whatsapp", "sms", "viber", "line", "WhatsApp", "SMS"])
step_states = st.lists(
    st.tuples(st.sampled_from(["queued", "sent", "delivered", "read", "undelivered"]), st.integers(0, 10**6)),
    min_size=1,
    max_size=4,
).map(lambda evs: sorted(evs, key=lambda e: e[1]))


@given(
    st.lists(
        st.tuples(channels, step_states, st.none() | st.sampled_from([1018, 41])), min_size=1, max_size=3
    ),
    st.none() | st.sampled_from(["+6581234567", "+63922110123", "+14155550100"]),
    st.none() | st.sampled_from(["SG", "ph"]),
    st.booleans(),
    st.booleans(),
)
def test_what_a_state_adds_is_what_its_stored_rows_take_away(
    steps: list, msisdn: str | None, country: str | None, final: bool, clear: bool
) -> None:
    """contribution(state) == contribution_from_rows(the rows the store writes for it), whatever the
    PII policy: so a later state subtracts exactly what this one added."""
    built = tuple(
        _step(n, ch, evs, code, country=country if n == len(steps) else None)
        for n, (ch, evs, code) in enumerate(steps, 1)
    )
    sent = [x.sent_at for x in built if x.sent_at]
    delivered = [e.timestamp for x in built for e in x.history if e.state in ("delivered", "read")]
    read = [e.timestamp for x in built for e in x.history if e.state == "read"]
    state = _state(built, first_sent_at=min(sent, default=None), delivered_at=min(delivered, default=None),
                   read_at=min(read, default=None), final=final)  # fmt: skip
    state = dataclasses.replace(state, user=User(msisdn=msisdn))
    pii = PiiPolicy(hash_key=b"k", clear=clear)
    message, step_rows = state_rows(state, pii)
    new = A.contribution(state, message["msisdn"] or message["msisdn_masked"], message["msisdn_hash"])
    assert new == A.contribution_from_rows(message, list(reversed(step_rows)))
    as_tuples = [tuple(r[c] for c in A.STEP_FACT_COLUMNS) for r in reversed(step_rows)]
    assert new == A.contribution_from_tuples(tuple(message[c] for c in A.MESSAGE_FACT_COLUMNS), as_tuples)
    assert new is not None and new[A.COUNTRY] == A.country_of(country, msisdn)


@given(
    st.lists(
        st.tuples(st.integers(-3 * 3600, 3 * 3600), st.sampled_from([0, 8, -5, 14])), min_size=1, max_size=12
    )
)
def test_a_contribution_is_counted_in_the_utc_hour_of_its_first_event_whatever_came_before(
    moments: list[tuple[int, int]],
) -> None:
    """The hour is cached from one message to the next (`_SPAN`): in any order and any time zone, each
    message still gets the UTC hour its first event falls in."""
    for seconds, offset in moments:
        at = (T0 + timedelta(seconds=seconds)).astimezone(timezone(timedelta(hours=offset)))
        step = dataclasses.replace(_step(1, "sms", [("sent", 0)]), first_event_at=at)
        c = A.contribution(_state((step,)), "+6581234567", "h")
        assert c is not None and c[A.HOUR] == A.hour_of(at) and c[A.HOUR].tzinfo is UTC


def test_the_window_is_24_hours_from_the_inbound_message() -> None:
    assert A.answered(T0, [T0])
    assert A.answered(T0, [T0 + timedelta(hours=24) - timedelta(microseconds=1)])
    assert not A.answered(T0, [T0 + timedelta(hours=24), T0 - timedelta(seconds=1)])


def test_error_codes_carry_8x8s_meaning() -> None:
    assert A.error_meaning(1018) == ("Message rejected", "Message undeliverable (WhatsApp: 131026)")
    assert A.error_meaning(2008)[0] == "Not a Viber user"  # type: ignore[index]
    assert A.error_meaning(424242) is None


# --- records and queries -----------------------------------------------------------------------


def test_funnel_rates() -> None:
    r = A.funnel_record({"messages": 10, "delivered": 5, "read": 3, "failed": 1, "sent": 1, "fellBack": 2})
    assert (r["deliveredRate"], r["readRate"], r["failedRate"], r["fellBack"]) == (0.8, 0.3, 0.1, 2)
    assert A.funnel_record({})["deliveredRate"] is None


def test_latency_record_percentiles() -> None:
    r = A.latency_record({A.latency_bucket(2.0): 9, A.latency_bucket(100.0): 1})
    assert r["count"] == 10
    lo, hi = A.bucket_bounds(A.latency_bucket(2.0))
    assert r["p50"] == pytest.approx(math.sqrt(lo * hi), abs=1e-3)
    assert r["p99Bucket"][0] <= 100.0 < r["p99Bucket"][1]
    assert [h["count"] for h in r["histogram"]] == [9, 1]


def test_queries_are_scoped_to_one_subaccount_and_validated() -> None:
    sql, params = select(Query("funnel", "sub", T0, T0, channel="sms"), "?", "day(hour)")
    assert "sub_account_id = ?" in sql and params[0] == "sub" and params[-1] == "sms"
    with pytest.raises(ValueError):
        Query("funnel", "sub", T0, T0, group_by=("path",))
    with pytest.raises(ValueError):
        Query("nope", "sub", T0, T0)
