"""The reconciler against a fake 8x8 that enforces 1 request/second per subaccount with its own clock.

    .venv/bin/python bench/reconciler.py [--subaccounts 10] [--messages 30] [--margin 0.05] [--seed 16]

A local aiohttp server plays 8x8's Retrieve message details endpoint: it counts each request when it
"arrives" and answers 429 in 8x8's format ("try again in 1 second(s)") when the same subaccount's previous
arrival was less than 1 s before, by its own clock. Network jitter is simulated on both legs of every
request: each request waits a random delay before it is counted (its trip to 8x8) and another before its
answer leaves (the trip back): 0 ms (40%), 2 ms (30%), 10 ms (25%) or 200 ms (5%: a stalled event loop, a
retransmission). The same fake, the same jitter (same seed), side by side in one run:

- send-spaced: the previous client's rule, a token bucket per subaccount spacing SENDS 1.1 s apart
  (`request_interval` 1.1 = 1 s + 10% margin), `--subaccounts` x `--messages` lookups, 16 in flight;
- chatpipe.reconciler: one pass of the real reconciler over a SQLite store holding `--subaccounts` x
  `--messages` stale messages (the real Tansu broker and schema registry take its receipts), pacing each
  subaccount's next request 1 s + `--margin` after the previous ANSWER.

Printed per run: lookups answered 200, 429s received, lookups/s per subaccount (mean and slowest: a
subaccount's answers divided by the time from its first send to its last answer).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from aiohttp import web

from chatpipe.broker import free_port, start_tansu, wait_for_port
from chatpipe.reconciler import Reconciler, ReconcilerConfig
from chatpipe.runtime.config import Settings
from chatpipe.runtime.serve import serve_in_thread
from chatpipe.runtime.topics import ensure_topics
from processors.state import apply_many
from schemas.models import DeliveryReceipt, Status
from schemas.registry import create_registry_app
from sinks.connect import open_store
from sinks.rows import PiiPolicy

KEY = "bench-key"
DELAYS = ((0.0, 0.40), (0.002, 0.30), (0.010, 0.25), (0.200, 0.05))


@dataclass
class Fake8x8:
    rng: random.Random
    last: dict[str, float] = field(default_factory=dict)
    limited: int = 0
    answered: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # sub -> answer times

    def delay(self) -> float:
        values, weights = zip(*DELAYS, strict=True)
        return self.rng.choices(values, weights)[0]

    async def details(self, request: web.Request) -> web.Response:
        sub, umid = request.match_info["sub"], request.match_info["umid"]
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return web.json_response({"code": 1200, "message": "unauthenticated"}, status=401)
        await asyncio.sleep(self.delay())  # the trip to 8x8
        now = time.monotonic()
        previous, self.last[sub] = self.last.get(sub), now
        if previous is not None and now - previous < 1.0:
            self.limited += 1
            body = {"code": 429, "message": "Quota exceeded. Please try again in 1 second(s).",
                    "errorId": str(uuid.uuid4()), "timestamp": "2026-12-06T00:00:00Z"}  # fmt: skip
            status = 429
        else:
            body = {"data": [{"umid": umid, "subAccountId": sub, "channel": "WhatsApp", "channelId": "c-1",
                              "direction": "outbound", "status": {"state": "read",
                              "timestamp": "2026-12-06T00:00:00.00Z"}, "contentType": "Text",
                              "createdAt": "2026-12-06T00:00:00.00Z", "step": 1}]}  # fmt: skip
            status = 200
        await asyncio.sleep(self.delay())  # the trip back
        if status == 200:
            self.answered[sub].append(time.monotonic())
        return web.json_response(body, status=status)


async def serve_fake(fake: Fake8x8) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/api/v1/subaccounts/{sub}/messages/{umid}", fake.details)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def per_subaccount(firsts: dict[str, float], fake: Fake8x8) -> list[float]:
    return [
        len(times) / (times[-1] - firsts[sub]) if len(times) > 1 else float("nan")
        for sub, times in fake.answered.items()
    ]


async def send_spaced(subs: list[str], messages: int, seed: int) -> tuple[Fake8x8, dict[str, float]]:
    """The previous client: a send is allowed 1.1 s after the previous SEND of the subaccount."""
    fake = Fake8x8(random.Random(seed))
    runner, url = await serve_fake(fake)
    sem = asyncio.Semaphore(16)
    firsts: dict[str, float] = {}
    try:
        async with httpx.AsyncClient(timeout=10) as http:

            async def one_sub(sub: str) -> None:
                next_send = 0.0
                done = 0
                while done < messages:
                    await asyncio.sleep(max(0.0, next_send - time.monotonic()))
                    async with sem:
                        next_send = time.monotonic() + 1.1
                        firsts.setdefault(sub, time.monotonic())
                        r = await http.get(
                            f"{url}/api/v1/subaccounts/{sub}/messages/{uuid.uuid4()}",
                            headers={"Authorization": f"Bearer {KEY}"},
                        )
                    if r.status_code == 200:
                        done += 1
                    else:  # 429: wait what it says (1 s) from now, as the previous client did
                        next_send = max(next_send, time.monotonic() + 1.0)

            await asyncio.gather(*(one_sub(s) for s in subs))
    finally:
        await runner.cleanup()
    return fake, firsts


async def reconciler_pass(
    subs: list[str], messages: int, seed: int, margin: float, bootstrap: str, registry: str, db: Path
) -> tuple[Fake8x8, dict[str, float], int]:
    fake = Fake8x8(random.Random(seed))
    runner, url = await serve_fake(fake)
    store = open_store(f"sqlite:///{db}", PiiPolicy(hash_key=b"k"))
    store.migrate()
    old = datetime.now(UTC) - timedelta(hours=2)
    states = [
        apply_many(
            None,
            [DeliveryReceipt(str(uuid.uuid4()), sub, "whatsapp", Status("sent", old), old, "{}")],
            now=old,
        ).state
        for sub in subs
        for _ in range(messages)
    ]
    store.write_states(states)
    settings = Settings(
        kafka_bootstrap=bootstrap,
        schema_registry_url=registry,
        store_url=f"sqlite:///{db}",
        api_8x8_url=url,
        api_8x8_key=KEY,
        reconcile_after=900.0,
    )
    sends: dict[str, float] = {}
    reconciler = Reconciler(settings, config=ReconcilerConfig(margin=margin), store=store)
    original = reconciler.http.get

    async def get(u: str, **kw: object) -> httpx.Response:  # note each subaccount's first send
        sends.setdefault(u.split("/subaccounts/")[1].split("/")[0], time.monotonic())
        return await original(u, **kw)  # type: ignore[arg-type]

    reconciler.http.get = get  # type: ignore[method-assign]
    await reconciler.start()
    try:
        report = await reconciler.run_pass()
    finally:
        await reconciler.close()
        store.close()
        await runner.cleanup()
    return fake, sends, report.rate_limited


def line(label: str, fake: Fake8x8, firsts: dict[str, float]) -> tuple[float, float]:
    rates = per_subaccount(firsts, fake)
    answered = sum(len(t) for t in fake.answered.values())
    mean, low = statistics.fmean(rates), min(rates)
    print(
        f"  {label:27s} answered {answered:4d}  429s {fake.limited:3d}  "
        f"lookups/s per subaccount: mean {mean:.3f}, slowest {low:.3f}",
        flush=True,
    )
    return mean, low


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subaccounts", type=int, default=10)
    parser.add_argument("--messages", type=int, default=30)
    parser.add_argument("--margin", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="chatpipe-bench-reconciler-"))
    port = free_port()
    broker = start_tansu("127.0.0.1", port, work / "tansu.log")
    bootstrap = f"127.0.0.1:{port}"
    try:
        ensure_topics(bootstrap, 2)
        rport = free_port()
        serve_in_thread(create_registry_app(work / "registry.json"), "127.0.0.1", rport)
        wait_for_port("127.0.0.1", rport)
        registry = f"http://127.0.0.1:{rport}"
        subs = [f"bench-{i:02d}" for i in range(args.subaccounts)]
        print(f"{args.subaccounts} subaccounts x {args.messages} stale messages, jitter {DELAYS} each way")
        old, old_firsts = asyncio.run(send_spaced(subs, args.messages, args.seed))
        new, new_firsts, limited = asyncio.run(
            reconciler_pass(subs, args.messages, args.seed, args.margin, bootstrap, registry, work / "c.db")
        )
        assert limited == new.limited
        a_mean, _ = line("send-spaced 1.1 s", old, old_firsts)
        b_mean, b_low = line(f"chatpipe.reconciler +{args.margin:g}s", new, new_firsts)
        print(f"reconciler / send-spaced lookups/s per subaccount: {b_mean / a_mean:.2f}x")
        print(f"reconciler: {new.limited} 429s, slowest subaccount at {b_low:.3f} lookups/s (limit 1.000)")
    finally:
        broker.terminate()
        broker.wait(10)


if __name__ == "__main__":
    main()
