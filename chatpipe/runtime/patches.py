"""Every change chatpipe makes to another library's internals, fenced in one module.

The model codebases patch nobody's internals; where chatpipe has to, each patch lives here with the upstream
issue it works around, a test in `tests/unit/chatpipe/runtime/test_patches.py` that fails the moment it stops
taking effect, and a version guard: `check_versions` refuses to run on library versions the patches were not
written for (the ranges in `SUPPORTED`, the ones pyproject.toml pins). To move a pin: read each patch against
the new version's source, widen `SUPPORTED`, run the patch tests and the processor and ingest integration
tests.

| patch | library internal replaced | used by |
| --- | --- | --- |
| `patch_fetcher_close` | aiokafka `Fetcher.close` | `processors.runner.run_worker` |
| `patch_gap_acking` | faust `Consumer._add_gap` | `processors.runner.run_worker` |
| `patch_message_delivery` | faust `Consumer.wait_first` (mode's) | `processors.runner.run_worker` |
| `install_dispatch` | aiohttp `Server.request_handler` | `serve.start_site` (`chatpipe ingest`) |

Reads of internals (nothing replaced), fenced here all the same:

| accessor | library internal read | used by |
| --- | --- | --- |
| `partition_db` | faust `stores.rocksdb.Store._db_for_partition` | `processors.agents` (the receipts table) |

Imports only the standard library at module level (faust, mode and aiokafka are imported by the functions
that patch them), so the ingest and API processes that import `chatpipe.runtime.serve` never load Faust.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)

#: distribution -> (lowest version, first version not supported): the ranges the patches were written and
#: tested for, as pinned in pyproject.toml (mode-streaming comes with faust-streaming 0.15.3, which needs
#: >=0.6.0; 0.7.x is the line that was read and tested).
SUPPORTED: dict[str, tuple[str, str]] = {
    "faust-streaming": ("0.15.3", "0.15.4"),
    "mode-streaming": ("0.6.0", "0.8"),
    "aiokafka": ("0.10", "0.15"),
    "aiohttp": ("3.9", "4"),
}
#: the distributions whose internals the worker's patches replace
WORKER_LIBRARIES = ("faust-streaming", "mode-streaming", "aiokafka")
#: the distribution whose internals `install_dispatch` replaces
SERVER_LIBRARIES = ("aiohttp",)


class UnsupportedLibraryVersion(RuntimeError):
    """An installed library is outside the range chatpipe's patches of its internals were written for."""


def release(version: str) -> tuple[int, ...]:
    """The numeric release part of a version string: "0.15.3" -> (0, 15, 3); "3.10.0rc1" -> (3, 10, 0)."""
    parts: list[int] = []
    for piece in version.split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) < len(piece):
            break
    return tuple(parts)


def _below(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) < b + (0,) * (width - len(b))


def check_versions(
    names: Iterable[str], installed: Callable[[str], str] = metadata.version
) -> dict[str, str]:
    """Return {distribution: installed version} for `names`, or raise `UnsupportedLibraryVersion` naming
    every one outside `SUPPORTED` (or not installed). `installed` is the version lookup (a test passes its
    own)."""
    found: dict[str, str] = {}
    wrong: list[str] = []
    for name in names:
        low, high = SUPPORTED[name]
        try:
            version = installed(name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{name} is not installed (need >={low},<{high})")
            continue
        found[name] = version
        ours = release(version)
        if not ours or _below(ours, release(low)) or not _below(ours, release(high)):
            wrong.append(f"{name} {version} is installed, the patches were written for >={low},<{high}")
    if wrong:
        raise UnsupportedLibraryVersion(
            "chatpipe patches internals of these libraries and refuses to run on versions it was not "
            "written for: "
            + "; ".join(wrong)
            + ". Install the versions pyproject.toml pins (scripts/setup), or read each patch in "
            "chatpipe/runtime/patches.py against the new version and widen SUPPORTED there."
        )
    return found


# --- aiokafka ----------------------------------------------------------------------------------------


def patch_fetcher_close() -> None:
    """aiokafka (0.10-0.14) `Fetcher.close` cancels its in-flight fetch tasks and then awaits them
    without catching the CancelledError they end with. When a fetch is in flight at shutdown (always, on
    an idle topic: fetches long-poll), that error kills Faust's consumer thread and the worker hangs in
    shutdown until it is killed. Same close, with the cancellation of its own tasks expected.

    Upstream: aio-libs/aiokafka#1000 ("Fixed CancelledError being raised from various .close() methods",
    open, not released in 0.14); the fetch task itself got the same treatment in aio-libs/aiokafka#1007
    (fixing aio-libs/aiokafka#983), the pending tasks did not. Remove when a release carries #1000."""
    from aiokafka.consumer.fetcher import Fetcher

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


# --- faust ---------------------------------------------------------------------------------------------


async def _add_gap(self: Any, tp: Any, offset_from: int, offset_to: int) -> None:
    log.warning(
        "offsets %s..%s of %s were not delivered: not acked, they come again",
        offset_from,
        offset_to - 1,
        tp,
    )


_add_gap._chatpipe_patched = True  # type: ignore[attr-defined]


def patch_gap_acking() -> None:
    """Faust treats a jump in the offsets it delivers as a compaction gap and acks the missing offsets,
    so its next commit moves past them. chatpipe's input topics are never compacted: a jump means records
    were fetched but not delivered (seen after rebalances on the embedded broker: 531 offsets at once),
    and acking them loses them after a crash. Never ack a gap: the commit waits at the first offset that
    was not processed, and a restart or rebalance delivers it again (at-least-once; the pure core is
    idempotent, so a redelivered receipt is a duplicate).

    Upstream: faust-streaming/faust#606 ("Wrong offset commit in case of gaps", open; fix proposed in
    faust-streaming/faust#707, not released), the gap handling added for compacted topics by
    faust-streaming/faust#378 after faust-streaming/faust#312."""
    from faust.transport.consumer import Consumer

    if getattr(Consumer._add_gap, "_chatpipe_patched", False):
        return
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


class _Mode:
    """mode's `Service.wait_first` and `WaitResults`, imported on first use (an import statement in
    `deliver_first` would cost its hot path about a microsecond per record; the module must not import
    mode itself, see the module docstring)."""

    wait_first: Any = None
    results: Any = None


def _mode() -> type[_Mode]:
    if _Mode.wait_first is None:
        from mode.services import Service, WaitResults

        _Mode.wait_first = Service.wait_first
        _Mode.results = WaitResults
    return _Mode


async def deliver_first(self: Any, *coros: Any, timeout: Any = None) -> Any:
    """Faust's fetch loop hands every record to the conductor as
    `await self.wait_first(callback(message), self.suspend_flow.wait())`: four tasks created, awaited and
    cancelled per record (mode's `wait_first` also watches the stopped and crashed events), about 40% of
    the worker's main thread at 8k receipts/s. The callback only puts the event on a queue and nearly
    always completes without suspending. Fast path, for that call only and only while the flow is not
    suspended and the consumer neither stopped nor crashed: run the callback's first step right here; if
    it completes, that is the result; if it suspends (a full queue), hand the rest of it to the original
    `wait_first`, which stays interruptible by a flow suspension exactly as before."""
    mode = _mode()
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
            return mode.results([delivery], [done.value], False)
        return await mode.wait_first(self, _finish(delivery, first), flow)
    return await mode.wait_first(self, *coros, timeout=timeout)


def patch_message_delivery() -> None:
    """Make `deliver_first` the `wait_first` of Faust's consumer (inherited from mode's `Service`), a
    speed-up of the per-record hand-over, not a bug fix: see `deliver_first`.

    Upstream: no issue asks for this fast path. The call it shortcuts is the one discussed in
    faust-streaming/faust#229 ("Conductor appears to be deadlocked", at
    `await self.wait_first(callback(message), self.suspend_flow.wait())`), and Faust's per-record overhead
    is robinhood/faust#563 ("Message consumption is slow")."""
    from faust.transport.consumer import Consumer

    Consumer.wait_first = deliver_first  # type: ignore[method-assign]


def partition_db(store: Any, partition: int) -> Any:
    """The RocksDB database (rocksdict `Rdict`) holding `partition` of a Faust RocksDB table store
    (`table.data`), opened on first use. Faust keeps one database per partition and offers no public
    accessor: `faust.stores.rocksdb.Store._db_for_partition` is the method its own reads and writes use
    (faust-streaming 0.15.3, within `SUPPORTED`). `processors.agents` reads and writes the receipts
    table's partition directly, in batches (a `WriteBatch` per flush), which the table's mapping API does
    not offer."""
    return store._db_for_partition(partition)


def apply_worker_patches() -> None:
    """Check the versions of Faust, mode and aiokafka, then apply the worker's patches (idempotent).
    Raises `UnsupportedLibraryVersion` before patching anything."""
    check_versions(WORKER_LIBRARIES)
    patch_fetcher_close()
    patch_gap_acking()
    patch_message_delivery()


# --- aiohttp -------------------------------------------------------------------------------------------

#: a server's request handler
Handler = Callable[["web.BaseRequest"], Awaitable["web.StreamResponse"]]
#: wraps a server's request handler (the app's router): see `ingest.app.fast_dispatch`
Dispatch = Callable[["web.Application", Handler], Handler]


def install_dispatch(runner: web.BaseRunner, app: web.Application, dispatch: Dispatch) -> None:
    """Make `dispatch(app, handler)` the request handler of `runner`'s server, which must not have accepted
    a connection yet (each connection keeps the handler it started with). Checks aiohttp's version first.

    `Server.request_handler` is an undocumented attribute of aiohttp's low-level server (3.x), the one the
    app's router is installed as. Upstream: aio-libs/aiohttp#3377 ("Allow custom routing", closed: use
    the low-level server, which would drop the app's middlewares, signals and other routes that chatpipe
    keeps for every request but the webhook)."""
    check_versions(SERVER_LIBRARIES)
    server = runner.server
    if server is None:
        raise RuntimeError("runner.setup() first")
    server.request_handler = dispatch(app, server.request_handler)
