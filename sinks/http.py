"""The read API's HTTP vocabulary, shared by its routes (`sinks.api`, `sinks.api_analytics`): the
application keys, 8x8's error body and codes (api-error-codes.md), and the checks of request parameters.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from aiohttp import web
from prometheus_client import CollectorRegistry

from chatpipe.runtime.metric_defs import ApiMetrics
from schemas import ids
from schemas.timefmt import format_iso8601
from sinks.store import Store

MAX_PARAM_CHARS = 200
CODE_BAD_REQUEST = 1000
CODE_ILLEGAL_SUBACCOUNT = 1001
CODE_INVALID_ID = 1008
CODE_NOT_FOUND = 1300
CODE_UNAVAILABLE = 1500

STORE = web.AppKey("store", Store)
METRICS = web.AppKey("metrics", ApiMetrics)
REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)
CLOCK: web.AppKey[Callable[[], datetime]] = web.AppKey("clock")
CHANNEL_IDS: web.AppKey[dict[tuple[str, str], str]] = web.AppKey("channel_ids")


def utc_now() -> datetime:
    return datetime.now(UTC)


class BadRequest(Exception):
    """A malformed request parameter: answered 400 with `code` and `message`."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def error_response(status: int, code: int, message: str) -> web.Response:
    return web.json_response(
        {
            "code": code,
            "message": message,
            "errorId": str(uuid.uuid4()),
            "timestamp": format_iso8601(datetime.now(UTC)),
        },
        status=status,
    )


def subaccount_id(request: web.Request) -> str:
    sub = request.match_info["subAccountId"]
    if not ids.SUBACCOUNT_ID.ok(sub):
        raise BadRequest(CODE_ILLEGAL_SUBACCOUNT, f"Invalid subAccountId {sub!r}")
    return sub


def text_param(request: web.Request, name: str) -> str | None:
    """A query parameter (absent or empty: None); too long or with control characters: 400."""
    value = request.query.get(name)
    if value is None or value == "":
        return None
    if len(value) > MAX_PARAM_CHARS or not value.isprintable():
        raise BadRequest(CODE_BAD_REQUEST, f"{name}: invalid value")
    return value


def answer(request: web.Request, route: str, response: web.Response) -> web.Response:
    request.app[METRICS].requests.labels(route, str(response.status)).inc()
    return response
