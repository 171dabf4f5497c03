"""chatpipe.proof.client against a real local HTTP server: 8x8's retry schedule (scaled), giving up after
the fifth attempt, 4xx of malformed bodies counted as dead-letter records, bounded concurrency."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from chatpipe.proof.client import deliver
from chatpipe.proof.delivery import RetryPolicy
from chatpipe.proof.traffic import Webhook

pytestmark = pytest.mark.integration

FACTOR = 0.05  # 50 ms, 0.5 s, 1.5 s, 4.5 s


async def test_retries_follow_the_schedule_and_give_up_after_the_fifth_attempt() -> None:
    seen: dict[bytes, list[float]] = defaultdict(list)
    in_flight = peak = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal in_flight, peak
        body = await request.read()
        seen[body].append(time.monotonic())
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        if body == b"flaky" and len(seen[body]) <= 2:
            return web.Response(status=503)
        if body == b"broken":
            return web.Response(status=500)
        if body == b"malformed":
            return web.Response(status=400)
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/v1/webhooks/chatapps", hook)
    hooks = [
        Webhook("receipt", "u-ok", b"fine"),
        Webhook("receipt", "u-flaky", b"flaky"),
        Webhook("receipt", "u-broken", b"broken"),
        Webhook("malformed", None, b"malformed", defect="x"),
    ]
    hooks += [Webhook("receipt", f"u-{n}", f"bulk-{n}".encode()) for n in range(40)]
    async with TestServer(app) as server:
        result = await deliver(
            hooks,
            str(server.make_url("/v1/webhooks/chatapps")),
            rate=500,
            concurrency=4,
            policy=RetryPolicy(time_factor=FACTOR),
            timeout=5,
        )
    s = result.stats
    assert [len(seen[b]) for b in (b"fine", b"flaky", b"broken", b"malformed")] == [1, 3, 5, 5]
    gaps = [b - a for a, b in zip(seen[b"broken"], seen[b"broken"][1:], strict=False)]
    assert all(gap >= d * FACTOR for gap, d in zip(gaps, (1, 10, 30, 90), strict=True)), gaps
    assert sorted(hooks[i].umid or "" for i in result.given_up) == ["", "u-broken"]
    assert (s.accepted, s.given_up, s.dlq_records, s.rejected_valid, s.malformed_accepted) == (42, 2, 5, 0, 0)
    assert s.attempts == 1 + 3 + 5 + 5 + 40 and s.retries == 2 + 4 + 4
    assert peak <= 4


async def test_a_server_that_is_not_there_gets_every_attempt_then_is_given_up() -> None:
    result = await deliver(
        [Webhook("receipt", "u-1", b"{}")],
        "http://127.0.0.1:9/v1/webhooks/chatapps",
        rate=100,
        concurrency=2,
        policy=RetryPolicy(time_factor=0.001),
        timeout=2,
    )
    assert (result.stats.attempts, result.stats.connection_errors, result.given_up) == (5, 5, (0,))
