"""Reconciliation with 8x8's Retrieve message details API: the pure parts. No I/O, no clock.

The reconciler (`chatpipe.reconciler`, the shell) looks up messages that are not final and have not
changed for `reconcile_after` seconds, and turns each answer into synthetic `DeliveryReceipt`s on
`chatpipe.receipts.raw`: one per `data[]` record (one record per fallback step). The state machine
(`processors.state`) folds them like any webhook: exact duplicates are counted, states never regress, a
step it never heard of appears.

Telling them apart: a reconciled receipt has `raw_json` = the details record (compact JSON, it carries
`step` and no `eventType`) and `received_at` = the fetch time; `version` stays None. `is_reconciled`
recognises one. The Avro schema has no `source` field (adding one is a schema change, not done here).

Limits of synthetic receipts (what the receipt schema cannot carry): the authoritative `step` number,
`channelId`, `country`, `contentType`, `createdAt` are only in `raw_json`, and the state machine still
orders steps by each channel's first event time. So the reconciler also records them (`step_details`) in
the store with the lookup, and the read API takes them from there (`sinks.present.detail_records`): 8x8's
step numbers win. The details API reports each step's CURRENT status only.

Contracts
- `details_to_receipts` raises `InvalidEvent` (field = JSON path, e.g. `data[1].status.timestamp`) for any
  body that is not a well-formed details answer for the requested umid, and nothing else.
- `Pacer` spaces the requests of one key (subaccount) from the previous ANSWER, so that whatever the
  network delays, two requests reach 8x8 at least `interval + margin` apart; a 429 opens a circuit that
  waits what 8x8 asked and then slows the key down. Every method takes `now` (monotonic seconds).
- `CheckSchedule` decides when an umid may be looked up again (backoff after each lookup).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson

from schemas.errors import InvalidEvent
from schemas.fields import (
    MAX_ID_LENGTH,
    FieldError,
    bad,
    int32,
    iso_timestamp,
    jtype,
    normalise_channel,
    opt_obj,
    opt_str,
    req_str,
    show,
)
from schemas.models import DeliveryReceipt, Status, User

__all__ = [
    "Candidate",
    "CheckSchedule",
    "Outcome",
    "Pacer",
    "details_to_receipts",
    "is_reconciled",
    "next_check",
    "parse_retry_after",
    "select_candidates",
    "step_details",
]

# --- details body -> receipts ---------------------------------------------------------------------


def _channel(value: str, known: Sequence[str]) -> str:
    """Lower case (`GoogleRCS` -> `rcs`). When the message's known channels lack it but have exactly one
    `<it>notification` (`Zalo` in the details API, `ZaloNotification` in webhooks), that one: the same
    attempt must not become a second step under another spelling."""
    channel = normalise_channel(value)
    if known and channel not in known:
        matches = [k for k in known if k == channel + "notification"]
        if len(matches) == 1:
            return matches[0]
    return channel


def _record(
    rec: object, path: str, sub_account_id: str, umid: str, fetched_at: datetime, known: Sequence[str]
) -> tuple[int, DeliveryReceipt]:
    if type(rec) is not dict:
        raise FieldError(path, f"expected object, got {jtype(rec)}")
    got_umid = req_str(rec, "umid", path, MAX_ID_LENGTH)
    if got_umid.lower() != umid.lower():
        bad(path, "umid", f"{show(got_umid)} is not the requested umid {show(umid)}")
    got_sub = req_str(rec, "subAccountId", path, MAX_ID_LENGTH)
    if got_sub.lower() != sub_account_id.lower():
        bad(path, "subAccountId", f"{show(got_sub)} is not the requested subaccount")
    direction = opt_str(rec, "direction", path)
    if direction is not None and direction.lower() != "outbound":
        bad(path, "direction", f"expected outbound, got {show(direction)}")
    channel = _channel(req_str(rec, "channel", path), known)
    if rec.get("step") is None:
        bad(path, "step", "required")
    step = int32(rec["step"], path, "step")
    if step < 1:
        bad(path, "step", f"must be >= 1, got {step}")
    status = opt_obj(rec, "status", path)
    if status is None:
        bad(path, "status", "required")
    sp = f"{path}.status"
    detail = opt_str(status, "detail", sp)
    code = status.get("errorCode")
    if status.get("timestamp") is None:
        bad(sp, "timestamp", "required")
    st = Status(
        state=req_str(status, "state", sp).lower(),
        timestamp=iso_timestamp(status["timestamp"], sp, "timestamp"),
        detail=detail.lower() if detail else None,
        error_code=None if code is None else int32(code, sp, "errorCode"),
        error_message=opt_str(status, "errorMessage", sp),
    )
    user = opt_obj(rec, "user", path) or {}
    up = f"{path}.user"
    receipt = DeliveryReceipt(
        umid=umid,
        sub_account_id=sub_account_id,
        channel=channel,
        status=st,
        received_at=fetched_at,
        raw_json=orjson.dumps(rec).decode(),
        user=User(msisdn=opt_str(user, "msisdn", up), channel_user_id=opt_str(user, "channelUserId", up)),
        batch_id=opt_str(rec, "batchId", path),
        client_message_id=opt_str(rec, "clientMessageId", path),
        client_batch_id=opt_str(rec, "clientBatchId", path),
    )
    return step, receipt


def details_to_receipts(
    sub_account_id: str,
    umid: str,
    body: bytes,
    fetched_at: datetime,
    *,
    known_channels: Sequence[str] = (),
) -> list[DeliveryReceipt]:
    """The synthetic delivery receipts of one Retrieve-message-details answer, in step order.

    One receipt per `data[]` record: channel lower-cased (see `_channel` for `known_channels`, the
    message's channels as stored), status state/detail lower-cased, errorCode as int (a digit string is
    accepted), user, batch and client ids; `umid`/`sub_account_id` as requested, `received_at` =
    `fetched_at`, `raw_json` = the record as compact JSON. Unknown extra fields are accepted and kept in
    `raw_json`; an empty `data` gives no receipt.

    Raises `InvalidEvent` (code 1000, `field` = JSON path, `raw` = body) when the body is not UTF-8 JSON, has
    no `data` array, or a record lacks what a receipt needs (umid, subAccountId, channel, step,
    status.state, status.timestamp), belongs to another umid or subaccount, is inbound, or repeats a step.
    """
    try:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise FieldError("body", f"not valid JSON (line {exc.lineno} column {exc.colno})") from None
        if type(doc) is not dict:
            raise FieldError("body", f"expected a JSON object, got {jtype(doc)}")
        data = doc.get("data")
        if data is None:
            raise FieldError("data", "required")
        if type(data) is not list:
            raise FieldError("data", f"expected array, got {jtype(data)}")
        known = tuple(known_channels)
        out: list[tuple[int, DeliveryReceipt]] = []
        seen: dict[int, int] = {}
        for i, rec in enumerate(data):
            step, receipt = _record(rec, f"data[{i}]", sub_account_id, umid, fetched_at, known)
            if step in seen:
                bad(f"data[{i}]", "step", f"step {step} already given by data[{seen[step]}]")
            seen[step] = i
            out.append((step, receipt))
    except FieldError as problem:
        message = f"{problem.field}: {problem.message}"
        raise InvalidEvent(message, field=problem.field, raw=bytes(body)) from None
    out.sort(key=lambda pair: pair[0])
    return [r for _, r in out]


#: per-step fields of a details record that receipts lack (kept by the store for the read API)
STEP_DETAIL_KEYS = ("channelId", "country", "contentType", "createdAt")


def step_details(receipts: Sequence[DeliveryReceipt]) -> list[dict[str, Any]]:
    """What the details API said of each step, from `details_to_receipts`'s receipts: `step` (8x8's own
    number), `channel` (as chatpipe stores it) and whichever of `STEP_DETAIL_KEYS` are non-empty strings."""
    out: list[dict[str, Any]] = []
    for r in receipts:
        rec = orjson.loads(r.raw_json)
        item: dict[str, Any] = {"step": int32(rec.get("step"), "", "step"), "channel": r.channel}
        for key in STEP_DETAIL_KEYS:
            value = rec.get(key)
            if isinstance(value, str) and value.strip():
                item[key] = value
        out.append(item)
    return out


def is_reconciled(receipt: DeliveryReceipt) -> bool:
    """Whether a receipt was made by the reconciler (its raw JSON is a details record, not a webhook)."""
    raw = receipt.raw_json
    return '"step"' in raw and '"eventType"' not in raw


# --- 429 -----------------------------------------------------------------------------------------

_RETRY_IN = re.compile(r"try\s+again\s+in\s+(\d+(?:\.\d+)?)\s*sec", re.IGNORECASE)
MAX_RETRY_AFTER = 3600.0


def parse_retry_after(message: object, default: float = 1.0) -> float:
    """Seconds to wait from 8x8's 429 message `Quota exceeded. Please try again in N second(s).`

    Returns `default` when the message does not say (not a string, other wording); the result is clamped
    to [0, MAX_RETRY_AFTER] so a garbled number cannot stall a subaccount for days.
    """
    m = _RETRY_IN.search(message) if isinstance(message, str) else None
    seconds = float(m.group(1)) if m else default
    if not math.isfinite(seconds):
        seconds = default
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


# --- rate limiting -------------------------------------------------------------------------------

#: 8x8's documented limit of the Retrieve message details API: 1 request per second per subaccount
LIMIT_INTERVAL = 1.0


@dataclass(slots=True)
class _Pace:
    busy: bool = False  # a request is in flight
    ready_at: float = 0.0  # no request before this
    slow_until: float = -math.inf  # the circuit: spacing is `interval * slow_factor` until then
    limited: int = 0  # 429s since the circuit last closed


class Pacer:
    """When the next request of each key (a subaccount) may be sent: at most one in flight per key, and the
    next one sent no earlier than `interval + margin` after the ANSWER to the previous one.

    Why from the answer: 8x8 counts a request when it arrives, by its own clock; that instant lies somewhere
    between our send and the arrival of its answer. Spacing sends by `interval` (a token bucket) is tripped
    by jitter: a first request delayed on its way and a second one fast arrive closer than `interval`.
    Spacing the next send from the previous answer bounds the gap at 8x8 from below whatever the delays:
    arrival(n+1) - arrival(n) >= send(n+1) - answer(n) >= interval + margin. `margin` covers the two
    clocks' resolution and drift; throughput per key is 1 / (interval + margin + round trip).

    A 429 (`done(..., retry_after=s)`) opens the circuit for the key: nothing before `answer + max(s,
    interval) + margin`, then the spacing is `interval * slow_factor` (+ margin) until `cooldown` seconds
    pass without another 429; each further 429 doubles the slow spacing again (up to `max_factor`).

    Pure state machine: every method takes `now`, a monotonic time in seconds chosen by the caller (it must
    not go backwards). `prune` forgets idle keys (indistinguishable from new ones) so memory stays bounded.
    """

    def __init__(
        self,
        interval: float = LIMIT_INTERVAL,
        margin: float = 0.05,
        *,
        slow_factor: float = 2.0,
        max_factor: float = 16.0,
        cooldown: float = 60.0,
    ) -> None:
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
        if not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"margin must be >= 0 seconds, got {margin!r}")
        if not (1.0 <= slow_factor <= max_factor) or not (cooldown >= 0):
            raise ValueError("need 1 <= slow_factor <= max_factor and cooldown >= 0")
        self.interval = float(interval)
        self.margin = float(margin)
        self.slow_factor = float(slow_factor)
        self.max_factor = float(max_factor)
        self.cooldown = float(cooldown)
        self._keys: dict[str, _Pace] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def spacing(self, key: str, now: float) -> float:
        """Seconds between an answer of `key` and its next send, as things stand at `now`."""
        p = self._keys.get(key)
        if p is None or now >= p.slow_until:
            return self.interval + self.margin
        factor = min(self.slow_factor * 2 ** max(p.limited - 1, 0), self.max_factor)
        return self.interval * factor + self.margin

    def slowed(self, key: str, now: float) -> bool:
        """Whether the circuit of `key` is open or half-open (a 429 less than `cooldown` ago)."""
        p = self._keys.get(key)
        return p is not None and now < p.slow_until

    def wait_time(self, key: str, now: float) -> float:
        """Seconds until `key` may send (0.0: now; infinite while a request of it is in flight)."""
        p = self._keys.get(key)
        if p is None:
            return 0.0
        if p.busy:
            return math.inf
        return max(0.0, p.ready_at - now)

    def acquire(self, key: str, now: float) -> bool:
        """Mark a request of `key` as sent at `now` if allowed (True), else change nothing (False)."""
        if self.wait_time(key, now) > 0.0:
            return False
        p = self._keys.get(key)
        if p is None:
            p = self._keys[key] = _Pace()
        p.busy = True
        return True

    def done(self, key: str, now: float, retry_after: float | None = None) -> None:
        """The request of `key` was answered (or failed) at `now`; `retry_after`: it was a 429 asking to
        wait that many seconds."""
        p = self._keys.get(key)
        if p is None:
            p = self._keys[key] = _Pace()
        p.busy = False
        if now >= p.slow_until:
            p.limited = 0  # the circuit closed: a cooldown passed without a 429
        wait = self.spacing(key, now)
        if retry_after is not None:
            p.limited += 1
            p.slow_until = now + max(retry_after, 0.0) + self.cooldown
            wait = max(max(retry_after, 0.0) + self.margin, self.spacing(key, now))
        p.ready_at = max(p.ready_at, now + wait)

    def prune(self, now: float) -> int:
        """Forget keys that are idle, ready and not slowed at `now`; returns how many."""
        gone = [k for k, p in self._keys.items() if not p.busy and p.ready_at <= now and now >= p.slow_until]
        for k in gone:
            del self._keys[k]
        return len(gone)


# --- which messages to look up, and when again ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """A message to look up: its subaccount, umid and the channels the store knows (`channel_path`)."""

    sub_account_id: str
    umid: str
    last_change: datetime
    channels: tuple[str, ...] = ()
    attempts: int = 0  # lookups recorded so far


class Outcome:
    """How a lookup ended (the label of the outcome metric too)."""

    RECEIPTS = "receipts"  # 8x8 answered, receipts produced
    NOT_FOUND = "not_found"  # 404: unknown at 8x8 (too old, wrong subaccount, not yet indexed)
    INVALID = "invalid"  # 200 with a body we cannot read
    FAILED = "failed"  # retries exhausted (5xx, timeouts, repeated 429), or the produce failed
    REJECTED = "rejected"  # other 4xx (401/403: the key), not retried soon


@dataclass(slots=True)
class _Check:
    attempts: int
    next_due: datetime


def next_check(
    attempts: int,
    outcome: str,
    now: datetime,
    *,
    base: timedelta,
    not_found_after: timedelta = timedelta(hours=6),
    max_backoff: timedelta = timedelta(hours=24),
) -> tuple[int, datetime]:
    """(lookups so far, when due again) after a lookup that ended with `outcome` at `now`, `attempts`
    lookups before it. The rule of `CheckSchedule`, for a schedule kept in the store."""
    if outcome == Outcome.FAILED:
        return attempts, now + base
    n = attempts + 1
    wait = base * (2 ** min(n - 1, 30))
    if outcome != Outcome.RECEIPTS:
        wait = max(wait, not_found_after * (2 ** min(n - 1, 30)))
    return n, now + min(wait, max_backoff)


@dataclass
class CheckSchedule:
    """When each umid may be looked up again. Pure: `now` is always an argument.

    After a lookup with answer (`Outcome.RECEIPTS`) the next is due `base * 2**(n-1)` later (n = lookups so
    far, capped at `max_backoff`): a message that stays open (delivered, waiting for a read) is asked about
    at growing intervals, not every pass. `NOT_FOUND`, `INVALID` and `REJECTED` wait at least
    `not_found_after` (and also grow). `FAILED` (transient) is due again after `base`, attempts unchanged.
    At most `max_entries` umids are remembered (the oldest forgotten first: it is simply looked up again).
    """

    base: timedelta
    not_found_after: timedelta = timedelta(hours=6)
    max_backoff: timedelta = timedelta(hours=24)
    max_entries: int = 1_000_000
    _checks: dict[str, _Check] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.base <= timedelta(0) or self.not_found_after <= timedelta(0) or self.max_entries < 1:
            raise ValueError("base and not_found_after must be positive, max_entries >= 1")

    def __len__(self) -> int:
        return len(self._checks)

    def due(self, umid: str, now: datetime) -> bool:
        c = self._checks.get(umid)
        return c is None or c.next_due <= now

    def attempts(self, umid: str) -> int:
        c = self._checks.get(umid)
        return 0 if c is None else c.attempts

    def record(self, umid: str, outcome: str, now: datetime) -> datetime:
        """Note a lookup of `umid` that ended with `outcome` at `now`; returns when it is due again."""
        prev = self._checks.pop(umid, None)
        n, next_due = next_check(
            0 if prev is None else prev.attempts,
            outcome,
            now,
            base=self.base,
            not_found_after=self.not_found_after,
            max_backoff=self.max_backoff,
        )
        self._checks[umid] = _Check(n, next_due)  # re-inserted: dict order = least recently checked first
        while len(self._checks) > self.max_entries:
            del self._checks[next(iter(self._checks))]
        return next_due

    def forget(self, umids: Iterable[str]) -> None:
        for u in umids:
            self._checks.pop(u, None)


def select_candidates(
    rows: Iterable[Mapping[str, Any]],
    now: datetime,
    reconcile_after: float,
    schedule: CheckSchedule | None = None,
    *,
    per_subaccount: int | None = None,
    limit: int | None = None,
) -> list[Candidate]:
    """The rows (`messages` table: umid, sub_account_id, final, status_at, updated_at, channel_path) to look
    up now: not final, last change (the later of status_at and updated_at) at least `reconcile_after`
    seconds before `now`, due in `schedule`; oldest change first, at most `per_subaccount` per subaccount
    and `limit` in all. Raises KeyError for a row missing one of those columns."""
    cutoff = now - timedelta(seconds=reconcile_after)
    picked: list[Candidate] = []
    for row in rows:
        if row["final"]:
            continue
        status_at, updated_at = row["status_at"], row["updated_at"]
        last = status_at if status_at >= updated_at else updated_at
        if last > cutoff:
            continue
        if schedule is not None and not schedule.due(row["umid"], now):
            continue
        path = row["channel_path"] or ""
        channels = tuple(c for c in path.split(">") if c)
        picked.append(Candidate(row["sub_account_id"], row["umid"], last, channels, row.get("attempts") or 0))
    picked.sort(key=lambda c: (c.last_change, c.umid))
    if per_subaccount is not None:
        counts: dict[str, int] = {}
        kept: list[Candidate] = []
        for c in picked:
            n = counts.get(c.sub_account_id, 0)
            if n < per_subaccount:
                counts[c.sub_account_id] = n + 1
                kept.append(c)
        picked = kept
    return picked if limit is None else picked[:limit]
