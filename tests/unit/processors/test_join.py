"""Merging states of different lineages (`processors.join`): the union of their events, in any order."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors.join import MERGED, descends, join, receipts_of
from processors.state import apply_many, expire, is_sealed
from schemas.models import EPOCH, MessageState
from tests.unit.processors.test_state import NOW, PROPS, at, fold, norm, rc, scrambled


def content(state: MessageState) -> MessageState:
    """What the receipts decide: `norm` without the lineage either."""
    return dataclasses.replace(norm(state), lineage=0)


def joined(held: MessageState, incoming: MessageState) -> MessageState:
    return join(held, incoming) or held


@st.composite
def split(draw: st.DrawFn) -> tuple[list, list, list]:
    """(the distinct receipts of one umid, and two overlapping subsets of them: what two lineages saw)."""
    chain, _ = draw(scrambled())
    sides = [draw(st.sampled_from(["a", "b", "ab"])) for _ in chain]
    a = [r for r, side in zip(chain, sides, strict=True) if "a" in side]
    b = [r for r, side in zip(chain, sides, strict=True) if "b" in side]
    return chain, a or chain[:1], b or chain[-1:]


@PROPS
@given(split())
def test_join_is_the_state_of_the_union_of_the_events(case: tuple[list, list, list]) -> None:
    chain, a, b = case
    union, _ = fold([r for r in chain if r in a or r in b])
    left = dataclasses.replace(apply_many(None, a, now=NOW).state, lineage=11)
    right = dataclasses.replace(apply_many(None, b, now=NOW).state, lineage=22)
    assert content(joined(left, right)) == content(union)
    assert content(joined(right, left)) == content(union)


@PROPS
@given(split())
def test_a_joined_state_absorbs_either_side_again_and_versions_grow(case: tuple[list, list, list]) -> None:
    _, a, b = case
    left = dataclasses.replace(apply_many(None, a, now=NOW).state, lineage=11, version=7)
    right = dataclasses.replace(apply_many(None, b, now=NOW).state, lineage=22, version=2)
    j = join(left, right)
    if j is None:  # b's events are all in a
        assert {(r.channel, r.status) for r in b} <= {(r.channel, r.status) for r in a}
        return
    assert j.lineage == MERGED and j.version == 8
    assert join(j, right) is None and join(j, left) is None and join(j, j) is None


def test_a_state_joined_with_itself_or_a_subset_of_its_events_adds_nothing() -> None:
    full = apply_many(None, [rc("sent", 1), rc("delivered", 2), rc("read", 3)], now=NOW).state
    part = apply_many(None, [rc("delivered", 2)], now=NOW).state
    assert join(full, full) is None
    assert join(full, part) is None
    assert join(part, full) is not None


def test_the_restart_case_a_new_lineage_with_the_later_receipt_moves_the_state_on() -> None:
    # before a restart: sent; after it, a new processor lineage knows only the delivered receipt
    before = dataclasses.replace(apply_many(None, [rc("sent", 1)], now=NOW).state, lineage=5, version=3)
    after = dataclasses.replace(
        apply_many(None, [rc("delivered", 60)], now=NOW + timedelta(hours=1)).state, lineage=9
    )
    j = join(before, after)
    assert j is not None
    assert j.state == "delivered" and j.steps[0].sent_at == at(1) and j.delivered_at == at(60)
    assert [e.state for e in j.steps[0].history] == ["sent", "delivered"]
    assert j.version == 4 and j.lineage == MERGED and j.updated_at == NOW + timedelta(hours=1)


def test_a_fallback_step_seen_only_after_a_reset_is_numbered_in_the_union() -> None:
    old = apply_many(None, [rc("sent", 1, "whatsapp"), rc("undelivered", 5, "whatsapp")], now=NOW).state
    new = apply_many(None, [rc("delivered", 30, "sms")], now=NOW).state
    j = joined(old, new)
    steps = [(s.step, s.channel, s.state) for s in j.steps]
    assert steps == [(1, "whatsapp", "undelivered"), (2, "sms", "delivered")]
    assert j.channel_path == "whatsapp>sms" and j.state == "delivered"


def test_sealed_on_either_side_stays_sealed_and_events_still_count() -> None:
    failed = apply_many(None, [rc("sent", 1), rc("undelivered", 2)], now=NOW).state
    sealed = expire(failed, now=NOW + timedelta(days=3))
    assert sealed is not None and is_sealed(sealed)
    late = apply_many(None, [rc("delivered", 3)], now=NOW).state
    for j in (joined(sealed, late), joined(late, sealed)):
        assert j.final and j.state == "delivered"


def test_step_fields_only_the_details_api_knows_are_filled_not_overwritten() -> None:
    base = apply_many(None, [rc("sent", 1)], now=NOW).state
    with_id = dataclasses.replace(base, steps=(dataclasses.replace(base.steps[0], channel_id="ch-1"),))
    j = join(base, with_id)
    assert j is not None and j.steps[0].channel_id == "ch-1"
    other = dataclasses.replace(base, steps=(dataclasses.replace(base.steps[0], channel_id="ch-2"),))
    assert join(j, other) is None  # the held value stays


def test_duplicates_are_the_larger_count_not_a_sum() -> None:
    a = apply_many(None, [rc("sent", 1), rc("sent", 1), rc("sent", 1)], now=NOW).state
    b = apply_many(None, [rc("sent", 1), rc("delivered", 2), rc("delivered", 2)], now=NOW).state
    j = joined(a, b)
    assert j.duplicates == 2 and j.steps[0].duplicates == 2


def test_descends_only_within_one_known_lineage() -> None:
    s = dataclasses.replace(apply_many(None, [rc("sent", 1)], now=NOW).state, lineage=42)
    assert descends(42, s)
    assert not descends(41, s)
    # records from before lineages existed continue each other, as versions always did
    assert descends(0, dataclasses.replace(s, lineage=0))
    assert not descends(0, s) and not descends(42, dataclasses.replace(s, lineage=0))
    assert not descends(MERGED, dataclasses.replace(s, lineage=MERGED))  # a merged row is always joined


def test_receipts_of_carry_every_history_event_and_the_ids() -> None:
    s = apply_many(None, [rc("sent", 1, batch_id="b-9"), rc("delivered", 2, "sms")], now=NOW).state
    rs = receipts_of(s)
    assert [(r.channel, r.status.state) for r in rs] == [("whatsapp", "sent"), ("sms", "delivered")]
    assert {r.batch_id for r in rs} == {"b-9"} and all(r.umid == s.umid for r in rs)


def test_states_of_two_umids_are_not_joined() -> None:
    a = apply_many(None, [rc("sent", 1)], now=NOW).state
    b = apply_many(None, [rc("sent", 1, umid="u-2")], now=NOW).state
    with pytest.raises(ValueError, match="umids"):
        join(a, b)
    assert EPOCH < NOW
