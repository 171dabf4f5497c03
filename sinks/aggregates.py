"""Analytics aggregates: what one message or inbound message adds to them, and how they merge. Pure.

Nothing here does I/O or reads the clock. The stores (`sinks.sqlite`, `sinks.postgres`) keep, per
message, the `Contribution` it last added (table `analytics_message_facts`), and in the transaction that
writes a new state of it they add `new - old` to the aggregate tables (`Deltas`). So a message counts
once, in its current state, whatever the number of its receipts, versions or redeliveries: re-writing
the same state adds nothing, and the aggregates equal the sum of the current contributions.

Dimensions (docs/analytics.md says the same for analysts):
- bucket: the UTC hour of the message's first event (step 1's `first_event_at`); inbound: of its time;
- channel: the current (last) step's channel; for error counts, the failed step's channel;
- country: ISO alpha-2 of the recipient: the details API's `country` of the last step when known, else
  from the E.164 calling code of the number (masked numbers keep it), else `unknown`;
- path: the steps' channels in order joined by `>`.

Latency histograms use fixed log-spaced buckets (`latency_bucket`), the same for every row, so any rows
merge by adding counts (`merge_histograms`, associative and commutative) and any merge answers
percentiles (`percentile`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.models import InboundMessage, MessageState
from sinks.error_codes import ERROR_CODES

UNKNOWN_COUNTRY = "unknown"
OUTCOMES: tuple[str, ...] = ("pending", "sent", "delivered", "read", "failed")
FAILURE_STATES = frozenset({"undelivered", "rejected", "failed", "error"})
_OUTCOME: dict[str, str] = {
    "sent": "sent",
    "delivered": "delivered",
    "read": "read",
    **{s: "failed" for s in FAILURE_STATES},
}
WINDOW = timedelta(hours=24)
WHATSAPP = "whatsapp"

#: buckets per doubling of the duration; bucket 0 holds < 1 s, bucket i >= 1 holds [2^((i-1)/4), 2^(i/4))
BUCKETS_PER_DOUBLING = 4
#: the last bucket, open-ended (>= 2^(99/4) s, about 8 months)
LAST_BUCKET = 100
METRICS: tuple[str, ...] = ("deliver", "read")

# E.164 calling codes -> ISO 3166 alpha-2 (a shared code names its largest country: +1 US, +7 RU)
CALLING_CODES: dict[str, str] = {
    "1": "US", "7": "RU", "20": "EG", "27": "ZA", "30": "GR", "31": "NL", "32": "BE", "33": "FR",
    "34": "ES", "36": "HU", "39": "IT", "40": "RO", "41": "CH", "43": "AT", "44": "GB", "45": "DK",
    "46": "SE", "47": "NO", "48": "PL", "49": "DE", "51": "PE", "52": "MX", "53": "CU", "54": "AR",
    "55": "BR", "56": "CL", "57": "CO", "58": "VE", "60": "MY", "61": "AU", "62": "ID", "63": "PH",
    "64": "NZ", "65": "SG", "66": "TH", "81": "JP", "82": "KR", "84": "VN", "86": "CN", "90": "TR",
    "91": "IN", "92": "PK", "93": "AF", "94": "LK", "95": "MM", "98": "IR", "212": "MA", "213": "DZ",
    "216": "TN", "234": "NG", "254": "KE", "351": "PT", "352": "LU", "353": "IE", "358": "FI",
    "380": "UA", "420": "CZ", "852": "HK", "853": "MO", "855": "KH", "856": "LA", "880": "BD",
    "886": "TW", "960": "MV", "966": "SA", "971": "AE", "972": "IL", "974": "QA", "977": "NP",
}  # fmt: skip


def hour_of(when: datetime) -> datetime:
    """The start of the UTC hour holding `when` (an aware datetime)."""
    return when.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def day_of(when: datetime) -> datetime:
    return when.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def latency_bucket(seconds: float) -> int:
    """The histogram bucket of a duration: 0 below 1 s (negative durations, from clocks that disagree,
    included), else 1 + floor(4 * log2(seconds)), at most LAST_BUCKET."""
    if not seconds >= 1.0:  # also NaN
        return 0
    if math.isinf(seconds):
        return LAST_BUCKET
    i = 1 + math.floor(BUCKETS_PER_DOUBLING * math.log2(seconds))
    # guard float rounding at exact powers: keep lower <= seconds < upper
    while i > 1 and seconds < bucket_bounds(i)[0]:
        i -= 1
    while i < LAST_BUCKET and seconds >= (bucket_bounds(i)[1] or math.inf):
        i += 1
    return min(i, LAST_BUCKET)


def bucket_bounds(i: int) -> tuple[float, float | None]:
    """[lower, upper) seconds of bucket `i`; upper None for the last, open-ended bucket."""
    if i <= 0:
        return 0.0, 1.0
    lower = 2.0 ** ((i - 1) / BUCKETS_PER_DOUBLING)
    return lower, (None if i >= LAST_BUCKET else 2.0 ** (i / BUCKETS_PER_DOUBLING))


def merge_histograms(*hists: Mapping[int, int]) -> dict[int, int]:
    """The histogram of the union of the durations the given histograms count (counts added)."""
    out: dict[int, int] = {}
    for h in hists:
        for b, n in h.items():
            out[b] = out.get(b, 0) + n
    return {b: n for b, n in sorted(out.items()) if n}


@dataclass(frozen=True, slots=True)
class Percentile:
    value: float  # the estimate, seconds: the geometric middle of the bucket (0.5 s for bucket 0)
    bucket: int
    lower: float
    upper: float | None


def percentile(hist: Mapping[int, int], p: float) -> Percentile | None:
    """The `p` quantile (0 < p <= 1) of the durations `hist` counts: the bucket holding the rank
    ceil(p * n), estimated by its geometric middle; None for an empty histogram."""
    if not 0 < p <= 1:
        raise ValueError(f"p must be within (0, 1], got {p}")
    n = sum(hist.values())
    if n <= 0:
        return None
    rank = max(1, math.ceil(p * n - 1e-9))
    seen = 0
    for b in sorted(hist):
        seen += hist[b]
        if seen >= rank:
            lower, upper = bucket_bounds(b)
            if b == 0:
                value = 0.5
            elif upper is None:
                value = lower
            else:
                value = math.sqrt(lower * upper)
            return Percentile(value, b, lower, upper)
    raise AssertionError("unreachable: ranks are within the counts")


def outcome_of(state: str) -> str:
    """The funnel outcome of a message state: pending, sent, delivered, read or failed."""
    return _OUTCOME.get(state, "pending")


def country_of(country: str | None, msisdn: str | None) -> str:
    """ISO alpha-2 of the recipient: `country` when given (the details API's), else from the calling code
    of `msisdn` (E.164, possibly masked: `+63922110xxxx`), else UNKNOWN_COUNTRY."""
    if country:
        return country.strip().upper()[:8] or UNKNOWN_COUNTRY
    if msisdn:
        digits = msisdn.lstrip("+")
        for n in (1, 2, 3):
            found = CALLING_CODES.get(digits[:n])
            if found is not None and digits[:n].isdigit():
                return found
    return UNKNOWN_COUNTRY


def error_meaning(code: int) -> tuple[str, str] | None:
    """8x8's (reason, description) of a delivery-receipt error code, None when undocumented."""
    return ERROR_CODES.get(code)


@dataclass(frozen=True, slots=True)
class Contribution:
    """What one message adds to the aggregates, from its current state."""

    sub_account_id: str
    hour: datetime
    channel: str
    country: str
    path: str
    outcome: str
    final: bool
    deliver_bucket: int | None = None
    read_bucket: int | None = None
    errors: tuple[tuple[str, int], ...] = ()  # (channel, error code) of each failed step with a code
    user: str | None = None  # keyed hash of the recipient (WhatsApp window matching)
    whatsapp_at: datetime | None = None  # the first event of its WhatsApp step, when it has one


def contribution(state: MessageState, user_hash: str | None = None) -> Contribution | None:
    """The contribution of a message state (None for a state without steps). `user_hash`: the keyed hash
    of the recipient's number (the store's `msisdn_hash`), used to match the WhatsApp window."""
    steps = state.steps
    if not steps:
        return None
    last = steps[-1]
    deliver = read = None
    if state.delivered_at is not None and state.first_sent_at is not None:
        deliver = latency_bucket((state.delivered_at - state.first_sent_at).total_seconds())
    if state.read_at is not None and state.delivered_at is not None:
        read = latency_bucket((state.read_at - state.delivered_at).total_seconds())
    errors = tuple(
        (s.channel.lower(), s.error_code)
        for s in steps
        if s.error_code is not None and s.state in FAILURE_STATES
    )
    wa = [s.first_event_at for s in steps if s.channel.lower() == WHATSAPP]
    return Contribution(
        sub_account_id=state.sub_account_id,
        hour=hour_of(steps[0].first_event_at),
        channel=last.channel.lower(),
        country=country_of(last.country, state.user.msisdn),
        path=">".join(s.channel.lower() for s in steps),
        outcome=outcome_of(state.state),
        final=state.final,
        deliver_bucket=deliver,
        read_bucket=read,
        errors=errors,
        user=user_hash,
        whatsapp_at=min(wa) if wa else None,
    )


def inbound_key(msg: InboundMessage) -> tuple[str, datetime, str, str, str, str]:
    """The `analytics_inbound` key of an inbound message: (subaccount, hour, channel, country, type,
    interactive type or '')."""
    it = msg.content.interactive
    return (
        msg.sub_account_id,
        hour_of(msg.timestamp),
        msg.channel.lower(),
        country_of(None, msg.user.msisdn),
        msg.type,
        (it.type if it else None) or "",
    )


def answered(inbound_at: datetime, outbound_at: Iterable[datetime]) -> bool:
    """Whether an inbound WhatsApp message was answered inside the 24 h window it opened: some outbound
    WhatsApp message's first event at `inbound_at <= t < inbound_at + 24 h`."""
    end = inbound_at + WINDOW
    return any(inbound_at <= t < end for t in outbound_at)


MessageKey = tuple[str, datetime, str, str, str]  # subaccount, hour, channel, country, path
LatencyKey = tuple[str, datetime, str, str, str, int]  # ..., metric, bucket
ErrorKey = tuple[str, datetime, str, str, int]  # subaccount, hour, step channel, country, error code
#: messages, pending, sent, delivered, read, failed, final
MESSAGE_COUNTERS: tuple[str, ...] = ("messages", *OUTCOMES, "final")


def _add(d: dict[Any, int], key: Any, n: int) -> None:
    v = d.get(key, 0) + n
    if v:
        d[key] = v
    else:
        d.pop(key, None)


@dataclass(slots=True)
class Deltas:
    """Changes to add to the aggregate tables, keyed by their primary keys; zero changes are dropped."""

    messages: dict[MessageKey, list[int]] = field(default_factory=dict)
    latency: dict[LatencyKey, int] = field(default_factory=dict)
    errors: dict[ErrorKey, int] = field(default_factory=dict)

    def add(self, c: Contribution | None, sign: int = 1) -> None:
        """Add (sign 1) or take away (sign -1) one message's contribution."""
        if c is None:
            return
        key = (c.sub_account_id, c.hour, c.channel, c.country, c.path)
        row = self.messages.get(key)
        if row is None:
            row = self.messages[key] = [0] * len(MESSAGE_COUNTERS)
        row[0] += sign
        row[1 + OUTCOMES.index(c.outcome)] += sign
        if c.final:
            row[-1] += sign
        if not any(row):
            del self.messages[key]
        base = (c.sub_account_id, c.hour, c.channel, c.country)
        if c.deliver_bucket is not None:
            _add(self.latency, (*base, "deliver", c.deliver_bucket), sign)
        if c.read_bucket is not None:
            _add(self.latency, (*base, "read", c.read_bucket), sign)
        for channel, code in c.errors:
            _add(self.errors, (c.sub_account_id, c.hour, channel, c.country, code), sign)

    def change(self, old: Contribution | None, new: Contribution | None) -> None:
        """Add the difference `new - old` of one message (nothing when they are equal)."""
        if old == new:
            return
        self.add(old, -1)
        self.add(new, 1)

    def __bool__(self) -> bool:
        return bool(self.messages or self.latency or self.errors)


def totals(contributions: Iterable[Contribution | None]) -> Deltas:
    """The aggregates of a set of messages from scratch (what incremental maintenance must equal)."""
    d = Deltas()
    for c in contributions:
        d.add(c)
    return d


def rate(numerator: int, denominator: int) -> float | None:
    return None if denominator <= 0 else round(numerator / denominator, 4)


def funnel_record(counts: Mapping[str, int]) -> dict[str, Any]:
    """The API's funnel numbers from the summed counters (`MESSAGE_COUNTERS` + fellBack)."""
    n = counts.get("messages", 0)
    delivered = counts.get("delivered", 0) + counts.get("read", 0)
    return {
        **{k: counts.get(k, 0) for k in MESSAGE_COUNTERS},
        "fellBack": counts.get("fellBack", 0),
        "deliveredRate": rate(delivered, n),
        "readRate": rate(counts.get("read", 0), n),
        "failedRate": rate(counts.get("failed", 0), n),
    }


def latency_record(hist: Mapping[int, int]) -> dict[str, Any]:
    """The API's latency numbers of one histogram: count, p50/p90/p99 with their buckets, the buckets."""
    out: dict[str, Any] = {"count": sum(hist.values())}
    for name, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        found = percentile(hist, p)
        out[name] = None if found is None else round(found.value, 3)
        out[name + "Bucket"] = None if found is None else [round(found.lower, 3), _r(found.upper)]
    out["histogram"] = [
        {"bucket": b, "lowerSeconds": round(bucket_bounds(b)[0], 3), "upperSeconds": _r(bucket_bounds(b)[1]),
         "count": n}
        for b, n in sorted(hist.items())
        if n
    ]  # fmt: skip
    return out


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def first_channel(path: str) -> str:
    return path.split(">", 1)[0]


Hasher = Callable[[str | None], str | None]


# --- rows: what the stores write and read back (tuples in `sinks.analytics_sql` column order) ---


def fact_values(umid: str, c: Contribution) -> tuple[Any, ...]:
    """The `analytics_message_facts` row of a message's contribution (`FACT_COLUMNS` order)."""
    errors = json.dumps([list(e) for e in c.errors], separators=(",", ":")) if c.errors else None
    return (
        umid, c.sub_account_id, c.hour, c.channel, c.country, c.path, c.outcome, int(c.final),
        c.deliver_bucket, c.read_bucket, errors, c.user, c.whatsapp_at,
    )  # fmt: skip


def contribution_from_fact(row: Mapping[str, Any]) -> Contribution:
    """The contribution an `analytics_message_facts` row holds (timestamps as aware datetimes)."""
    errors = row["errors"]
    return Contribution(
        sub_account_id=row["sub_account_id"],
        hour=row["hour"],
        channel=row["channel"],
        country=row["country"],
        path=row["path"],
        outcome=row["outcome"],
        final=bool(row["final"]),
        deliver_bucket=row["deliver_bucket"],
        read_bucket=row["read_bucket"],
        errors=tuple((ch, int(code)) for ch, code in json.loads(errors)) if errors else (),
        user=row["wa_user"],
        whatsapp_at=row["wa_at"],
    )


def message_rows(d: Deltas) -> list[tuple[Any, ...]]:
    """`analytics_messages` upsert rows (`MESSAGE_AGG_COLUMNS` order), sorted by key (a fixed lock
    order: two writers never wait on each other in a cycle)."""
    return [
        (*key, first_channel(key[4]), key[4].count(">") + 1, *counts)
        for key, counts in sorted(d.messages.items())
    ]


def latency_rows(d: Deltas) -> list[tuple[Any, ...]]:
    return [(*key, n) for key, n in sorted(d.latency.items())]


def error_rows(d: Deltas) -> list[tuple[Any, ...]]:
    return [(*key, n) for key, n in sorted(d.errors.items())]


def window_change(old: Contribution | None, new: Contribution | None) -> list[tuple[str, str, datetime]]:
    """The (subaccount, user, outbound time) whose WhatsApp-window answers a change of one message may
    change: its old and new WhatsApp send, when they differ."""

    def key(c: Contribution | None) -> tuple[str, str, datetime] | None:
        if c is None or c.user is None or c.whatsapp_at is None:
            return None
        return (c.sub_account_id, c.user, c.whatsapp_at)

    a, b = key(old), key(new)
    if a == b:
        return []
    return [k for k in (a, b) if k is not None]


def user_hash(state: MessageState, hash_msisdn: Hasher, kept: str | None = None) -> str | None:
    """The keyed hash of a message's recipient, needed only for messages with a WhatsApp step (window
    matching): `hash_msisdn` of its number, else `kept` (the stored hash of a state rebuilt from a
    masked row)."""
    if not any(s.channel.lower() == WHATSAPP for s in state.steps):
        return None
    if state.user.msisdn:
        return hash_msisdn(state.user.msisdn)
    return kept
