"""The sending edge of `chatpipe simulate`: POSTs webhooks with aiohttp the way 8x8 does.

At most `concurrency` requests in flight, new attempts paced to `rate` per second (retries included),
every failed attempt (non-2xx, timeout, connection error) retried on 8x8's schedule (`delivery`), given up
after the last. No state is shared with anything but the caller's progress callback.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

from chatpipe.proof.delivery import Pacer, RetryPolicy, failed
from chatpipe.proof.traffic import Webhook

__all__ = ["DeliveryResult", "SendStats", "deliver"]


@dataclass(slots=True)
class SendStats:
    """Running counters (read by the progress callback while sending)."""

    total: int = 0
    attempts: int = 0
    accepted: int = 0  # webhooks settled 2xx
    retries: int = 0
    timeouts: int = 0
    connection_errors: int = 0
    given_up: int = 0
    in_flight: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    dlq_records: int = 0  # 4xx answers to malformed webhooks
    malformed_accepted: int = 0  # 2xx answers to malformed webhooks (a defect)
    rejected_valid: int = 0  # 4xx answers to well-formed webhooks (a defect)

    @property
    def settled(self) -> int:
        return self.accepted + self.given_up

    @property
    def failures(self) -> int:
        """Failed attempts: non-2xx answers, timeouts, connection errors."""
        refused = sum(n for s, n in self.statuses.items() if not 200 <= s < 300)
        return refused + self.timeouts + self.connection_errors


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    stats: SendStats
    given_up: tuple[int, ...]  # indices into the webhooks, in the order they were given up
    elapsed: float


async def deliver(
    webhooks: Sequence[Webhook],
    url: str,
    *,
    rate: float,
    concurrency: int,
    policy: RetryPolicy,
    token: str | None = None,
    timeout: float = 5.0,
    progress: Callable[[SendStats, float], None] | None = None,
    progress_interval: float = 0.5,
) -> DeliveryResult:
    """Send every webhook (in order, retries as they fall due) and return what happened."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    loop = asyncio.get_running_loop()
    stats = SendStats(total=len(webhooks))
    pacer = Pacer(rate, burst=max(8, int(rate * 0.05)))  # up to 50 ms of sends caught up after a stall
    retries: list[tuple[float, int, int]] = []  # (due, index, attempts made)
    given_up: list[int] = []
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()
    headers = {"Content-Type": "application/json", "User-Agent": "chatpipe-simulate"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    started = time.monotonic()

    async def attempt(session: aiohttp.ClientSession, index: int, made: int) -> None:
        hook = webhooks[index]
        status: int | None = None
        try:
            async with session.post(url, data=hook.body, headers=headers) as answer:
                await answer.read()
                status = answer.status
        except TimeoutError:
            stats.timeouts += 1
        except (aiohttp.ClientError, OSError):
            stats.connection_errors += 1
        finally:
            stats.in_flight -= 1
            slots.release()
        made += 1
        if status is not None:
            stats.statuses[status] += 1
            if 400 <= status < 500:
                if hook.kind == "malformed":
                    stats.dlq_records += 1
                else:
                    stats.rejected_valid += 1
        if not failed(status):
            stats.accepted += 1
            if hook.kind == "malformed":
                stats.malformed_accepted += 1
            return
        delay = policy.next_delay(made)
        if delay is None:
            stats.given_up += 1
            given_up.append(index)
        else:
            stats.retries += 1
            heapq.heappush(retries, (loop.time() + delay, index, made))

    async def report() -> None:
        assert progress is not None
        while True:
            await asyncio.sleep(progress_interval)
            progress(stats, time.monotonic() - started)

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    reporter = asyncio.create_task(report()) if progress is not None else None
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
            following = 0
            while following < len(webhooks) or retries or tasks:
                now = loop.time()
                if retries and retries[0][0] <= now:
                    _, index, made = heapq.heappop(retries)
                elif following < len(webhooks):
                    index, made = following, 0
                    following += 1
                else:  # nothing due: wait for the next retry or an answer (which may schedule one)
                    wait = max(0.0, retries[0][0] - now) if retries else None
                    if tasks:
                        await asyncio.wait(tasks, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                    else:
                        await asyncio.sleep(wait or 0.0)
                    continue
                at = pacer.slot(loop.time())
                if at - loop.time() > 0.001:
                    await asyncio.sleep(at - loop.time())
                await slots.acquire()
                stats.attempts += 1
                stats.in_flight += 1
                task = asyncio.create_task(attempt(session, index, made))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
    finally:
        if reporter is not None:
            reporter.cancel()
    elapsed = time.monotonic() - started
    if progress is not None:
        progress(stats, elapsed)
    return DeliveryResult(stats, tuple(given_up), elapsed)
