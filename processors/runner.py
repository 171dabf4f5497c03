"""Run the Faust worker process (`chatpipe worker`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import faust
from aiokafka.consumer.fetcher import Fetcher

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


def run_worker(settings: Settings, on_ready: Callable[[], None] | None = None) -> int:
    _patch_fetcher_close()
    _patch_gap_acking()
    (settings.state_dir / "processor").mkdir(parents=True, exist_ok=True)
    processor = create_processor(settings)
    processor.codecs.register_all()
    install_agents(processor)
    worker = _Worker(processor.app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False)
    worker.on_ready = on_ready
    worker.execute_from_commandline()  # returns via SystemExit when stopped
    return 0
