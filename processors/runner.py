"""Run the Faust worker process (`chatpipe worker`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import faust
from aiokafka.consumer.fetcher import Fetcher
from mode.services import Service, WaitResults

from chatpipe.config import Settings
from processors.agents import install_agents
from processors.app import create_processor, tune_gc

log = logging.getLogger(__name__)


def _patch_fetcher_close() -> None:
    """aiokafka (0.10-0.14) `Fetcher.close` cancels its in-flight fetch tasks and then awaits them
    without catching the CancelledError they end with. When a fetch is in flight at shutdown (always, on
    an idle topic: fetches long-poll), that error kills Faust's consumer thread and the worker hangs in
    shutdown until it is killed. Same close, with the cancellation of its own tasks expected."""
    if getattr(Fetcher.close, "_chatpipe_patched", False):
        return

    async def close(self: Any) -> None:
        self._closed = True
        self._fetch_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._fetch_task
        for waiter in self._fetch_waiters:
            self._notify(waiter)
        for task in self._pending_tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    close._chatpipe_patched = True  # type: ignore[attr-defined]
    Fetcher.close = close  # type: ignore[method-assign]


class _Worker(faust.Worker):
    """Faust's worker with a hook for "ready": partitions assigned and tables recovered."""

    on_ready: Callable[[], None] | None = None

    async def on_startup_finished(self) -> None:
        await super().on_startup_finished()
        tune_gc()
        if self.on_ready is not None:
            self.on_ready()


def _patch_gap_acking() -> None:
    """Faust treats a jump in the offsets it delivers as a compaction gap and acks the missing offsets,
    so its next commit moves past them. chatpipe's input topics are never compacted: a jump means records
    were fetched but not delivered (seen after rebalances on the embedded broker: 531 offsets at once),
    and acking them loses them after a crash. Never ack a gap: the commit waits at the first offset that
    was not processed, and a restart or rebalance delivers it again (at-least-once; the pure core is
    idempotent, so a redelivered receipt is a duplicate)."""
    from faust.transport.consumer import Consumer

    if getattr(Consumer._add_gap, "_chatpipe_patched", False):
        return

    async def _add_gap(self: Any, tp: Any, offset_from: int, offset_to: int) -> None:
        log.warning(
            "offsets %s..%s of %s were not delivered: not acked, they come again",
            offset_from,
            offset_to - 1,
            tp,
        )

    _add_gap._chatpipe_patched = True  # type: ignore[attr-defined]
    Consumer._add_gap = _add_gap  # type: ignore[method-assign]


class _Resume:
    """Awaitable that finishes a coroutine which was started by hand (`send(None)`) and yielded `first`:
    yields `first` to whoever awaits this, then relays sends and throws until the coroutine returns."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self.coro, self.first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _finish(coro: Coroutine[Any, Any, Any], first: Any) -> Any:
    return await _Resume(coro, first)


_EVENT_WAIT = asyncio.Event.wait.__code__


async def deliver_first(self: Any, *coros: Any, timeout: Any = None) -> Any:
    """Faust's fetch loop hands every record to the conductor as
    `await self.wait_first(callback(message), self.suspend_flow.wait())`: four tasks created, awaited and
    cancelled per record (mode's `wait_first` also watches the stopped and crashed events), about 40% of
    the worker's main thread at 8k receipts/s. The callback only puts the event on a queue and nearly
    always completes without suspending. Fast path, for that call only and only while the flow is not
    suspended and the consumer neither stopped nor crashed: run the callback's first step right here; if
    it completes, that is the result; if it suspends (a full queue), hand the rest of it to the original
    `wait_first`, which stays interruptible by a flow suspension exactly as before."""
    if (
        len(coros) == 2
        and timeout is None
        and getattr(coros[1], "cr_code", None) is _EVENT_WAIT
        and asyncio.iscoroutine(coros[0])
        and not self.suspend_flow.is_set()
        and not self._stopped.is_set()
        and not self._crashed.is_set()
    ):
        delivery, flow = coros
        try:
            first = delivery.send(None)
        except StopIteration as done:
            flow.close()
            return WaitResults([delivery], [done.value], False)
        return await Service.wait_first(self, _finish(delivery, first), flow)
    return await Service.wait_first(self, *coros, timeout=timeout)


def _patch_message_delivery() -> None:
    from faust.transport.consumer import Consumer

    Consumer.wait_first = deliver_first  # type: ignore[method-assign]


def run_worker(settings: Settings, on_ready: Callable[[], None] | None = None) -> int:
    _patch_fetcher_close()
    _patch_gap_acking()
    _patch_message_delivery()
    (settings.state_dir / "processor").mkdir(parents=True, exist_ok=True)
    processor = create_processor(settings)
    processor.codecs.register_all()
    install_agents(processor)
    worker = _Worker(processor.app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False)
    worker.on_ready = on_ready
    worker.execute_from_commandline()  # returns via SystemExit when stopped
    return 0
