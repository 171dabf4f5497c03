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
`channelId`, `country`, `contentType`, `createdAt` are only in `raw_json`; the state machine still orders
steps by each channel's first event time. The details API reports each step's CURRENT status only.

Contracts
- `details_to_receipts` raises `InvalidEvent` (field = JSON path, e.g. `data[1].status.timestamp`) for any
  body that is not a well-formed details answer for the requested umid, and nothing else.
- `RateLimiter` is a token bucket per key whose every method takes `now` (monotonic seconds) from the
  caller; it never grants more than `burst` + elapsed/`interval` requests per key.
- `CheckSchedule` decides when an umid may be looked up again (backoff after each lookup).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NoReturn

import orjson

from ingest.parse import INT32_MAX, INT32_MIN, MAX_ID_LENGTH, normalise_channel
from schemas.errors import InvalidEvent
from schemas.models import DeliveryReceipt, Status, User
from schemas.timefmt import parse_iso8601

__all__ = [
    "Candidate",
    "CheckSchedule",
    "Outcome",
    "RateLimiter",
    "details_to_receipts",
    "is_reconciled",
    "parse_retry_after",
    "select_candidates",
]

_SHOW_MAX = 80


# --- details body -> receipts ---------------------------------------------------------------------


class _Bad(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 1] + "…"


def _jtype(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _bad(path: str, message: str) -> NoReturn:
    raise _Bad(path, message)


def _req_str(obj: Mapping[str, Any], key: str, path: str, max_len: int | None = None) -> str:
    value = obj.get(key)
    p = f"{path}.{key}"
    if value is None:
        _bad(p, "required")
    if type(value) is not str:
        _bad(p, f"expected string, got {_jtype(value)}")
    if not value.strip():
        _bad(p, "must not be empty")
    if max_len is not None and len(value) > max_len:
        _bad(p, f"longer than {max_len} characters")
    return value


def _opt_str(obj: Mapping[str, Any], key: str, path: str) -> str | None:
    value = obj.get(key)
    if value is None or type(value) is str:
        return value
    _bad(f"{path}.{key}", f"expected string, got {_jtype(value)}")


def _opt_obj(obj: Mapping[str, Any], key: str, path: str) -> dict[str, Any] | None:
    value = obj.get(key)
    if value is None or type(value) is dict:
        return value
    _bad(f"{path}.{key}", f"expected object, got {_jtype(value)}")


def _int(value: object, path: str) -> int:
    """A JSON integer or a string of ASCII digits, within int32."""
    if type(value) is int:
        number = value
    elif type(value) is str:
        text = value.strip()
        digits = text[1:] if text[:1] in ("-", "+") else text
        if not (digits.isascii() and digits.isdigit()) or len(digits) > 10:
            _bad(path, f"not an integer: {_show(value)}")
        number = int(text)
    else:
        _bad(path, f"expected integer, got {_jtype(value)}")
    if not INT32_MIN <= number <= INT32_MAX:
        _bad(path, f"out of range: {number}")
    return number


def _timestamp(obj: Mapping[str, Any], key: str, path: str) -> datetime:
    value = obj.get(key)
    p = f"{path}.{key}"
    if value is None:
        _bad(p, "required")
    if type(value) is not str:
        _bad(p, f"expected string, got {_jtype(value)}")
    try:
        return parse_iso8601(value)
    except (ValueError, OverflowError):
        _bad(p, f"not an ISO 8601 timestamp: {_show(value)}")


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
        _bad(path, f"expected object, got {_jtype(rec)}")
    got_umid = _req_str(rec, "umid", path, MAX_ID_LENGTH)
    if got_umid.lower() != umid.lower():
        _bad(f"{path}.umid", f"{_show(got_umid)} is not the requested umid {_show(umid)}")
    got_sub = _req_str(rec, "subAccountId", path, MAX_ID_LENGTH)
    if got_sub.lower() != sub_account_id.lower():
        _bad(f"{path}.subAccountId", f"{_show(got_sub)} is not the requested subaccount")
    direction = _opt_str(rec, "direction", path)
    if direction is not None and direction.lower() != "outbound":
        _bad(f"{path}.direction", f"expected outbound, got {_show(direction)}")
    channel = _channel(_req_str(rec, "channel", path), known)
    if "step" not in rec or rec["step"] is None:
        _bad(f"{path}.step", "required")
    step = _int(rec["step"], f"{path}.step")
    if step < 1:
        _bad(f"{path}.step", f"must be >= 1, got {step}")
    status = _opt_obj(rec, "status", path)
    if status is None:
        _bad(f"{path}.status", "required")
    sp = f"{path}.status"
    detail = _opt_str(status, "detail", sp)
    code = status.get("errorCode")
    st = Status(
        state=_req_str(status, "state", sp).lower(),
        timestamp=_timestamp(status, "timestamp", sp),
        detail=detail.lower() if detail else None,
        error_code=None if code is None else _int(code, f"{sp}.errorCode"),
        error_message=_opt_str(status, "errorMessage", sp),
    )
    user = _opt_obj(rec, "user", path) or {}
    up = f"{path}.user"
    receipt = DeliveryReceipt(
        umid=umid,
        sub_account_id=sub_account_id,
        channel=channel,
        status=st,
        received_at=fetched_at,
        raw_json=orjson.dumps(rec).decode(),
        user=User(msisdn=_opt_str(user, "msisdn", up), channel_user_id=_opt_str(user, "channelUserId", up)),
        batch_id=_opt_str(rec, "batchId", path),
        client_message_id=_opt_str(rec, "clientMessageId", path),
        client_batch_id=_opt_str(rec, "clientBatchId", path),
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
            _bad("body", f"not valid JSON (line {exc.lineno} column {exc.colno})")
        if type(doc) is not dict:
            _bad("body", f"expected a JSON object, got {_jtype(doc)}")
        data = doc.get("data")
        if data is None:
            _bad("data", "required")
        if type(data) is not list:
            _bad("data", f"expected array, got {_jtype(data)}")
        known = tuple(known_channels)
        out: list[tuple[int, DeliveryReceipt]] = []
        seen: dict[int, int] = {}
        for i, rec in enumerate(data):
            step, receipt = _record(rec, f"data[{i}]", sub_account_id, umid, fetched_at, known)
            if step in seen:
                _bad(f"data[{i}].step", f"step {step} already given by data[{seen[step]}]")
            seen[step] = i
            out.append((step, receipt))
    except _Bad as bad:
        raise InvalidEvent(f"{bad.path}: {bad.message}", field=bad.path, raw=bytes(body)) from None
    out.sort(key=lambda pair: pair[0])
    return [r for _, r in out]


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


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float  # time `tokens` holds at; later than now while blocked by a 429


class RateLimiter:
    """Token bucket per key (a subaccount): `burst` tokens at most, one more every `interval` seconds.

    Pure state machine: every method takes `now`, a monotonic time in seconds chosen by the caller (it
    must not go backwards). `acquire` takes a token and returns 0.0, or takes nothing and returns how
    long to wait. `block` (a 429) refuses every request for the key until `now + seconds`, then allows
    one and refills from there. Keys start with a full bucket; `prune` forgets keys whose bucket is full
    again (indistinguishable from new ones), so memory stays bounded by the active keys.
    """

    def __init__(self, interval: float = 1.0, burst: int = 1) -> None:
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self.interval = float(interval)
        self.burst = burst
        self._buckets: dict[str, _Bucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def _refill(self, b: _Bucket, now: float) -> None:
        if now > b.stamp:
            b.tokens = min(float(self.burst), b.tokens + (now - b.stamp) / self.interval)
            b.stamp = now

    def wait_time(self, key: str, now: float) -> float:
        """Seconds until `acquire(key)` would succeed (0.0: now). Takes nothing."""
        b = self._buckets.get(key)
        if b is None:
            return 0.0
        self._refill(b, now)
        blocked = b.stamp - now if b.stamp > now else 0.0
        return blocked + max(0.0, 1.0 - b.tokens) * self.interval

    def acquire(self, key: str, now: float) -> float:
        """Take one token for `key` and return 0.0, or return the wait (> 0) and take nothing."""
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(float(self.burst), now)
        wait = self.wait_time(key, now)
        if wait > 0.0:
            return wait
        b.tokens -= 1.0
        return 0.0

    def block(self, key: str, now: float, seconds: float) -> None:
        """8x8 said "try again in `seconds`": no request for `key` before `now + seconds`, nor before the
        bucket's own next token; from then on one request, and one more per `interval`."""
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(0.0, now)
        ready = now + self.wait_time(key, now)  # when the bucket alone would allow the next request
        until = max(ready, now + max(seconds, 0.0))
        b.stamp = until
        b.tokens = 1.0

    def prune(self, now: float) -> int:
        """Forget keys whose bucket is full and unblocked at `now`; returns how many."""
        gone = [
            k for k, b in self._buckets.items() if self.wait_time(k, now) == 0.0 and b.tokens >= self.burst
        ]
        for k in gone:
            del self._buckets[k]
        return len(gone)


# --- which messages to look up, and when again ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """A message to look up: its subaccount, umid and the channels the store knows (`channel_path`)."""

    sub_account_id: str
    umid: str
    last_change: datetime
    channels: tuple[str, ...] = ()


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
        n = 0 if prev is None else prev.attempts
        if outcome == Outcome.FAILED:
            wait = self.base
        else:
            n += 1
            wait = self.base * (2 ** min(n - 1, 30))
            if outcome != Outcome.RECEIPTS:
                wait = max(wait, self.not_found_after * (2 ** min(n - 1, 30)))
            wait = min(wait, self.max_backoff)
        check = _Check(n, now + wait)
        self._checks[umid] = check  # re-inserted: dict order = least recently checked first
        while len(self._checks) > self.max_entries:
            del self._checks[next(iter(self._checks))]
        return check.next_due

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
        picked.append(Candidate(row["sub_account_id"], row["umid"], last, channels))
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
