"""The ground truth of a simulation, and its file format. Pure: text in, text out.

The expected outcome of a message is computed from the traffic plan by the rules README's Guarantees
state, implemented here on their own (never by calling chatpipe's state machine, which is what is being
proved):
- a step is one channel; the steps are ordered by the first event time of their channel, numbered from 1;
- a step's status is its greatest event by rank (queued/accepted 1 < sent 2 < delivered = undelivered =
  rejected = failed 3 < read 4), the later event time between equal ranks: states never regress;
- the message's state is its last step's.
`traffic.generate` builds every step so that its last event is also that greatest one (the tests check
that the two agree), so the truth holds by construction as well as by rule.

Truth file: JSON Lines, UTF-8, one object per line, its kind in `"type"`:

    {"type": "run", "format": "chatpipe-truth/1", "seed": 7, "start": "2026-...Z", "messages": N,
     "inbound": K, "malformed": M, "webhooks": W, "subAccounts": ["Sim1a2b3c_Acme_Retail", ...]}
    {"type": "message", "umid": "...", "subAccountId": "...", "state": "read",
     "steps": [{"step": 1, "channel": "whatsapp", "state": "undelivered", "timestamp": "...Z",
                "detail": "rejected_by_operator", "errorCode": 1018, "errorMessage": "Message rejected"},
               {"step": 2, "channel": "sms", ...}]}                                   (one per message)
    {"type": "inbound", "umid": "...", "subAccountId": "...", "channel": "whatsapp", "channelId": "...",
     "user": "+6581968289", "inboundType": "Text", "timestamp": "...Z", "replyToUmid": "..."}
    {"type": "malformed", "defect": "unknown_state", "sha256": "...", "umid": "..."}  (one per body)
    {"type": "delivery", "givenUp": [umid, ...], "givenUpInbound": [umid, ...], "dlqRecords": 3105,
     "malformedAccepted": 0, "rejectedValid": 0, "attempts": ..., "retries": ..., "elapsedSeconds": ...,
     "ratePerSecond": ...}                                                            (last line)

The run line of `chatpipe simulate` also names its `parts` (`chatpipe.proof.runs`: one per run, each with
its seed, start, shares and the time that run stopped sending), so that a later run can continue it; then
`messages`, `inbound` and `malformed` count what the truth covers over every run.
Everything but the `delivery` line follows from the seeds and starts alone (deterministic). `delivery`
is what sending observed: the umids any of whose webhooks were given up after 8x8's last retry
(`givenUp`, `givenUpInbound`: verify excludes them, since their state is that of whichever of their
receipts got through), the refusals of malformed webhooks (`dlqRecords`: each 4xx answer to one is a
record in ingest's dead-letter topic; 8x8 retries 4xx too, so a malformed webhook is refused 5 times),
malformed webhooks answered 2xx and well-formed ones answered 4xx (both chatpipe defects).
Timestamps are the text the webhooks carried (0 to 7 fractional digits); channels are 8x8's channel type
values in lower case (`whatsapp`, `rcs`, `linenotification`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from chatpipe.proof.traffic import RANKS, Event, Inbound, Message, Traffic

__all__ = [
    "FORMAT",
    "Delivery",
    "ExpectedInbound",
    "ExpectedMessage",
    "ExpectedStep",
    "Malformed",
    "Truth",
    "dump_lines",
    "expected_message",
    "load_lines",
    "step_status",
    "truth_of",
]

FORMAT = "chatpipe-truth/1"


@dataclass(frozen=True, slots=True)
class ExpectedStep:
    step: int
    channel: str
    state: str
    timestamp: str
    detail: str | None = None
    error_code: int | None = None
    error_message: str | None = None


@dataclass(frozen=True, slots=True)
class ExpectedMessage:
    umid: str
    sub_account_id: str
    state: str
    steps: tuple[ExpectedStep, ...]


@dataclass(frozen=True, slots=True)
class ExpectedInbound:
    umid: str
    sub_account_id: str
    channel: str
    channel_id: str
    user: str  # the E.164 number, else the channelUserId: how the read API's conversation routes name them
    inbound_type: str
    timestamp: str
    reply_to_umid: str | None = None


@dataclass(frozen=True, slots=True)
class Malformed:
    defect: str
    sha256: str
    umid: str | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """What sending observed (see the module docstring)."""

    given_up: frozenset[str] = frozenset()
    given_up_inbound: frozenset[str] = frozenset()
    dlq_records: int = 0
    malformed_accepted: int = 0
    rejected_valid: int = 0
    attempts: int = 0
    retries: int = 0
    elapsed_seconds: float = 0.0
    rate_per_second: float = 0.0


@dataclass(frozen=True, slots=True)
class Truth:
    run: dict[str, Any]
    messages: tuple[ExpectedMessage, ...]
    inbound: tuple[ExpectedInbound, ...]
    malformed: tuple[Malformed, ...]
    delivery: Delivery | None = field(default=None)


def step_status(events: Iterable[Event]) -> Event:
    """A step's status: its greatest event by (rank, event time). Raises ValueError when empty."""
    return max(events, key=lambda e: (RANKS[e.state], e.at))


def expected_message(m: Message) -> ExpectedMessage:
    """The outcome the documented rules give the events of `m` (see the module docstring)."""
    ordered = sorted(m.steps, key=lambda s: (min(e.at for e in s.events), s.channel))
    steps = []
    for n, s in enumerate(ordered, 1):
        e = step_status(s.events)
        steps.append(ExpectedStep(n, s.channel, e.state, e.stamp, e.detail, e.error_code, e.error_message))
    return ExpectedMessage(m.umid, m.sub_account_id, steps[-1].state, tuple(steps))


def expected_inbound(i: Inbound) -> ExpectedInbound:
    return ExpectedInbound(
        i.umid, i.sub_account_id, i.channel, i.channel_id, i.user.key, i.type, i.stamp, i.reply_to_umid
    )


def truth_of(traffic: Traffic, delivery: Delivery | None = None) -> Truth:
    """The truth of `traffic` (deterministic), with what sending observed if given."""
    c = traffic.config
    malformed = tuple(
        Malformed(w.defect or "", w.sha256, w.umid) for w in traffic.webhooks if w.kind == "malformed"
    )
    run = {
        "type": "run",
        "format": FORMAT,
        "seed": c.seed,
        "start": c.start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "messages": len(traffic.messages),
        "inbound": len(traffic.inbound),
        "malformed": len(malformed),
        "webhooks": len(traffic.webhooks),
        "subAccounts": list(traffic.sub_accounts),
    }
    return Truth(
        run,
        tuple(map(expected_message, traffic.messages)),
        tuple(map(expected_inbound, traffic.inbound)),
        malformed,
        delivery,
    )


# --- the file format -----------------------------------------------------------------------------


def _step_json(s: ExpectedStep) -> dict[str, Any]:
    return {
        "step": s.step,
        "channel": s.channel,
        "state": s.state,
        "timestamp": s.timestamp,
        "detail": s.detail,
        "errorCode": s.error_code,
        "errorMessage": s.error_message,
    }


def _delivery_json(d: Delivery) -> dict[str, Any]:
    return {
        "type": "delivery",
        "givenUp": sorted(d.given_up),
        "givenUpInbound": sorted(d.given_up_inbound),
        "dlqRecords": d.dlq_records,
        "malformedAccepted": d.malformed_accepted,
        "rejectedValid": d.rejected_valid,
        "attempts": d.attempts,
        "retries": d.retries,
        "elapsedSeconds": round(d.elapsed_seconds, 3),
        "ratePerSecond": round(d.rate_per_second, 1),
    }


def dump_lines(truth: Truth) -> Iterator[str]:
    """The truth file, line by line (each without its newline)."""
    yield orjson.dumps(truth.run).decode()
    for m in truth.messages:
        doc: dict[str, Any] = {
            "type": "message",
            "umid": m.umid,
            "subAccountId": m.sub_account_id,
            "state": m.state,
            "steps": [_step_json(s) for s in m.steps],
        }
        yield orjson.dumps(doc).decode()
    for i in truth.inbound:
        doc = {
            "type": "inbound",
            "umid": i.umid,
            "subAccountId": i.sub_account_id,
            "channel": i.channel,
            "channelId": i.channel_id,
            "user": i.user,
            "inboundType": i.inbound_type,
            "timestamp": i.timestamp,
            "replyToUmid": i.reply_to_umid,
        }
        yield orjson.dumps(doc).decode()
    for b in truth.malformed:
        yield orjson.dumps(
            {"type": "malformed", "defect": b.defect, "sha256": b.sha256, "umid": b.umid}
        ).decode()
    if truth.delivery is not None:
        yield orjson.dumps(_delivery_json(truth.delivery)).decode()


def load_lines(lines: Iterable[str]) -> Truth:
    """Parse a truth file. Raises ValueError naming the line for anything that is not one."""
    run: dict[str, Any] | None = None
    messages: list[ExpectedMessage] = []
    inbound: list[ExpectedInbound] = []
    malformed: list[Malformed] = []
    delivery: Delivery | None = None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = orjson.loads(line)
            kind = doc["type"]
            if kind == "run":
                if doc.get("format") != FORMAT:
                    raise ValueError(f"unknown format {doc.get('format')!r} (expected {FORMAT})")
                run = doc
            elif kind == "message":
                steps = tuple(
                    ExpectedStep(
                        s["step"],
                        s["channel"],
                        s["state"],
                        s["timestamp"],
                        s.get("detail"),
                        s.get("errorCode"),
                        s.get("errorMessage"),
                    )
                    for s in doc["steps"]
                )
                messages.append(ExpectedMessage(doc["umid"], doc["subAccountId"], doc["state"], steps))
            elif kind == "inbound":
                inbound.append(
                    ExpectedInbound(
                        doc["umid"],
                        doc["subAccountId"],
                        doc["channel"],
                        doc["channelId"],
                        doc["user"],
                        doc["inboundType"],
                        doc["timestamp"],
                        doc.get("replyToUmid"),
                    )
                )
            elif kind == "malformed":
                malformed.append(Malformed(doc["defect"], doc["sha256"], doc.get("umid")))
            elif kind == "delivery":
                delivery = Delivery(
                    frozenset(doc["givenUp"]),
                    frozenset(doc["givenUpInbound"]),
                    doc["dlqRecords"],
                    doc["malformedAccepted"],
                    doc["rejectedValid"],
                    doc.get("attempts", 0),
                    doc.get("retries", 0),
                    doc.get("elapsedSeconds", 0.0),
                    doc.get("ratePerSecond", 0.0),
                )
            else:
                raise ValueError(f"unknown type {kind!r}")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"truth line {n}: {exc}") from None
    if run is None:
        raise ValueError(f"no run line: not a {FORMAT} file")
    return Truth(run, tuple(messages), tuple(inbound), tuple(malformed), delivery)
