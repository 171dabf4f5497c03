"""Truth against what chatpipe answers. Pure: records in, mismatches out.

A message's observed records are 8x8's Retrieve message details `data[]` (`Store.get_message` presented
by `sinks.present`, what the read API answers): one record per step with `step`, `channel` and
`status{state, detail, errorCode, errorMessage, timestamp}`. Channels compare case-insensitively with
8x8's aliases (`GoogleRCS` = `RCS`); timestamps compare as instants to the microsecond (8x8 writes up to
7 fractional digits, chatpipe keeps 6: the 7th is cut, not rounded).

Categories, each counted once per message:
- `missing`: no record at all (unknown umid); `extra`: a stored umid of a simulated subaccount the truth
  does not know;
- `steps`: the number of steps or their channels (in step order) differ;
- `state`: the message's state (its last step's) or a step's state differs;
- `times`: a step's status timestamp differs;
- `details`: a step's detail, errorCode or errorMessage differs;
- `inbound-missing` / `inbound-extra`: an inbound umid absent from its conversation / one the truth does
  not know in a simulated conversation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from chatpipe.proof.truth import ExpectedMessage

__all__ = ["CATEGORIES", "Mismatch", "Report", "compare_inbound", "compare_message", "instant", "report"]

CATEGORIES = ("missing", "extra", "steps", "state", "times", "details", "inbound-missing", "inbound-extra")
_ALIASES = {"googlercs": "rcs"}


@dataclass(frozen=True, slots=True)
class Mismatch:
    category: str
    umid: str
    sub_account_id: str
    what: str


@dataclass(frozen=True, slots=True)
class Report:
    """One source's comparison: `checked` umids compared, `matched` of them fully."""

    source: str
    checked: int
    matched: int
    excluded: int
    mismatches: tuple[Mismatch, ...]

    @property
    def counts(self) -> dict[str, int]:
        found = Counter(m.category for m in self.mismatches)
        return {c: found.get(c, 0) for c in CATEGORIES}

    @property
    def ok(self) -> bool:
        return not self.mismatches


def channel_key(channel: str | None) -> str:
    low = (channel or "").lower()
    return _ALIASES.get(low, low)


def instant(text: str | None) -> datetime | None:
    """An 8x8 timestamp as an aware UTC instant to the microsecond (a 7th digit cut); None if not one."""
    if not isinstance(text, str):
        return None
    body = text.strip()
    zone = ""
    for i in range(len(body) - 1, 9, -1):
        if body[i] in "Zz+-":
            body, zone = body[:i], body[i:]
            break
    if "." in body:
        whole, frac = body.split(".", 1)
        body = f"{whole}.{frac[:6].ljust(6, '0')}"
    try:
        value = datetime.fromisoformat(body + ("+00:00" if zone in ("", "Z", "z") else zone))
    except ValueError:
        return None
    return value.astimezone(UTC)


def _status(record: Mapping[str, Any]) -> Mapping[str, Any]:
    status = record.get("status")
    return status if isinstance(status, Mapping) else {}


def _show_steps(channels: Iterable[str]) -> str:
    return "[" + ", ".join(f"{n} {c}" for n, c in enumerate(channels, 1)) + "]"


def compare_message(
    expected: ExpectedMessage, records: Sequence[Mapping[str, Any]] | None
) -> tuple[Mismatch, ...]:
    """What differs between the truth of one message and its records (None: unknown umid)."""
    umid, sub = expected.umid, expected.sub_account_id

    def miss(category: str, what: str) -> Mismatch:
        return Mismatch(category, umid, sub, what)

    if not records:
        return (
            miss("missing", f"expected {expected.state} after {len(expected.steps)} step(s), found nothing"),
        )
    got = sorted(records, key=lambda r: r.get("step") or 0)
    out: dict[str, list[str]] = {}
    want_channels = [channel_key(s.channel) for s in expected.steps]
    got_channels = [channel_key(r.get("channel")) for r in got]
    if want_channels != got_channels or [r.get("step") for r in got] != list(range(1, len(got) + 1)):
        out.setdefault("steps", []).append(
            f"expected steps {_show_steps(want_channels)}, got "
            + "["
            + ", ".join(f"{r.get('step')} {r.get('channel')}" for r in got)
            + "]"
        )
    last_state = _status(got[-1]).get("state")
    if last_state != expected.state:
        out.setdefault("state", []).append(f"message state: expected {expected.state}, got {last_state}")
    by_channel = {channel_key(r.get("channel")): r for r in got}
    for s in expected.steps:
        r = by_channel.get(channel_key(s.channel))
        if r is None:
            continue  # reported under `steps`
        st = _status(r)
        where = f"step {s.step} {s.channel}"
        if st.get("state") != s.state:
            out.setdefault("state", []).append(f"{where}: expected {s.state}, got {st.get('state')}")
        if instant(st.get("timestamp")) != instant(s.timestamp):
            out.setdefault("times", []).append(f"{where}: expected {s.timestamp}, got {st.get('timestamp')}")
        for key, want in (
            ("detail", s.detail),
            ("errorCode", s.error_code),
            ("errorMessage", s.error_message),
        ):
            if st.get(key) != want:
                out.setdefault("details", []).append(f"{where} {key}: expected {want!r}, got {st.get(key)!r}")
    return tuple(miss(c, "; ".join(out[c])) for c in CATEGORIES if c in out)


def compare_inbound(
    sub_account_id: str,
    conversation: str,
    expected: Iterable[str],
    found: Iterable[str],
    known: frozenset[str],
) -> tuple[Mismatch, ...]:
    """The inbound umids of one conversation: each expected one must be found; a found one the truth does
    not know at all (`known`: every inbound umid of the truth) is extra."""
    want, got = set(expected), set(found)
    missing = [
        Mismatch("inbound-missing", u, sub_account_id, f"not in conversation {conversation}")
        for u in sorted(want - got)
    ]
    extra = [
        Mismatch("inbound-extra", u, sub_account_id, f"in conversation {conversation}, unknown to the truth")
        for u in sorted(got - want)
        if u not in known
    ]
    return (*missing, *extra)


def report(source: str, checked: int, excluded: int, mismatches: Iterable[Mismatch]) -> Report:
    found = tuple(mismatches)
    wrong = {m.umid for m in found if m.category not in ("extra", "inbound-extra")}
    return Report(source, checked, checked - len(wrong), excluded, found)
