"""Process glue shared by the services: logging set-up, running an aiohttp app until a signal, and the
`/healthz` + `/metrics` answers every service gives."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from chatpipe.runtime.patches import Dispatch, install_dispatch
from chatpipe.runtime.patches import Handler as Handler  # re-exported: ingest.app imports it from here

#: a service's health: (healthy, what else `/healthz` says); called for every /healthz request
HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]


def always_ok() -> tuple[bool, dict[str, Any]]:
    """The health of a service whose answering is its health (ingest, the read API, the worker)."""
    return True, {}


def health_answer(check: HealthCheck) -> tuple[int, dict[str, Any]]:
    """`/healthz`'s status and JSON body: 200 `{"status": "ok", ...details}` when healthy, else 503
    `{"status": "unavailable", ...details}` (`status` comes first and from `healthy`: one among the
    details is ignored)."""
    ok, details = check()
    body: dict[str, Any] = {"status": "ok" if ok else "unavailable"}
    body.update((k, v) for k, v in details.items() if k != "status")
    return (200 if ok else 503), body


def metrics_answer(registry: CollectorRegistry) -> bytes:
    """`/metrics`' body: `registry` in Prometheus' text format (served as `CONTENT_TYPE_LATEST`)."""
    return generate_latest(registry)


def add_health_routes(
    app: web.Application, registry: CollectorRegistry, check: HealthCheck = always_ok
) -> None:
    """GET `/healthz` (`health_answer(check)`, JSON) and GET `/metrics` (`registry`, Prometheus' text
    format) on `app`: the same answers from every aiohttp service (Faust's pages reuse the builders)."""

    async def healthz(_request: web.Request) -> web.Response:
        status, body = health_answer(check)
        return web.json_response(body, status=status)

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=metrics_answer(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (+ exc)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str = "INFO", fmt: str = "text", component: str = "chatpipe") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {component} %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def run(main: Coroutine[Any, Any, Any], event_loop: str = "asyncio") -> Any:
    """Run `main` to completion on a fresh event loop: the standard library's ("asyncio") or uvloop's.

    uvloop is the opt-in (CHATPIPE_EVENT_LOOP=uvloop). Measured with bench/ingest.py --loops uvloop,asyncio
    on 2 cores: ingest alone answers about 7% more webhooks per second on it, but with the worker and the
    sink on the same cores (`chatpipe dev`) about 1% more, and a bare aiohttp server gains 18%.
    """
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if event_loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    elif event_loop != "asyncio":
        raise ValueError(f"unknown event loop {event_loop!r}")
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


async def start_site(
    app: web.Application,
    host: str,
    port: int,
    reuse_port: bool = False,
    shutdown_timeout: float = 15.0,
    dispatch: Dispatch | None = None,
    header_timeout: float | None = None,
) -> web.AppRunner:
    """Start `app` (its start-up runs here) listening on host:port; `runner.cleanup()` stops it.

    With `dispatch`, the server's request handler becomes `dispatch(app, handler)`: a way for a hot route
    to skip the router. Set before the site starts, so every connection gets it (a patch of aiohttp's
    internals: `chatpipe.runtime.patches.install_dispatch`, which checks aiohttp's version first).

    With `header_timeout`, a connection that has not delivered a whole request head (request line and
    headers) within that many seconds of opening, or of its previous answer, is closed. This is aiohttp's
    `keepalive_timeout` (aiohttp 3.x has no separate header timeout: its keep-alive timer, armed when a
    connection opens and after each answer, closes the connection if no complete request arrived by then),
    so it also bounds how long an idle keep-alive connection is kept. Without it, aiohttp's 3630 s.
    """
    extra: dict[str, Any] = {} if header_timeout is None else {"keepalive_timeout": header_timeout}
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout, access_log=None, **extra)
    await runner.setup()
    if dispatch is not None:
        install_dispatch(runner, app, dispatch)
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=1024)
    await site.start()
    logging.getLogger(__name__).info("listening on http://%s:%d", host, port)
    return runner


async def serve_until_signal(
    app: web.Application,
    host: str,
    port: int,
    on_ready: Callable[[], None] | None = None,
    reuse_port: bool = False,
    shutdown_timeout: float = 15.0,
    dispatch: Dispatch | None = None,
    header_timeout: float | None = None,
) -> None:
    """Serve `app` until SIGINT/SIGTERM, then stop accepting, finish in-flight requests, clean up."""
    runner = await start_site(app, host, port, reuse_port, shutdown_timeout, dispatch, header_timeout)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready()
    await stop.wait()
    await runner.cleanup()


async def answer_and_close(request: web.BaseRequest, response: web.StreamResponse) -> web.StreamResponse:
    """Send `response` at once and close the connection behind it; return it for the handler to return.

    For a client too slow to finish its request: aiohttp would otherwise keep reading (and discarding) the
    rest of an unread body for up to `lingering_time` (10 s) before closing. A client already gone is no
    error (nothing is logged). The transport flushes the answer before it closes.
    """
    response.force_close()
    with contextlib.suppress(ConnectionError):
        await response.prepare(request)
        await response.write_eof()
    request.protocol.force_close()
    return response


def serve_in_thread(app: web.Application, host: str, port: int) -> threading.Thread:
    """Serve a small app (health, metrics) from a daemon thread with its own loop."""

    def target() -> None:
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, host, port).start())
        loop.run_forever()

    thread = threading.Thread(target=target, name=f"http-{port}", daemon=True)
    thread.start()
    return thread
