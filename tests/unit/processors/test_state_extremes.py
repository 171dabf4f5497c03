"""The message-state machine at the ends of the calendar (`processors.state`, "Time range").

A decoded receipt can hold any time `datetime` can represent (`9999-12-31T23:59:59Z` was seen: it made
`expire_due` overflow and the worker lose the receipts of the same batch). The properties: no such value
makes the core raise, due times saturate at `datetime.max`, and the machine does not care where on the
calendar the receipts are (moving every event by the same span moves the due time by that span).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.state import StateConfig, apply, apply_many, content_final, expire, expire_due, is_sealed
from schemas.models import DeliveryReceipt, MessageState, Status, User

MAX = datetime.max.replace(tzinfo=UTC)
MIN = datetime.min.replace(tzinfo=UTC)
EDGES = [
    MAX,
    MIN,
    MAX - timedelta(hours=1),
    MIN + timedelta(hours=1),
    datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),
]
STATES = ["unknown", "queued", "accepted", "sent", "delivered", "undelivered", "failed", "read", "x_new"]
CHANNELS = ["whatsapp", "viber", "sms", "line", "linenotification", ""]
PROPS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

times = st.one_of(st.sampled_from(EDGES), st.datetimes(timezones=st.just(UTC)))
late_times = st.datetimes(min_value=datetime(9999, 11, 1), timezones=st.just(UTC))  # within 2 months of MAX
spans = st.one_of(
    st.timedeltas(min_value=timedelta(microseconds=1)),  # up to timedelta.max
    st.sampled_from([timedelta(hours=48), timedelta(hours=24, minutes=5), timedelta(days=10)]),
)
configs = st.builds(
    StateConfig,
    read_window=spans,
    fallback_horizon=spans,
    history_limit=st.integers(1, 4),
    stale_after=st.one_of(st.none(), spans),
)
text = st.one_of(st.none(), st.text(max_size=4))


def receipt(state: str, t: datetime, channel: str, detail: str | None, code: int | None) -> DeliveryReceipt:
    return DeliveryReceipt(
        "u-1", "acme", channel, Status(state, t, detail, code, "boom" if code else None), t, "{}",
        user=User(msisdn="+6590000000"),
    )  # fmt: skip


def receipts(at: st.SearchStrategy[datetime]) -> st.SearchStrategy[list[DeliveryReceipt]]:
    one = st.builds(
        receipt,
        st.sampled_from(STATES),
        at,
        st.sampled_from(CHANNELS),
        text,
        st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1)),
    )
    return st.lists(one, min_size=1, max_size=6)


def fold(rs: list[DeliveryReceipt], now: datetime, config: StateConfig) -> MessageState:
    state: MessageState | None = None
    for r in rs:
        state = apply(state, r, now=now, config=config).state
    assert state is not None
    return state


def shifted(r: DeliveryReceipt, by: timedelta) -> DeliveryReceipt:
    s = r.status
    return receipt(s.state, s.timestamp + by, r.channel, s.detail, s.error_code)


@PROPS
@given(receipts(times), times, configs)
def test_no_receipt_time_and_no_config_makes_the_core_raise(
    rs: list[DeliveryReceipt], now: datetime, config: StateConfig
) -> None:
    state = fold(rs, now, config)
    assert apply_many(None, rs, now=now, config=config).state.steps == state.steps
    due = expire_due(state, config)
    sealed = expire(state, now=now, config=config)
    if due is None:
        assert sealed is None
    else:
        assert MIN <= due <= MAX
        assert (sealed is not None) == (now >= due)
    if sealed is not None:
        assert is_sealed(sealed) and expire_due(sealed, config) is None
        assert apply(sealed, rs[0], now=now, config=config).changed is False  # absorbed
    content_final(state)


@PROPS
@given(
    receipts(late_times),
    configs,
    st.timedeltas(min_value=timedelta(days=366), max_value=timedelta(days=3_000_000)),
)
def test_moving_every_event_moves_the_due_time_alike_saturating_at_datetime_max(
    rs: list[DeliveryReceipt], config: StateConfig, back: timedelta
) -> None:
    """The same receipts `back` earlier give the same state, and a due time `back` earlier, except that a
    due time past the calendar is datetime.max (never, in practice)."""
    late = fold(rs, MAX, config)
    early = fold([shifted(r, -back) for r in rs], MAX, config)
    assert [(s.channel, s.state, s.status_timestamp - back) for s in late.steps] == [
        (s.channel, s.state, s.status_timestamp) for s in early.steps
    ]
    assert late.final == early.final
    due, reference = expire_due(late, config), expire_due(early, config)
    if reference is None:
        assert due is None
    else:
        try:
            expected = reference + back
        except OverflowError:
            expected = MAX
        assert due == expected


def test_a_delivery_at_the_end_of_the_calendar_is_due_only_at_datetime_max() -> None:
    """The receipt seen in production: accepted by ingest, then `expire_due` overflowed."""
    t = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    for state in ("delivered", "failed"):
        s = fold([receipt("sent", t - timedelta(seconds=1), "whatsapp", None, None),
                  receipt(state, t, "whatsapp", None, None)], t, StateConfig())  # fmt: skip
        assert expire_due(s) == MAX
        assert expire(s, now=t) is None
        sealed = expire(s, now=MAX)
        assert sealed is not None and sealed.final and sealed.state == state


def test_times_at_the_start_of_the_calendar_are_exact() -> None:
    s = fold([receipt("delivered", MIN, "whatsapp", None, None)], MIN, StateConfig())
    assert s.delivered_at == MIN
    assert expire_due(s) == MIN + timedelta(hours=48)
