"""The message-state machine: delivery receipts in, the truth about each umid out. Pure.

Nothing here does I/O, reads the clock or the environment: event time comes from the receipt, processing
time (`now`) is an argument. The Faust agent reads the previous `MessageState` from its table, calls
`apply`/`apply_many`, writes `Outcome.state` back (also when `changed` is False: the duplicate counters
moved) and emits `Outcome.state` only when `changed`. A timer calls `expire` for time-based finality.

Raises `ValueError` only for contract violations by the caller (a receipt for another umid, an empty
batch with no previous state, an invalid `StateConfig`); unknown states or channels are never errors, and
no value a decoded receipt can hold makes it raise (see "Time range").

Time range
    Receipts may carry any time `datetime` can represent (8x8, or a client, may send
    `9999-12-31T23:59:59Z`; `0001-01-01T00:00:00Z` is representable too). Times are only compared, except
    where `expire_due` adds a span (`read_window`, `fallback_horizon`, `stale_after`) to an event time: a
    sum past `datetime.max` saturates at `datetime.max` (in the event's time zone), so such a rule is due
    only at `now = datetime.max`, i.e. never in practice, and the message stays open until a rule that
    does not overflow seals it (or its receipts make it content-final). Spans are positive
    (`StateConfig`), so nothing can fall below `datetime.min`.

Steps
    A step is one channel attempt. Receipts carry the channel, not the step number, so a step is
    identified by its channel (a channel used twice under one umid is one step) and the steps are ordered
    by `(first_event_at, channel)`, where `first_event_at` is the earliest event time ever seen for the
    channel. A receipt that lowers a channel's first event time, or adds a channel that started earlier
    than an existing one, re-orders and re-numbers the steps (1-based). The steps are therefore a pure
    function of the SET of distinct events, whatever order they arrive in.

Progress ranks (`rank`)
    =========================================  ====  ===========================================
    state                                      rank  note
    =========================================  ====  ===========================================
    unknown, and any state not listed here     0     recorded in history, never fatal
    queued, accepted, ok                       1     accepted by 8x8 / operation successful
    sent                                       2
    delivered                                  3     success
    undelivered, rejected, failed, error       3     terminal failure (equal to delivered)
    read                                       4     top: nothing replaces it but a later read
    =========================================  ====  ===========================================

    Failures rank with `delivered` so that an operator failure after `delivered_to_operator` wins, and a
    later `delivered` after a failure wins, by event time.

Current status of a step (the transition rule)
    The incoming event replaces the current one iff it is greater in the total order
    `(rank, timestamp, is_failure, state, detail, error_code, error_message)` (None sorts before any
    value): a lower rank never replaces a higher one (no regression: a late `sent` after `delivered`, a
    retried `delivered` after `read` only enter the history); between equal ranks the later event time
    wins; on an exact time tie a failure beats a success, then the lexically greater state/detail/error.
    Being a maximum over the set, the current status is independent of arrival order.

Per step
    `history`: the distinct `StatusEvent`s, sorted by `(timestamp, rank, ...)` (the same total order, so
    ties are deterministic). An exact duplicate (the whole `StatusEvent`: state, timestamp, detail,
    error_code, error_message; the channel is the step) is counted in the step's and the message's
    `duplicates` and changes nothing else. At most `history_limit` events are kept: beyond it the oldest
    event that is not the current one is dropped; the dropped event still counted for `first_event_at`,
    `sent_at`, `delivered_at`, `read_at`, which are kept as running minima. (Trimming keeps the result a
    function of the event set; only a re-delivered, already-dropped event is no longer recognised as a
    duplicate: it yields `changed=False, duplicate=False`.)
    `sent_at`: earliest sent/delivered/read event. `delivered_at`: earliest delivered or read event (read
    implies delivered; a lost `delivered` receipt gives the read time as an upper bound).
    `read_at`: earliest read. `failed_at`: the current status's time when the current status is a terminal
    failure, else None (a later `delivered` clears it).

Per message
    state/detail/error/status_timestamp of the LAST step (fallback means the earlier ones failed or timed
    out); `first_sent_at`, `delivered_at`, `read_at`: earliest over the steps (time-to-deliver =
    delivered_at - first_sent_at, time-to-read = read_at - delivered_at). `sub_account_id` from the first
    receipt; user fields, batch_id, client ids: the first non-null value seen per field, never erased by a
    null (a later receipt may add `channelUserId`). These are first-come: if 8x8 ever sent two different
    non-null values for one umid the arrival order would decide; it sends one recipient per umid.

Finality. `final` is True once no further change is expected. Two kinds:
    content-final (decided by the events alone, so order-independent):
        - the message reached read on any step (`read_at` set; read is the top rank, this never reverts);
        - the last step's channel never reports anything better: `sms`, `zalonotification`,
          `linenotification` never report read, so `delivered` (or better) is final at once; `line` never
          reports delivered either, so `sent` (or better, non-failure) is final at once. This kind can
          revert if a later receipt says otherwise (an sms `undelivered` after `delivered_to_operator`,
          a fallback step after a `line` sent): the flag reports the truth of the events.
        A content-final message is NOT sealed: it still records late events (a `delivered` arriving after
        the `read`, with an earlier time, must set `delivered_at` exactly as if it had come first).
    sealed (decided by time, `expire`): the last step's terminal failure has no later step within
        `fallback_horizon`; or the read window has passed since the latest delivery (last step not
        failed); or, when `stale_after` is set, no event for that long. `expire` seals only messages that
        are not final yet, so a message is sealed iff `final` and not content-final (`is_sealed`; no
        extra field needed, it survives serialisation).
    A sealed message absorbs everything that arrives later: the receipt is counted in `duplicates`
    (message, and step when its channel exists) and changes nothing else (`changed=False`, same version).
    Order-independence therefore holds exactly for all receipts that arrive before the seal.

Versions. `version` = previous + 1 on each change (1 for a new umid), `updated_at = now` on each change;
`expire` is a change. `apply_many` bumps the version at most ONCE per batch (fewer outputs; the sink only
needs a strictly increasing version per emitted change) and otherwise equals folding `apply`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from schemas.frozen import fast_init
from schemas.models import DeliveryReceipt, MessageState, StatusEvent, Step, User

__all__ = [
    "DEFAULT_CONFIG",
    "FAILURE_STATES",
    "Outcome",
    "StateConfig",
    "apply",
    "apply_many",
    "content_final",
    "expire",
    "is_failure",
    "is_sealed",
    "rank",
]

_RANKS: dict[str, int] = {
    "unknown": 0,
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
FAILURE_STATES: frozenset[str] = frozenset({"undelivered", "rejected", "failed", "error"})
_READ_RANK = 4
_SENT_LIKE = frozenset({"sent", "delivered", "read"})
_DELIVERED_LIKE = frozenset({"delivered", "read"})
# channel -> rank of the best status it ever reports (from list-of-supported-chatapps-channels.md)
_BEST_REPORTED: dict[str, int] = {
    "sms": 3,
    "zalonotification": 3,
    "linenotification": 3,
    "line": 2,
}


@dataclass(frozen=True, slots=True)
class StateConfig:
    """Tuning of the state machine. Durations are event-time spans compared with `now` by `expire`."""

    read_window: timedelta = timedelta(hours=48)  # read receipts still possible this long after delivery
    # a failed last step with no later step this long is final (8x8 fallbackAfter is at most 86400 s)
    fallback_horizon: timedelta = timedelta(hours=24, minutes=5)
    history_limit: int = 32  # max distinct events kept per step; beyond it the oldest non-current goes
    stale_after: timedelta | None = None  # seal a message with no event this long (None: never)

    def __post_init__(self) -> None:
        if self.history_limit < 1:
            raise ValueError(f"history_limit must be >= 1, got {self.history_limit}")
        if self.read_window <= timedelta(0) or self.fallback_horizon <= timedelta(0):
            raise ValueError("read_window and fallback_horizon must be positive")
        if self.stale_after is not None and self.stale_after <= timedelta(0):
            raise ValueError("stale_after must be positive or None")


DEFAULT_CONFIG = StateConfig()


@fast_init
@dataclass(frozen=True, slots=True)
class Outcome:
    """Result of `apply`/`apply_many`.

    `state` is always the state to store (duplicate counters may have moved even when `changed` is False);
    emit it only when `changed`. `new_events` are (step number in `state`, event) newly recorded in a
    step's history, for the status-history topic (identify the step by `state.steps[n - 1].channel`: a
    later receipt may re-number the steps).
    """

    state: MessageState
    changed: bool
    duplicate: bool
    new_events: tuple[tuple[int, StatusEvent], ...]


def rank(state: str) -> int:
    """Progress rank of a (lower-case) state; unknown strings rank 0. See the module table."""
    return _RANKS.get(state, 0)


def is_failure(state: str) -> bool:
    return state in FAILURE_STATES


# --- ordering ------------------------------------------------------------------------------------


def _tie(state: str, detail: str | None, code: int | None, msg: str | None) -> tuple[object, ...]:
    return (
        state in FAILURE_STATES,
        state,
        detail is not None,
        detail or "",
        code is not None,
        code or 0,
        msg is not None,
        msg or "",
    )


def _hkey(e: StatusEvent) -> tuple[object, ...]:
    """History order: event time first, then the status order; total over distinct events."""
    return (e.timestamp, _RANKS.get(e.state, 0), *_tie(e.state, e.detail, e.error_code, e.error_message))


def _beats(e: StatusEvent, s: Step) -> bool:
    """Does event `e` replace the step's current status? (rank, time, failure, lexical)."""
    re_, rs = _RANKS.get(e.state, 0), _RANKS.get(s.state, 0)
    if re_ != rs:
        return re_ > rs
    if e.timestamp != s.status_timestamp:
        return e.timestamp > s.status_timestamp
    return _tie(e.state, e.detail, e.error_code, e.error_message) > _tie(
        s.state, s.detail, s.error_code, s.error_message
    )


def _min(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None or a <= b:
        return a
    return b


# --- finality ------------------------------------------------------------------------------------


def saturating_add(t: datetime, span: timedelta) -> datetime:
    """`t + span` for a positive span, saturating at `datetime.max` (see "Time range")."""
    try:
        return t + span
    except OverflowError:
        return datetime.max.replace(tzinfo=t.tzinfo)


def content_final(state: MessageState) -> bool:
    """Final by the events alone: read anywhere, or the last step at its channel's best reportable status."""
    if state.read_at is not None:
        return True
    if not state.steps:
        return False
    last = state.steps[-1]
    best = _BEST_REPORTED.get(last.channel)
    return best is not None and _RANKS.get(last.state, 0) >= best and last.state not in FAILURE_STATES


def is_sealed(state: MessageState) -> bool:
    """Sealed by `expire` (time): absorbs every later receipt."""
    return state.final and not content_final(state)


def _content_final_parts(read_at: datetime | None, last: Step) -> bool:
    if read_at is not None:
        return True
    best = _BEST_REPORTED.get(last.channel)
    return best is not None and _RANKS.get(last.state, 0) >= best and last.state not in FAILURE_STATES


# --- step construction ---------------------------------------------------------------------------


def _new_step(number: int, channel: str, e: StatusEvent) -> Step:
    st = e.state
    ts = e.timestamp
    return Step(
        step=number,
        channel=channel,
        state=st,
        status_timestamp=ts,
        first_event_at=ts,
        detail=e.detail,
        error_code=e.error_code,
        error_message=e.error_message,
        sent_at=ts if st in _SENT_LIKE else None,
        delivered_at=ts if st in _DELIVERED_LIKE else None,
        read_at=ts if st == "read" else None,
        failed_at=ts if st in FAILURE_STATES else None,
        history=(e,),
    )


def _renumber(s: Step, number: int) -> Step:
    return Step(
        number, s.channel, s.state, s.status_timestamp, s.first_event_at, s.detail, s.error_code,
        s.error_message, s.sent_at, s.delivered_at, s.read_at, s.failed_at, s.history, s.duplicates,
        s.channel_id, s.country, s.content_type, s.created_at,
    )  # fmt: skip


def _count_dup(s: Step) -> Step:
    return Step(
        s.step, s.channel, s.state, s.status_timestamp, s.first_event_at, s.detail, s.error_code,
        s.error_message, s.sent_at, s.delivered_at, s.read_at, s.failed_at, s.history, s.duplicates + 1,
        s.channel_id, s.country, s.content_type, s.created_at,
    )  # fmt: skip


def _add_event(s: Step, e: StatusEvent, index: int, limit: int) -> Step | None:
    """The step with new (non-duplicate) event `e` inserted at history `index`; None if nothing changes."""
    hist = s.history
    history = (*hist[:index], e, *hist[index:])
    if _beats(e, s):
        state, ts, detail, code, msg = e.state, e.timestamp, e.detail, e.error_code, e.error_message
    else:
        state, ts, detail, code, msg = s.state, s.status_timestamp, s.detail, s.error_code, s.error_message
    if len(history) > limit:
        history = _trim(history, state, ts, detail, code, msg, limit)
    est, ets = e.state, e.timestamp
    sent_at = _min(s.sent_at, ets) if est in _SENT_LIKE else s.sent_at
    delivered_at = _min(s.delivered_at, ets) if est in _DELIVERED_LIKE else s.delivered_at
    read_at = _min(s.read_at, ets) if est == "read" else s.read_at
    first = s.first_event_at if s.first_event_at <= ets else ets
    if (
        history == hist
        and state == s.state
        and ts == s.status_timestamp
        and detail == s.detail
        and code == s.error_code
        and msg == s.error_message
        and sent_at == s.sent_at
        and delivered_at == s.delivered_at
        and read_at == s.read_at
        and first == s.first_event_at
    ):
        return None
    return Step(
        s.step, s.channel, state, ts, first, detail, code, msg, sent_at, delivered_at, read_at,
        ts if state in FAILURE_STATES else None, history, s.duplicates,
        s.channel_id, s.country, s.content_type, s.created_at,
    )  # fmt: skip


def _trim(
    history: tuple[StatusEvent, ...],
    state: str,
    ts: datetime,
    detail: str | None,
    code: int | None,
    msg: str | None,
    limit: int,
) -> tuple[StatusEvent, ...]:
    """Drop the oldest events that are not the current status until `limit` remain."""
    kept = list(history)
    i = 0
    while len(kept) > limit:
        h = kept[i]
        if (
            h.state == state
            and h.timestamp == ts
            and h.detail == detail
            and h.error_code == code
            and h.error_message == msg
        ):
            i += 1
            continue
        del kept[i]
    return tuple(kept)


# --- message assembly ----------------------------------------------------------------------------


def _merge_user(a: User, b: User) -> User:
    if a is b:
        return a
    msisdn = a.msisdn if a.msisdn is not None else b.msisdn
    cuid = a.channel_user_id if a.channel_user_id is not None else b.channel_user_id
    name = a.name if a.name is not None else b.name
    username = a.username if a.username is not None else b.username
    if msisdn is a.msisdn and cuid is a.channel_user_id and name is a.name and username is a.username:
        return a
    return User(msisdn, cuid, name, username)


def _assemble(
    umid: str,
    sub_account_id: str,
    version: int,
    steps: tuple[Step, ...],
    updated_at: datetime,
    user: User,
    batch_id: str | None,
    client_message_id: str | None,
    client_batch_id: str | None,
    duplicates: int,
    lineage: int,
) -> MessageState:
    last = steps[-1]
    if len(steps) == 1:
        first_sent, delivered, read = last.sent_at, last.delivered_at, last.read_at
    else:
        first_sent = delivered = read = None
        for s in steps:
            first_sent = _min(first_sent, s.sent_at)
            delivered = _min(delivered, s.delivered_at)
            read = _min(read, s.read_at)
    return MessageState(
        umid, sub_account_id, version, last.state, last.status_timestamp, steps, updated_at,
        last.detail, last.error_code, last.error_message, user, batch_id, client_message_id,
        client_batch_id, first_sent, delivered, read, _content_final_parts(read, last), duplicates, lineage,
    )  # fmt: skip


def _with_counts(prev: MessageState, steps: tuple[Step, ...], duplicates: int) -> MessageState:
    """`prev` with only the duplicate counters changed (version and updated_at untouched)."""
    p = prev
    return MessageState(
        p.umid, p.sub_account_id, p.version, p.state, p.status_timestamp, steps, p.updated_at, p.detail,
        p.error_code, p.error_message, p.user, p.batch_id, p.client_message_id, p.client_batch_id,
        p.first_sent_at, p.delivered_at, p.read_at, p.final, duplicates, p.lineage,
    )  # fmt: skip


def _event_of(receipt: DeliveryReceipt) -> StatusEvent:
    st = receipt.status
    return StatusEvent(st.state, st.timestamp, st.detail, st.error_code, st.error_message)


# --- the transition ------------------------------------------------------------------------------


def _apply(
    prev: MessageState | None,
    receipt: DeliveryReceipt,
    version: int,
    now: datetime,
    limit: int,
    lineage: int = 0,
) -> tuple[MessageState, bool, bool, StatusEvent | None]:
    """One receipt. Returns (state, changed, duplicate, recorded event). On change the state gets
    `version` and `updated_at=now`; otherwise it keeps prev's. A new state (`prev` None) gets `lineage`,
    a later one keeps prev's."""
    e = _event_of(receipt)
    channel = receipt.channel
    if prev is None:
        step = _new_step(1, channel, e)
        state = _assemble(
            receipt.umid, receipt.sub_account_id, version, (step,), now, receipt.user, receipt.batch_id,
            receipt.client_message_id, receipt.client_batch_id, 0, lineage,
        )  # fmt: skip
        return state, True, False, e
    if receipt.umid != prev.umid:
        raise ValueError(f"receipt for umid {receipt.umid!r} applied to state of {prev.umid!r}")

    steps = prev.steps
    pos = -1
    for i, s in enumerate(steps):
        if s.channel == channel:
            pos = i
            break

    if prev.final and not content_final(prev):  # sealed: absorb, count only
        duplicate = False
        if pos >= 0:
            s = steps[pos]
            duplicate = e in s.history
            steps = (*steps[:pos], _count_dup(s), *steps[pos + 1 :])
        return _with_counts(prev, steps, prev.duplicates + 1), False, duplicate, None

    user = _merge_user(prev.user, receipt.user)
    batch_id = prev.batch_id if prev.batch_id is not None else receipt.batch_id
    cmid = prev.client_message_id if prev.client_message_id is not None else receipt.client_message_id
    cbid = prev.client_batch_id if prev.client_batch_id is not None else receipt.client_batch_id
    ids_changed = (
        user is not prev.user
        or batch_id is not prev.batch_id
        or cmid is not prev.client_message_id
        or cbid is not prev.client_batch_id
    )

    duplicate = False
    recorded: StatusEvent | None = None
    reorder = False
    if pos < 0:
        new_steps = [*steps, _new_step(0, channel, e)]
        reorder = True
        recorded = e
        duplicates = prev.duplicates
    else:
        s = steps[pos]
        hist = s.history
        key = _hkey(e)
        index = bisect_left(hist, key, key=_hkey)
        if index < len(hist) and hist[index] == e:
            duplicate = True
            duplicates = prev.duplicates + 1
            new_steps = list(steps)
            new_steps[pos] = _count_dup(s)
        else:
            duplicates = prev.duplicates
            ns = _add_event(s, e, index, limit)
            if ns is None:
                new_steps = list(steps)
            else:
                new_steps = list(steps)
                new_steps[pos] = ns
                if e in ns.history:
                    recorded = e
                reorder = ns.first_event_at != s.first_event_at

    steps_changed = recorded is not None or (not duplicate and new_steps[pos] is not steps[pos])
    if reorder and len(new_steps) > 1 and not _in_order(new_steps):
        new_steps.sort(key=_step_order)
    for i, s in enumerate(new_steps):
        if s.step != i + 1:
            new_steps[i] = _renumber(s, i + 1)
    steps_t = tuple(new_steps)

    if not steps_changed and not ids_changed:
        return _with_counts(prev, steps_t, duplicates), False, duplicate, None
    state = _assemble(
        prev.umid, prev.sub_account_id, version, steps_t, now, user, batch_id, cmid, cbid, duplicates,
        prev.lineage,
    )  # fmt: skip
    return state, True, duplicate, recorded


def _step_order(s: Step) -> tuple[datetime, str]:
    return (s.first_event_at, s.channel)


def _in_order(steps: list[Step]) -> bool:
    prev = steps[0]
    for s in steps[1:]:
        if s.first_event_at < prev.first_event_at or (
            s.first_event_at == prev.first_event_at and s.channel < prev.channel
        ):
            return False
        prev = s
    return True


def _step_number(state: MessageState, channel: str) -> int:
    for s in state.steps:
        if s.channel == channel:
            return s.step
    raise AssertionError(f"no step for channel {channel!r}")  # pragma: no cover - recorded => exists


def apply(
    prev: MessageState | None,
    receipt: DeliveryReceipt,
    *,
    now: datetime,
    config: StateConfig = DEFAULT_CONFIG,
    lineage: int = 0,
) -> Outcome:
    """Fold one receipt into the state of its umid (`prev` None for a new umid).

    Never reads the clock: `now` becomes `updated_at` when the state changes. A new state gets `lineage`
    (the shell draws it at random: `schemas.models.MessageState.lineage`); a later one keeps prev's.
    Raises ValueError when the receipt's umid differs from `prev.umid`.
    """
    version = 1 if prev is None else prev.version + 1
    state, changed, duplicate, recorded = _apply(prev, receipt, version, now, config.history_limit, lineage)
    new_events = ((_step_number(state, receipt.channel), recorded),) if recorded is not None else ()
    return Outcome(state, changed, duplicate, new_events)


def apply_many(
    prev: MessageState | None,
    receipts: Iterable[DeliveryReceipt],
    *,
    now: datetime,
    config: StateConfig = DEFAULT_CONFIG,
    lineage: int = 0,
) -> Outcome:
    """Fold a batch of receipts for ONE umid. Equals folding `apply` one by one, except that the version
    grows by at most one for the whole batch (a new state gets `lineage`, as with `apply`). `changed` =
    any changed; `duplicate` = the batch was not empty and every receipt was an exact duplicate;
    `new_events` in application order, numbered by the steps of the returned state. Raises ValueError
    for an empty batch with `prev` None, or mixed umids.
    """
    version = 1 if prev is None else prev.version + 1
    limit = config.history_limit
    state = prev
    changed = False
    all_dup = True
    seen = False
    recorded: list[tuple[str, StatusEvent]] = []
    for r in receipts:
        seen = True
        state, ch, dup, ev = _apply(state, r, version, now, limit, lineage)
        changed |= ch
        all_dup &= dup
        if ev is not None:
            recorded.append((r.channel, ev))
    if state is None:
        raise ValueError("apply_many needs a previous state or at least one receipt")
    new_events = tuple((_step_number(state, ch), ev) for ch, ev in recorded)
    return Outcome(state, changed, seen and all_dup, new_events)


def expire_due(state: MessageState, config: StateConfig = DEFAULT_CONFIG) -> datetime | None:
    """The earliest time at which `expire` seals `state`; None when no rule will (or it is final).

    Due at the latest of: the last step's terminal failure + `fallback_horizon`; every step's delivery +
    `read_window` (reads may come for any delivered step). A message whose last step is neither failed nor
    delivered and that no step delivered has no such rule; `stale_after` (latest event + stale_after)
    seals it too, whichever comes first. Never raises: a sum past `datetime.max` is `datetime.max`.
    """
    if state.final or not state.steps:
        return None
    last = state.steps[-1]
    due: datetime | None = None
    if last.state in FAILURE_STATES:
        due = saturating_add(last.status_timestamp, config.fallback_horizon)
    for s in state.steps:
        if s.delivered_at is not None:
            d = saturating_add(s.delivered_at, config.read_window)
            if due is None or d > due:
                due = d
    if due is None and _RANKS.get(last.state, 0) >= 3 and last.state not in FAILURE_STATES:
        # delivered without a delivered_at (a foreign state)
        due = saturating_add(last.status_timestamp, config.read_window)
    if config.stale_after is not None:
        latest = max(max(s.status_timestamp, s.history[-1].timestamp if s.history else s.status_timestamp)
                     for s in state.steps)  # fmt: skip
        stale = saturating_add(latest, config.stale_after)
        if due is None or stale < due:
            due = stale
    return due


def expire(
    state: MessageState, *, now: datetime, config: StateConfig = DEFAULT_CONFIG
) -> MessageState | None:
    """Seal a message that time has made final (`expire_due(state) <= now`); None when nothing is due yet
    or it is already final. The returned state is final, version + 1, updated_at = now."""
    due = expire_due(state, config)
    if due is None or now < due:
        return None
    p = state
    return MessageState(
        p.umid, p.sub_account_id, p.version + 1, p.state, p.status_timestamp, p.steps, now, p.detail,
        p.error_code, p.error_message, p.user, p.batch_id, p.client_message_id, p.client_batch_id,
        p.first_sent_at, p.delivered_at, p.read_at, True, p.duplicates, p.lineage,
    )  # fmt: skip
