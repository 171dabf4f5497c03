"""The message-state machine (`processors.state`): table-driven transitions and hypothesis properties."""

from __future__ import annotations

import dataclasses
import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from processors.state import (
    Outcome,
    StateConfig,
    apply,
    apply_many,
    content_final,
    expire,
    expire_due,
    is_sealed,
    rank,
)
from schemas.models import EPOCH, DeliveryReceipt, MessageState, Status, StatusEvent, User

T0 = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)
CFG = StateConfig()


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def rc(
    state: str,
    t: float | datetime,
    channel: str = "whatsapp",
    detail: str | None = None,
    code: int | None = None,
    msg: str | None = None,
    *,
    umid: str = "u-1",
    user: User | None = None,
    batch_id: str | None = None,
    client_message_id: str | None = None,
) -> DeliveryReceipt:
    ts = t if isinstance(t, datetime) else at(t)
    return DeliveryReceipt(
        umid=umid,
        sub_account_id="acme",
        channel=channel,
        status=Status(state, ts, detail, code, msg),
        received_at=ts,
        raw_json="{}",
        user=user if user is not None else User(msisdn="+6590000000"),
        batch_id=batch_id,
        client_message_id=client_message_id,
    )


def fold(
    receipts: list[DeliveryReceipt],
    prev: MessageState | None = None,
    *,
    now: datetime = NOW,
    config: StateConfig = CFG,
) -> tuple[MessageState, list[Outcome]]:
    outcomes = []
    state = prev
    for r in receipts:
        o = apply(state, r, now=now, config=config)
        outcomes.append(o)
        state = o.state
    assert state is not None
    return state, outcomes


def norm(state: MessageState) -> MessageState:
    """The state with the arrival-dependent bookkeeping (duplicates, version, updated_at) blanked."""
    steps = tuple(dataclasses.replace(s, duplicates=0) for s in state.steps)
    return dataclasses.replace(state, duplicates=0, version=0, updated_at=EPOCH, steps=steps)


# --- rank table ------------------------------------------------------------------------------------

SPEC_RANK = {
    "unknown": 0,
    "brand_new_state": 0,
    "queued": 1,
    "accepted": 1,
    "ok": 1,
    "sent": 2,
    "delivered": 3,
    "undelivered": 3,
    "rejected": 3,
    "failed": 3,
    "error": 3,
    "read": 4,
}
SPEC_FAILURES = {"undelivered", "rejected", "failed", "error"}
STATES = list(SPEC_RANK)


@pytest.mark.parametrize(("state", "expected"), SPEC_RANK.items())
def test_rank_table(state: str, expected: int) -> None:
    assert rank(state) == expected


# --- every pair of states --------------------------------------------------------------------------


def _expected_winner(prev: str, incoming: str, when: str) -> str:
    rp, ri = SPEC_RANK[prev], SPEC_RANK[incoming]
    if rp != ri:
        return incoming if ri > rp else prev
    if when == "later":
        return incoming
    if when == "earlier":
        return prev
    return max(prev, incoming, key=lambda s: (s in SPEC_FAILURES, s))


PAIRS = [
    (p, i, w)
    for p, i, w in itertools.product(STATES, STATES, ["later", "same", "earlier"])
    if not (p == i and w == "same")  # that one is an exact duplicate: tested below
]


@pytest.mark.parametrize(("prev", "incoming", "when"), PAIRS)
def test_transition_for_every_pair_of_states(prev: str, incoming: str, when: str) -> None:
    dt = {"later": 10, "same": 0, "earlier": -10}[when]
    first = rc(prev, 100)
    second = rc(incoming, 100 + dt)
    s1 = apply(None, first, now=NOW).state
    o = apply(s1, second, now=NOW + timedelta(seconds=1))
    winner = _expected_winner(prev, incoming, when)
    winner_time = at(100) if winner == prev and (prev != incoming or when == "earlier") else at(100 + dt)
    step = o.state.steps[0]
    assert (step.state, step.status_timestamp) == (winner, winner_time)
    assert (o.state.state, o.state.status_timestamp) == (winner, winner_time)
    assert o.changed and not o.duplicate
    assert o.state.version == 2 and o.state.updated_at == NOW + timedelta(seconds=1)
    assert [h.timestamp for h in step.history] == sorted(h.timestamp for h in step.history)
    assert {(h.state, h.timestamp) for h in step.history} == {(prev, at(100)), (incoming, at(100 + dt))}
    assert o.new_events == ((1, StatusEvent(incoming, at(100 + dt))),)
    assert step.failed_at == (winner_time if winner in SPEC_FAILURES else None)


@pytest.mark.parametrize("state", STATES)
def test_exact_duplicate_of_every_state_is_counted_not_applied(state: str) -> None:
    s1 = apply(None, rc(state, 5, detail="d", code=7), now=NOW).state
    o = apply(s1, rc(state, 5, detail="d", code=7), now=NOW + timedelta(minutes=1))
    assert o.duplicate and not o.changed and o.new_events == ()
    assert o.state.version == 1 and o.state.updated_at == NOW
    assert o.state.duplicates == 1 and o.state.steps[0].duplicates == 1
    assert norm(o.state) == norm(s1)


# spelled out: the cases the issue names, readable without the rule above
@pytest.mark.parametrize(
    ("sequence", "expected"),
    [
        ([("sent", 1), ("delivered", 2)], ("delivered", 2)),
        ([("delivered", 2), ("sent", 1)], ("delivered", 2)),  # late sent after delivered
        ([("delivered", 2), ("sent", 3)], ("delivered", 2)),  # even with a later time: no regression
        ([("read", 3), ("delivered", 4)], ("read", 3)),  # retried delivered after read
        ([("delivered", 2), ("undelivered", 3)], ("undelivered", 3)),  # operator failure after dlvd
        ([("undelivered", 3), ("delivered", 2)], ("undelivered", 3)),
        ([("undelivered", 3), ("delivered", 4)], ("delivered", 4)),  # a later delivery wins
        ([("failed", 3), ("read", 2)], ("read", 2)),  # read proves delivery
        ([("delivered", 3), ("rejected", 3)], ("rejected", 3)),  # tie on time: failure wins
        ([("queued", 1), ("brand_new_state", 2)], ("queued", 1)),  # unknown ranks 0
        ([("brand_new_state", 1), ("unknown", 2)], ("unknown", 2)),
        ([("accepted", 1), ("queued", 2)], ("queued", 2)),
        ([("ok", 1), ("sent", 2), ("queued", 3)], ("sent", 2)),
    ],
)
def test_named_transitions(sequence: list[tuple[str, int]], expected: tuple[str, int]) -> None:
    state, _ = fold([rc(s, t) for s, t in sequence])
    assert (state.state, state.status_timestamp) == (expected[0], at(expected[1]))
    assert len(state.steps[0].history) == len(sequence)


def test_detail_and_error_follow_the_current_status() -> None:
    state, _ = fold(
        [
            rc("delivered", 2, detail="delivered_to_operator"),
            rc("undelivered", 5, detail="undelivered_to_recipient", code=3, msg="Absent subscriber"),
            rc("sent", 1),
        ]
    )
    assert (state.state, state.detail, state.error_code, state.error_message) == (
        "undelivered",
        "undelivered_to_recipient",
        3,
        "Absent subscriber",
    )
    step = state.steps[0]
    assert (step.sent_at, step.delivered_at, step.failed_at) == (at(1), at(2), at(5))
    assert state.first_sent_at == at(1) and state.delivered_at == at(2) and state.read_at is None


def test_same_state_different_detail_is_distinct_and_the_later_wins() -> None:
    state, outs = fold(
        [
            rc("delivered", 2, detail="delivered_to_operator"),
            rc("delivered", 4, detail="delivered_to_recipient"),
        ]
    )
    assert not outs[1].duplicate and state.detail == "delivered_to_recipient"
    assert state.steps[0].delivered_at == at(2)


def test_duplicate_identity_includes_detail_and_error_code() -> None:
    s, _ = fold([rc("undelivered", 3, code=1), rc("undelivered", 3, code=2), rc("undelivered", 3)])
    assert len(s.steps[0].history) == 3 and s.duplicates == 0
    s2 = apply(s, rc("undelivered", 3, code=2), now=NOW)
    assert s2.duplicate and s2.state.duplicates == 1
    assert s.error_code == 2  # same time, same state: the larger code wins the deterministic tiebreak


def test_first_receipt_creates_version_1() -> None:
    o = apply(None, rc("queued", 0, batch_id="b", client_message_id="c"), now=NOW)
    s = o.state
    assert o.changed and not o.duplicate
    assert (s.version, s.updated_at, s.umid, s.sub_account_id) == (1, NOW, "u-1", "acme")
    assert (s.state, s.batch_id, s.client_message_id, s.final, s.duplicates) == ("queued", "b", "c", False, 0)
    assert s.channel_path == "whatsapp" and not s.fell_back
    assert o.new_events == ((1, StatusEvent("queued", at(0))),)


def test_receipt_for_another_umid_is_a_contract_violation() -> None:
    s = apply(None, rc("queued", 0), now=NOW).state
    with pytest.raises(ValueError, match="umid"):
        apply(s, rc("sent", 1, umid="other"), now=NOW)


def test_apply_many_needs_a_state_or_a_receipt() -> None:
    with pytest.raises(ValueError):
        apply_many(None, [], now=NOW)
    s = apply(None, rc("queued", 0), now=NOW).state
    o = apply_many(s, [], now=NOW)
    assert o.state is s and not o.changed and not o.duplicate


@pytest.mark.parametrize(
    "kwargs",
    [{"history_limit": 0}, {"read_window": timedelta(0)}, {"fallback_horizon": -timedelta(1)},
     {"stale_after": timedelta(0)}],
)  # fmt: skip
def test_config_rejects_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        StateConfig(**kwargs)  # type: ignore[arg-type]


# --- ids and user ----------------------------------------------------------------------------------


def test_user_and_ids_first_non_null_wins_and_null_never_erases() -> None:
    s, _ = fold(
        [
            rc("queued", 0, user=User(msisdn="+651"), batch_id=None),
            rc("sent", 1, user=User(msisdn=None, channel_user_id="cu-1"), batch_id="b-1"),
            rc("delivered", 2, user=User(msisdn="+659", channel_user_id=None, name="Ann"), batch_id="b-2"),
            rc("read", 3, user=User(), client_message_id="cm"),
        ]
    )
    assert s.user == User(msisdn="+651", channel_user_id="cu-1", name="Ann")
    assert (s.batch_id, s.client_message_id) == ("b-1", "cm")


def test_a_duplicate_receipt_may_still_fill_a_missing_user_field() -> None:
    s = apply(None, rc("sent", 1, user=User(msisdn="+65")), now=NOW).state
    o = apply(s, rc("sent", 1, user=User(msisdn="+65", channel_user_id="cu")), now=NOW)
    assert o.duplicate and o.changed and o.state.version == 2
    assert o.state.user.channel_user_id == "cu" and o.state.duplicates == 1


# --- fallback steps --------------------------------------------------------------------------------


def test_fallback_steps_are_ordered_by_first_event_time() -> None:
    s, outs = fold(
        [
            rc("queued", 0, "viber"),
            rc("undelivered", 30, "viber", code=2001),
            rc("queued", 31, "whatsapp"),
            rc("failed", 40, "whatsapp", code=1026),
            rc("sent", 42, "sms"),
            rc("delivered", 50, "sms", detail="delivered_to_operator"),
        ]
    )
    assert s.channel_path == "viber>whatsapp>sms" and s.fell_back and s.current_channel == "sms"
    assert [x.step for x in s.steps] == [1, 2, 3]
    assert (s.state, s.detail, s.status_timestamp) == ("delivered", "delivered_to_operator", at(50))
    assert s.final  # sms never reports read: delivered is final at once
    assert outs[3].new_events == ((2, StatusEvent("failed", at(40), None, 1026)),)


def test_a_late_receipt_of_an_earlier_channel_reorders_the_steps() -> None:
    s, _ = fold([rc("queued", 31, "whatsapp"), rc("sent", 35, "whatsapp")])
    assert s.channel_path == "whatsapp" and s.state == "sent"
    o = apply(s, rc("undelivered", 30, "viber"), now=NOW)
    assert o.state.channel_path == "viber>whatsapp"
    assert [(x.step, x.channel) for x in o.state.steps] == [(1, "viber"), (2, "whatsapp")]
    assert o.state.state == "sent"  # the last step is still whatsapp
    assert o.new_events == ((1, StatusEvent("undelivered", at(30))),)


def test_an_earlier_event_of_an_existing_channel_can_reorder_too() -> None:
    s, _ = fold([rc("queued", 10, "viber"), rc("delivered", 20, "sms")])
    assert s.channel_path == "viber>sms"
    s2 = apply(s, rc("queued", 5, "sms"), now=NOW).state
    assert s2.channel_path == "sms>viber" and s2.state == "queued"
    assert s2.steps[0].first_event_at == at(5)


def test_equal_first_event_times_order_by_channel_name() -> None:
    a, _ = fold([rc("queued", 1, "whatsapp"), rc("queued", 1, "rcs")])
    b, _ = fold([rc("queued", 1, "rcs"), rc("queued", 1, "whatsapp")])
    assert a.channel_path == b.channel_path == "rcs>whatsapp"


def test_message_times_are_earliest_across_steps() -> None:
    s, _ = fold(
        [
            rc("sent", 10, "whatsapp"),
            rc("delivered", 20, "whatsapp"),
            rc("sent", 80, "sms"),  # successStatus=read not met in time: fell back anyway
            rc("delivered", 90, "sms"),
            rc("read", 100, "whatsapp"),
        ]
    )
    assert (s.first_sent_at, s.delivered_at, s.read_at) == (at(10), at(20), at(100))
    assert s.state == "delivered" and s.current_channel == "sms" and s.final


# --- finality --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "state", "final"),
    [
        ("whatsapp", "read", True),
        ("whatsapp", "delivered", False),
        ("viber", "delivered", False),
        ("rcs", "delivered", False),
        ("sms", "delivered", True),
        ("sms", "sent", False),
        ("sms", "undelivered", False),
        ("zalonotification", "delivered", True),
        ("linenotification", "delivered", True),
        ("line", "sent", True),  # line reports neither delivered nor read
        ("line", "queued", False),
        ("line", "rejected", False),
        ("some_new_channel", "delivered", False),
        ("whatsapp", "failed", False),
    ],
)
def test_content_finality_by_channel(channel: str, state: str, final: bool) -> None:
    s = apply(None, rc(state, 1, channel), now=NOW).state
    assert s.final is final and content_final(s) is final and not is_sealed(s)


def test_read_window_seals_a_delivered_message() -> None:
    s, _ = fold([rc("sent", 0), rc("delivered", 10)])
    assert expire(s, now=at(10) + CFG.read_window - timedelta(microseconds=1), config=CFG) is None
    e = expire(s, now=at(10) + CFG.read_window, config=CFG)
    assert e is not None and e.final and is_sealed(e)
    assert e.version == s.version + 1 and e.updated_at == at(10) + CFG.read_window
    assert norm(dataclasses.replace(e, final=False)) == norm(s)
    assert expire(e, now=at(10) + 3 * CFG.read_window, config=CFG) is None


def test_read_window_is_configurable() -> None:
    cfg = StateConfig(read_window=timedelta(days=10))
    s, _ = fold([rc("delivered", 0)])
    assert expire(s, now=at(0) + timedelta(days=9), config=cfg) is None
    assert expire(s, now=at(0) + timedelta(days=10), config=cfg) is not None


def test_terminal_failure_without_a_later_step_is_final_after_the_fallback_horizon() -> None:
    s, _ = fold([rc("queued", 0, "viber"), rc("undelivered", 30, "viber")])
    assert not s.final
    assert expire(s, now=at(30) + timedelta(hours=24), config=CFG) is None
    e = expire(s, now=at(30) + CFG.fallback_horizon, config=CFG)
    assert e is not None and e.final and e.state == "undelivered"


def test_a_later_step_within_the_horizon_keeps_the_message_open() -> None:
    s, _ = fold([rc("undelivered", 30, "viber"), rc("queued", 30 + 3600, "sms")])
    assert not s.final and s.state == "queued"
    assert expire(s, now=at(30) + CFG.fallback_horizon, config=CFG) is None


def test_failure_after_an_earlier_delivered_step_waits_for_that_steps_read_window() -> None:
    s, _ = fold([rc("delivered", 10, "whatsapp"), rc("undelivered", 100, "sms")])
    assert expire(s, now=at(100) + CFG.fallback_horizon, config=CFG) is None  # whatsapp read still possible
    assert expire(s, now=at(10) + CFG.read_window, config=CFG) is not None


def test_in_progress_message_is_sealed_only_by_stale_after() -> None:
    s, _ = fold([rc("queued", 0), rc("sent", 5)])
    far = at(5) + timedelta(days=365)
    assert expire(s, now=far, config=CFG) is None
    cfg = StateConfig(stale_after=timedelta(days=7))
    assert expire(s, now=at(5) + timedelta(days=6), config=cfg) is None
    e = expire(s, now=at(5) + timedelta(days=7), config=cfg)
    assert e is not None and is_sealed(e) and e.state == "sent"


def test_content_final_message_is_not_expired_again() -> None:
    s, _ = fold([rc("read", 10)])
    assert s.final and expire(s, now=at(10) + timedelta(days=100), config=CFG) is None


def test_sealed_message_absorbs_late_events() -> None:
    s, _ = fold([rc("sent", 0), rc("delivered", 10)])
    sealed = expire(s, now=at(10) + CFG.read_window, config=CFG)
    assert sealed is not None
    late = [rc("read", 20), rc("delivered", 10), rc("queued", 5, "sms"), rc("failed", 99)]
    state = sealed
    for i, r in enumerate(late, start=1):
        o = apply(state, r, now=NOW + timedelta(days=5))
        assert not o.changed and o.new_events == ()
        assert o.duplicate is (r == late[1])
        assert o.state.version == sealed.version and o.state.updated_at == sealed.updated_at
        assert o.state.duplicates == i
        state = o.state
    assert norm(state) == norm(sealed) and state.steps[0].duplicates == 3


def test_read_final_message_still_records_straggling_receipts() -> None:
    s, _ = fold([rc("read", 30)])
    assert s.final and s.delivered_at == at(30)  # read implies delivered: an upper bound
    o = apply(s, rc("delivered", 20), now=NOW)
    assert o.changed and o.state.final and o.state.state == "read"
    assert o.state.delivered_at == at(20)  # the same as if delivered had come first


def test_content_finality_reverts_when_a_later_receipt_contradicts_it() -> None:
    s, _ = fold([rc("delivered", 10, "sms", detail="delivered_to_operator")])
    assert s.final
    o = apply(s, rc("undelivered", 20, "sms", detail="undelivered_to_recipient"), now=NOW)
    assert o.changed and not o.state.final and o.state.state == "undelivered"


# --- history limit ---------------------------------------------------------------------------------


def test_history_is_bounded_but_milestones_and_current_survive() -> None:
    cfg = StateConfig(history_limit=3)
    receipts = [
        rc("sent", 1),
        rc("delivered", 2),
        rc("queued", 3),
        rc("queued", 4, detail="x"),
        rc("sent", 5),
    ]
    s, _ = fold(receipts, config=cfg)
    step = s.steps[0]
    assert len(step.history) == 3
    assert StatusEvent("delivered", at(2)) in step.history  # current is never dropped
    assert [h.timestamp for h in step.history] == [at(2), at(4), at(5)]
    assert (step.state, step.sent_at, step.delivered_at, step.first_event_at) == (
        "delivered",
        at(1),
        at(2),
        at(1),
    )
    # a redelivery of a dropped event is recognised as changing nothing (not as a duplicate)
    o = apply(s, rc("sent", 1), now=NOW, config=cfg)
    assert not o.changed and not o.duplicate and o.state.version == s.version
    # the bounded result does not depend on the order either
    for perm in itertools.permutations(receipts):
        assert norm(fold(list(perm), config=cfg)[0]) == norm(s)


# --- apply_many ------------------------------------------------------------------------------------


def test_apply_many_equals_folding_apply_with_one_version_bump() -> None:
    receipts = [rc("queued", 0, "viber"), rc("undelivered", 9, "viber"), rc("queued", 10, "sms"),
                rc("sent", 11, "sms"), rc("sent", 11, "sms")]  # fmt: skip
    folded, outs = fold(receipts)
    o = apply_many(None, receipts, now=NOW)
    assert norm(o.state) == norm(folded) and o.state.duplicates == folded.duplicates == 1
    assert o.changed and not o.duplicate and o.state.version == 1
    assert o.new_events == tuple(e for x in outs for e in x.new_events)
    o2 = apply_many(o.state, [rc("delivered", 12, "sms"), rc("sent", 11, "sms")], now=NOW)
    assert o2.state.version == 2 and o2.changed and not o2.duplicate
    o3 = apply_many(o2.state, [rc("delivered", 12, "sms"), rc("sent", 11, "sms")], now=NOW)
    assert o3.duplicate and not o3.changed and o3.state.version == 2 and o3.state.duplicates == 4


def test_apply_many_numbers_new_events_by_the_final_steps() -> None:
    o = apply_many(None, [rc("sent", 20, "sms"), rc("undelivered", 10, "viber")], now=NOW)
    assert o.state.channel_path == "viber>sms"
    assert o.new_events == ((2, StatusEvent("sent", at(20))), (1, StatusEvent("undelivered", at(10))))


# --- hypothesis: realistic fallback chains -------------------------------------------------------

CHANNELS = ["viber", "whatsapp", "rcs", "sms", "line", "zalonotification", "linenotification"]
CAN_DELIVER = {c for c in CHANNELS if c != "line"}
CAN_READ = {"viber", "whatsapp", "rcs"}
FAILS = ["undelivered", "rejected", "failed", "error"]


@st.composite
def fallback_chain(draw: st.DrawFn) -> list[DeliveryReceipt]:
    """The distinct receipts of one umid: 1-4 channel steps, each later step starting after the previous
    one ended; statuses within a step at increasing times, intermediate ones sometimes missing."""
    n = draw(st.integers(1, 4))
    channels = draw(st.lists(st.sampled_from(CHANNELS), min_size=n, max_size=n, unique=True))
    msisdn = "+6591234567"
    cuid = draw(st.sampled_from([None, "cu-77"]))
    t = T0 + timedelta(milliseconds=draw(st.integers(0, 10**7)))
    out: list[DeliveryReceipt] = []

    def gap() -> timedelta:
        return timedelta(milliseconds=draw(st.integers(1, 120_000)))

    for i, ch in enumerate(channels):
        last = i == n - 1
        path = [draw(st.sampled_from(["queued", "accepted"])), "sent"]
        if ch in CAN_DELIVER:
            path.append("delivered")
        if ch in CAN_READ:
            path.append("read")
        if last:
            path = path[: draw(st.integers(1, len(path)))]
            if draw(st.booleans()) and draw(st.booleans()):
                path.append(draw(st.sampled_from(FAILS)))
        else:  # a step that led to fallback: failed, or timed out short of its success status
            path = path[: draw(st.integers(1, len(path) - (1 if path[-1] == "read" else 0)))]
            if draw(st.booleans()):
                path.append(draw(st.sampled_from(FAILS)))
        if draw(st.integers(0, 9)) == 0:
            path.insert(draw(st.integers(0, len(path))), draw(st.sampled_from(["unknown", "ok", "x_new"])))
        keep = [j == len(path) - 1 or draw(st.integers(0, 3)) > 0 for j in range(len(path))]
        for state, kept in zip(path, keep, strict=True):
            t += gap()
            if not kept:
                continue
            detail = code = None
            if state == "delivered":
                detail = draw(st.sampled_from([None, "delivered_to_operator", "delivered_to_recipient"]))
            elif state in FAILS:
                code = draw(st.sampled_from([None, 3, 1026, 2001]))
            user = User(msisdn=msisdn, channel_user_id=cuid if draw(st.booleans()) else None)
            out.append(rc(state, t, ch, detail, code, "boom" if code else None, user=user, batch_id="b-1"))
        t += gap()
    return out


@st.composite
def scrambled(draw: st.DrawFn) -> tuple[list[DeliveryReceipt], list[DeliveryReceipt]]:
    """(the distinct receipts in event order, the same receipts permuted with random 8x8 retries)."""
    chain = draw(fallback_chain())
    dups = draw(st.lists(st.sampled_from(chain), max_size=len(chain) * 2))
    return chain, draw(st.permutations(chain + dups))


def late_receipts() -> st.SearchStrategy[list[DeliveryReceipt]]:
    receipt = st.builds(
        rc,
        st.sampled_from([*STATES]),
        st.integers(-86400, 10**7).map(float),
        st.sampled_from(CHANNELS),
        st.sampled_from([None, "delivered_to_operator"]),
        st.sampled_from([None, 5]),
    )
    return st.lists(receipt, min_size=1, max_size=6)


PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(scrambled())
def test_any_permutation_and_duplication_gives_same_final_state(case: tuple[list, list]) -> None:
    chain, messy = case
    expected, _ = fold(chain)
    got, outs = fold(messy)
    assert norm(got) == norm(expected)
    assert got.duplicates == len(messy) - len(chain)
    assert sum(s.duplicates for s in got.steps) == got.duplicates
    batched = apply_many(None, messy, now=NOW).state
    assert norm(batched) == norm(expected)
    # halves in batches, as the agent does across two polls
    half = len(messy) // 2
    two = apply_many(apply_many(None, messy[: half or 1], now=NOW).state, messy[half or 1 :], now=NOW).state
    assert norm(two) == norm(expected)
    # the recorded history is exactly the set of distinct events, in time order per step
    assert sum(len(s.history) for s in got.steps) == len(chain)
    assert sum(len(o.new_events) for o in outs) == len(chain)


@PROPS
@given(scrambled(), st.data())
def test_applying_an_event_twice_equals_once(case: tuple[list, list], data: st.DataObject) -> None:
    _, messy = case
    cut = data.draw(st.integers(0, len(messy) - 1))
    prev = fold(messy[:cut])[0] if cut else None
    event = data.draw(st.sampled_from(messy))
    once = apply(prev, event, now=NOW)
    twice = apply(once.state, event, now=NOW + timedelta(seconds=1))
    assert twice.duplicate and not twice.changed and twice.new_events == ()
    assert twice.state.version == once.state.version and twice.state.updated_at == once.state.updated_at
    assert twice.state.duplicates == once.state.duplicates + 1
    assert norm(twice.state) == norm(once.state)


@PROPS
@given(scrambled(), late_receipts(), st.integers(0, 400))
def test_final_message_absorbs_late_events(case: tuple[list, list], late: list, hours: int) -> None:
    chain, messy = case
    state, _ = fold(messy)
    cfg = StateConfig(stale_after=timedelta(days=3))
    sealed = expire(state, now=chain[-1].status.timestamp + timedelta(days=3, hours=hours), config=cfg)
    assume(sealed is not None)
    assert sealed is not None
    assert sealed.final and is_sealed(sealed) and sealed.version == state.version + 1
    current = sealed
    for r in [*late, *chain]:
        o = apply(current, r, now=NOW + timedelta(days=30))
        assert not o.changed and o.new_events == ()
        assert o.state.version == sealed.version and o.state.updated_at == sealed.updated_at
        assert o.state.duplicates == current.duplicates + 1
        current = o.state
    assert norm(current) == norm(sealed)
    assert apply_many(sealed, late, now=NOW).changed is False
    assert expire(current, now=NOW + timedelta(days=999), config=cfg) is None


@PROPS
@given(scrambled(), late_receipts())
def test_read_final_message_stays_final_and_read(case: tuple[list, list], late: list) -> None:
    chain, messy = case
    reader = next((s.channel for s in fold(chain)[0].steps if s.channel in CAN_READ), "whatsapp")
    state, _ = fold([*messy, rc("read", chain[-1].status.timestamp + timedelta(seconds=1), reader)])
    assert state.final and content_final(state) and state.read_at is not None
    after, _ = fold(late, state)
    assert after.final and after.read_at is not None and after.read_at <= state.read_at
    read_steps = {s.channel for s in state.steps if s.state == "read"}
    assert all(s.state == "read" for s in after.steps if s.channel in read_steps)


@PROPS
@given(scrambled(), st.data())
def test_version_strictly_increases_on_change(case: tuple[list, list], data: st.DataObject) -> None:
    _, messy = case
    state: MessageState | None = None
    now = NOW
    for r in messy:
        now += timedelta(seconds=1)
        o = apply(state, r, now=now)
        before = 0 if state is None else state.version
        if o.changed:
            assert o.state.version == before + 1 and o.state.updated_at == now
        else:
            assert state is not None
            assert o.state.version == before and o.state.updated_at == state.updated_at
        state = o.state
        if data.draw(st.integers(0, 9)) == 0:  # the timer fires now and then
            sealed = expire(state, now=now + timedelta(days=data.draw(st.integers(0, 5))), config=CFG)
            if sealed is not None:
                assert sealed.version == state.version + 1 and sealed.final
                state = sealed
    assert state is not None


@PROPS
@given(scrambled(), late_receipts())
def test_status_never_regresses(case: tuple[list, list], extra: list) -> None:
    _, messy = case
    state: MessageState | None = None
    best: dict[str, tuple[int, datetime]] = {}
    for r in [*messy, *extra]:
        state = apply(state, r, now=NOW).state
        for s in state.steps:
            key = (rank(s.state), s.status_timestamp)
            if s.channel in best:
                assert key >= best[s.channel], (s.channel, best[s.channel], key)
            best[s.channel] = key
    assert state is not None
    assert [s.step for s in state.steps] == list(range(1, len(state.steps) + 1))
    assert [s.first_event_at for s in state.steps] == sorted(s.first_event_at for s in state.steps)


@pytest.mark.parametrize(
    "receipts",
    [
        [rc("sent", 0), rc("delivered", 10, detail="delivered_to_recipient")],
        [rc("sent", 0, "viber"), rc("undelivered", 30, "viber", code=2005)],
        [rc("queued", 0)],
        [rc("sent", 0, "viber"), rc("delivered", 5, "viber"), rc("sent", 50, "whatsapp")],
    ],
)
def test_expire_seals_exactly_when_expire_due_says(receipts: list[DeliveryReceipt]) -> None:
    cfg = StateConfig(stale_after=timedelta(days=10))
    state, _ = fold(receipts, config=cfg)
    due = expire_due(state, cfg)
    assert due is not None
    assert expire(state, now=due - timedelta(microseconds=1), config=cfg) is None
    sealed = expire(state, now=due, config=cfg)
    assert sealed is not None and sealed.final and sealed.version == state.version + 1
    assert expire_due(sealed, cfg) is None


def test_a_new_state_takes_the_given_lineage_and_every_later_version_keeps_it() -> None:
    first = apply(None, rc("sent", 1), now=NOW, lineage=77).state
    assert first.lineage == 77
    later = apply(first, rc("undelivered", 2), now=NOW, lineage=5).state  # only a new state takes one
    duplicate = apply(later, rc("undelivered", 2), now=NOW).state
    batch = apply_many(duplicate, [rc("sent", 1), rc("undelivered", 3, detail="x")], now=NOW).state
    sealed = expire(batch, now=NOW + timedelta(days=30))
    assert sealed is not None
    absorbed = apply(sealed, rc("delivered", 9), now=NOW).state
    assert [s.lineage for s in (later, duplicate, batch, sealed, absorbed)] == [77] * 5
    assert apply_many(None, [rc("sent", 1)], now=NOW, lineage=3).state.lineage == 3
