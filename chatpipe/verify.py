"""`chatpipe verify`: compare the store (and the read API) with the truth `chatpipe simulate` wrote.

    chatpipe verify --truth FILE [--store URL] [--api URL] [--wait SECONDS] [--show N]

Reads every message of the truth through `Store.get_message` (the store named by `--store`, default
`CHATPIPE_STORE_URL`; presented by `sinks.present.stored_details`) and, with `--api`, through the read
API's Retrieve message details route; lists the simulated subaccounts' stored umids to find extra ones;
lists each simulated conversation's inbound messages. Messages and inbound umids the truth marks given up
(8x8 would have stopped retrying one of their webhooks) are excluded: their state is that of whichever of
their webhooks got through.
Categories: `chatpipe.proof.compare`. Prints a table of counts per source and category and the first
mismatches (umid and what differs); ingest defects seen while sending (a malformed webhook answered 2xx,
a well-formed one answered 4xx) fail the verification too.

`--wait SECONDS`: the pipeline is asynchronous, so re-check what does not match yet (progress on stderr)
until everything does or the time is up; then one last full pass decides. Exit 0 only when everything
matches, 1 on any mismatch, 2 when the truth file or a source cannot be read.
Also runs as `python -m chatpipe.verify ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp

from chatpipe.proof.compare import CATEGORIES, Mismatch, Report, compare_inbound, compare_message, report
from chatpipe.proof.shell import SubParsers, run_alone
from chatpipe.proof.truth import ExpectedMessage, Truth, load_lines
from chatpipe.runtime.config import Settings

__all__ = ["add_verify_parser", "cmd_verify", "main"]

PAGE = 1000

Records = list[dict[str, Any]] | None
Conversation = tuple[str, str, str]  # (subAccountId, channelId, user)


class Source(Protocol):
    name: str

    async def messages(self, wanted: Sequence[ExpectedMessage]) -> dict[str, Records]: ...

    async def umids(self, sub_account_id: str) -> set[str]: ...

    async def inbound(self, conversation: Conversation) -> set[str]: ...


class StoreSource:
    """Reads through `sinks.store`'s public interface (blocking calls, fast on the embedded store)."""

    name = "store"

    def __init__(self, url: str, settings: Settings) -> None:
        from sinks.connect import open_store
        from sinks.worker import pii_policy

        self.store = open_store(url, pii_policy(settings))

    async def messages(self, wanted: Sequence[ExpectedMessage]) -> dict[str, Records]:
        from sinks.present import stored_details

        found = {m.umid: self.store.get_message(m.sub_account_id, m.umid) for m in wanted}
        return {umid: None if f is None else stored_details(f) for umid, f in found.items()}

    async def umids(self, sub_account_id: str) -> set[str]:
        found: set[str] = set()
        after = None
        while True:
            page, after = self.store.list_messages(sub_account_id, after=after, limit=PAGE)
            found.update(r["umid"] for r in page)
            if after is None:
                return found

    async def inbound(self, conversation: Conversation) -> set[str]:
        sub, channel_id, user = conversation
        by_number = user.startswith("+")
        found: set[str] = set()
        after = None
        while True:
            page, after = self.store.list_inbound(
                sub,
                channel_id=channel_id,
                msisdn=user if by_number else None,
                channel_user_id=None if by_number else user,
                after=after,
                limit=PAGE,
            )
            found.update(r["umid"] for r in page)
            if after is None:
                return found

    def close(self) -> None:
        self.store.close()


class ApiSource:
    """Reads through the read API (`GET /api/v1/subaccounts/...`), `concurrency` requests at a time."""

    name = "api"

    def __init__(self, base: str, concurrency: int, api_key: str | None = None) -> None:
        self.base = base.rstrip("/")
        self.slots = asyncio.Semaphore(concurrency)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency),
            timeout=aiohttp.ClientTimeout(total=30),
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
        )

    def _sub(self, sub: str) -> str:
        return f"{self.base}/api/v1/subaccounts/{quote(sub, safe='')}"

    async def _get(self, url: str, params: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.slots, self.session.get(url, params=params) as r:
            body = await r.json(content_type=None) if r.status in (200, 404) else await r.text()
            return r.status, body

    async def _one(self, m: ExpectedMessage) -> Records:
        status, body = await self._get(f"{self._sub(m.sub_account_id)}/messages/{quote(m.umid, safe='')}")
        if status == 404:
            return None
        if status != 200:
            raise RuntimeError(f"GET message {m.umid}: HTTP {status}: {str(body)[:200]}")
        return body["data"]

    async def messages(self, wanted: Sequence[ExpectedMessage]) -> dict[str, Records]:
        answers = await asyncio.gather(*(self._one(m) for m in wanted))
        return {m.umid: a for m, a in zip(wanted, answers, strict=True)}

    async def _pages(self, url: str, params: dict[str, str]) -> set[str]:
        found: set[str] = set()
        while True:
            status, body = await self._get(url, params)
            if status != 200:
                raise RuntimeError(f"GET {url}: HTTP {status}: {str(body)[:200]}")
            found.update(r["umid"] for r in body["data"])
            if not body.get("next"):
                return found
            params = {**params, "after": body["next"]}

    async def umids(self, sub_account_id: str) -> set[str]:
        return await self._pages(f"{self._sub(sub_account_id)}/messages", {"limit": str(PAGE)})

    async def inbound(self, conversation: Conversation) -> set[str]:
        sub, channel_id, user = conversation
        url = f"{self._sub(sub)}/conversations/{quote(channel_id, safe='')}/messages"
        return await self._pages(url, {"user": user, "limit": str(PAGE)})

    async def close(self) -> None:
        await self.session.close()


@dataclass(frozen=True, slots=True)
class Plan:
    """What to check, from the truth: given-up umids left out."""

    messages: dict[str, ExpectedMessage]
    conversations: dict[Conversation, frozenset[str]]
    known_umids: frozenset[str]  # every umid the truth names (messages, inbound, malformed)
    known_inbound: frozenset[str]
    sub_accounts: tuple[str, ...]
    excluded: int


def plan_of(truth: Truth) -> Plan:
    given_up = truth.delivery.given_up if truth.delivery else frozenset()
    given_up_in = truth.delivery.given_up_inbound if truth.delivery else frozenset()
    messages = {m.umid: m for m in truth.messages if m.umid not in given_up}
    convs: dict[Conversation, set[str]] = {}
    for i in truth.inbound:
        key = (i.sub_account_id, i.channel_id, i.user)
        bucket = convs.setdefault(key, set())
        if i.umid not in given_up_in:
            bucket.add(i.umid)
    known = {m.umid for m in truth.messages} | {i.umid for i in truth.inbound}
    known |= {b.umid for b in truth.malformed if b.umid}
    excluded = len(truth.messages) - len(messages) + sum(1 for i in truth.inbound if i.umid in given_up_in)
    return Plan(
        messages,
        {k: frozenset(v) for k, v in convs.items()},
        frozenset(known),
        frozenset(i.umid for i in truth.inbound),
        tuple(truth.run.get("subAccounts", ())),
        excluded,
    )


@dataclass(frozen=True, slots=True)
class Pass:
    mismatches: tuple[Mismatch, ...]
    pending_messages: frozenset[str]
    pending_conversations: frozenset[Conversation]


async def check(
    source: Source, plan: Plan, messages: Iterable[str], conversations: Iterable[Conversation], extras: bool
) -> Pass:
    """Compare `messages` and `conversations` of `plan` through `source`; `extras`: also list every
    simulated subaccount's umids to find extra ones."""
    wanted = [plan.messages[u] for u in messages]
    found = await source.messages(wanted)
    out: list[Mismatch] = []
    for m in wanted:
        out.extend(compare_message(m, found[m.umid]))
    convs = list(conversations)
    pending_conv = set()
    for conv, got in zip(convs, await asyncio.gather(*map(source.inbound, convs)), strict=True):
        wrong = compare_inbound(
            conv[0], f"{conv[1]}/{conv[2]}", plan.conversations[conv], got, plan.known_inbound
        )
        if wrong:
            pending_conv.add(conv)
            out.extend(wrong)
    if extras:
        for sub in plan.sub_accounts:
            for umid in sorted(await source.umids(sub) - plan.known_umids):
                out.append(Mismatch("extra", umid, sub, "stored, unknown to the truth"))
    pending = frozenset(m.umid for m in out if m.umid in plan.messages)
    return Pass(tuple(out), pending, frozenset(pending_conv))


def _counts(mismatches: Iterable[Mismatch]) -> str:
    counts: dict[str, int] = {}
    for m in mismatches:
        counts[m.category] = counts.get(m.category, 0) + 1
    return ", ".join(f"{c} {counts[c]}" for c in CATEGORIES if c in counts)


async def verify(sources: Sequence[Source], plan: Plan, wait: float, stream=sys.stderr) -> list[Report]:
    """Check each source in turn: a full pass; while it finds mismatches and `wait` s (counted from the
    start) are not over, re-check only what did not match, every 2 s at most; once that all matches or
    the time is up, one more full pass (extras included) decides. The first full pass decides when it
    matches at once or `wait` is 0."""
    deadline = time.monotonic() + wait
    reports = []
    everything = (list(plan.messages), list(plan.conversations))
    for source in sources:
        messages, conversations = everything
        full = True
        while True:
            result = await check(source, plan, messages, conversations, extras=full)
            over = time.monotonic() >= deadline
            if full and (not result.mismatches or over):
                break
            if not result.mismatches or over:  # confirm (or settle) with a full pass
                messages, conversations, full = *everything, True
                continue
            left = deadline - time.monotonic()
            print(
                f"verify: {source.name}: {len(result.pending_messages)} messages and "
                f"{len(result.pending_conversations)} conversations not matching yet "
                f"({_counts(result.mismatches)}); {left:.0f} s left",
                file=stream,
                flush=True,
            )
            messages, conversations = sorted(result.pending_messages), sorted(result.pending_conversations)
            full = False
            await asyncio.sleep(min(2.0, max(left, 0.0)))
        checked = len(plan.messages) + sum(len(v) for v in plan.conversations.values())
        reports.append(report(source.name, checked, plan.excluded, result.mismatches))
    return reports


def render(truth: Truth, plan: Plan, reports: Sequence[Report], show: int) -> tuple[str, bool]:
    """The summary table and the first mismatches; whether everything matched."""
    d = truth.delivery
    dlq = d.dlq_records if d else "unknown"
    lines = [
        f"verify: {len(truth.messages)} messages, {len(truth.inbound)} inbound, "
        f"{len(truth.malformed)} malformed (dead-letter records expected: {dlq}); "
        f"excluded as given up: {plan.excluded}"
    ]
    header = ["source", "checked", "matched", *CATEGORIES]
    rows = [
        [r.source, str(r.checked), str(r.matched), *(str(r.counts[c]) for c in CATEGORIES)] for r in reports
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        lines.append(
            "  "
            + "  ".join(
                x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    ok = all(r.ok for r in reports)
    if d is None:
        lines.append("  (no delivery line in the truth: simulate did not finish; nothing is excluded)")
    elif d.malformed_accepted or d.rejected_valid:
        ok = False
        lines.append(
            f"  ingest defects while sending: {d.malformed_accepted} malformed webhooks answered 2xx, "
            f"{d.rejected_valid} well-formed answers 4xx"
        )
    wrong = [(r.source, m) for r in reports for m in r.mismatches]
    if wrong:
        lines.append(f"first mismatches ({min(show, len(wrong))} of {len(wrong)}):")
        for source, m in wrong[:show]:
            lines.append(f"  {source}  {m.category}  {m.umid}  ({m.sub_account_id})  {m.what}")
    return "\n".join(lines), ok


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--truth", type=Path, required=True, help="the truth file chatpipe simulate wrote")
    p.add_argument("--store", help="store URL (default: CHATPIPE_STORE_URL, sqlite:///.chatpipe/chatpipe.db)")
    p.add_argument("--api", help="also check the read API at this base URL (http://127.0.0.1:8081)")
    p.add_argument(
        "--api-key",
        help="present Authorization: Bearer KEY to the read API (default: CHATPIPE_READ_API_KEY); "
        "its scope must cover every subaccount of the truth",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        help="re-check for up to this many seconds until everything matches (default 0: once)",
    )
    p.add_argument("--show", type=int, default=20, help="list this many mismatches at most (default 20)")
    p.add_argument("--concurrency", type=int, default=16, help="read API requests in flight (default 16)")


def add_verify_parser(sub: SubParsers) -> argparse.ArgumentParser:
    """Register `verify` on `chatpipe`'s sub-command parsers."""
    p = sub.add_parser(
        "verify",
        help="compare the store (and read API) with a simulation's truth",
        description=__doc__.split("\n\n")[0],
    )
    _arguments(p)
    p.set_defaults(func=cmd_verify)
    return p


async def _run(settings: Settings, args: argparse.Namespace, truth: Truth, plan: Plan) -> list[Report]:
    store = StoreSource(args.store or settings.store_url, settings)
    key = args.api_key or settings.read_api_key
    api = ApiSource(args.api, max(1, args.concurrency), key) if args.api else None
    try:
        sources: list[Source] = [store] if api is None else [store, api]
        return await verify(sources, plan, args.wait)
    finally:
        store.close()
        if api is not None:
            await api.close()


def cmd_verify(settings: Settings, args: argparse.Namespace, env: dict[str, str]) -> int:
    started = time.monotonic()
    try:
        with args.truth.open(encoding="utf-8") as f:
            truth = load_lines(f)
    except (OSError, ValueError) as exc:
        print(f"chatpipe verify: cannot read the truth: {exc}", file=sys.stderr)
        return 2
    plan = plan_of(truth)
    try:
        reports = asyncio.run(_run(settings, args, truth, plan))
    except Exception as exc:  # a store or API that cannot be read: not a verdict on the data
        print(f"chatpipe verify: cannot read a source: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    text, ok = render(truth, plan, reports, args.show)
    print(text)
    print(f"verify: {'OK' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_alone("chatpipe verify", __doc__, _arguments, cmd_verify, argv)


if __name__ == "__main__":
    sys.exit(main())
