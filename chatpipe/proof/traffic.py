"""The traffic model of `chatpipe simulate`: realistic 8x8 Chat Apps webhooks, generated from a seed. Pure.

`generate(config)` never does I/O and never reads the clock (`config.start` anchors every event time):
the same config gives the same webhooks, byte for byte, in the same order.

What it models (8x8-docs/):
- subaccounts with their own countries, users, channelIds, fallback chains (WhatsApp -> Viber -> SMS,
  RCS -> SMS, LineNotification -> SMS, ...), receipt version (v8 bodies, or v9 with `version: 9`,
  `whatsapp{pricingCategory, providerErrorCode}`, `outboundContent`) and channel spellings
  (`whatsapp`/`WhatsApp`, `RCS`/`GoogleRCS`, `LineNotification`, ...);
- per step (one channel attempt): optional `queued`, `sent` (Viber's sometimes with errorCode 2000
  "Successfully sent"), then `delivered` (`delivered_to_recipient`, SMS `delivered_to_operator`), `read`
  only on channels that report it (not SMS, Zalo, LineNotification; `line` reports `sent` at best), or a
  failure with a real error code of that channel (`delivery-error-codes.md`): `undelivered`
  (`rejected_by_operator`), `rejected` by 8x8, `failed`, or SMS `undelivered_to_recipient` after
  `delivered_to_operator`. A failure, or no success within the chain's `fallbackAfter`, starts the next
  channel of the chain;
- inbound messages (Text, Image, Location, Interactive button_reply / list_reply) replying to delivered
  outbound messages, from the same user to the subaccount's channelId, `replyToUmid` the outbound umid;
- production's disorder: a share of receipts sent twice, and for a share of messages every receipt
  arriving in shuffled order;
- a share of malformed webhooks (`MALFORMED_KINDS`), each of which ingest must refuse and dead-letter.
  They carry umids of their own, so that a defect ingest failed to refuse could never alter a real
  message's truth.

Event times: a step's events are strictly increasing (after rounding to the precision the timestamp is
written with: 0, 2, 3 or 7 fractional digits, as 8x8 sends), a later step starts after the earlier one's
events, and ranks never go down within a step (failure after `delivered_to_operator` has the same rank).
So by construction a step's last event is its final status and the chain order is the step order.
Message starts are spread over `spread` seconds after `config.start`; the latest event is at most
`spread` + about 45 minutes after it. Ingest refuses times more than a day ahead of arrival and the
processor seals messages a day after a failure: `start` must be recent (the CLI's default: an hour ago).
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import orjson

__all__ = [
    "MALFORMED_KINDS",
    "SUBACCOUNTS",
    "Event",
    "Inbound",
    "Message",
    "Party",
    "Step",
    "Traffic",
    "TrafficConfig",
    "User",
    "Webhook",
    "generate",
]

#: the states a receipt may carry, with the rank README's Guarantees give them (queued/accepted < sent <
#: delivered = failed < read)
RANKS = {
    "queued": 1,
    "accepted": 1,
    "sent": 2,
    "delivered": 3,
    "undelivered": 3,
    "rejected": 3,
    "failed": 3,
    "read": 4,
}
FAILURES = frozenset({"undelivered", "rejected", "failed"})

#: channel -> what it reports (list-of-supported-chatapps-channels.md)
REPORTS_READ = frozenset({"whatsapp", "viber", "rcs"})
NO_DELIVERED = frozenset({"line"})
#: channels users can write back on (inbound), and the inbound types each carries
INBOUND_TYPES: dict[str, tuple[str, ...]] = {
    "whatsapp": ("Text", "Text", "Image", "Location", "button_reply", "list_reply"),
    "viber": ("Text", "Text", "Image", "Location"),
    "rcs": ("Text", "Image", "button_reply"),
    "line": ("Text", "Image"),
    "sms": ("Text",),
}

#: channel -> (receipt spellings v8, v9): 8x8's bodies disagree on case and on RCS's name
SPELLINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "whatsapp": (("whatsapp", "WhatsApp"), ("whatsapp", "whatsApp", "WhatsApp")),
    "viber": (("viber", "Viber"), ("viber",)),
    "sms": (("sms", "SMS"), ("sms",)),
    "rcs": (("GoogleRCS",), ("RCS", "rcs")),
    "line": (("line",), ("line",)),
    "linenotification": (("LineNotification",), ("LineNotification",)),
    "zalonotification": (("ZaloNotification",), ("ZaloNotification",)),
}

# delivery-error-codes.md: code -> "Possible reason" (the errorMessage 8x8 sends)
GENERAL_ERRORS = {
    1: "AbsentSubscriber",
    9: "EquipmentProtocolError",
    11: "Flooding",
    14: "InternalError",
    15: "InvalidDestination",
    18: "Invalid parameter",
    23: "ConnectionError",
    25: "Operation Aborted By Receiving Network Or User",
    36: "Expired",
    41: "SmscReject",
    42: "NoCredit",
    43: "SpamFilter",
    46: "SubscriberNotReachable",
    57: "UnknownError",
    61: "SessionExpired",
}
WHATSAPP_ERRORS = {  # code -> (reason, WhatsApp's own code for v9's providerErrorCode)
    1012: ("Unknown failure", "131000"),
    1018: ("Message rejected", "131026"),
    1022: ("Message window expired", "131047"),
    1023: ("Spam control triggered", "131048"),
    1024: ("Message suppressed", "131049"),
    1028: ("Sender-recipient throttled", "131056"),
    1051: ("Message can't be delivered", "131050"),
    1054: ("BSUID Not Supported", ""),
}
VIBER_ERRORS = {
    2006: "Timeout",
    2007: "User blocked",
    2008: "Not a Viber user",
    2009: "No suitable device",
    2023: "Invalid destination number",
}
#: channel -> the codes an operator failure (`undelivered`) of that channel carries
CHANNEL_FAILURE_CODES: dict[str, tuple[int, ...]] = {
    "whatsapp": (1018, 1018, 1022, 1023, 1024, 1028, 1051, 1012, 1054, 15),
    "viber": (2008, 2008, 2007, 2009, 2006, 2023),
    "sms": (1, 15, 36, 41, 43, 46, 57),
    "rcs": (1, 9, 15, 23, 46),
    "line": (1, 15, 57),
    "linenotification": (1, 15, 25, 57, 61),
    "zalonotification": (1, 15, 25, 57, 61),
}
REJECTED_CODES = (42, 43, 18)  # refused by 8x8 itself: no credit, spam filter, invalid parameter
FAILED_CODES = (14, 57)

PRICING = ("marketing", "utility", "authentication", "service")

COUNTRIES: dict[str, tuple[str, str, int]] = {  # ISO code -> (calling code, leading digits, digits after)
    "SG": ("+65", "89", 7),
    "MY": ("+60", "1", 8),
    "PH": ("+63", "9", 9),
    "ID": ("+62", "8", 10),
    "TH": ("+66", "89", 8),
    "JP": ("+81", "9", 9),
    "VN": ("+84", "9", 8),
    "IN": ("+91", "98", 9),
    "GB": ("+44", "7", 9),
    "BR": ("+55", "1", 10),
}

DAY0 = timedelta(0)


@dataclass(frozen=True, slots=True)
class Profile:
    """A subaccount of the simulated customer base."""

    name: str
    weight: float
    countries: tuple[str, ...]
    chains: tuple[tuple[tuple[str, ...], float], ...]  # (channels in fallback order, weight)
    receipt_version: int  # 8: no version field; 9: `version: 9` and its extra objects
    fallback_after: tuple[int, ...]  # seconds, as the send request's `fallbackAfter` (10..86400)


SUBACCOUNTS: tuple[Profile, ...] = (
    Profile(
        "Acme_Retail",
        4,
        ("SG", "MY", "ID"),
        ((("whatsapp", "sms"), 5), (("whatsapp", "viber", "sms"), 3), (("whatsapp",), 2)),
        9,
        (60, 120),
    ),
    Profile(
        "Globex_Bank",
        3,
        ("PH", "TH", "IN"),
        ((("viber", "sms"), 4), (("sms",), 3), (("whatsapp", "sms"), 3)),
        8,
        (60, 300),
    ),
    Profile(
        "Initech_Travel",
        2,
        ("GB", "BR", "IN"),
        ((("rcs", "sms"), 4), (("whatsapp",), 3), (("rcs", "whatsapp", "sms"), 2)),
        9,
        (120, 900),
    ),
    Profile(
        "Umbrella_Japan",
        1.5,
        ("JP",),
        ((("linenotification", "sms"), 4), (("line",), 3), (("whatsapp", "sms"), 1)),
        9,
        (300,),
    ),
    Profile("Hooli_Vietnam", 1, ("VN",), ((("zalonotification", "sms"), 5), (("sms",), 2)), 9, (60,)),
)


@dataclass(frozen=True, slots=True)
class TrafficConfig:
    """What to generate. Shares are probabilities in [0, 1]; see `generate` for what each one counts."""

    messages: int
    seed: int = 0
    start: datetime = datetime(2026, 1, 1, tzinfo=UTC)
    malformed_share: float = 0.01
    inbound_share: float = 0.1
    duplicate_share: float = 0.05
    shuffle_share: float = 0.1
    spread: float | None = None  # seconds over which messages start; None: min(6 h, 0.2 s per message)

    def __post_init__(self) -> None:
        if self.messages < 0:
            raise ValueError(f"messages must be >= 0, got {self.messages}")
        for name in ("malformed_share", "inbound_share", "duplicate_share", "shuffle_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if self.malformed_share >= 1.0:
            raise ValueError("malformed_share must be below 1")
        if self.start.tzinfo is None:
            raise ValueError("start must be an aware datetime (UTC)")
        if self.spread is not None and self.spread <= 0:
            raise ValueError(f"spread must be positive, got {self.spread}")

    @property
    def spread_seconds(self) -> float:
        return self.spread if self.spread is not None else min(6 * 3600.0, max(60.0, 0.2 * self.messages))


@dataclass(frozen=True, slots=True)
class User:
    """An end user: a phone number, and the ids WhatsApp and LINE know them by."""

    msisdn: str
    country: str
    whatsapp_id: str | None = None
    line_id: str | None = None
    name: str | None = None

    def on(self, channel: str) -> Party:
        """The user as 8x8 names them on `channel`: LINE by its user id alone, WhatsApp by number and
        WhatsApp id, every other channel by number."""
        if channel in ("line", "linenotification") and self.line_id is not None:
            return Party(None, self.line_id)
        if channel == "whatsapp":
            return Party(self.msisdn, self.whatsapp_id)
        return Party(self.msisdn, None)


@dataclass(frozen=True, slots=True)
class Party:
    """A user as one webhook names them (`user.msisdn`, `user.channelUserId`)."""

    msisdn: str | None
    channel_user_id: str | None

    @property
    def key(self) -> str:
        """How the read API names this user in a conversation: the E.164 number, else the channel's id."""
        return self.msisdn if self.msisdn is not None else (self.channel_user_id or "")

    def json(self) -> dict[str, str]:
        out = {}
        if self.msisdn is not None:
            out["msisdn"] = self.msisdn
        if self.channel_user_id is not None:
            out["channelUserId"] = self.channel_user_id
        return out


@dataclass(frozen=True, slots=True)
class Event:
    """One status of one step, as 8x8 reports it. `at` is exactly the time `stamp` says (to the
    microsecond: a 7th fractional digit is below what any store keeps)."""

    state: str
    at: datetime
    stamp: str
    detail: str | None = None
    error_code: int | None = None
    error_message: str | None = None
    provider_error_code: str | None = None


@dataclass(frozen=True, slots=True)
class Step:
    channel: str  # lower case, the 8x8 channel type value (`whatsapp`, `rcs`, `linenotification`)
    events: tuple[Event, ...]


@dataclass(frozen=True, slots=True)
class Message:
    """The plan of one outbound message: every status 8x8 will report for it, per step."""

    umid: str
    sub_account_id: str
    user: User
    steps: tuple[Step, ...]
    receipt_version: int
    batch_id: str | None = None
    client_message_id: str | None = None
    client_batch_id: str | None = None
    pricing: str | None = None


@dataclass(frozen=True, slots=True)
class Inbound:
    umid: str
    sub_account_id: str
    channel: str
    channel_id: str
    user: Party
    type: str  # 8x8's type, or the interactive reply kind (button_reply, list_reply)
    at: datetime  # whole milliseconds
    reply_to_umid: str | None

    @property
    def stamp(self) -> str:
        """`at` as the webhook writes it (3 fractional digits)."""
        return self.at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{self.at.microsecond // 1000:03d}Z"


@dataclass(frozen=True, slots=True)
class Webhook:
    """One request body to POST, in send order. `kind` is `receipt`, `inbound` or `malformed`; `umid` is
    the message or inbound umid it is about (for a malformed one, whatever umid it carries, if any)."""

    kind: str
    umid: str | None
    body: bytes
    duplicate: bool = False
    defect: str | None = None  # the MALFORMED_KINDS entry, for malformed webhooks
    at: datetime | None = None  # when 8x8 sends it (the event time plus the network delay)
    event: tuple[int, int] | None = None  # a receipt's (step, event) indices into its Message.steps

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


@dataclass(frozen=True, slots=True)
class Traffic:
    config: TrafficConfig
    messages: tuple[Message, ...]
    inbound: tuple[Inbound, ...]
    webhooks: tuple[Webhook, ...]  # in send order
    sub_accounts: tuple[str, ...] = field(default=())


# --- small helpers ---------------------------------------------------------------------------------


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _pick(rng: random.Random, weighted: Sequence[tuple[object, float]]) -> object:
    total = sum(w for _, w in weighted)
    x = rng.random() * total
    for value, w in weighted:
        x -= w
        if x < 0:
            return value
    return weighted[-1][0]


_PRECISIONS = ((2, 0.7), (3, 0.1), (7, 0.1), (0, 0.1))  # fractional digits 8x8 writes, and how often


def _stamp(rng: random.Random, at: datetime, after: datetime | None) -> tuple[datetime, str]:
    """`at` rounded down to a precision 8x8 writes, strictly after `after`, and its text."""
    digits = int(_pick(rng, _PRECISIONS))  # type: ignore[call-overload]
    quantum = {0: 1_000_000, 2: 10_000, 3: 1_000, 7: 1}[digits]
    micros = at.microsecond - at.microsecond % quantum
    t = at.replace(microsecond=micros)
    if after is not None and t <= after:
        t = after + timedelta(microseconds=quantum)
        t = t.replace(microsecond=t.microsecond - t.microsecond % quantum)
        if t <= after:
            t += timedelta(microseconds=quantum)
    base = t.strftime("%Y-%m-%dT%H:%M:%S")
    if digits == 0:
        return t, base + "Z"
    frac = f"{t.microsecond:06d}"
    if digits == 7:
        return t, f"{base}.{frac}{rng.randrange(10)}Z"
    return t, f"{base}.{frac[:digits]}Z"


def _msisdn(rng: random.Random, country: str) -> str:
    code, lead, rest = COUNTRIES[country]
    return code + rng.choice(lead) + "".join(str(rng.randrange(10)) for _ in range(rest))


def _sub_id(tag: str, profile: Profile) -> str:
    return f"Sim{tag}_{profile.name}"


def run_tag(seed: int) -> str:
    """Six hex digits naming a seed's subaccounts, so that runs of different seeds never share one."""
    return hashlib.sha256(f"chatpipe-simulate-{seed}".encode()).hexdigest()[:6]


# --- the plan of one message ---------------------------------------------------------------------


class _Clock:
    """Event times of one message: strictly increasing, each written at some 8x8 precision."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.last: datetime | None = None

    def event(self, at: datetime, state: str, **fields: object) -> Event:
        t, text = _stamp(self.rng, at, self.last)
        self.last = t
        return Event(state, t, text, **fields)  # type: ignore[arg-type]


def _failure(rng: random.Random, clock: _Clock, channel: str, t: datetime, sent: bool) -> list[Event]:
    """The events ending a failed step, from time `t` (after `sent` if one was reported)."""
    x = rng.random()
    if x < 0.1 and not sent:
        code = rng.choice(REJECTED_CODES)
        return [clock.event(t, "rejected", error_code=code, error_message=GENERAL_ERRORS[code])]
    if x < 0.15:
        code = rng.choice(FAILED_CODES)
        return [clock.event(t, "failed", error_code=code, error_message=GENERAL_ERRORS[code])]
    code = rng.choice(CHANNEL_FAILURE_CODES[channel])
    provider = None
    if channel == "whatsapp" and code in WHATSAPP_ERRORS:
        message, provider = WHATSAPP_ERRORS[code]
        provider = provider or None
    elif channel == "viber" and code in VIBER_ERRORS:
        message = VIBER_ERRORS[code]
    else:
        message = GENERAL_ERRORS[code]
    if channel == "sms" and x < 0.4:  # the operator first took it, then the handset never did
        first = clock.event(t, "delivered", detail="delivered_to_operator")
        later = t + timedelta(seconds=rng.uniform(5, 120))
        return [
            first,
            clock.event(
                later,
                "undelivered",
                detail="undelivered_to_recipient",
                error_code=code,
                error_message=message,
            ),
        ]
    return [
        clock.event(
            t,
            "undelivered",
            detail="rejected_by_operator",
            error_code=code,
            error_message=message,
            provider_error_code=provider,
        )
    ]


def _step(
    rng: random.Random, clock: _Clock, channel: str, t: datetime, last: bool, fallback_after: int
) -> tuple[Step, datetime | None, bool]:
    """One channel attempt starting at `t`: its events, when the next step starts (None: no next step),
    and whether it ended delivered or read (an inbound reply may follow)."""
    events: list[Event] = []
    if rng.random() < 0.3:
        events.append(clock.event(t, "queued"))
    sent_at = t + timedelta(seconds=rng.uniform(0.3, 3.0))
    success_p = {"sms": 0.9, "whatsapp": 0.75, "viber": 0.7, "rcs": 0.7}.get(channel, 0.8)
    outcome = (
        "success" if rng.random() < success_p else ("fail" if last or rng.random() < 0.65 else "timeout")
    )
    if outcome == "fail":
        sent = rng.random() < 0.6
        if sent:
            events.append(clock.event(sent_at, "sent"))
        fail_at = sent_at + timedelta(seconds=rng.uniform(0.5, 30.0))
        events.extend(_failure(rng, clock, channel, fail_at, sent))
        assert clock.last is not None
        nxt = None if last else clock.last + timedelta(seconds=rng.uniform(0.5, 5.0))
        return Step(channel, tuple(events)), nxt, False
    if rng.random() < 0.93 or channel in NO_DELIVERED:
        if channel == "viber" and rng.random() < 0.5:
            events.append(clock.event(sent_at, "sent", error_code=2000, error_message="Successfully sent"))
        else:
            events.append(clock.event(sent_at, "sent"))
    nxt = None if last or outcome == "success" else t + timedelta(seconds=fallback_after)
    if channel in NO_DELIVERED:  # `line` reports sent at best
        return Step(channel, tuple(events)), nxt, outcome == "success"
    if outcome == "timeout" and (channel not in REPORTS_READ or rng.random() < 0.5):
        return Step(channel, tuple(events)), nxt, False  # stuck at sent until the fallback
    delivered_at = sent_at + timedelta(seconds=rng.uniform(0.5, 8.0))
    detail = "delivered_to_operator" if channel == "sms" else "delivered_to_recipient"
    events.append(clock.event(delivered_at, "delivered", detail=detail))
    if outcome == "success" and channel in REPORTS_READ and rng.random() < 0.55:
        read_at = delivered_at + timedelta(seconds=min(1800.0, rng.expovariate(1 / 120) + 2))
        events.append(clock.event(read_at, "read"))
    return Step(channel, tuple(events)), nxt, outcome == "success"


# --- bodies ---------------------------------------------------------------------------------------


def _receipt_doc(rng: random.Random, m: Message, channel: str, e: Event) -> dict[str, object]:
    v9 = m.receipt_version == 9
    payload: dict[str, object] = {"umid": m.umid}
    if m.batch_id is not None:
        payload["batchId"] = m.batch_id
    if m.client_message_id is not None:
        payload["clientMessageId"] = m.client_message_id
    if m.client_batch_id is not None:
        payload["clientBatchId"] = m.client_batch_id
    payload["subAccountId"] = m.sub_account_id
    payload["channel"] = rng.choice(SPELLINGS[channel][1 if v9 else 0])
    payload["user"] = m.user.on(channel).json()
    status: dict[str, object] = {"state": e.state}
    if e.detail is not None:
        status["detail"] = e.detail
    status["timestamp"] = e.stamp
    if e.error_code is not None:
        status["errorCode"] = e.error_code
        status["errorMessage"] = e.error_message
    payload["status"] = status
    if v9 and channel == "whatsapp":
        whatsapp: dict[str, str] = {}
        if e.provider_error_code is not None:
            whatsapp["providerErrorCode"] = e.provider_error_code
        elif e.state in ("sent", "delivered", "read") and m.pricing is not None:
            whatsapp["pricingCategory"] = m.pricing
        if whatsapp:
            payload["whatsapp"] = whatsapp
        if e.state == "delivered" and rng.random() < 0.3:
            payload["outboundContent"] = {
                "channel": "whatsapp",
                "contentType": "text",
                "body": {"text": "Your order has shipped."},
            }
    doc: dict[str, object] = {"version": 9} if v9 else {}
    doc.update(
        namespace="ChatApps",
        eventType="outbound_message_status_changed",
        description="ChatApps outbound message delivery receipt"
        if v9
        else "ChatApps Outbound Message Delivery Receipt",
        payload=payload,
    )
    return doc


_TEXTS = (
    "Thanks!",
    "When will it arrive?",
    "STOP",
    "Yes please",
    "Can I change the address?",
    "こんにちは、注文の状況を教えてください",
    "Ok 👍",
    "I did not order this",
)


def _inbound_doc(rng: random.Random, i: Inbound, v3: bool, name: str | None = None) -> dict[str, object]:
    user: dict[str, str] = i.user.json()
    if name is not None:
        user["name"] = name
    payload: dict[str, object] = {
        "umid": i.umid,
        "subAccountId": i.sub_account_id,
        "timestamp": i.stamp,
        "user": user,
        "recipient": {"channel": rng.choice(SPELLINGS[i.channel][1]), "channelId": i.channel_id},
    }
    if i.type == "Text":
        payload.update(type="Text", content={"text": rng.choice(_TEXTS)})
    elif i.type == "Image":
        payload.update(
            type="Image",
            content={
                "url": f"https://chatapps-media.8x8.com/inbound/{i.umid[:8]}/photo.jpg?sig={rng.getrandbits(48):x}"
            },
        )
    elif i.type == "Location":
        payload.update(
            type="Location",
            content={
                "location": {
                    "latitude": round(rng.uniform(-60, 60), 7),
                    "longitude": round(rng.uniform(-180, 180), 7),
                }
            },
        )
    elif i.type == "button_reply":
        n = rng.randrange(1, 4)
        payload.update(
            type="Interactive",
            content={
                "interactive": {
                    "type": "button_reply",
                    "button_reply": {"id": f"option-{n}", "title": ("Track", "FAQ", "Agent")[n - 1]},
                }
            },
        )
    else:
        n = rng.randrange(1, 5)
        payload.update(
            type="Interactive",
            content={
                "interactive": {
                    "type": "list_reply",
                    "list_reply": {
                        "id": f"slot-{n}",
                        "title": "Monday, Oct 9",
                        "description": f"{8 + n}:00 AM - {9 + n}:00 AM",
                    },
                }
            },
        )
    if i.reply_to_umid is not None:
        payload["replyToUmid"] = i.reply_to_umid
    doc: dict[str, object] = {"version": 3} if v3 else {}
    doc.update(
        namespace="ChatApps",
        eventType="inbound_message_received",
        description="ChatApps inbound message",
        payload=payload,
    )
    return doc


def _dumps(doc: object) -> bytes:
    return orjson.dumps(doc)


# --- malformed webhooks ----------------------------------------------------------------------------

MALFORMED_KINDS = (
    "not_json",
    "empty",
    "not_utf8",
    "not_an_object",
    "missing_umid",
    "bad_umid",
    "missing_subaccount",
    "unknown_state",
    "bad_timestamp",
    "timestamp_before_2000",
    "timestamp_far_future",
    "status_not_object",
    "bad_channel",
    "inbound_missing_recipient",
    "unsupported_event_type",
)
"""Each is refused by ingest's parser (400, or 422 for the unsupported eventType) and dead-lettered."""


def _malformed(rng: random.Random, kind: str, doc: dict[str, object], inbound: dict[str, object]) -> bytes:
    """A defective copy of a well-formed receipt `doc` (or inbound `inbound`), defect `kind`."""
    d = orjson.loads(orjson.dumps(doc))
    p = d["payload"]
    if kind == "not_json":
        text = orjson.dumps(d)
        return text[: rng.randrange(10, len(text) - 5)]
    if kind == "empty":
        return b""
    if kind == "not_utf8":
        return orjson.dumps(d).replace(b'"ChatApps"', b'"Chat\xff\xfeApps"', 1)
    if kind == "not_an_object":
        return orjson.dumps([d])
    if kind == "missing_umid":
        del p["umid"]
    elif kind == "bad_umid":
        p["umid"] = p["umid"][:8] + rng.choice(("/../", " ", "?x=", "%2F", "\u202e"))
    elif kind == "missing_subaccount":
        del p["subAccountId"]
    elif kind == "unknown_state":
        p["status"]["state"] = rng.choice(("exploded", "deliverd", "DELIVERED_OK"))
    elif kind == "bad_timestamp":
        p["status"]["timestamp"] = rng.choice(("yesterday", "2026-13-45T25:61:00Z", "1719999999"))
    elif kind == "timestamp_before_2000":
        p["status"]["timestamp"] = "1999-12-31T23:59:59.99Z"
    elif kind == "timestamp_far_future":
        p["status"]["timestamp"] = "2099-01-01T00:00:00Z"
    elif kind == "status_not_object":
        p["status"] = "delivered"
    elif kind == "bad_channel":
        p["channel"] = rng.choice(("what's app", "sms/viber", ""))
    elif kind == "inbound_missing_recipient":
        d = orjson.loads(orjson.dumps(inbound))
        del d["payload"]["recipient"]
    elif kind == "unsupported_event_type":
        d["eventType"] = "outbound_message_exploded"
    else:  # pragma: no cover - MALFORMED_KINDS is closed
        raise AssertionError(kind)
    return orjson.dumps(d)


# --- the whole traffic ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Sub:
    profile: Profile
    sub_id: str
    users: list[User]
    channel_ids: dict[str, tuple[str, ...]]
    batches: list[tuple[str, str]]


def _subaccounts(rng: random.Random, tag: str, messages: int) -> list[_Sub]:
    subs = []
    for profile in SUBACCOUNTS:
        channels = {c for chain, _ in profile.chains for c in chain}
        users = []
        for _ in range(max(3, messages // 8)):
            country = rng.choice(profile.countries)
            msisdn = _msisdn(rng, country)
            wa = (
                (msisdn[1:] if rng.random() < 0.5 else f"{country}.{rng.getrandbits(60)}")
                if rng.random() < 0.7
                else None
            )
            line = "U" + f"{rng.getrandbits(128):032x}" if channels & {"line", "linenotification"} else None
            users.append(User(msisdn, country, wa, line, rng.choice(("Jane Tan", "Ravi", "Yuki", None))))
        ids = {c: tuple(_uuid(rng) for _ in range(2 if c == "whatsapp" else 1)) for c in sorted(channels)}
        batches = [(_uuid(rng), f"campaign-2026-{n:02d}") for n in range(1, 6)]
        subs.append(_Sub(profile, _sub_id(tag, profile), users, ids, batches))
    return subs


def generate(config: TrafficConfig) -> Traffic:
    """Every webhook of a simulation, in send order, and the plan of every message and inbound message.

    - `messages` outbound messages, each with a subaccount, user, fallback chain and event sequence;
    - inbound replies: each message whose last step was delivered or read on a channel users can write
      back on gets one reply with probability `inbound_share` (a fifth of them a second one);
    - `duplicate_share` of the receipts are sent a second time, a little later;
    - `shuffle_share` of the messages have all their receipts arrive in a random order;
    - malformed webhooks: `round(malformed_share / (1 - malformed_share) * well-formed)`, so that they
      are `malformed_share` of all webhooks, at random places in the stream.
    Send order is arrival time: the event time plus a network delay of up to 2 s (or the shuffled one).
    """
    rng = random.Random(config.seed)
    tag = run_tag(config.seed)
    subs = _subaccounts(rng, tag, config.messages)
    weights = [(s, s.profile.weight) for s in subs]
    spread = config.spread_seconds
    messages: list[Message] = []
    inbound: list[Inbound] = []
    timed: list[tuple[datetime, int, Webhook]] = []  # (arrival, tie-break, webhook)
    seq = 0

    def arrive(at: datetime, hook: Webhook) -> None:
        nonlocal seq
        timed.append((at, seq, hook))
        seq += 1

    for n in range(config.messages):
        sub: _Sub = _pick(rng, weights)  # type: ignore[assignment]
        profile = sub.profile
        chain: tuple[str, ...] = _pick(rng, profile.chains)  # type: ignore[assignment]
        ui = rng.randrange(len(sub.users))
        user = sub.users[ui]
        umid = _uuid(rng)
        batch_id = client_batch_id = client_message_id = None
        if rng.random() < 0.3:
            batch_id, client_batch_id = rng.choice(sub.batches)
            if rng.random() < 0.5:
                client_batch_id = None
        if rng.random() < 0.6:
            client_message_id = f"order-{n:07d}-{rng.getrandbits(20):05x}"
        start = config.start + timedelta(seconds=rng.uniform(0, spread))
        clock = _Clock(rng)
        steps: list[Step] = []
        t: datetime | None = start
        answered = False
        fallback_after = rng.choice(profile.fallback_after)
        for k, channel in enumerate(chain):
            assert t is not None
            step, t, answered = _step(rng, clock, channel, t, k == len(chain) - 1, fallback_after)
            if step.events:  # a step no receipt reports (stuck, `sent` lost) is invisible: no step at all
                steps.append(step)
            if t is None:
                break
        message = Message(
            umid,
            sub.sub_id,
            user,
            tuple(steps),
            profile.receipt_version,
            batch_id,
            client_message_id,
            client_batch_id,
            rng.choice(PRICING),
        )
        messages.append(message)

        receipts = [
            (
                e.at + timedelta(seconds=rng.uniform(0.05, 2.0)),
                _receipt_doc(rng, message, s.channel, e),
                (si, ei),
            )
            for si, s in enumerate(steps)
            for ei, e in enumerate(s.events)
        ]
        if rng.random() < config.shuffle_share and len(receipts) > 1:
            times = [a for a, _, _ in receipts]
            rng.shuffle(times)
            receipts = [(a, doc, where) for a, (_, doc, where) in zip(times, receipts, strict=True)]
        for at, doc, where in receipts:
            body = _dumps(doc)
            arrive(at, Webhook("receipt", umid, body, at=at, event=where))
            if rng.random() < config.duplicate_share:
                again = at + timedelta(seconds=rng.uniform(0.5, 60.0))
                arrive(again, Webhook("receipt", umid, body, duplicate=True, at=again, event=where))

        last = steps[-1]
        if answered and last.channel in INBOUND_TYPES and rng.random() < config.inbound_share:
            replies = 2 if rng.random() < 0.2 else 1
            at = last.events[-1].at
            for _ in range(replies):
                at = at + timedelta(seconds=rng.uniform(5, 900), microseconds=rng.randrange(1000) * 1000)
                at = at.replace(microsecond=at.microsecond - at.microsecond % 1000)
                kind = rng.choice(INBOUND_TYPES[last.channel])
                reply_to = umid if kind.endswith("_reply") or rng.random() < 0.4 else None
                ids = sub.channel_ids[last.channel]
                msg = Inbound(
                    _uuid(rng),
                    sub.sub_id,
                    last.channel,
                    ids[ui % len(ids)],
                    user.on(last.channel),
                    kind,
                    at,
                    reply_to,
                )
                inbound.append(msg)
                doc = _inbound_doc(rng, msg, profile.receipt_version == 9, user.name)
                sent_at = at + timedelta(seconds=rng.uniform(0.05, 2.0))
                arrive(sent_at, Webhook("inbound", msg.umid, _dumps(doc), at=sent_at))

    share = config.malformed_share
    count = round(share / (1 - share) * len(timed)) if timed else 0
    first = min((a for a, _, _ in timed), default=config.start)
    last_at = max((a for a, _, _ in timed), default=config.start)
    window = max((last_at - first).total_seconds(), 1.0)
    template_sub = subs[0]
    for i in range(count):
        kind = (
            MALFORMED_KINDS[i % len(MALFORMED_KINDS)]
            if i < len(MALFORMED_KINDS)
            else rng.choice(MALFORMED_KINDS)
        )
        fake = Message(_uuid(rng), template_sub.sub_id, template_sub.users[0], (), 9)
        e = Event(
            "delivered", first, first.strftime("%Y-%m-%dT%H:%M:%S.00Z"), detail="delivered_to_recipient"
        )
        doc = _receipt_doc(rng, fake, "whatsapp", e)
        fake_in = Inbound(
            _uuid(rng),
            template_sub.sub_id,
            "whatsapp",
            _uuid(rng),
            template_sub.users[0].on("whatsapp"),
            "Text",
            first,
            None,
        )
        in_doc = _inbound_doc(rng, fake_in, True)
        body = _malformed(rng, kind, doc, in_doc)
        umid = fake_in.umid if kind == "inbound_missing_recipient" else fake.umid
        sent_at = first + timedelta(seconds=rng.uniform(0, window))
        arrive(sent_at, Webhook("malformed", umid, body, defect=kind, at=sent_at))

    timed.sort(key=lambda item: (item[0], item[1]))
    return Traffic(
        config, tuple(messages), tuple(inbound), tuple(h for _, _, h in timed), tuple(s.sub_id for s in subs)
    )
