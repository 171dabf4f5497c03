"""Conversations at the ends of the calendar (`processors.conversation`, "Time range").

The receipt side is `test_state_extremes.py`. An inbound message at `9999-12-31T23:59:59Z` on WhatsApp made
`apply_inbound` overflow (`last_inbound_at + 24 h`) and the conversations agent stop. The properties: no
decoded time makes the fold raise, the window saturates at `datetime.max`, and the fold does not care where
on the calendar the messages are (moving every message by the same span moves every time by that span).
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.conversation import WHATSAPP_SERVICE_WINDOW, apply_inbound, window_open
from schemas.models import (
    CallPermissionReply,
    Conversation,
    InboundContent,
    InboundMessage,
    Interactive,
    User,
)

MAX = datetime.max.replace(tzinfo=UTC)
MIN = datetime.min.replace(tzinfo=UTC)
END = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
EDGES = [MAX, MIN, END, MAX - timedelta(hours=1), MIN + timedelta(hours=1)]
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

times = st.one_of(st.sampled_from(EDGES), st.datetimes(timezones=st.just(UTC)))
late_times = st.datetimes(min_value=datetime(9999, 12, 30), timezones=st.just(UTC))  # within 2 days of MAX


def message(umid: str, t: datetime, channel: str, answer: str | None, permanent: bool) -> InboundMessage:
    content = InboundContent(text="hi")
    if answer is not None:
        until = None if permanent else t
        reply = CallPermissionReply(answer, permanent, until, "user_action")
        content = InboundContent(interactive=Interactive("callPermissionReply", call_permission_reply=reply))
    return InboundMessage(
        umid=umid, sub_account_id="SubAccount-1", timestamp=t, channel=channel,
        type="Text" if answer is None else "Interactive", received_at=t, raw_json="{}", channel_id="c-1",
        user=User(msisdn="+12025550023", channel_user_id="BSUID.1", name=f"n{umid}"), content=content,
    )  # fmt: skip


def messages(
    at: st.SearchStrategy[datetime], channel: str | None = None
) -> st.SearchStrategy[list[InboundMessage]]:
    one = st.builds(
        message,
        st.sampled_from(["u1", "u2", "u3", "u4"]),
        at,
        st.just(channel) if channel else st.sampled_from(["whatsapp", "sms"]),
        st.one_of(st.none(), st.sampled_from(["accept", "reject"])),
        st.booleans(),
    )
    return st.lists(one, min_size=1, max_size=6)


def fold(ms: list[InboundMessage], now: datetime) -> Conversation:
    conv: Conversation | None = None
    for m in ms:
        conv = apply_inbound(conv, m, now=now)[0] if conv is None or conv.channel == m.channel else conv
    assert conv is not None
    return conv


def shifted(m: InboundMessage, by: timedelta) -> InboundMessage:
    return dataclasses.replace(m, timestamp=m.timestamp + by, received_at=m.received_at + by)


@PROPS
@given(messages(times), times)
def test_no_message_time_makes_the_fold_raise(ms: list[InboundMessage], now: datetime) -> None:
    conv = fold(ms, now)
    if conv.window_open_until is not None:
        assert MIN < conv.window_open_until <= MAX
        assert window_open(conv, now) == (now < conv.window_open_until)
    assert conv.first_inbound_at <= conv.last_inbound_at


@PROPS
@given(
    messages(late_times, "whatsapp"),
    st.timedeltas(min_value=timedelta(days=2), max_value=timedelta(days=3_000_000)),
)
def test_moving_every_message_moves_the_conversation_alike_saturating_at_datetime_max(
    ms: list[InboundMessage], back: timedelta
) -> None:
    late = fold(ms, MAX)
    early = fold([shifted(m, -back) for m in ms], MAX)
    assert (late.first_inbound_at - back, late.last_inbound_at - back) == (
        early.first_inbound_at, early.last_inbound_at,
    )  # fmt: skip
    assert (late.last_umid, late.message_count, late.counts_by_type, late.call_permission) == (
        early.last_umid, early.message_count, early.counts_by_type, early.call_permission,
    )  # fmt: skip
    assert early.window_open_until is not None and late.window_open_until is not None
    try:
        expected = early.window_open_until + back
    except OverflowError:
        expected = MAX
    assert late.window_open_until == expected


def test_a_whatsapp_message_at_the_end_of_the_calendar_opens_a_window_until_datetime_max() -> None:
    """The message that stopped the conversations agent: the window saturates, it does not overflow."""
    conv, changed = apply_inbound(None, message("u1", END, "whatsapp", None, False), now=END)
    assert changed and conv.window_open_until == MAX and window_open(conv, END)
    again, changed = apply_inbound(
        conv, message("u2", END - timedelta(days=1), "whatsapp", None, False), now=END
    )
    assert changed and again.window_open_until == MAX and again.last_umid == "u1"


def test_times_at_the_start_of_the_calendar_are_exact() -> None:
    conv, _ = apply_inbound(None, message("u1", MIN, "whatsapp", None, False), now=MIN)
    assert conv.window_open_until == MIN + WHATSAPP_SERVICE_WINDOW
