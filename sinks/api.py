"""The read API (`chatpipe api`): 8x8's Retrieve message details, served from the materialized store.

`GET /api/v1/subaccounts/{subAccountId}/messages/{umid}` answers exactly like 8x8 (`{"data": [...]}`,
one record per fallback step); errors use 8x8's body `{code, message, errorId, timestamp}`.
Store calls are blocking (sqlite3/psycopg), so they run in a thread.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from chatpipe.config import Settings
from chatpipe.metric_defs import ApiMetrics
from schemas.timefmt import format_iso8601
from sinks.store import Store, open_store

SUBACCOUNT_RE = re.compile(r"^[A-Za-z0-9\-._&]{3,50}$")
UMID_RE = re.compile(r"^[A-Za-z0-9\-]{1,100}$")
CODE_ILLEGAL_SUBACCOUNT = 1001
CODE_BAD_REQUEST = 1000
CODE_NOT_FOUND = 1300

STORE = web.AppKey("store", Store)
METRICS = web.AppKey("metrics", ApiMetrics)
REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)


def _error(status: int, code: int, message: str) -> web.Response:
    return web.json_response(
        {
            "code": code,
            "message": message,
            "errorId": str(uuid.uuid4()),
            "timestamp": format_iso8601(datetime.now(UTC)),
        },
        status=status,
    )


def _validated(request: web.Request) -> tuple[str, str] | web.Response:
    sub = request.match_info["subAccountId"]
    umid = request.match_info.get("umid", "")
    if not SUBACCOUNT_RE.match(sub):
        return _error(400, CODE_ILLEGAL_SUBACCOUNT, f"Invalid subAccountId {sub!r}")
    if "umid" in request.match_info and not UMID_RE.match(umid):
        return _error(400, CODE_BAD_REQUEST, f"Invalid umid {umid!r}")
    return sub, umid


async def message_details(request: web.Request) -> web.Response:
    checked = _validated(request)
    if isinstance(checked, web.Response):
        request.app[METRICS].requests.labels("message", str(checked.status)).inc()
        return checked
    sub, umid = checked
    records = await asyncio.to_thread(request.app[STORE].get_message, sub, umid)
    if not records:
        request.app[METRICS].requests.labels("message", "404").inc()
        return _error(404, CODE_NOT_FOUND, f"Message {umid} not found")
    request.app[METRICS].requests.labels("message", "200").inc()
    return web.json_response({"data": records})


async def list_messages(request: web.Request) -> web.Response:
    checked = _validated(request)
    if isinstance(checked, web.Response):
        return checked
    sub, _ = checked
    q = request.query
    try:
        limit = max(1, min(int(q.get("limit", "100")), 1000))
    except ValueError:
        return _error(400, CODE_BAD_REQUEST, "limit: not an integer")
    records, cursor = await asyncio.to_thread(
        request.app[STORE].list_messages,
        sub,
        client_message_id=q.get("clientMessageId"),
        batch_id=q.get("batchId"),
        after=q.get("after"),
        limit=limit,
    )
    request.app[METRICS].requests.labels("list", "200").inc()
    return web.json_response({"data": records, "next": cursor})


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics_view(request: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(request.app[REGISTRY]), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def create_app(settings: Settings, store: Store | None = None) -> web.Application:
    from sinks.worker import pii_policy

    app = web.Application()
    registry = CollectorRegistry()
    app[REGISTRY] = registry
    app[METRICS] = ApiMetrics(registry)

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        own = store is None
        app[STORE] = store if store is not None else open_store(settings.store_url, pii_policy(settings))
        if own:
            await asyncio.to_thread(app[STORE].migrate)
        yield
        if own:
            app[STORE].close()

    app.cleanup_ctx.append(store_ctx)
    app.router.add_get("/api/v1/subaccounts/{subAccountId}/messages/{umid}", message_details)
    app.router.add_get("/api/v1/subaccounts/{subAccountId}/messages", list_messages)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_view)
    return app
