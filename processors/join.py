"""Merging two states of one umid that were folded from different sets of receipts. Pure.

Nothing here does I/O, reads the clock or the environment.

A state's `version` orders it only against states of the same `lineage` (`MessageState.lineage`: a random
id the processor gives a state when it creates it, kept by every later version). When the processor's
state is lost or rebuilt (a restarted embedded broker, a new cluster, a lost changelog, a reset consumer
group, a tombstone deleted before a late receipt), the next receipt for a known umid starts a NEW lineage
at version 1, folded from the new receipts only. Comparing its version with the stored one would refuse
the new truth (version 1 < the stored version) or, the other way round, replace a complete state by a
partial one. So the sinks merge states of different lineages by content instead:

    join(held, incoming) = the state of the union of both states' events

- content: `held`, unsealed, with every event of `incoming`'s step histories folded into it by the state
  machine (`processors.state.apply_many`), so steps, their order and numbers, current statuses, milestone
  times and finality are those of the union of the events, whatever the order of the two arguments;
- sealing (finality decided by time): sealed when either side was, since the processor that sealed it
  had seen no event within the horizon (an event the other side brings still counts in the content);
- user fields, batch and client ids: `held`'s, a null filled from `incoming` (first non-null, as in the
  state machine); the step fields only the details API supplies (`channel_id`, `country`, ...) likewise;
- bookkeeping: `duplicates` the larger of the two (per step and per message), `updated_at` the later one,
  `version` one more than the larger of the two, `lineage` `MERGED`.

`MERGED` belongs to no processor lineage, so every later state of that umid is joined again (never taken
by its version alone): its content is always that of the union of every event any lineage reported.
The join is idempotent (joining a state that brings nothing new returns None), and the content it
produces does not depend on the order of the joins (a property test checks commutativity and that it
equals folding the union of the events directly).
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace

from processors.state import DEFAULT_CONFIG, StateConfig, apply_many, is_sealed
from schemas.models import DeliveryReceipt, MessageState, Status, Step

#: the lineage of a merged state: no processor lineage continues it, so every later state is joined
MERGED = -1


def descends(held_lineage: int, incoming: MessageState) -> bool:
    """Whether `incoming` continues the lineage of a stored state (then its version alone orders them).
    Nothing continues `MERGED`. Lineage 0 is that of records written before lineages existed: they
    continue each other (as versions always did), and any processor lineage differs from it."""
    return incoming.lineage == held_lineage and held_lineage != MERGED


def receipts_of(state: MessageState) -> list[DeliveryReceipt]:
    """One receipt per event of every step's history, with the state's ids and user: what folding
    `state`'s events into another state of the same umid takes."""
    return [
        DeliveryReceipt(
            umid=state.umid,
            sub_account_id=state.sub_account_id,
            channel=step.channel,
            status=Status(e.state, e.timestamp, e.detail, e.error_code, e.error_message),
            received_at=state.updated_at,
            raw_json="",
            user=state.user,
            batch_id=state.batch_id,
            client_message_id=state.client_message_id,
            client_batch_id=state.client_batch_id,
        )
        for step in state.steps
        for e in step.history
    ]


_STEP_EXTRAS = ("channel_id", "country", "content_type", "created_at")


def _fill_step(s: Step, other: Step | None) -> Step:
    if other is None:
        return s
    changes: dict[str, object] = {
        name: getattr(other, name)
        for name in _STEP_EXTRAS
        if getattr(s, name) is None and getattr(other, name) is not None
    }
    if other.duplicates > s.duplicates:
        changes["duplicates"] = other.duplicates
    return replace(s, **changes) if changes else s  # type: ignore[arg-type]


def _same_ids(a: MessageState, b: MessageState) -> bool:
    """Same ids and the same user as far as a store keeps it (channel user id; a number only when both
    have one: a state rebuilt from a masked row has none, and filling it in is no news, the row keeps its
    masked and hashed columns)."""
    ua, ub = a.user, b.user
    ids = (a.batch_id, a.client_message_id, a.client_batch_id, ua.channel_user_id)
    return ids == (b.batch_id, b.client_message_id, b.client_batch_id, ub.channel_user_id) and (
        ua.msisdn == ub.msisdn or not ua.msisdn or not ub.msisdn
    )


def _no_counts(steps: tuple[Step, ...]) -> tuple[Step, ...]:
    return tuple(replace(s, duplicates=0) if s.duplicates else s for s in steps)


def join(
    held: MessageState, incoming: MessageState, config: StateConfig = DEFAULT_CONFIG
) -> MessageState | None:
    """The state of the union of `held`'s and `incoming`'s events (see the module docstring), or None
    when `incoming` adds nothing to `held`. Raises ValueError for states of two different umids."""
    if held.umid != incoming.umid:
        raise ValueError(f"cannot join states of umids {held.umid!r} and {incoming.umid!r}")
    sealed = is_sealed(held) or is_sealed(incoming)
    base = replace(held, final=False) if is_sealed(held) else held
    now = max(held.updated_at, incoming.updated_at)
    out = apply_many(base, receipts_of(incoming), now=now, config=config)
    state = out.state
    held_steps = {s.channel: s for s in held.steps}
    other = {s.channel: s for s in incoming.steps}
    steps = tuple(
        _fill_step(
            replace(s, duplicates=held_steps[s.channel].duplicates)
            if s.channel in held_steps
            else replace(s, duplicates=0),
            other.get(s.channel),
        )
        for s in state.steps
    )
    final = state.final or sealed
    if final == held.final and _no_counts(steps) == _no_counts(held.steps) and _same_ids(state, held):
        return None  # only counters or a number the held state could not keep: nothing to write
    return dataclasses.replace(
        state,
        steps=steps,
        final=final,
        version=max(held.version, incoming.version) + 1,
        lineage=MERGED,
        updated_at=now,
        duplicates=max(held.duplicates, incoming.duplicates),
    )
