"""The read API (`chatpipe api`): 8x8's Retrieve message details, served from the materialized store.

- `GET /api/v1/subaccounts/{subAccountId}/messages/{umid}` answers exactly like 8x8 (`{"data": [...]}`,
  one record per fallback step); an umid unknown to this subaccount is 404.
- `GET /api/v1/subaccounts/{subAccountId}/messages?clientMessageId=&batchId=&after=&limit=` lists message
  summaries (`sinks.present.summary_record`) ordered by umid: `{"data": [...], "next": cursor or null}`;
  pass `next` as `after` for the following page.
- `GET /api/v1/subaccounts/{subAccountId}/conversations/{channelId}/messages?user=&after=&limit=` lists
  the inbound messages of one conversation (`sinks.present.inbound_record`), oldest first, same paging.
  `user` is the end user's E.164 number (`+6581968289`, matched through its keyed hash, since stores keep
  numbers masked) or else their channelUserId.
- `GET /api/v1/subaccounts/{subAccountId}/conversations/{channelId}?user=` answers the conversation
  itself (`sinks.present.conversation_record`): last inbound time, WhatsApp service window (`windowOpen`
  evaluated now), counts by type, the last call-permission answer (`granted` evaluated now), version.
  `user` as above (channelUserId or E.164 number, both hash-matched); unknown: 404.
- `GET /api/v1/subaccounts/{subAccountId}/analytics/{funnel|fallback|latency|errors|inbound|window}`:
  the subaccount's aggregates (`sinks.api_analytics`, docs/analytics.md).

Errors use 8x8's body `{code, message, errorId, timestamp}`: 400 with 1001 (illegal subAccountId), 1008
(malformed umid or channelId) or 1000 (any other invalid parameter); 404 with 1300.
A subaccount only ever sees its own messages. The store answers rows; the JSON shapes are built here
with `sinks.present`. Store calls are blocking (sqlite3/psycopg), so they run in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from datetime import datetime

from aiohttp import web
from prometheus_client import CollectorRegistry

from chatpipe.runtime.config import Settings
from chatpipe.runtime.metric_defs import ApiMetrics
from chatpipe.runtime.serve import add_health_routes
from chatpipe.runtime.specs import ApiKeys, parse_api_keys, parse_api_keys_spec, parse_channel_ids
from schemas import ids
from schemas.errors import TransientError
from sinks import present
from sinks.auth import Verdict, authorize
from sinks.connect import open_store
from sinks.dashboard import add_dashboard
from sinks.http import (
    CHANNEL_IDS,
    CLOCK,
    CODE_BAD_REQUEST,
    CODE_INVALID_ID,
    CODE_NOT_FOUND,
    CODE_UNAVAILABLE,
    METRICS,
    REGISTRY,
    STORE,
    BadRequest,
    answer,
    error_response,
    subaccount_id,
    text_param,
    utc_now,
)
from sinks.rows import parse_inbound_cursor
from sinks.store import DEFAULT_LIMIT, MAX_LIMIT, Store

#: path ids, checked with the formats ingest applies (`schemas.ids`): what ingest stores, the API serves
_PATH_IDS = {"umid": ids.UMID, "channelId": ids.CHANNEL_ID}
E164_RE = re.compile(r"^\+[1-9][0-9]{5,14}$")


def _id(request: web.Request, name: str) -> str:
    value = request.match_info[name]
    if not _PATH_IDS[name].ok(value):
        raise BadRequest(CODE_INVALID_ID, f"Invalid {name} {value!r}")
    return value


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        raise BadRequest(CODE_BAD_REQUEST, f"limit: not an integer: {raw!r}") from None
    if limit < 1:
        raise BadRequest(CODE_BAD_REQUEST, f"limit: must be >= 1, got {limit}")
    return min(limit, MAX_LIMIT)


async def message_details(request: web.Request) -> web.Response:
    try:
        sub, umid = subaccount_id(request), _id(request, "umid")
    except BadRequest as exc:
        return answer(request, "message", error_response(400, exc.code, exc.message))
    found = await asyncio.to_thread(request.app[STORE].get_message, sub, umid)
    data = present.message_details(found, request.app[CHANNEL_IDS]) if found is not None else []
    if not data:
        return answer(request, "message", error_response(404, CODE_NOT_FOUND, f"Message {umid} not found"))
    return answer(request, "message", web.json_response({"data": data}))


async def list_messages(request: web.Request) -> web.Response:
    try:
        sub, limit = subaccount_id(request), _limit(request)
        client_message_id = text_param(request, "clientMessageId")
        batch_id = text_param(request, "batchId")
        after = text_param(request, "after")
    except BadRequest as exc:
        return answer(request, "list", error_response(400, exc.code, exc.message))
    rows, cursor = await asyncio.to_thread(
        request.app[STORE].list_messages,
        sub,
        client_message_id=client_message_id,
        batch_id=batch_id,
        after=after,
        limit=limit,
    )
    data = [present.summary_record(r) for r in rows]
    return answer(request, "list", web.json_response({"data": data, "next": cursor}))


async def conversation_messages(request: web.Request) -> web.Response:
    try:
        sub, channel_id, limit = subaccount_id(request), _id(request, "channelId"), _limit(request)
        user = _user(request)
        after = text_param(request, "after")
        if after is not None:
            try:
                parse_inbound_cursor(after)
            except ValueError:
                raise BadRequest(CODE_BAD_REQUEST, "after: not a cursor returned as next") from None
    except BadRequest as exc:
        return answer(request, "conversation", error_response(400, exc.code, exc.message))
    by_msisdn = E164_RE.match(user) is not None
    rows, cursor = await asyncio.to_thread(
        request.app[STORE].list_inbound,
        sub,
        channel_id=channel_id,
        msisdn=user if by_msisdn else None,
        channel_user_id=None if by_msisdn else user,
        after=after,
        limit=limit,
    )
    data = [present.inbound_record(r) for r in rows]
    return answer(request, "conversation", web.json_response({"data": data, "next": cursor}))


def _user(request: web.Request) -> str:
    user = text_param(request, "user")
    if user is None:
        raise BadRequest(CODE_BAD_REQUEST, "user: required (channelUserId or E.164 msisdn)")
    return user


async def conversation(request: web.Request) -> web.Response:
    try:
        sub, channel_id, user = subaccount_id(request), _id(request, "channelId"), _user(request)
    except BadRequest as exc:
        return answer(request, "conversation_state", error_response(400, exc.code, exc.message))
    found = await asyncio.to_thread(request.app[STORE].get_conversation, sub, channel_id, user)
    if found is None:
        return answer(
            request,
            "conversation_state",
            error_response(404, CODE_NOT_FOUND, f"Conversation on channel {channel_id} not found"),
        )
    record = present.conversation_record(found, request.app[CLOCK]())
    return answer(request, "conversation_state", web.json_response(record))


@web.middleware
async def store_unavailable(request: web.Request, handler: Callable[..., object]) -> web.StreamResponse:
    """The store is unreachable even after the store's own reconnect: 503 with Retry-After (8x8's error
    body), not a 500: the request may be retried as is."""
    try:
        return await handler(request)  # type: ignore[misc,no-any-return]
    except TransientError as exc:
        response = error_response(503, CODE_UNAVAILABLE, f"Store temporarily unavailable, retry later: {exc}")
        response.headers["Retry-After"] = "1"
        return response


# --- authentication (sinks/auth.py): API keys scoped to subaccounts -----------------------------------
CODE_UNAUTHORIZED = 1200  # 8x8's api-error-codes.md: Unauthorized Access
CODE_FORBIDDEN = 1201  # Access forbidden
log = logging.getLogger(__name__)


def load_api_keys(settings: Settings) -> ApiKeys:
    """The keys of `CHATPIPE_API_KEYS` and `CHATPIPE_API_KEYS_FILE` together (empty: the API is open).

    Raises ValueError naming the variable (and the file's line) when an entry is malformed, OSError when
    the file cannot be read.
    """
    entries: list[str] = []
    if settings.api_keys:
        try:
            parse_api_keys_spec(settings.api_keys)  # alone first: errors name its own entries
        except ValueError as exc:
            raise ValueError(f"CHATPIPE_API_KEYS: {exc}") from None
        entries += settings.api_keys.replace("\n", ";").split(";")
    if settings.api_keys_file is not None:
        lines = settings.api_keys_file.read_text(encoding="utf-8").splitlines()
        try:
            parse_api_keys(lines)
        except ValueError as exc:
            raise ValueError(f"CHATPIPE_API_KEYS_FILE {settings.api_keys_file}: {exc}") from None
        entries += lines
    try:
        return parse_api_keys(entries)
    except ValueError:
        raise ValueError("CHATPIPE_API_KEYS and CHATPIPE_API_KEYS_FILE name the same key twice") from None


def api_key_auth(keys: ApiKeys) -> Callable[..., object]:
    """Every /api/v1/subaccounts/{subAccountId}/... request presents `Authorization: Bearer KEY` with a key
    whose scope names that subaccount: else 401 (no or unknown key, code 1200) or 403 (another
    subaccount's data, code 1201; 401 with code 1201 on the details endpoint, whose answers keep to 8x8's
    document: it lists 400, 401, 404 and 429), in 8x8's error body. /healthz and /metrics stay open."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[..., object]) -> web.StreamResponse:
        sub = request.match_info.get("subAccountId")
        if sub is not None:
            verdict = authorize(keys, request.headers.get("Authorization"), sub)
            if verdict is Verdict.UNAUTHENTICATED:
                response = error_response(401, CODE_UNAUTHORIZED, "Request was not authenticated properly")
                response.headers["WWW-Authenticate"] = 'Bearer realm="chatpipe"'
                return answer(request, "auth", response)
            if verdict is Verdict.FORBIDDEN:
                # 8x8's details endpoint documents 400, 401, 404 and 429 only: it answers 401 (code 1201)
                status = 401 if "umid" in request.match_info else 403
                forbidden = error_response(status, CODE_FORBIDDEN, f"Access forbidden to {sub}")
                return answer(request, "auth", forbidden)
        return await handler(request)  # type: ignore[misc,no-any-return]

    return middleware


def create_app(
    settings: Settings, store: Store | None = None, clock: Callable[[], datetime] = utc_now
) -> web.Application:
    """The API app; with `store` given it is used as is (not migrated, not closed), else the store named
    by `settings.store_url` is opened and migrated at start-up and closed at clean-up. `clock` is what
    "now" means for time-dependent answers (the conversation's `windowOpen`, `granted`)."""
    from sinks.worker import pii_policy

    keys = load_api_keys(settings)
    if not keys:
        log.warning("no CHATPIPE_API_KEYS: the read API serves every subaccount's data to anyone")
    app = web.Application(middlewares=[*([api_key_auth(keys)] if keys else []), store_unavailable])
    registry = CollectorRegistry()
    app[REGISTRY] = registry
    app[METRICS] = ApiMetrics(registry)
    app[CLOCK] = clock
    app[CHANNEL_IDS] = parse_channel_ids(settings.channel_ids)

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        own = store is None
        app[STORE] = store if store is not None else open_store(settings.store_url, pii_policy(settings))
        if own:
            await asyncio.to_thread(app[STORE].migrate)
        yield
        if own:
            app[STORE].close()

    app.cleanup_ctx.append(store_ctx)
    prefix = "/api/v1/subaccounts/{subAccountId}"
    app.router.add_get(prefix + "/messages/{umid}", message_details)
    app.router.add_get(prefix + "/messages", list_messages)
    app.router.add_get(prefix + "/conversations/{channelId}", conversation)
    app.router.add_get(prefix + "/conversations/{channelId}/messages", conversation_messages)
    from sinks.api_analytics import add_routes as add_analytics_routes

    add_analytics_routes(app, prefix)  # .../analytics/{view}: docs/analytics.md
    add_health_routes(app, registry)
    add_dashboard(app)
    return app
