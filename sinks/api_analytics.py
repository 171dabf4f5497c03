"""The analytics read API: `GET /api/v1/subaccounts/{subAccountId}/analytics/{view}` (docs/analytics.md).

Views: funnel, fallback, latency, errors, inbound, window. Query parameters `since`, `until` (ISO 8601;
default: the 7 days up to now, `until` rounded up to the hour), `granularity` (hour, day, total),
`channel`, `country`, `groupBy` (channel, country), `metric` (latency: deliver, read), `limit` (errors).
The store answers rows (`Store.analytics`); the JSON shapes are built here. A subaccount only sees its
own numbers: every query is scoped by the path's subAccountId. Bad parameters: 400, 8x8's error body.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from schemas.timefmt import format_iso8601
from sinks import aggregates as A
from sinks.analytics_sql import GRANULARITIES, GROUPABLE, VIEWS, Query
from sinks.http import (
    CLOCK,
    CODE_BAD_REQUEST,
    STORE,
    BadRequest,
    answer,
    error_response,
    subaccount_id,
    text_param,
)

DEFAULT_DAYS = 7
DEFAULT_ERRORS = 10
MAX_ERRORS = 100
MAX_RANGE = timedelta(days=3660)


def _time(request: web.Request, name: str) -> datetime | None:
    raw = text_param(request, name)
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise BadRequest(CODE_BAD_REQUEST, f"{name}: not an ISO 8601 time: {raw!r}") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def parse_query(request: web.Request, view: str, now: datetime) -> tuple[Query, int]:
    """The `Query` a request asks for, and the errors view's limit; BadRequest for a bad parameter."""
    sub = subaccount_id(request)
    until = _time(request, "until")
    if until is None:
        until = A.hour_of(now) + (timedelta(hours=1) if now != A.hour_of(now) else timedelta(0))
    since = _time(request, "since") or until - timedelta(days=DEFAULT_DAYS)
    if since >= until or until - since > MAX_RANGE:
        raise BadRequest(CODE_BAD_REQUEST, "since/until: since must be before until, at most 10 years apart")
    granularity = text_param(request, "granularity") or ("total" if view == "errors" else "day")
    if granularity not in GRANULARITIES:
        raise BadRequest(CODE_BAD_REQUEST, f"granularity: one of {', '.join(GRANULARITIES)}")
    group_by = tuple(g.strip() for g in (text_param(request, "groupBy") or "").split(",") if g.strip())
    if any(g not in GROUPABLE for g in group_by) or len(set(group_by)) != len(group_by):
        raise BadRequest(CODE_BAD_REQUEST, f"groupBy: a comma-separated list of {', '.join(GROUPABLE)}")
    if view in ("fallback", "inbound"):
        group_by = ()
    channel = text_param(request, "channel")
    country = text_param(request, "country")
    metric = text_param(request, "metric") or "deliver"
    if metric not in A.METRICS:
        raise BadRequest(CODE_BAD_REQUEST, "metric: deliver or read")
    limit = DEFAULT_ERRORS
    raw = text_param(request, "limit")
    if raw is not None:
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_ERRORS:
            raise BadRequest(CODE_BAD_REQUEST, f"limit: an integer from 1 to {MAX_ERRORS}")
        limit = int(raw)
    query = Query(
        view, sub, since, until, granularity,
        channel=channel.lower() if channel else None,
        country=(country if country == A.UNKNOWN_COUNTRY else country.upper()) if country else None,
        group_by=group_by, metric=metric,
    )  # fmt: skip
    return query, limit


def _bucket(value: datetime | None) -> str | None:
    return None if value is None else format_iso8601(value)


def _keys(row: dict[str, Any], group_by: Sequence[str]) -> dict[str, Any]:
    return {"bucket": _bucket(row["bucket"]), **{g: row[g] for g in group_by}}


def shape(query: Query, rows: list[dict[str, Any]], limit: int = DEFAULT_ERRORS) -> dict[str, Any]:
    """The JSON answer of a view from the store's rows (docs/analytics.md)."""
    g = query.group_by
    out: dict[str, Any] = {
        "subAccountId": query.sub_account_id,
        "since": format_iso8601(query.since),
        "until": format_iso8601(query.until),
        "granularity": query.granularity,
        "filters": {"channel": query.channel, "country": query.country},
        "groupBy": list(g),
    }
    data: list[dict[str, Any]] = []
    if query.view == "funnel":
        data = [{**_keys(r, g), **A.funnel_record(r)} for r in rows if r["messages"]]
    elif query.view == "fallback":
        summary: dict[str, dict[str, int]] = {}
        for r in rows:
            if not r["messages"]:
                continue
            delivered = r["delivered"] + r["read"]
            data.append(
                {
                    "bucket": _bucket(r["bucket"]), "path": r["path"], "firstChannel": r["first_channel"],
                    "steps": r["steps"], **{c: r[c] for c in A.MESSAGE_COUNTERS},
                    "deliveredRate": A.rate(delivered, r["messages"]),
                }
            )  # fmt: skip
            s = summary.setdefault(r["first_channel"], {"messages": 0, "fellBack": 0, "fellBackDelivered": 0})
            s["messages"] += r["messages"]
            if r["steps"] > 1:
                s["fellBack"] += r["messages"]
                s["fellBackDelivered"] += delivered
        out["summary"] = [
            {"firstChannel": ch, **s, "fallbackRate": A.rate(s["fellBack"], s["messages"]),
             "fallbackSuccessRate": A.rate(s["fellBackDelivered"], s["fellBack"])}
            for ch, s in sorted(summary.items())
        ]  # fmt: skip
    elif query.view == "latency":
        hists: dict[tuple[Any, ...], dict[int, int]] = {}
        for r in rows:
            key = (r["bucket"], *(r[k] for k in g))
            hists.setdefault(key, {})[r["bucket_index"]] = r["count"]
        for key, h in hists.items():
            record = A.latency_record(h)
            if record["count"]:
                data.append({"bucket": _bucket(key[0]), **dict(zip(g, key[1:], strict=True)), **record})
    elif query.view == "errors":
        groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for r in rows:
            if r["count"] > 0:
                groups.setdefault((r["bucket"], *(r[k] for k in g)), []).append(r)
        for key, found in groups.items():
            total = sum(r["count"] for r in found)
            for r in sorted(found, key=lambda r: (-r["count"], r["error_code"]))[:limit]:
                meaning = A.error_meaning(r["error_code"])
                data.append(
                    {
                        "bucket": _bucket(key[0]), **dict(zip(g, key[1:], strict=True)),
                        "errorCode": r["error_code"], "reason": meaning[0] if meaning else None,
                        "description": meaning[1] if meaning else None, "count": r["count"],
                        "share": A.rate(r["count"], total),
                    }
                )  # fmt: skip
    elif query.view == "inbound":
        data = [
            {"bucket": _bucket(r["bucket"]), "channel": r["channel"], "type": r["type"],
             "interactiveType": r["interactive_type"] or None, "count": r["count"]}
            for r in rows
            if r["count"]
        ]  # fmt: skip
    else:
        data = [
            {**_keys(r, g), "inbound": r["inbound"], "answered": r["answered"],
             "answeredRate": A.rate(r["answered"], r["inbound"])}
            for r in rows
            if r["inbound"]
        ]  # fmt: skip
    out["data"] = data
    return out


async def analytics_view(request: web.Request) -> web.Response:
    view = request.match_info["view"]
    route = f"analytics_{view}" if view in VIEWS else "analytics"
    if view not in VIEWS:
        return answer(request, route, error_response(404, 1300, f"Unknown analytics view {view!r}"))
    try:
        query, limit = parse_query(request, view, request.app[CLOCK]())
    except BadRequest as exc:
        return answer(request, route, error_response(400, exc.code, exc.message))
    rows = await asyncio.to_thread(request.app[STORE].analytics, query)
    return answer(request, route, web.json_response(shape(query, rows, limit)))


def add_routes(app: web.Application, prefix: str) -> None:
    """Register `prefix + /analytics/{view}` (prefix: the subaccount's API path)."""
    app.router.add_get(prefix + "/analytics/{view}", analytics_view)
