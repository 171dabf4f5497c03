"""Simulations in several runs: a run may stop at a time and a later run continue it. Pure: no I/O, no clock.

A simulation is a list of parts, one per run of `chatpipe simulate`: each part is a `TrafficConfig` (its
own seed, so its own umids and subaccounts) and `until`, the time at which that run stopped sending
(None: it sent everything). 8x8 sends each webhook at its arrival time (`Webhook.at`), so a run that stops
at `until` has sent exactly the webhooks of every part that arrive by then; the others are held back:
the messages still in flight then (a `read` after `delivered`, `delivered` after `sent`, the fallback step
after a failure, an inbound reply, a duplicate) get them from the next run, which also starts messages of
its own part.

Run k (parts[:k]) sends, in arrival order: every webhook of its own part arriving by its `until`, and
every webhook of an earlier part arriving after the previous run's `until` and by its own. The truth after
run k is the truth (`truth.truth_of`, by the documented rules) of each part as seen by then: its messages
restricted to the events whose receipts were sent (steps with none left out, messages with none left
out), the inbound and malformed webhooks sent. A part whose own run, or any later one, had no `until`
was sent in full.

A truth file carries its parts in its run line (`"parts": [...]`, see `part_json`), so a continuation
regenerates the earlier runs from the file alone and checks they give the file's truth before sending.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from chatpipe.proof.traffic import Step, Traffic, TrafficConfig, Webhook, generate
from chatpipe.proof.truth import FORMAT, Delivery, Truth, truth_of

__all__ = [
    "Part",
    "Simulation",
    "merge_delivery",
    "part_from_json",
    "part_json",
    "parts_of",
    "seen",
    "simulation",
]


@dataclass(frozen=True, slots=True)
class Part:
    """One run's own traffic, and when that run stopped sending (None: it sent everything)."""

    config: TrafficConfig
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class Simulation:
    """What the last run of `parts` sends, the truth once it has, and how many webhooks wait for a later
    run."""

    webhooks: tuple[Webhook, ...]
    truth: Truth
    held_back: int


def _stamp(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def part_json(p: Part) -> dict[str, Any]:
    c = p.config
    return {
        "seed": c.seed,
        "start": _stamp(c.start),
        "messages": c.messages,
        "malformedShare": c.malformed_share,
        "inboundShare": c.inbound_share,
        "duplicateShare": c.duplicate_share,
        "shuffleShare": c.shuffle_share,
        "spread": c.spread,
        "until": None if p.until is None else _stamp(p.until),
    }


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def part_from_json(doc: Mapping[str, Any]) -> Part:
    """Raises KeyError, TypeError or ValueError for anything that is not a `part_json` object."""
    config = TrafficConfig(
        messages=int(doc["messages"]),
        seed=int(doc["seed"]),
        start=_time(doc["start"]),
        malformed_share=float(doc["malformedShare"]),
        inbound_share=float(doc["inboundShare"]),
        duplicate_share=float(doc["duplicateShare"]),
        shuffle_share=float(doc["shuffleShare"]),
        spread=None if doc.get("spread") is None else float(doc["spread"]),
    )
    until = doc.get("until")
    return Part(config, None if until is None else _time(until))


def parts_of(run: Mapping[str, Any]) -> tuple[Part, ...]:
    """The parts a truth's run line names; a run line written before parts existed is one part with the
    default shares (a continuation then finds out whether those were the shares used)."""
    if "parts" in run:
        return tuple(part_from_json(d) for d in run["parts"])
    return (
        Part(TrafficConfig(messages=int(run["messages"]), seed=int(run["seed"]), start=_time(run["start"]))),
    )


def _check(parts: Sequence[Part]) -> None:
    if not parts:
        raise ValueError("a simulation has at least one part")
    seeds = [p.config.seed for p in parts]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"every part needs a seed of its own (the seed makes the umids): {seeds}")
    for a, b in itertools.pairwise(parts):
        if a.until is not None and b.until is not None and b.until <= a.until:
            raise ValueError(
                f"a run must stop after the run it continues: {_stamp(b.until)} <= {_stamp(a.until)}"
            )


def _cut(parts: Sequence[Part], j: int, runs: int) -> datetime | None:
    """Until when part j was sent once runs parts[:runs] (runs > j) are over; None: in full."""
    untils = [p.until for p in parts[j:runs]]
    return None if any(u is None for u in untils) else untils[-1]


def seen(traffic: Traffic, until: datetime | None) -> Traffic:
    """`traffic` as sent by `until` (None: all of it): the webhooks arriving by then, the messages cut to
    the events whose receipts were among them, the inbound messages sent."""
    if until is None:
        return traffic
    hooks = tuple(w for w in traffic.webhooks if w.at is not None and w.at <= until)
    events = {(w.umid, w.event) for w in hooks if w.kind == "receipt"}
    messages = []
    for m in traffic.messages:
        steps = []
        for si, s in enumerate(m.steps):
            kept = tuple(e for ei, e in enumerate(s.events) if (m.umid, (si, ei)) in events)
            if kept:
                steps.append(Step(s.channel, kept))
        if steps:
            messages.append(dataclasses.replace(m, steps=tuple(steps)))
    sent_inbound = {w.umid for w in hooks if w.kind == "inbound"}
    inbound = tuple(i for i in traffic.inbound if i.umid in sent_inbound)
    return Traffic(traffic.config, tuple(messages), inbound, hooks, traffic.sub_accounts)


def simulation(parts: Sequence[Part]) -> Simulation:
    """The last run of `parts` (see the module docstring). Raises ValueError for parts sharing a seed or
    a run stopping no later than the run it continues."""
    _check(parts)
    k = len(parts)
    traffics = [generate(p.config) for p in parts]
    timed: list[tuple[datetime, int, int, Webhook]] = []
    truths = []
    held_back = 0
    for j, traffic in enumerate(traffics):
        before = None if j == k - 1 else _cut(parts, j, k - 1)
        after = _cut(parts, j, k)
        if j < k - 1 and before is None:
            truths.append(truth_of(traffic))
            continue  # sent in full by an earlier run
        for n, w in enumerate(traffic.webhooks):
            assert w.at is not None
            if before is not None and w.at <= before:
                continue
            if after is not None and w.at > after:
                held_back += 1
                continue
            timed.append((w.at, j, n, w))
        truths.append(truth_of(seen(traffic, after)))
    timed.sort(key=lambda item: item[:3])
    last = parts[-1].config
    run = {
        "type": "run",
        "format": FORMAT,
        "seed": last.seed,
        "start": last.start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "messages": sum(len(t.messages) for t in truths),
        "inbound": sum(len(t.inbound) for t in truths),
        "malformed": sum(len(t.malformed) for t in truths),
        "webhooks": sum(t.run["webhooks"] for t in truths),
        "subAccounts": [s for t in truths for s in t.run["subAccounts"]],
        "parts": [part_json(p) for p in parts],
    }
    truth = Truth(
        run,
        tuple(m for t in truths for m in t.messages),
        tuple(i for t in truths for i in t.inbound),
        tuple(b for t in truths for b in t.malformed),
    )
    return Simulation(tuple(w for *_, w in timed), truth, held_back)


def merge_delivery(earlier: Delivery | None, now: Delivery) -> Delivery:
    """What sending observed over the earlier runs and this one: given-up umids stay given up (their
    state is that of whichever of their webhooks got through), counts add up."""
    if earlier is None:
        return now
    elapsed = earlier.elapsed_seconds + now.elapsed_seconds
    attempts = earlier.attempts + now.attempts
    return Delivery(
        earlier.given_up | now.given_up,
        earlier.given_up_inbound | now.given_up_inbound,
        earlier.dlq_records + now.dlq_records,
        earlier.malformed_accepted + now.malformed_accepted,
        earlier.rejected_valid + now.rejected_valid,
        attempts,
        earlier.retries + now.retries,
        elapsed,
        attempts / max(elapsed, 1e-9),
    )
