"""The ingest service: authenticate, validate, encode, produce durably, then answer 2xx.

Routes: `POST /v1/webhooks/chatapps`, `GET /healthz`, `GET /readyz`, `GET /metrics`.
A request is answered 2xx only after the broker acked the record (acks=all). Bad input is answered 4xx
with 8x8's error body and parked whole in the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from chatpipe.config import Settings
from chatpipe.metric_defs import IngestMetrics
from ingest.auth import token_matches
from ingest.parse import error_body, parse_webhook
from ingest.publisher import AsyncProducer, ProduceFailed, producer_config
from schemas.codec import Codecs
from schemas.errors import InvalidEvent
from schemas.models import DeadLetter, DeliveryReceipt

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/v1/webhooks/chatapps"
CODE_UNAUTHORIZED = 1200
CODE_UNAVAILABLE = 1500
CODE_TOO_LARGE = 1004
CODE_BAD_CONTENT_TYPE = 1005
_SECRET_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization", "x-api-key"})

SETTINGS = web.AppKey("settings", Settings)
CODECS = web.AppKey("codecs", Codecs)
PRODUCER = web.AppKey("producer", AsyncProducer)
METRICS = web.AppKey("metrics", IngestMetrics)
REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)


def _now() -> datetime:
    return datetime.now(UTC)


def _error(status: int, code: int, message: str, error_id: str | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    body = error_body(code, message, error_id or str(uuid.uuid4()), _now())
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


async def _park(request: web.Request, body: bytes, exc: InvalidEvent, error_id: str) -> None:
    """Write the rejected request, whole, to the ingest DLQ; waits for the broker ack."""
    app = request.app
    headers = tuple(
        (k, v) for k, v in request.headers.items() if k.lower() not in _SECRET_HEADERS
    )
    letter = DeadLetter(
        error_id=error_id,
        reason=exc.reason,
        code=exc.code,
        http_status=exc.http_status,
        source="ingest",
        received_at=_now(),
        body=body,
        headers=headers,
        field=exc.field,
        remote=request.remote,
    )
    codec = app[CODECS].ingest_dlq
    await app[PRODUCER].publish(codec.spec.name, error_id.encode(), codec.encode(letter))
    app[METRICS].dead_letters.labels(exc.field or "body").inc()


async def webhook(request: web.Request) -> web.Response:
    app = request.app
    settings, metrics = app[SETTINGS], app[METRICS]
    started = time.perf_counter()
    try:
        if settings.webhook_token is not None and not token_matches(
            request.headers.get("Authorization"), settings.webhook_token
        ):
            metrics.auth_failures.labels("token").inc()
            metrics.webhooks.labels("unknown", "unauthorized").inc()
            return _error(401, CODE_UNAUTHORIZED, "Request was not authenticated properly",
                          headers={"WWW-Authenticate": 'Bearer realm="chatpipe"'})
        body = await request.read()
        error_id = str(uuid.uuid4())
        try:
            if request.content_type not in ("application/json", "text/json", "application/octet-stream", ""):
                raise InvalidEvent(
                    f"Content-Type: expected application/json, got {request.content_type}",
                    field="Content-Type", code=CODE_BAD_CONTENT_TYPE, http_status=415,
                )
            event = parse_webhook(body, _now())
        except InvalidEvent as exc:
            metrics.webhooks.labels("invalid", "rejected").inc()
            try:
                await _park(request, body, exc, error_id)
            except ProduceFailed as perr:
                log.error("dead-letter write failed error_id=%s: %s", error_id, perr)
                return _error(503, CODE_UNAVAILABLE, "Service temporarily unavailable", error_id,
                              headers={"Retry-After": "10"})
            log.info("webhook rejected error_id=%s field=%s reason=%s", error_id, exc.field, exc.reason)
            return _error(exc.http_status, exc.code, exc.reason, error_id)
        codecs = app[CODECS]
        codec = codecs.receipts if isinstance(event, DeliveryReceipt) else codecs.inbound
        kind = "receipt" if isinstance(event, DeliveryReceipt) else "inbound"
        value = codec.encode(event)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        try:
            await app[PRODUCER].publish(codec.spec.name, event.umid.encode(), value)
        except ProduceFailed as exc:
            metrics.webhooks.labels(kind, "unavailable").inc()
            log.error("produce failed topic=%s umid=%s: %s", codec.spec.name, event.umid, exc)
            return _error(503, CODE_UNAVAILABLE, "Service temporarily unavailable", error_id,
                          headers={"Retry-After": "10"})
        metrics.produce_latency.observe(time.perf_counter() - t0)
        metrics.webhooks.labels(kind, "accepted").inc()
        return web.json_response({"status": "accepted", "umid": event.umid})
    finally:
        metrics.request_latency.observe(time.perf_counter() - started)


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    producer = request.app[PRODUCER]
    if producer.healthy:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "broker unavailable"}, status=503)


async def metrics_view(request: web.Request) -> web.Response:
    data = generate_latest(request.app[REGISTRY])
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _producer_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    producer = AsyncProducer(producer_config(settings.kafka_bootstrap))
    producer.start()
    app[PRODUCER] = producer
    # register every schema before taking traffic: a registry problem fails start-up, not requests
    await asyncio.to_thread(app[CODECS].register_all)
    yield
    remaining = producer.close(timeout=10)
    if remaining:
        log.error("shutdown: %d records still undelivered", remaining)


def create_app(settings: Settings, codecs: Codecs | None = None) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes)
    registry = CollectorRegistry()
    app[SETTINGS] = settings
    app[CODECS] = codecs or Codecs.connect(settings.schema_registry_url)
    app[REGISTRY] = registry
    app[METRICS] = IngestMetrics(registry)
    if settings.webhook_token is None:
        log.warning("CHATPIPE_WEBHOOK_TOKEN is not set: the webhook endpoint accepts unauthenticated requests")
    app.cleanup_ctx.append(_producer_ctx)
    app.router.add_post(WEBHOOK_PATH, webhook)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    return app
