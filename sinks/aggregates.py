"""Analytics aggregates: what one message or inbound message adds to them, and how they merge. Pure.

Nothing here does I/O or reads the clock. A message's `Contribution` is a function of what its stored
rows hold (`contribution_from_rows`: its `messages` row and `message_steps` rows); the stores
(`sinks.sqlite`, `sinks.postgres`), in the transaction that replaces those rows by a new state, add
`contribution(new state) - contribution_from_rows(old rows)` to the aggregate tables (`Deltas`), and
`contribution(state)` equals `contribution_from_rows(rows of state)` (tested). So a message counts once,
in its current state, whatever the number of its receipts, versions or redeliveries: re-writing the same
state adds nothing, and the aggregates always equal the sum of the contributions of the stored messages.

Dimensions (docs/analytics.md says the same for analysts):
- bucket: the UTC hour of the message's first event (step 1's `first_event_at`); inbound: of its time;
- channel: the current (last) step's channel; for error counts, the failed step's channel;
- country: ISO alpha-2 of the recipient: the details API's `country` of the last step when known, else
  from the E.164 calling code of the stored (masked) number, else `unknown`;
- path: the steps' channels in order joined by `>`.

Latency histograms use fixed log-spaced buckets (`latency_bucket`), the same for every row, so any rows
merge by adding counts (`merge_histograms`, associative and commutative) and any merge answers
percentiles (`percentile`).
"""

from __future__ import annotations

import collections
import math
import sys
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import Any, Final, NamedTuple

from processors.conversation import WHATSAPP_SERVICE_WINDOW
from schemas.models import MessageState
from sinks.error_codes import ERROR_CODES

UNKNOWN_COUNTRY = "unknown"
OUTCOMES: tuple[str, ...] = ("pending", "sent", "delivered", "read", "failed")
FAILURE_STATES = frozenset({"undelivered", "rejected", "failed", "error"})
OUTCOME: dict[str, str] = {
    "sent": "sent",
    "delivered": "delivered",
    "read": "read",
    **{s: "failed" for s in FAILURE_STATES},
}
#: the WhatsApp customer-service window: the rule lives in processors.conversation, once
WINDOW = WHATSAPP_SERVICE_WINDOW
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
    if when.tzinfo is not UTC:
        when = when.astimezone(UTC)
    return when.replace(minute=0, second=0, microsecond=0)


def day_of(when: datetime) -> datetime:
    return when.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def latency_bucket(seconds: float) -> int:
    """The histogram bucket of a duration: 0 below 1 s (negative durations, from clocks that disagree,
    included), else the i >= 1 with 2^((i-1)/4) <= seconds < 2^(i/4), at most LAST_BUCKET."""
    if not seconds >= 1.0:  # also NaN
        return 0
    return min(bisect_right(_LOWER_BOUNDS, seconds), LAST_BUCKET)


def bucket_bounds(i: int) -> tuple[float, float | None]:
    """[lower, upper) seconds of bucket `i`; upper None for the last, open-ended bucket."""
    if i <= 0:
        return 0.0, 1.0
    lower = 2.0 ** ((i - 1) / BUCKETS_PER_DOUBLING)
    return lower, (None if i >= LAST_BUCKET else 2.0 ** (i / BUCKETS_PER_DOUBLING))


#: lower bounds of buckets 1..LAST_BUCKET (bisect finds a duration's bucket)
_LOWER_BOUNDS: list[float] = [bucket_bounds(i)[0] for i in range(1, LAST_BUCKET + 1)]


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
    return OUTCOME.get(state, "pending")


def country_of(country: str | None, msisdn: str | None) -> str:
    """ISO alpha-2 of the recipient: `country` when given (the details API's), else from the calling code
    of `msisdn` (E.164, possibly masked: `+63922110xxxx`), else UNKNOWN_COUNTRY."""
    if country:
        return country.strip().upper()[:8] or UNKNOWN_COUNTRY
    if not msisdn:
        return UNKNOWN_COUNTRY
    head = msisdn[:4]
    found = _BY_HEAD.get(head)
    if found is None:
        if len(_BY_HEAD) > 100_000:
            _BY_HEAD.clear()
        found = _BY_HEAD[head] = _calling_code_country(head)
    return found


_BY_HEAD: dict[str, str] = {}  # the first 4 characters of a number -> its country (a cache)


def _calling_code_country(head: str) -> str:
    digits = head[1:] if head.startswith("+") else head
    for n in (1, 2, 3):
        code = digits[:n]
        if len(code) == n and code.isdigit() and code in CALLING_CODES:
            return CALLING_CODES[code]
    return UNKNOWN_COUNTRY


def error_meaning(code: int) -> tuple[str, str] | None:
    """8x8's (reason, description) of a delivery-receipt error code, None when undocumented."""
    return ERROR_CODES.get(code)


class NamedContribution(NamedTuple):
    """The fields of a `Contribution`, by name (`named(c)`; tests build contributions with it): equal to
    the plain tuple of the same fields."""

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
    user: str | None = None  # keyed hash of the recipient's number, for messages with a WhatsApp step
    whatsapp_at: datetime | None = None  # the first event of its WhatsApp step, when it has one


#: What one message adds to the aggregates, from its current state: a plain tuple of the fields of
#: `NamedContribution`, in that order (indexes `SUB` ... `WHATSAPP_AT`). Plain, because the sink builds
#: one per record: a NamedTuple costs 3k instructions more to build and free (`bench/sink_instructions.py`).
Contribution = tuple[
    str, datetime, str, str, str, str, bool, int | None, int | None, tuple[tuple[str, int], ...], str | None,
    datetime | None,
]  # fmt: skip
SUB: Final = 0
HOUR: Final = 1
CHANNEL: Final = 2
COUNTRY: Final = 3
PATH: Final = 4
OUTCOME_: Final = 5  # (OUTCOME maps states to outcomes)
FINAL: Final = 6
DELIVER: Final = 7
READ: Final = 8
ERRORS: Final = 9
USER: Final = 10
WHATSAPP_AT: Final = 11


def named(c: Contribution) -> NamedContribution:
    return NamedContribution(*c)


StepParts = tuple[
    str, str, int | None, datetime, str | None
]  # channel, state, error code, first event, country


def _contribution(
    sub_account_id: str,
    state: str,
    final: bool,
    first_sent_at: datetime | None,
    delivered_at: datetime | None,
    read_at: datetime | None,
    number: str | None,
    number_hash: str | None,
    steps: Sequence[Sequence[Any]],
    at: int = 0,
) -> Contribution | None:
    """The one definition both `contribution` and `contribution_from_rows` use. `steps` in order, each a
    sequence holding `StepParts` from index `at` on (the stores' row tuples, without slicing them);
    `number` the stored (masked or clear) number, `number_hash` its keyed hash. Spelled out as
    `contribution` is: the stores compute one for each message a state replaces."""
    if not steps:
        return None
    deliver = read = None
    if delivered_at is not None and first_sent_at is not None:
        seconds = (delivered_at - first_sent_at).total_seconds()
        deliver = bisect_right(_LOWER_BOUNDS, seconds) if seconds >= 1.0 else 0
        if read_at is not None:
            seconds = (read_at - delivered_at).total_seconds()
            read = bisect_right(_LOWER_BOUNDS, seconds) if seconds >= 1.0 else 0
    errors: tuple[tuple[str, int], ...] = ()
    wa_at = None
    channel_at, state_at, code_at, first_at = at, at + 1, at + 2, at + 3
    if len(steps) == 1:
        s = steps[0]
        path = channel = _CHANNELS.get(s[channel_at]) or _channel(s[channel_at])
        if s[code_at] is not None and s[state_at] in FAILURE_STATES:
            errors = ((channel, s[code_at]),)
        if channel == WHATSAPP:
            wa_at = s[first_at]
    else:
        channels = []
        for s in steps:
            ch = _CHANNELS.get(s[channel_at]) or _channel(s[channel_at])
            channels.append(ch)
            if s[code_at] is not None and s[state_at] in FAILURE_STATES:
                errors += ((ch, s[code_at]),)
            if ch == WHATSAPP and (wa_at is None or s[first_at] < wa_at):
                wa_at = s[first_at]
        channel, path = channels[-1], ">".join(channels)
    first = steps[0][first_at]
    country = steps[-1][at + 4]
    if country or not number:
        country = country_of(country, number)
    else:  # country_of's cache, inlined
        country = _BY_HEAD.get(number[:4]) or country_of(None, number)
    span = _SPAN[0]  # the hour `_hour` found last, [start, end)
    hour = span[0] if first.tzinfo is UTC and span[0] <= first < span[1] else _hour(first)
    return (
        sub_account_id,
        hour,
        channel,
        country,
        path,
        OUTCOME.get(state, "pending"),
        bool(final),
        deliver,
        read,
        errors,
        number_hash if wa_at is not None else None,
        wa_at,
    )


def whatsapp_send(c: Contribution | None) -> datetime | None:
    """When the message of contribution `c` sent on WhatsApp, as the window share counts its sends (a
    WhatsApp step, and a number's hash to match inbound messages on): its WhatsApp step's first event."""
    return c[11] if c is not None and c[10] is not None else None


def _hour(when: datetime) -> datetime:
    """`hour_of(when)`, cached by hours since 0001-01-01 (replace, astimezone, timestamp are slow); the
    hour found is kept as `_SPAN`, the one the next call checks first."""
    if when.tzinfo is not UTC:
        when = when.astimezone(UTC)
    number = when.toordinal() * 24 + when.hour
    hour = _HOURS.get(number)
    if hour is None:
        if len(_HOURS) > 100_000:
            _HOURS.clear()
        hour = _HOURS[number] = hour_of(when)
    _SPAN[0] = (hour, hour + _ONE_HOUR)
    return hour


def _channel(name: str) -> str:
    """`name.lower()`, cached and interned: a channel name is then one object, whose comparisons (the
    counts' keys) are identity checks and whose hash is computed once."""
    found = _CHANNELS.get(name)
    if found is None:
        if len(_CHANNELS) > 10_000:
            _CHANNELS.clear()
        found = _CHANNELS[name] = sys.intern(name.lower())
    return found


def contribution(state: MessageState, number: str | None, number_hash: str | None) -> Contribution | None:
    """The contribution of a message state (None without steps). `number`, `number_hash`: the number
    and hash its `messages` row stores (`msisdn` if clear else `msisdn_masked`; `msisdn_hash`).

    Equals `_contribution` of the same parts (`contribution_from_rows` of the rows written for the
    state: a property test), spelled out for the sink's hot path."""
    steps = state.steps
    if not steps:
        return None
    deliver = read = None
    delivered = state.delivered_at
    if delivered is not None:
        first_sent = state.first_sent_at
        if first_sent is not None:  # bisect_right over _LOWER_BOUNDS is at most LAST_BUCKET
            seconds = (delivered - first_sent).total_seconds()
            deliver = bisect_right(_LOWER_BOUNDS, seconds) if seconds >= 1.0 else 0
            read_at = state.read_at
            if read_at is not None:
                seconds = (read_at - delivered).total_seconds()
                read = bisect_right(_LOWER_BOUNDS, seconds) if seconds >= 1.0 else 0
    errors: tuple[tuple[str, int], ...] = ()
    wa_at = None
    if len(steps) == 1:
        s = steps[0]
        path = channel = _CHANNELS.get(s.channel) or _channel(s.channel)
        if s.error_code is not None and s.state in FAILURE_STATES:
            errors = ((channel, s.error_code),)
        first = s.first_event_at
        if channel == WHATSAPP:
            wa_at = first
        country = s.country
    else:
        channels = []
        for s in steps:
            ch = _CHANNELS.get(s.channel) or _channel(s.channel)
            channels.append(ch)
            if s.error_code is not None and s.state in FAILURE_STATES:
                errors += ((ch, s.error_code),)
            if ch == WHATSAPP and (wa_at is None or s.first_event_at < wa_at):
                wa_at = s.first_event_at
        channel, path = channels[-1], ">".join(channels)
        first = steps[0].first_event_at
        country = steps[-1].country
    if country or not number:
        country = country_of(country, number)
    else:  # country_of's cache, inlined
        country = _BY_HEAD.get(number[:4]) or country_of(None, number)
    span = _SPAN[0]  # the hour `_hour` found last, [start, end): most messages of a batch share it
    hour = span[0] if first.tzinfo is UTC and span[0] <= first < span[1] else _hour(first)
    return (
        state.sub_account_id,
        hour,
        channel,
        country,
        path,
        OUTCOME.get(state.state, "pending"),
        state.final,
        deliver,
        read,
        errors,
        number_hash if wa_at is not None else None,
        wa_at,
    )


#: hours since 0001-01-01 (UTC: `toordinal() * 24 + hour`) -> the hour's start (a cache: `_hour`)
_HOURS: dict[int, datetime] = {}
_ONE_HOUR = timedelta(hours=1)
#: [start, end) of the hour `_hour` found last, one tuple (read and replaced whole: thread-safe)
_SPAN: list[tuple[datetime, datetime]] = [(datetime.min.replace(tzinfo=UTC),) * 2]
#: channel names as given -> lowercased and interned (`_channel`)
_CHANNELS: dict[str, str] = {}


#: the columns `contribution_from_rows` reads
MESSAGE_FACT_COLUMNS: tuple[str, ...] = (
    "umid", "sub_account_id", "state", "final", "first_sent_at", "delivered_at", "read_at", "msisdn",
    "msisdn_masked", "msisdn_hash",
)  # fmt: skip
STEP_FACT_COLUMNS: tuple[str, ...] = (
    "umid",
    "step",
    "channel",
    "state",
    "error_code",
    "first_event_at",
    "country",
)


def contribution_from_tuples(message: Sequence[Any], steps: list[Any]) -> Contribution | None:
    """`contribution_from_rows` of rows as tuples in `MESSAGE_FACT_COLUMNS` / `STEP_FACT_COLUMNS` order."""
    if len(steps) > 1:
        steps.sort(key=_step_number)
    return _contribution(
        message[1], message[2], message[3], message[4], message[5], message[6], message[7] or message[8],
        message[9], steps, 2,
    )  # fmt: skip


def _step_number(r: Sequence[Any]) -> Any:
    return r[1]


def contribution_from_rows(
    message: Mapping[str, Any], steps: Iterable[Mapping[str, Any]]
) -> Contribution | None:
    """The contribution of a stored message: its `messages` row and its `message_steps` rows (any order;
    at least `MESSAGE_FACT_COLUMNS` / `STEP_FACT_COLUMNS`, timestamps as aware datetimes)."""
    ordered = sorted(steps, key=lambda r: r["step"])
    return _contribution(
        message["sub_account_id"], message["state"], message["final"], message["first_sent_at"],
        message["delivered_at"], message["read_at"], message["msisdn"] or message["msisdn_masked"],
        message["msisdn_hash"],
        [(r["channel"], r["state"], r["error_code"], r["first_event_at"], r["country"]) for r in ordered],
    )  # fmt: skip


def inbound_key(row: Mapping[str, Any]) -> tuple[str, datetime, str, str, str, str]:
    """The `analytics_inbound` key of a stored inbound message (its `inbound_messages` row, as
    `sinks.rows.inbound_row` builds it): (subaccount, hour, channel, country, type, interactive type
    or '')."""
    return (
        row["sub_account_id"],
        hour_of(row["ts"]),
        row["channel"].lower(),
        country_of(None, row["msisdn"] or row["msisdn_masked"]),
        row["type"],
        row["interactive_type"] or "",
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
_OUTCOME_INDEX = {o: 1 + i for i, o in enumerate(OUTCOMES)}


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
        sub, hour, channel, country = c[0], c[1], c[2], c[3]
        key = (sub, hour, channel, country, c[4])
        row = self.messages.get(key)
        if row is None:
            row = self.messages[key] = [0] * len(MESSAGE_COUNTERS)
        row[0] += sign
        row[_OUTCOME_INDEX[c[5]]] += sign
        if c[6]:
            row[-1] += sign
        if not any(row):
            del self.messages[key]
        if c[7] is not None:
            _add(self.latency, (sub, hour, channel, country, "deliver", c[7]), sign)
        if c[8] is not None:
            _add(self.latency, (sub, hour, channel, country, "read", c[8]), sign)
        for ch, code in c[9]:
            _add(self.errors, (sub, hour, ch, country, code), sign)

    def change(self, old: Contribution | None, new: Contribution | None) -> None:
        """Add the difference `new - old` of one message (nothing when they are equal)."""
        if old == new:
            return
        self.add(old, -1)
        self.add(new, 1)

    def __bool__(self) -> bool:
        return bool(self.messages or self.latency or self.errors)


@dataclass(slots=True)
class Changes:
    """What one write batch changes: the aggregate counts (`counts`: the aggregated part of each
    contribution, `Contribution[:10]`, with how many messages gained (+) or lost (-) it; `deltas()`
    expands them), and the WhatsApp sends that appeared, moved or went (`gone`: the umids whose stored
    send is replaced, to delete; `outbound`: (umid, sub, user, time) rows to insert; `rewindow`: the
    (sub, user, time) whose inbound windows must be checked again)."""

    counts: dict[tuple[Any, ...], int] = field(default_factory=dict)
    gone: list[str] = field(default_factory=list)
    outbound: list[tuple[str, str, str, datetime]] = field(default_factory=list)
    rewindow: list[tuple[str, str, datetime]] = field(default_factory=list)
    fresh_umids: list[str] = field(default_factory=list)  # `note`'s messages without an old contribution
    fresh: list[Contribution | None] = field(default_factory=list)  # and their new ones

    def note(self, umid: str, old: Contribution | None, new: Contribution | None) -> None:
        """`record`, except that a message without an old contribution waits for `settle`, which counts
        them all in bulk (SQLite's write path; PostgreSQL's fast path uses `count_new`)."""
        if old is None:
            self.fresh_umids.append(umid)
            self.fresh.append(new)
        else:
            self.record(umid, old, new)

    def settle(self) -> None:
        """Count what `note` kept for later."""
        self.record_new(self.fresh_umids, self.fresh)
        self.fresh_umids, self.fresh = [], []

    def count_new(self, news: Iterable[Contribution]) -> None:
        """The counts of `record(umid, None, new)` for each of `news` (messages without an old
        contribution), in bulk; their WhatsApp sends are the caller's (`whatsapp_send`, `rewindow`).
        PostgreSQL's fast path: the sends go in the rows it writes."""
        _count_elements(self.counts, map(_AGGREGATED, news))

    def record(self, umid: str, old: Contribution | None, new: Contribution | None) -> None:
        """One message moved from `old` to `new` (equal: nothing to do)."""
        if old == new:
            return
        counts = self.counts
        a = b = None
        if old is not None:
            key = old[:10]
            counts[key] = counts.get(key, 0) - 1
            if old[10] is not None and old[11] is not None:
                a = (old[0], old[10], old[11])
        if new is not None:
            key = new[:10]
            counts[key] = counts.get(key, 0) + 1
            if new[10] is not None and new[11] is not None:
                b = (new[0], new[10], new[11])
        if a != b:  # a WhatsApp send appeared, moved or went (`window_change`)
            if a is not None:
                self.gone.append(umid)
                self.rewindow.append(a)
            if b is not None:
                self.rewindow.append(b)
                self.outbound.append((umid, *b))

    def record_new(self, umids: Sequence[str], news: Sequence[Contribution | None]) -> None:
        """`record(umid, None, new)` of each pair: messages that had no contribution before, counted in
        bulk (the counting loop runs in C: `Counter.update`'s)."""
        self.count_new(filter(None, news))
        for umid, new in zip(umids, news, strict=True):
            if new is not None and new[10] is not None and new[11] is not None:
                b = (new[0], new[10], new[11])
                self.rewindow.append(b)
                self.outbound.append((umid, *b))

    def deltas(self) -> Deltas:
        d = Deltas()
        for key, n in self.counts.items():
            if n:
                d.add(key, n)  # type: ignore[arg-type]
        return d


_AGGREGATED = itemgetter(slice(0, 10))  # the aggregated part of a contribution (`Changes.counts` keys)


def _count_each(counts: dict[Any, int], keys: Iterable[Any]) -> None:
    for k in keys:
        counts[k] = counts.get(k, 0) + 1


# `Counter.update`'s counting loop, in C in CPython (the same as `_count_each`)
_count_elements: Callable[[dict[Any, int], Iterable[Any]], None] = getattr(
    collections, "_count_elements", _count_each
)


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


# --- rows: what the stores upsert (tuples in `sinks.analytics_sql` column order) ---


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
        if c is None or c[USER] is None or c[WHATSAPP_AT] is None:
            return None
        return (c[SUB], c[USER], c[WHATSAPP_AT])

    a, b = key(old), key(new)
    if a == b:
        return []
    return [k for k in (a, b) if k is not None]
