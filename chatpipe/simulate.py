"""`chatpipe simulate`: send realistic 8x8 Chat Apps traffic to an ingest service and write the ground truth.

    chatpipe simulate --url URL [--token T] --messages N --rate R [--seed S] [--truth FILE]
                      [--time-factor F] [--concurrency C] [--malformed-share X] [--inbound-share Y]
                      [--until SECONDS] [--continue EARLIER_TRUTH]

The traffic (`chatpipe.proof.traffic`) and the truth (`chatpipe.proof.truth`, format in its docstring)
depend on `--seed` and `--start` only; sending retries like 8x8 (1, 10, 30, 90 s, times
`--time-factor`). A progress line goes to stderr (rewritten in place on a terminal, a line every few
seconds otherwise), the summary to stdout. Exit 0 once every webhook was sent or given up; 1 when none
was accepted at all (nothing is listening); 2 for bad arguments or an earlier truth that cannot be
continued.

Runs in several parts (`chatpipe.proof.runs`): `--until SECONDS` stops the run at that time after
`--start` (event time, not wall time): the webhooks 8x8 would send later (a `read` after `delivered`, the
fallback step after a failure, ...) are held back, and the truth is that of what was sent. `--continue
EARLIER_TRUTH --truth NEW_TRUTH` is the next run: it regenerates the earlier runs from EARLIER_TRUTH's
run line (and refuses, exit 2, when they do not give that truth), sends their held-back webhooks that
arrive by its own `--until` together with `--messages` new messages of its own seed (default: one more
than the earlier ones; `--start` defaults to the earlier run's stop), and writes a truth covering every
run (given-up umids of earlier runs stay excluded).
Also runs as `python -m chatpipe.simulate ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from chatpipe.proof.client import DeliveryResult, SendStats, deliver
from chatpipe.proof.delivery import RetryPolicy
from chatpipe.proof.runs import Part, Simulation, merge_delivery, parts_of, simulation
from chatpipe.proof.shell import SubParsers, run_alone
from chatpipe.proof.traffic import TrafficConfig, Webhook
from chatpipe.proof.truth import Delivery, Truth, dump_lines, load_lines
from chatpipe.runtime.config import Settings

__all__ = ["add_simulate_parser", "cmd_simulate", "main"]

WEBHOOK_PATH = "/v1/webhooks/chatapps"


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1): {text}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _start(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text}") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        required=True,
        help=f"ingest's base URL or its webhook URL (the path {WEBHOOK_PATH} is added to a bare base)",
    )
    p.add_argument("--token", help="present Authorization: Bearer TOKEN (default: CHATPIPE_WEBHOOK_TOKEN)")
    p.add_argument("--messages", type=int, required=True, help="outbound messages to simulate (new ones)")
    p.add_argument("--rate", type=_positive, required=True, help="webhooks per second (retries included)")
    p.add_argument(
        "--seed",
        type=int,
        help="the traffic and truth depend on it alone (default 0; with --continue, one more than the "
        "earlier runs' largest)",
    )
    p.add_argument(
        "--start",
        type=_start,
        help="time of the first message (ISO 8601, UTC unless given; default: an hour ago, to the "
        "minute); keep it recent: ingest refuses times a day ahead, chatpipe seals failures "
        "after a day",
    )
    p.add_argument(
        "--truth", type=Path, help="write the ground truth here (JSON Lines, see chatpipe.proof.truth)"
    )
    p.add_argument(
        "--until",
        type=_positive,
        help="stop at this many seconds of event time after --start: later webhooks are held back for a "
        "--continue run (default: send everything)",
    )
    p.add_argument(
        "--continue",
        dest="earlier",
        type=Path,
        metavar="EARLIER_TRUTH",
        help="continue the run that wrote this truth: send its held-back webhooks and --messages new ones; "
        "--truth then covers every run",
    )
    p.add_argument(
        "--time-factor",
        type=float,
        default=1.0,
        help="multiply 8x8's retry delays (1, 10, 30, 90 s) by this (e.g. 0.01 in tests)",
    )
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at most (default 32)")
    p.add_argument(
        "--malformed-share",
        type=_share,
        default=0.01,
        help="share of all webhooks that are malformed (ingest must dead-letter them; default 0.01)",
    )
    p.add_argument(
        "--inbound-share",
        type=_share,
        default=0.1,
        help="chance that a delivered message gets an inbound reply (default 0.1)",
    )
    p.add_argument(
        "--duplicate-share", type=_share, default=0.05, help="share of receipts sent twice (default 0.05)"
    )
    p.add_argument(
        "--shuffle-share",
        type=_share,
        default=0.1,
        help="share of messages whose receipts arrive shuffled (default 0.1)",
    )
    p.add_argument(
        "--timeout",
        type=_positive,
        default=5.0,
        help="seconds before an attempt counts as timed out (default 5, what WhatsApp asks for)",
    )


def add_simulate_parser(sub: SubParsers) -> argparse.ArgumentParser:
    """Register `simulate` on `chatpipe`'s sub-command parsers."""
    p = sub.add_parser(
        "simulate",
        help="send realistic 8x8 traffic to ingest and write the ground truth",
        description=__doc__.split("\n\n")[0],
    )
    _arguments(p)
    p.set_defaults(func=cmd_simulate)
    return p


def webhook_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.path in ("", "/"):
        return url.rstrip("/") + WEBHOOK_PATH
    return url


class Progress:
    """The stderr progress line: at most `per_second` updates a second on a terminal (in place), one
    line every `quiet_every` seconds otherwise."""

    def __init__(self, stream=sys.stderr, per_second: float = 4.0, quiet_every: float = 5.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.every = 1.0 / per_second if self.tty else quiet_every
        self.last_at = 0.0
        self.last_attempts = 0

    def __call__(self, s: SendStats, elapsed: float) -> None:
        final = s.settled >= s.total
        if elapsed - self.last_at < self.every and not final:
            return
        span = max(elapsed - self.last_at, 1e-9)
        live = (s.attempts - self.last_attempts) / span
        self.last_at, self.last_attempts = elapsed, s.attempts
        refused = sum(n for code, n in s.statuses.items() if not 200 <= code < 300)
        line = (
            f"simulate: {s.settled}/{s.total} webhooks settled ({100 * s.settled / max(s.total, 1):.1f}%)"
            f"  {live:.0f}/s  attempts {s.attempts}  ok {s.accepted}  retries {s.retries}  "
            f"non-2xx {refused}  timeouts {s.timeouts}  conn-errors {s.connection_errors}  "
            f"given up {s.given_up}  in flight {s.in_flight}  {elapsed:.0f}s"
        )
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def delivery_of(webhooks: Sequence[Webhook], result: DeliveryResult) -> Delivery:
    """What the truth records of sending: which messages and inbound umids were given up on."""
    given_up: set[str] = set()
    given_up_inbound: set[str] = set()
    for index in result.given_up:
        hook = webhooks[index]
        if hook.kind == "receipt" and hook.umid is not None:
            given_up.add(hook.umid)
        elif hook.kind == "inbound" and hook.umid is not None:
            given_up_inbound.add(hook.umid)
    s = result.stats
    return Delivery(
        frozenset(given_up),
        frozenset(given_up_inbound),
        s.dlq_records,
        s.malformed_accepted,
        s.rejected_valid,
        s.attempts,
        s.retries,
        result.elapsed,
        s.attempts / max(result.elapsed, 1e-9),
    )


def write_truth(path: Path, truth: Truth) -> None:
    """Write the truth file atomically (a reader never sees half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for line in dump_lines(truth):
            f.write(line + "\n")
    tmp.replace(path)


def summary(sim: Simulation, result: DeliveryResult, delivery: Delivery) -> str:
    """This run's figures (`delivery`: this run's alone)."""
    s = result.stats
    hooks = sim.webhooks
    kinds = {k: sum(1 for w in hooks if w.kind == k) for k in ("receipt", "inbound", "malformed")}
    dups = sum(1 for w in hooks if w.duplicate)
    messages = len({w.umid for w in hooks if w.kind == "receipt"})
    statuses = ", ".join(f"{code}: {n}" for code, n in sorted(s.statuses.items()))
    header = (
        f"simulate: {messages} messages, {kinds['inbound']} inbound, "
        f"{len(hooks)} webhooks ({kinds['receipt']} receipts of which {dups} duplicates, "
        f"{kinds['inbound']} inbound, {kinds['malformed']} malformed)"
    )
    lines = [
        f"{header} in {result.elapsed:.1f} s: {delivery.rate_per_second:.0f} attempts/s",
        f"  attempts {s.attempts}, retries {s.retries}, answers {{{statuses}}}, timeouts {s.timeouts}, "
        f"connection errors {s.connection_errors}",
        f"  given up: {s.given_up} webhooks ({len(delivery.given_up)} messages, "
        f"{len(delivery.given_up_inbound)} inbound, the rest malformed); "
        f"dead-letter records expected: {s.dlq_records}",
        f"  defects: malformed answered 2xx {s.malformed_accepted}, "
        f"well-formed answered 4xx {s.rejected_valid}",
    ]
    t = sim.truth
    if len(t.run["parts"]) > 1 or sim.held_back:
        lines.append(
            f"  runs: {len(t.run['parts'])}; the truth covers {len(t.messages)} messages, "
            f"{len(t.inbound)} inbound, {len(t.malformed)} malformed; "
            f"{sim.held_back} webhooks held back for a --continue run"
        )
    return "\n".join(lines)


def _default_start() -> datetime:
    return (datetime.now(UTC) - timedelta(hours=1)).replace(second=0, microsecond=0)


def plan_run(args: argparse.Namespace) -> tuple[list[Part], Truth | None]:
    """The parts of this run (the earlier runs' from `--continue`, then this one's) and the earlier truth.
    Raises ValueError naming what cannot be continued."""
    earlier: Truth | None = None
    parts: list[Part] = []
    if args.earlier is not None:
        try:
            with args.earlier.open(encoding="utf-8") as f:
                earlier = load_lines(f)
            parts = list(parts_of(earlier.run))
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"cannot read the earlier truth {args.earlier}: {exc}") from None
        again = simulation(parts).truth
        if (again.messages, again.inbound, again.malformed) != (
            earlier.messages,
            earlier.inbound,
            earlier.malformed,
        ):
            raise ValueError(
                f"{args.earlier}: regenerating its runs from its run line does not give its truth "
                "(another simulator version, or an edited file): it cannot be continued"
            )
    seed = args.seed
    if seed is None:
        seed = max(p.config.seed for p in parts) + 1 if parts else 0
    stopped = parts[-1].until if parts else None
    start = args.start or stopped or _default_start()
    config = TrafficConfig(
        messages=args.messages,
        seed=seed,
        start=start,
        malformed_share=args.malformed_share,
        inbound_share=args.inbound_share,
        duplicate_share=args.duplicate_share,
        shuffle_share=args.shuffle_share,
    )
    until = None if args.until is None else start + timedelta(seconds=args.until)
    parts.append(Part(config, until))
    return parts, earlier


def cmd_simulate(settings: Settings, args: argparse.Namespace, env: dict[str, str]) -> int:
    if args.messages < 0 or args.concurrency < 1 or args.time_factor < 0:
        print("chatpipe simulate: --messages >= 0, --concurrency >= 1, --time-factor >= 0", file=sys.stderr)
        return 2
    try:
        parts, earlier = plan_run(args)
        # before sending: what is sent must not depend on how sending went
        sim = simulation(parts)
    except ValueError as exc:
        print(f"chatpipe simulate: {exc}", file=sys.stderr)
        return 2
    part = parts[-1]
    print(
        f"simulate: seed {part.config.seed}, start {part.config.start:%Y-%m-%dT%H:%M:%SZ}"
        + (f", run {len(parts)} continuing {args.earlier}" if earlier is not None else "")
        + f": {len(sim.webhooks)} webhooks to {webhook_url(args.url)} at {args.rate:g}/s",
        file=sys.stderr,
    )
    result = asyncio.run(
        deliver(
            sim.webhooks,
            webhook_url(args.url),
            rate=args.rate,
            concurrency=args.concurrency,
            policy=RetryPolicy(time_factor=args.time_factor),
            token=args.token or settings.webhook_token,
            timeout=args.timeout,
            progress=Progress(),
        )
    )
    delivery = delivery_of(sim.webhooks, result)
    if args.truth is not None:
        merged = merge_delivery(earlier.delivery if earlier is not None else None, delivery)
        write_truth(args.truth, dataclasses.replace(sim.truth, delivery=merged))
    print(summary(sim, result, delivery))
    if args.truth is not None:
        print(f"  truth: {args.truth}")
    return 1 if sim.webhooks and result.stats.accepted == 0 else 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_alone("chatpipe simulate", __doc__, _arguments, cmd_simulate, argv)


if __name__ == "__main__":
    sys.exit(main())
