"""`chatpipe.runtime.patches`: each patch of another library's internals still takes effect, and the
version guard refuses versions the patches were not written for. A failure here after a library
upgrade means: read the patch against the new version before widening `SUPPORTED`."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import defaultdict
from importlib import metadata
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from chatpipe.runtime import patches
from chatpipe.runtime.patches import (
    SUPPORTED,
    UnsupportedLibraryVersion,
    apply_worker_patches,
    check_versions,
    install_dispatch,
    release,
)


def versions(**overrides: str):  # type: ignore[no-untyped-def]
    """A version lookup: the installed versions, with `overrides` (underscores for dashes)."""
    wanted = {name.replace("_", "-"): v for name, v in overrides.items()}

    def lookup(name: str) -> str:
        if name in wanted:
            return wanted[name]
        return metadata.version(name)

    return lookup


# --- the version guard --------------------------------------------------------------------------------


def test_the_installed_versions_are_the_ones_the_patches_were_written_for() -> None:
    found = check_versions(SUPPORTED)
    assert found == {name: metadata.version(name) for name in SUPPORTED}
    assert found["faust-streaming"] == "0.15.3"


@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("faust-streaming", "0.15.2"),
        ("faust-streaming", "0.15.4"),
        ("faust-streaming", "0.16.0"),
        ("aiokafka", "0.9.0"),
        ("aiokafka", "0.15.0"),
        ("mode-streaming", "0.8.0"),
        ("aiohttp", "3.8.6"),
        ("aiohttp", "4.0.0a1"),
    ],
)
def test_a_version_outside_the_range_is_refused_naming_it(name: str, version: str) -> None:
    with pytest.raises(UnsupportedLibraryVersion) as refused:
        check_versions(SUPPORTED, versions(**{name.replace("-", "_"): version}))
    message = str(refused.value)
    assert f"{name} {version} is installed" in message
    assert "chatpipe/runtime/patches.py" in message
    assert message.count(" is installed") == 1  # only the wrong one is named


@pytest.mark.parametrize(
    ("name", "version"),
    [("faust-streaming", "0.15.3"), ("aiokafka", "0.10.0"), ("aiokafka", "0.14.9"), ("aiohttp", "3.9.0")],
)
def test_a_version_inside_the_range_is_accepted(name: str, version: str) -> None:
    assert check_versions([name], versions(**{name.replace("-", "_"): version})) == {name: version}


def test_a_library_that_is_not_installed_is_refused() -> None:
    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    with pytest.raises(UnsupportedLibraryVersion, match="aiokafka is not installed"):
        check_versions(["aiokafka"], missing)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("0.15.3", (0, 15, 3)), ("3.10.0rc1", (3, 10, 0)), ("4", (4,)), ("0.14.0.post1", (0, 14, 0)), ("", ())],
)
def test_release_is_the_numeric_part(text: str, parsed: tuple[int, ...]) -> None:
    assert release(text) == parsed


def test_the_worker_patches_refuse_to_start_on_an_unknown_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SUPPORTED, "aiokafka", ("0.1", "0.2"))
    with pytest.raises(UnsupportedLibraryVersion, match="aiokafka"):
        apply_worker_patches()


# --- aiokafka: Fetcher.close ----------------------------------------------------------------------------


async def test_fetcher_close_is_ours_and_expects_the_cancellation_of_its_pending_tasks() -> None:
    from aiokafka.consumer.fetcher import Fetcher

    apply_worker_patches()
    assert getattr(Fetcher.close, "_chatpipe_patched", False)

    forever = asyncio.Event()
    pending = [asyncio.create_task(forever.wait()) for _ in range(2)]
    waiter = asyncio.get_running_loop().create_future()
    fetcher = SimpleNamespace(
        _closed=False,
        _fetch_task=asyncio.create_task(forever.wait()),
        _fetch_waiters={waiter},
        _pending_tasks=pending,
        _notify=lambda fut: fut.set_result(None),
    )
    await asyncio.sleep(0)  # every task is in flight, as fetches are at shutdown
    await Fetcher.close(fetcher)  # aiokafka's own close raises CancelledError here
    assert fetcher._closed and waiter.done()
    assert all(task.cancelled() for task in [*pending, fetcher._fetch_task])


# --- faust: gap acking ----------------------------------------------------------------------------------


async def test_faust_consumer_never_acks_a_gap(caplog: pytest.LogCaptureFixture) -> None:
    from faust.transport.consumer import Consumer
    from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer

    apply_worker_patches()
    assert AIOKafkaConsumer._add_gap is patches._add_gap  # the driver chatpipe runs, not only the base
    # the fetch loop still calls the method the patch replaces
    assert "await self._add_gap(tp, r_offset + 1, offset)" in inspect.getsource(Consumer._drain_messages)

    added: list[tuple[int, int]] = []
    tree = SimpleNamespace(addi=lambda start, end: added.append((start, end)))
    consumer = SimpleNamespace(_committed_offset={"tp": 4}, _gap=defaultdict(lambda: tree))
    with caplog.at_level(logging.WARNING, logger="chatpipe.runtime.patches"):
        await AIOKafkaConsumer._add_gap(consumer, "tp", 5, 10)  # faust's own records (5, 11) as acked
    assert added == []
    assert "offsets 5..9 of tp were not delivered" in caplog.text


# --- faust/mode: per-record delivery ---------------------------------------------------------------------


async def test_faust_consumer_delivers_a_record_that_never_suspends_without_a_task() -> None:
    from faust.transport.consumer import Consumer
    from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer

    apply_worker_patches()
    assert AIOKafkaConsumer.wait_first is patches.deliver_first
    # the fast path recognises exactly this call of the fetch loop: if Faust changes it, it stops applying
    source = " ".join(inspect.getsource(Consumer._drain_messages).split())
    assert "await self.wait_first( callback(message), self.suspend_flow.wait() )" in source

    consumer: Any = SimpleNamespace(
        suspend_flow=asyncio.Event(),
        _stopped=asyncio.Event(),
        _crashed=asyncio.Event(),
        loop=asyncio.get_running_loop(),
    )
    before = len(asyncio.all_tasks())
    tasks_seen: list[int] = []

    async def callback() -> str:
        tasks_seen.append(len(asyncio.all_tasks()))
        return "queued"

    result = await AIOKafkaConsumer.wait_first(consumer, callback(), consumer.suspend_flow.wait())
    assert tasks_seen == [before]  # ran inline: mode's wait_first would have made a task of it
    assert result.results == ["queued"] and not result.stopped


# --- aiohttp: the server's request handler ----------------------------------------------------------------


async def test_install_dispatch_is_the_handler_every_new_connection_uses() -> None:
    async def routed(request: web.Request) -> web.Response:
        return web.Response(text="router")

    app = web.Application()
    app.router.add_get("/other", routed)
    seen: list[str] = []

    def dispatch(app: web.Application, handler: patches.Handler) -> patches.Handler:
        async def wrapper(request: web.BaseRequest) -> web.StreamResponse:
            seen.append(request.path)
            if request.path == "/hot":
                return web.Response(text="hot")
            return await handler(request)

        return wrapper

    runner = web.AppRunner(app)
    await runner.setup()
    try:
        install_dispatch(runner, app, dispatch)
        assert runner.server is not None
        connection = runner.server()  # what aiohttp makes per accepted connection
        handler = connection._request_handler
        assert handler is runner.server.request_handler and handler.__name__ == "wrapper"

        hot = await handler(make_mocked_request("POST", "/hot", app=app))
        assert isinstance(hot, web.Response) and hot.text == "hot"
        other = await handler(make_mocked_request("GET", "/other", app=app))
        assert isinstance(other, web.Response) and other.text == "router"  # the app's router behind it
        assert seen == ["/hot", "/other"]
    finally:
        await runner.cleanup()


async def test_install_dispatch_refuses_an_unknown_aiohttp_before_touching_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(SUPPORTED, "aiohttp", ("5", "6"))
    app = web.Application()
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        assert runner.server is not None
        original = runner.server.request_handler
        with pytest.raises(UnsupportedLibraryVersion, match="aiohttp"):
            install_dispatch(runner, app, lambda app, handler: handler)
        assert runner.server.request_handler is original
    finally:
        await runner.cleanup()


def test_partition_db_reads_through_the_accessor_faust_rocksdb_still_has() -> None:
    """`partition_db` replaces nothing; it fails here the moment Faust renames or reshapes the accessor."""
    from faust.stores.rocksdb import Store

    assert list(inspect.signature(Store._db_for_partition).parameters) == ["self", "partition"]
    store = SimpleNamespace(_db_for_partition=lambda partition: ("db", partition))
    assert patches.partition_db(store, 3) == ("db", 3)
