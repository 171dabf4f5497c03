"""Conversations folded from inbound messages: order- and retry-independent, windows and permissions."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.conversation import (
    Conversation,
    apply_inbound,
    call_permission_granted,
    conversation_key,
    window_open,
)
from schemas.models import CallPermissionReply, InboundContent, InboundMessage, Interactive, User

T0 = datetime(2026, 3, 19, 22, 0, tzinfo=UTC)
NOW = datetime(2026, 11, 22, tzinfo=UTC)


def inbound(
    umid: str, minutes: float, type_: str = "Text", channel: str = "whatsapp", **kw: object
) -> InboundMessage:
    fields: dict[str, object] = dict(
        umid=umid,
        sub_account_id="SubAccount-1",
        timestamp=T0 + timedelta(minutes=minutes),
        channel=channel,
        type=type_,
        received_at=NOW,
        raw_json="{}",
        channel_id="4b2ba2df-deb0-4c29-8ba5-a266672daf49",
        user=User(msisdn="+12025550023", channel_user_id="BSUID.1"),
        content=InboundContent(text="hi"),
    )
    fields.update(kw)
    return InboundMessage(**fields)  # type: ignore[arg-type]


def permission(
    umid: str, minutes: float, response: str, permanent: bool, hours: float = 7 * 24
) -> InboundMessage:
    reply = CallPermissionReply(
        response,
        permanent,
        None if permanent else T0 + timedelta(minutes=minutes, hours=hours),
        "user_action",
    )
    return inbound(
        umid,
        minutes,
        "Interactive",
        content=InboundContent(interactive=Interactive("callPermissionReply", call_permission_reply=reply)),
    )


def fold(msgs: list[InboundMessage]) -> Conversation:
    conv: Conversation | None = None
    for m in msgs:
        conv, _ = apply_inbound(conv, m, now=NOW)
    assert conv is not None
    return conv


def comparable(c: Conversation) -> Conversation:
    return dataclasses.replace(
        c, version=0, duplicates=0, updated_at=NOW, recent_umids=tuple(sorted(c.recent_umids))
    )


def test_whatsapp_message_opens_a_24_hour_service_window() -> None:
    conv = fold([inbound("a", 0), inbound("b", 30)])
    assert conv.window_open_until == T0 + timedelta(minutes=30, hours=24)
    assert window_open(conv, T0 + timedelta(hours=24, minutes=29))
    assert not window_open(conv, T0 + timedelta(hours=24, minutes=30))
    assert fold([inbound("c", 0, channel="viber")]).window_open_until is None


def test_counts_by_type_last_message_and_reply_link() -> None:
    conv = fold(
        [inbound("a", 0), inbound("b", 5, "Image"), inbound("c", 9, reply_to_umid="b"), inbound("d", 1)]
    )
    assert conv.message_count == 4
    assert dict(conv.counts_by_type) == {"Text": 3, "Image": 1}
    assert (conv.last_umid, conv.last_type, conv.last_reply_to_umid) == ("c", "Text", "b")
    assert conv.first_inbound_at == T0 and conv.last_inbound_at == T0 + timedelta(minutes=9)


def test_a_retried_message_is_counted_once() -> None:
    first = fold([inbound("a", 0)])
    again, changed = apply_inbound(first, inbound("a", 0), now=NOW)
    assert not changed
    assert again.message_count == 1 and again.duplicates == 1 and again.version == first.version


def test_call_permission_temporary_accept_expires_and_later_reject_wins() -> None:
    conv = fold([permission("p1", 0, "accept", permanent=False, hours=1)])
    assert call_permission_granted(conv, T0 + timedelta(minutes=59))
    assert not call_permission_granted(conv, T0 + timedelta(minutes=61))
    conv = fold(
        [permission("p1", 0, "accept", permanent=True), permission("p2", 10, "reject", permanent=False)]
    )
    assert conv.call_permission == "reject" and not call_permission_granted(conv, T0)
    conv = fold(
        [permission("p2", 10, "reject", permanent=False), permission("p1", 0, "accept", permanent=True)]
    )
    assert conv.call_permission == "reject"  # the older accept arriving late does not override


def test_messages_of_another_conversation_are_refused() -> None:
    conv = fold([inbound("a", 0)])
    other = inbound("b", 1, user=User(msisdn="+441234567890"))
    assert conversation_key(other) != conv.key
    with pytest.raises(ValueError, match="belongs to"):
        apply_inbound(conv, other, now=NOW)


MESSAGES = st.lists(
    st.tuples(
        st.integers(0, 30),  # umid index (collisions = retries of the same message)
        st.sampled_from(["Text", "Image", "Interactive", "Location"]),
        st.booleans(),  # carries a call permission answer
        st.sampled_from(["accept", "reject"]),
    ),
    min_size=1,
    max_size=25,
)


def _messages(spec: list[tuple[int, str, bool, str]]) -> list[InboundMessage]:
    out = []
    for idx, type_, perm, response in spec:
        minutes = idx * 3  # a umid always has the same content: a retry is an exact copy
        if perm:
            out.append(permission(f"m{idx}", minutes, response, permanent=idx % 2 == 0))
        else:
            out.append(
                inbound(
                    f"m{idx}",
                    minutes,
                    type_,
                    user=User(msisdn="+12025550023", channel_user_id="BSUID.1", name=f"name-{idx}"),
                )
            )
    # one umid, one content: keep the first spec of each umid
    seen: dict[str, InboundMessage] = {}
    for m in out:
        seen.setdefault(m.umid, m)
    return [seen[m.umid] for m in out]


@settings(max_examples=300, deadline=None)
@given(MESSAGES, st.randoms(use_true_random=False))
def test_any_order_and_any_duplication_gives_the_same_conversation(spec: list, rnd) -> None:  # type: ignore[no-untyped-def]
    msgs = _messages(spec)
    distinct = list({m.umid: m for m in msgs}.values())
    shuffled = msgs + rnd.sample(msgs, k=len(msgs) // 2)
    rnd.shuffle(shuffled)
    a, b = fold(distinct), fold(shuffled)
    assert comparable(a) == comparable(b)
    assert b.message_count == len(distinct)
    assert b.duplicates == len(shuffled) - len(distinct)


@settings(max_examples=200, deadline=None)
@given(MESSAGES)
def test_version_grows_by_one_per_new_message_and_never_for_a_retry(spec: list) -> None:  # type: ignore[no-untyped-def]
    conv: Conversation | None = None
    for m in _messages(spec):
        before = conv.version if conv else 0
        conv, changed = apply_inbound(conv, m, now=NOW)
        assert conv.version == before + (1 if changed else 0)
