"""The ingest service: authenticate, validate, encode, hand off durably, then answer 2xx.

Routes: `POST /v1/webhooks/chatapps`, `POST /oauth2/token`, `GET /healthz`, `GET /readyz`, `GET /metrics`.

A webhook is answered 2xx only once its record is durable: acked by the broker (acks=all) or, when the
broker cannot ack in time, fsynced to the local spool that a background task drains to the broker in
order. Only when the spool cannot take it either is the answer 503 (8x8 retries after 1, 10, 30, 90 s).
Bad input is answered 4xx with 8x8's error body and parked, raw and whole, in the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from chatpipe.runtime.config import Settings
from chatpipe.runtime.metric_defs import IngestMetrics
from chatpipe.runtime.serve import Handler, add_health_routes, answer_and_close
from chatpipe.runtime.specs import parse_networks
from ingest import auth
from ingest.fastreceipt import encode_receipt, matches
from ingest.parse import error_body, parse_webhook
from ingest.publisher import AsyncProducer, ProduceFailed, producer_config
from ingest.spool import AsyncSpool, Spool
from schemas.codec import Codecs
from schemas.errors import InvalidEvent
from schemas.models import DeadLetter, DeliveryReceipt

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/v1/webhooks/chatapps"
TOKEN_PATH = "/oauth2/token"
CODE_BAD_REQUEST = 1000
CODE_TOO_LARGE = 1004
CODE_BAD_CONTENT_TYPE = 1005
CODE_UNAUTHORIZED = 1200
CODE_FORBIDDEN = 1201
CODE_UNAVAILABLE = 1500
JSON_TYPES = frozenset({"application/json", "text/json", "text/plain", "application/octet-stream", ""})
_SECRET_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization", "x-api-key"})


class Unavailable(Exception):
    """Neither the broker nor the spool could take the record: answer 503."""


class DrainWatch:
    """Whether the spool's drain has stalled, from what each drain round reported. Pure: no I/O, no clock.

    Stalled: the spool holds records, the broker answers (the caller probes it after a failed round, and
    when `wants_probe`), and either `max_failures` rounds in a row failed without draining a record, or none
    was drained for `max_seconds`. A broker that does not answer is an outage, not a stall: the spool is
    there to take it (for as long as it has room), so it never makes the spool stalled; `age` shows it. A
    round that drains a record, or an empty spool, clears it. `stalled` is the reason, naming the topic and
    seq the drain stopped at and the error.
    """

    def __init__(self, max_failures: int, max_seconds: float, now: float) -> None:
        if max_failures < 1 or not max_seconds > 0:
            raise ValueError(f"need max_failures >= 1 and max_seconds > 0, got {max_failures}, {max_seconds}")
        self.max_failures = max_failures
        self.max_seconds = max_seconds
        self.failures = 0  # rounds in a row that failed without draining a record, the broker answering
        self.last_progress = now  # when a record was last drained or the spool last seen empty
        self.last_error: str | None = None  # "topic=... seq=...: error" of the last failed round
        self.stalled: str | None = None

    def empty(self, now: float) -> None:
        self.failures, self.last_progress, self.stalled = 0, now, None

    def round(self, now: float, sent: int, error: str | None, broker_answers: bool = True) -> None:
        """One drain round: `sent` records drained, then `error` (None: it drained all it found);
        `broker_answers`: whether the broker answered after a failed round (an outage counts no failure)."""
        if sent:
            self.failures, self.last_progress, self.stalled = 0, now, None
        if error is None:
            return
        self.last_error = error
        if not sent and broker_answers:
            self.failures += 1
            if self.failures >= self.max_failures:
                self.stalled = (
                    f"spool drain failed {self.failures} times in a row while the broker answers, at {error}"
                )

    def age(self, now: float) -> float:
        """Seconds since a record was last drained or the spool was empty."""
        return now - self.last_progress

    def wants_probe(self, now: float) -> bool:
        return self.stalled is None and self.age(now) >= self.max_seconds

    def broker_answered(self, now: float) -> None:
        if self.wants_probe(now):
            self.stalled = (
                f"no spooled record drained for {self.age(now):.0f} s while the broker answers; "
                f"last failure at {self.last_error or 'none'}"
            )


class Intake:
    """The durable hand-off: Kafka first, the local spool when Kafka cannot ack in time.

    While the spool holds a backlog, new records go behind it, so per-umid order is kept.

    The ack deadline is enforced by one reaper task for all waiting records (they share one timeout, so
    their deadlines expire in the order they were published) rather than a timer and a shield per request.

    The drain survives any outage: the producer replaces itself when librdkafka can no longer deliver with
    it (`AsyncProducer.replace`); the drain replaces it too when a round acks nothing for `drain_timeout`
    (its futures are stuck) or rounds keep failing although the broker answers (at the 2nd, 4th, 8th...
    such failure in a row that the producer did not already answer with a replacement). A spool that still
    does not drain while the broker answers is `stalled` (`DrainWatch`): /readyz answers 503 with the
    reason, the metrics show it, and it is logged at ERROR. A broker that does not answer is an outage the
    spool takes (readiness stays as it is); `chatpipe_ingest_spool_drain_age_seconds` shows how long.
    """

    def __init__(
        self,
        producer: AsyncProducer,
        spool: AsyncSpool | None,
        timeout: float,
        metrics: IngestMetrics,
        stall_failures: int = 5,
        stall_seconds: float = 60.0,
        drain_timeout: float = 30.0,
    ) -> None:
        self.producer = producer
        self.spool = spool
        self.timeout = timeout
        self.metrics = metrics
        self.drain_timeout = drain_timeout
        self.watch = DrainWatch(stall_failures, stall_seconds, time.monotonic())
        self._waiting: deque[tuple[float, asyncio.Future[None]]] = deque()
        self._reaper: asyncio.Task[None] | None = None
        self._observe_produce = metrics.produce_latency.observe
        replacements = metrics.producer_replacements
        producer.on_replace = lambda cause: replacements.labels(cause).inc()
        metrics.spool_drain_age.set_function(
            lambda: self.watch.age(time.monotonic()) if self.spool_depth else 0.0
        )

    @property
    def stalled(self) -> str | None:
        """Why the spool does not drain, or None."""
        return self.watch.stalled

    @property
    def spool_depth(self) -> int:
        return self.spool.depth if self.spool is not None else 0

    @property
    def spool_writable(self) -> bool:
        if self.spool is None:
            return False
        s = self.spool.spool
        return s.failed is None and s.size_bytes < s.max_bytes

    async def put(self, topic: str, key: bytes, value: bytes) -> str:
        """Make one record durable; returns where it went ("kafka" or "spool")."""
        if self.spool is not None and self.spool.depth > 0:
            return await self._spool(topic, key, value, "backlog")
        t0 = time.monotonic()
        fut = self.producer.publish(topic, key, value)
        if not fut.done():
            self._waiting.append((t0 + self.timeout, fut))
            if self._reaper is None:
                self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())
        try:
            await fut
        except (TimeoutError, ProduceFailed) as exc:
            # after a timeout the record may still be delivered as well as spooled: downstream dedups it
            if self.spool is None:
                raise Unavailable(str(exc) or "broker did not ack in time") from exc
            return await self._spool(topic, key, value, type(exc).__name__)
        self._observe_produce(time.monotonic() - t0)
        return "kafka"

    async def _reap_forever(self) -> None:
        """Fail the wait of each record not acked by its deadline with TimeoutError (its waiter spools it)."""
        waiting = self._waiting
        tick = max(0.001, min(0.05, self.timeout / 10))
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            while waiting:
                deadline, fut = waiting[0]
                if not fut.done():
                    if deadline > now:
                        break
                    fut.set_exception(TimeoutError(f"broker did not ack within {self.timeout:g} s"))
                waiting.popleft()

    async def close(self) -> None:
        """Stop the deadline reaper (after the producer was flushed: nothing waits any more)."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None

    async def _spool(self, topic: str, key: bytes, value: bytes, why: str) -> str:
        assert self.spool is not None
        try:
            await self.spool.append(topic, key, value)
        except Exception as exc:  # SpoolFull or a disk error: nothing durable took it
            raise Unavailable(f"spool cannot take writes: {exc}") from exc
        self.metrics.spool_depth.set(self.spool.depth)
        log.debug("spooled topic=%s key=%s (%s)", topic, key, why)
        return "spool"

    async def drain_forever(self, interval: float = 0.5) -> None:
        """Send spooled records to Kafka in order whenever the broker takes them; watch for a stall."""
        assert self.spool is not None
        while True:
            if self.spool.depth:
                await self._drain_round()
            else:
                self._judge(lambda: self.watch.empty(time.monotonic()))
            self.metrics.spool_depth.set(self.spool.depth)
            await asyncio.sleep(interval)

    async def _drain_round(self) -> None:
        assert self.spool is not None
        spool, producer = self.spool, self.producer
        replacements = producer.replacements
        spool.last_drain_error = spool.stopped_at = None
        error: BaseException | None
        try:
            sent = await self._drain_watched()
            error = spool.last_drain_error
        except Exception as exc:  # the spool could not be read or acked
            sent, error = 0, exc
        if sent:
            log.info("drained %d spooled records to kafka, %d left", sent, spool.depth)
        where = None
        if error is not None:
            self.metrics.spool_drain_failures.inc()
            at = spool.stopped_at
            # AsyncSpool.drain logged it (a WARNING naming topic and seq)
            where = f"topic={at.topic} seq={at.seq}: {error}" if at else f"the spool: {error!r}"
        up = error is None or sent > 0 or await self._broker_answers()
        now = time.monotonic()
        self._judge(lambda: self.watch.round(now, sent, where, up))
        failures = self.watch.failures
        if failures >= 2 and failures & (failures - 1) == 0 and producer.replacements == replacements:
            producer.replace("failing", f"{failures} drain rounds in a row failed at {where}")
        if self.watch.wants_probe(now) and await self._broker_answers():
            self._judge(lambda: self.watch.broker_answered(now))

    async def _drain_watched(self) -> int:
        """One `AsyncSpool.drain`; if it acks nothing for `drain_timeout`, the producer is replaced (which
        fails the futures it waits for)."""
        assert self.spool is not None
        spool = self.spool
        task = asyncio.ensure_future(spool.drain(self.producer.publish))
        try:
            acked = spool.spool.acked
            while not (await asyncio.wait({task}, timeout=self.drain_timeout))[0]:
                if spool.spool.acked == acked:
                    self.producer.replace("stuck", f"no spooled record acked for {self.drain_timeout:g} s")
                acked = spool.spool.acked
            return task.result()
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _broker_answers(self) -> bool:
        try:
            await asyncio.to_thread(self.producer.broker_metadata, 2.0)
        except Exception:
            return False
        return True

    def _judge(self, update: Callable[[], None]) -> None:
        """Apply `update` to the watch; report a stall starting or ending (ERROR log, gauge), once each."""
        before = self.watch.stalled
        update()
        after = self.watch.stalled
        if (after is None) == (before is None):
            return
        self.metrics.spool_stalled.set(after is not None)
        if after is not None:
            log.error("spool stalled, %d records undelivered: %s", self.spool_depth, after)
        else:
            log.warning("spool drains again (was stalled: %s)", before)


SETTINGS = web.AppKey("settings", Settings)
CODECS = web.AppKey("codecs", Codecs)
INTAKE = web.AppKey("intake", Intake)
METRICS = web.AppKey("metrics", IngestMetrics)
REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)
#: webhook counters by (kind, outcome), bound once: `.labels()` per request costs more than the increment
OUTCOMES = web.AppKey("outcomes", dict)
_KINDS = ("receipt", "inbound")
_OUTCOMES = ("accepted", "spooled", "unavailable")


class Authn:
    """Who may post webhooks: static token, OAuth2 tokens we issued, source-address allowlist."""

    def __init__(self, settings: Settings) -> None:
        self.token = settings.webhook_token
        self.client_id = settings.oauth_client_id
        self.client_secret = settings.oauth_client_secret
        self.token_ttl = settings.oauth_token_ttl
        self.key = auth.signing_key(self.client_secret) if self.client_secret else b""
        self.allowlist = parse_networks(settings.allowed_ips)
        self.proxies = parse_networks(settings.trusted_proxies)

    @property
    def required(self) -> bool:
        return self.token is not None or bool(self.key)

    def check(self, authorization: str | None) -> bool:
        if self.token is not None and auth.token_matches(authorization, self.token):
            return True
        if self.key:
            secret = auth.presented_secret(authorization)
            if secret is not None and auth.verify_token(secret, self.key, time.time()) == self.client_id:
                return True
        return False


AUTHN = web.AppKey("authn", Authn)
#: whether the receipts codec writes the schema `ingest.fastreceipt` encodes (else every body is parsed)
FAST_RECEIPTS = web.AppKey("fast_receipts", bool)


def _now() -> datetime:
    return datetime.now(UTC)


def _new_error_id() -> str:
    return str(uuid.uuid4())


def _error(
    status: int, code: int, message: str, error_id: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    body = error_body(code, message, error_id or _new_error_id(), _now())
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def _accepted(umid: str) -> web.Response:
    return web.Response(
        body=b'{"status":"accepted","umid":' + orjson.dumps(umid) + b"}", content_type="application/json"
    )


def _unavailable(error_id: str) -> web.Response:
    return _error(
        503,
        CODE_UNAVAILABLE,
        "Service temporarily unavailable, retry later",
        error_id,
        headers={"Retry-After": "5"},
    )


async def _read_body(request: web.BaseRequest, limit: int) -> tuple[bytes, bool]:
    """Up to `limit` bytes of the body, and whether there was more."""
    length = request.content_length
    if length is not None and length <= limit:  # the parser delivers exactly that many bytes
        return await request.read(), False
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(65536)
        if not chunk:
            return b"".join(chunks), False
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks)[:limit], True


def _remote(request: web.BaseRequest, authn: Authn) -> str | None:
    return auth.client_address(request.remote, request.headers.get("X-Forwarded-For"), authn.proxies)


class Webhook:
    """`POST /v1/webhooks/chatapps`: bound once to its app's parts (an `app[KEY]` lookup per request is a
    Python call), so it needs nothing from `request.app` and can also be served by `fast_dispatch`."""

    def __init__(self, app: web.Application) -> None:
        self.settings, self.metrics, self.authn = app[SETTINGS], app[METRICS], app[AUTHN]
        self.codecs, self.outcomes, self.fast_receipts = app[CODECS], app[OUTCOMES], app[FAST_RECEIPTS]
        self.intake: Intake | None = None  # set by the app's start-up, before it takes traffic
        self.fast_dispatched = 0  # requests `fast_dispatch` sent here without the router

    async def _park(
        self, request: web.BaseRequest, body: bytes, exc: InvalidEvent, error_id: str, remote: str | None
    ) -> None:
        """Park the rejected request, whole (secrets removed from headers), in the ingest DLQ."""
        assert self.intake is not None
        headers = tuple((k, v) for k, v in request.headers.items() if k.lower() not in _SECRET_HEADERS)
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
            remote=remote,
        )
        codec = self.codecs.ingest_dlq
        await self.intake.put(codec.spec.name, error_id.encode(), codec.encode(letter))
        self.metrics.dead_letters.labels(exc.field or "body").inc()

    async def __call__(self, request: web.BaseRequest) -> web.Response:
        settings, metrics, authn, intake = self.settings, self.metrics, self.authn, self.intake
        assert intake is not None, "webhook before start-up"
        started = time.perf_counter()
        try:
            remote: str | None = None  # worked out here only when an allowlist needs it, else for the DLQ
            if authn.allowlist:
                remote = _remote(request, authn)
                if not auth.address_allowed(remote, authn.allowlist):
                    metrics.auth_failures.labels("address").inc()
                    log.warning("webhook refused: source address %s not allowed", remote)
                    return _error(403, CODE_FORBIDDEN, "Source address not allowed")
            if authn.required and not authn.check(request.headers.get("Authorization")):
                metrics.auth_failures.labels("credentials").inc()
                metrics.webhooks.labels("unknown", "unauthorized").inc()
                return _error(
                    401,
                    CODE_UNAUTHORIZED,
                    "Request was not authenticated properly",
                    headers={"WWW-Authenticate": 'Bearer realm="chatpipe"'},
                )
            length = request.content_length
            content = request.content
            if length is not None and length <= settings.max_body_bytes and content.is_eof():
                # the common case: the HTTP parser already holds the whole body (then no coroutine at all)
                body, truncated = content.read_nowait(-1), False
            else:
                wait = settings.ingest_body_timeout
                try:
                    async with asyncio.timeout(wait):
                        body, truncated = await _read_body(request, settings.max_body_bytes)
                except TimeoutError:  # a client holding the connection without sending: 408, closed
                    log.info("webhook body not complete after %g s: answered 408", wait)
                    return await answer_and_close(
                        request, _error(408, CODE_BAD_REQUEST, f"body: not received within {wait:g} s")
                    )
                except ConnectionError:  # the client left mid-body: nobody to answer, nothing to park
                    log.debug("webhook body not read: the client disconnected")
                    return _error(400, CODE_BAD_REQUEST, "body: the client disconnected")
            try:
                if truncated:
                    limit = settings.max_body_bytes
                    raise InvalidEvent(
                        f"body: larger than {limit} bytes (first {limit} kept)",
                        field="body",
                        code=CODE_TOO_LARGE,
                        http_status=413,
                    )
                raw_type = request.headers.get("Content-Type")
                if raw_type != "application/json" and request.content_type not in JSON_TYPES:
                    raise InvalidEvent(
                        f"Content-Type: expected application/json, got {request.content_type}",
                        field="Content-Type",
                        code=CODE_BAD_CONTENT_TYPE,
                        http_status=415,
                    )
                received_at = _now()
                receipts = self.codecs.receipts
                # the common case straight to Avro; anything else (or a refusal) through the full parser
                fast = encode_receipt(body, received_at, receipts.header) if self.fast_receipts else None
                if fast is None:
                    event = parse_webhook(body, received_at)
            except InvalidEvent as exc:
                error_id = _new_error_id()
                metrics.webhooks.labels("invalid", "rejected").inc()
                try:
                    await self._park(request, body, exc, error_id, remote or _remote(request, authn))
                except Unavailable as unavailable:
                    log.error("dead-letter write failed error_id=%s: %s", error_id, unavailable)
                    return _unavailable(error_id)
                log.info("webhook rejected error_id=%s field=%s reason=%s", error_id, exc.field, exc.reason)
                return _error(exc.http_status, exc.code, exc.reason, error_id)
            if fast is not None:
                umid, value = fast
                topic, kind = receipts.spec.name, "receipt"
            else:
                is_receipt = isinstance(event, DeliveryReceipt)
                codec = receipts if is_receipt else self.codecs.inbound
                umid, value = event.umid, codec.encode(event)  # type: ignore[arg-type]
                topic, kind = codec.spec.name, "receipt" if is_receipt else "inbound"
            try:
                where = await intake.put(topic, umid.encode(), value)
            except Unavailable as exc:
                error_id = _new_error_id()
                self.outcomes[kind, "unavailable"].inc()
                log.error("webhook not durable topic=%s umid=%s error_id=%s: %s", topic, umid, error_id, exc)
                return _unavailable(error_id)
            self.outcomes[kind, "accepted" if where == "kafka" else "spooled"].inc()
            return _accepted(umid)
        finally:
            metrics.request_latency.observe(time.perf_counter() - started)


WEBHOOK = web.AppKey("webhook", Webhook)


def fast_dispatch(app: web.Application, handler: Handler) -> Handler:
    """The server's request handler with `POST /v1/webhooks/chatapps` taken straight to the webhook.

    `handler` is the app's own (`runner.server.request_handler`: router, match info, response-prepare
    signals). The webhook route needs none of it, and skipping it saves about 4 us of the 70 us a webhook
    costs the event loop (bench/ingest.py). Any other request, and a webhook with an `Expect` header (the
    app answers `100-continue`), still goes through `handler`.
    """
    webhook = app[WEBHOOK]

    async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
        if request.raw_path == WEBHOOK_PATH and request.method == "POST" and "Expect" not in request.headers:
            webhook.fast_dispatched += 1
            return await webhook(request)
        return await handler(request)

    return dispatch


def _bytes(text: str) -> bytes:
    """A request's text back to its bytes: aiohttp keeps bytes that are not UTF-8 as surrogate escapes."""
    return text.encode("utf-8", "surrogateescape")


async def token(request: web.Request) -> web.Response:
    """OAuth2 client-credentials grant (RFC 6749 4.4): short-lived bearer tokens for 8x8's webhook calls."""
    authn = request.app[AUTHN]
    if not authn.key:
        return web.json_response(
            {"error": "unsupported_grant_type", "error_description": "OAuth2 is not configured"}, status=400
        )
    form = {k: str(v) for k, v in (await request.post()).items()}
    if form.get("grant_type") != "client_credentials":
        return web.json_response({"error": "unsupported_grant_type"}, status=400)
    creds = auth.client_credentials(request.headers.get("Authorization"), form)
    if creds is None or not (
        hmac.compare_digest(_bytes(creds[0]), (authn.client_id or "").encode())
        and hmac.compare_digest(_bytes(creds[1]), (authn.client_secret or "").encode())
    ):
        request.app[METRICS].auth_failures.labels("oauth2").inc()
        return web.json_response(
            {"error": "invalid_client"}, status=401, headers={"WWW-Authenticate": 'Basic realm="chatpipe"'}
        )
    issued = auth.issue_token(creds[0], authn.key, time.time(), authn.token_ttl)
    return web.json_response(
        {"access_token": issued, "token_type": "Bearer", "expires_in": authn.token_ttl},
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )


async def readyz(request: web.Request) -> web.Response:
    """Ready when Kafka or the spool takes records and the spool is not stalled; else 503 with a reason."""
    intake = request.app[INTAKE]
    kafka = intake.producer.healthy
    spool = intake.spool_writable
    stalled = intake.stalled
    body: dict[str, object] = {
        "kafka": kafka,
        "spool": spool,
        "spoolDepth": intake.spool_depth,
        "spoolStalled": stalled is not None,
    }
    reason = stalled or (None if kafka or spool else "neither Kafka nor the spool takes records")
    if reason is not None:
        return web.json_response({"status": "unavailable", "reason": reason, **body}, status=503)
    return web.json_response({"status": "ready", **body})


def create_app(
    settings: Settings, codecs: Codecs | None = None, spool_dir: Path | None = None
) -> web.Application:
    """The ingest app. `spool_dir` defaults to STATE_DIR/spool/ingest-0 (one directory per process)."""
    app = web.Application(client_max_size=settings.max_body_bytes + 1)
    registry = CollectorRegistry()
    app[SETTINGS] = settings
    app[CODECS] = codecs or Codecs.connect(settings.schema_registry_url)
    app[REGISTRY] = registry
    app[METRICS] = IngestMetrics(registry)
    app[OUTCOMES] = {(k, o): app[METRICS].webhooks.labels(k, o) for k in _KINDS for o in _OUTCOMES}
    app[AUTHN] = Authn(settings)
    app[FAST_RECEIPTS] = matches(app[CODECS].receipts.schema)
    if not app[FAST_RECEIPTS]:
        log.warning("receipts schema is not ingest.fastreceipt.LAYOUT: every receipt takes the full parser")
    if not app[AUTHN].required:
        log.warning("no CHATPIPE_WEBHOOK_TOKEN nor OAuth2 client: the webhook endpoint is open to anyone")
    spool_path = spool_dir or settings.state_dir / "spool" / "ingest-0"

    async def intake_ctx(app: web.Application) -> AsyncIterator[None]:
        config = producer_config(settings, **{"linger.ms": settings.ingest_linger_ms})
        producer = AsyncProducer(config)
        producer.start()
        spool = None
        if settings.spool_max_bytes:
            spool = AsyncSpool(Spool(spool_path, max_bytes=settings.spool_max_bytes))
        intake = Intake(
            producer,
            spool,
            settings.produce_timeout,
            app[METRICS],
            stall_failures=settings.spool_stall_failures,
            stall_seconds=settings.spool_stall_seconds,
        )
        app[INTAKE] = intake
        app[WEBHOOK].intake = intake
        # every schema registered before taking traffic: a registry problem fails start-up, not requests
        await asyncio.to_thread(app[CODECS].register_all)
        drainer = asyncio.create_task(intake.drain_forever()) if spool is not None else None
        if spool is not None and spool.depth:
            log.info("spool holds %d records from an earlier run: draining", spool.depth)
        yield
        if drainer is not None:
            drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drainer
            # last chance to hand the backlog over while the producer is still up
            with contextlib.suppress(Exception):
                await asyncio.wait_for(spool.drain(producer.publish), 5)  # type: ignore[union-attr]
        remaining = producer.close(timeout=10)
        if remaining:
            log.error("shutdown: %d records still undelivered", remaining)
        await intake.close()
        if spool is not None:
            await spool.close()

    app.cleanup_ctx.append(intake_ctx)
    app[WEBHOOK] = Webhook(app)
    app.router.add_post(WEBHOOK_PATH, app[WEBHOOK])
    app.router.add_post(TOKEN_PATH, token)
    add_health_routes(app, registry)
    app.router.add_get("/readyz", readyz)
    return app
