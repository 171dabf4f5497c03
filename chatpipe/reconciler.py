"""`chatpipe reconcile`: ask 8x8 about messages whose receipts stopped coming. The I/O shell.

Every `interval` seconds a pass:
1. reads from the store (`CHATPIPE_STORE_URL`, read-only) the messages that are not final and whose last
   change (the later of `status_at` and `updated_at`) is older than `CHATPIPE_RECONCILE_AFTER` seconds and
   that the in-memory `CheckSchedule` says are due (a looked-up umid waits longer each time; a 404 waits
   hours);
2. looks each one up with `GET {CHATPIPE_8X8_API_URL}/api/v1/subaccounts/{sub}/messages/{umid}`
   (`Authorization: Bearer CHATPIPE_8X8_API_KEY`): one sequential queue per subaccount, spaced by a token
   bucket (8x8 allows 1 request/second per subaccount; `request_interval` adds a margin for network
   jitter), all subaccounts in parallel under a global cap of requests in flight. A 429 blocks that
   subaccount for the seconds 8x8 names; 5xx, timeouts and connection errors are retried with
   exponential backoff, `max_attempts` in all; a 404 is recorded ("unknown at 8x8") and not retried for
   hours; other 4xx are logged and not retried soon;
3. produces each answer's synthetic delivery receipts (`processors.reconcile.details_to_receipts`) to
   `chatpipe.receipts.raw`, keyed by umid, with chatpipe's Avro codec, acks=all and idempotence; the state
   processor folds them like webhooks.

One reconciler process per deployment: the rate limit is enforced in this process only (two would
together exceed 8x8's quota; 8x8's 429s would then throttle them). The schedule lives in memory: after a
restart every open message is due once more. /healthz and /metrics are served on
`CHATPIPE_METRICS_PORT` (off when 0). Without `CHATPIPE_8X8_API_KEY` the command logs "reconciler off"
and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from chatpipe.config import Settings
from chatpipe.metric_defs import ReconcilerMetrics
from ingest.publisher import AsyncProducer, ProduceFailed, producer_config
from processors.reconcile import (
    Candidate,
    CheckSchedule,
    Outcome,
    RateLimiter,
    details_to_receipts,
    parse_retry_after,
    select_candidates,
)
from schemas.catalog import RECEIPTS
from schemas.codec import Codecs
from schemas.errors import ChatpipeError, InvalidEvent
from schemas.models import DeliveryReceipt
from sinks.store import Store, open_store

log = logging.getLogger(__name__)

DETAILS_PATH = "/api/v1/subaccounts/{sub}/messages/{umid}"


@dataclass(frozen=True)
class ReconcilerConfig:
    """Tuning beyond INTERFACE.md (defaults suit 8x8's documented limits)."""

    interval: float = 30.0  # seconds between the starts of two passes
    concurrency: int = 16  # requests in flight over all subaccounts
    request_interval: float = 1.1  # seconds between two requests of one subaccount (8x8: 1/s + margin)
    timeout: float = 10.0  # per request
    max_attempts: int = 4  # per lookup, for 5xx / timeouts / connection errors
    max_rate_limited: int = 5  # 429s per lookup before it is left for a later pass
    backoff: float = 0.5  # first retry delay; doubles up to backoff_max
    backoff_max: float = 30.0
    per_subaccount: int = 300  # lookups per subaccount per pass (about 5.5 min at 1/1.1 s)
    per_pass: int = 10_000
    page_size: int = 1000  # rows per candidate query
    not_found_after: float = 6 * 3600.0  # a 404 (or unreadable answer) is asked again after this, growing
    max_backoff: float = 24 * 3600.0

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.request_interval <= 0 or self.timeout <= 0:
            raise ValueError("interval, request_interval and timeout must be positive")
        if self.concurrency < 1 or self.max_attempts < 1 or self.per_subaccount < 1 or self.per_pass < 1:
            raise ValueError("concurrency, max_attempts, per_subaccount and per_pass must be >= 1")
        if self.page_size < 1 or self.max_rate_limited < 0:
            raise ValueError("page_size must be >= 1 and max_rate_limited >= 0")


# --- candidates from the store ---------------------------------------------------------------------

_COLUMNS = "umid, sub_account_id, final, status_at, updated_at, channel_path"
SQLITE_CANDIDATES = (
    f"SELECT {_COLUMNS} FROM messages WHERE final = 0 AND updated_at < ? AND status_at < ?"
    " ORDER BY updated_at, umid LIMIT ?"
)
SQLITE_CANDIDATES_AFTER = (
    f"SELECT {_COLUMNS} FROM messages WHERE final = 0 AND updated_at < ? AND status_at < ?"
    " AND (updated_at > ? OR (updated_at = ? AND umid > ?)) ORDER BY updated_at, umid LIMIT ?"
)
POSTGRES_CANDIDATES = (
    f"SELECT {_COLUMNS} FROM messages WHERE NOT final AND updated_at < %s AND status_at < %s"
    " ORDER BY updated_at, umid LIMIT %s"
)
POSTGRES_CANDIDATES_AFTER = (
    f"SELECT {_COLUMNS} FROM messages WHERE NOT final AND updated_at < %s AND status_at < %s"
    " AND (updated_at, umid) > (%s, %s) ORDER BY updated_at, umid LIMIT %s"
)


def candidate_rows(
    store: Store, cutoff: datetime, *, after: tuple[datetime, str] | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    """Rows of `messages` not final with `updated_at` and `status_at` before `cutoff`, ordered by
    (updated_at, umid), starting after the `after` key; at most `limit`. Read-only.

    Uses the store's own connection (`SqliteStore._read`, `PostgresStore._run`) until the Store protocol
    has a method for it; raises TypeError for another store, TransientError when the database is away.
    """
    own = getattr(store, "reconcile_candidates", None)
    if callable(own):
        return list(own(cutoff, after=after, limit=limit))
    from sinks.sqlite import SqliteStore, to_text

    if isinstance(store, SqliteStore):
        c = to_text(cutoff)
        if after is None:
            return store._read(SQLITE_CANDIDATES, (c, c, limit))
        a = to_text(after[0])
        return store._read(SQLITE_CANDIDATES_AFTER, (c, c, a, a, after[1], limit))
    from sinks.postgres import PostgresStore

    if isinstance(store, PostgresStore):
        params: tuple[Any, ...]
        if after is None:
            sql, params = POSTGRES_CANDIDATES, (cutoff, cutoff, limit)
        else:
            sql, params = POSTGRES_CANDIDATES_AFTER, (cutoff, cutoff, after[0], after[1], limit)
        return store._run(lambda conn: conn.execute(sql, params).fetchall())
    raise TypeError(f"cannot list reconcile candidates of {store!r}")


def scan_candidates(
    store: Store,
    now: datetime,
    reconcile_after: float,
    schedule: CheckSchedule | None,
    *,
    per_subaccount: int,
    limit: int,
    page_size: int = 1000,
) -> list[Candidate]:
    """The due candidates (`processors.reconcile.select_candidates`), paging through the store until
    `limit` are found or the rows run out; at most `per_subaccount` per subaccount."""
    cutoff = now - timedelta(seconds=reconcile_after)
    picked: list[Candidate] = []
    counts: dict[str, int] = defaultdict(int)
    after: tuple[datetime, str] | None = None
    while len(picked) < limit:
        rows = candidate_rows(store, cutoff, after=after, limit=page_size)
        for c in select_candidates(rows, now, reconcile_after, schedule):
            if counts[c.sub_account_id] < per_subaccount and len(picked) < limit:
                counts[c.sub_account_id] += 1
                picked.append(c)
        if len(rows) < page_size:
            break
        after = (rows[-1]["updated_at"], rows[-1]["umid"])
    return picked


# --- the service -----------------------------------------------------------------------------------


@dataclass
class PassReport:
    candidates: int = 0
    requests: int = 0
    receipts: int = 0
    outcomes: dict[str, int] | None = None


class Reconciler:
    """One reconciler: `await start()`, then `await run_pass()` (tests) or `await run(stop)`; `await
    close()`. Everything it needs can be injected (store, codecs, HTTP client, clocks) for tests."""

    def __init__(
        self,
        settings: Settings,
        *,
        config: ReconcilerConfig | None = None,
        store: Store | None = None,
        codecs: Codecs | None = None,
        http: httpx.AsyncClient | None = None,
        metrics_registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not settings.api_8x8_key:
            raise ValueError("CHATPIPE_8X8_API_KEY is not set: the reconciler has nothing to call")
        if settings.reconcile_after <= 0:
            raise ValueError("CHATPIPE_RECONCILE_AFTER must be > 0")
        self.settings = settings
        self.config = cfg = config or ReconcilerConfig()
        self._own_store = store is None
        if store is None:
            from sinks.worker import pii_policy

            store = open_store(settings.store_url, pii_policy(settings))
        self.store = store
        self.codecs = codecs or Codecs.connect(settings.schema_registry_url)
        self._own_http = http is None
        self.http = http or httpx.AsyncClient(
            timeout=cfg.timeout,
            limits=httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency),
        )
        self.base_url = settings.api_8x8_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {settings.api_8x8_key}", "Accept": "application/json"}
        self.metrics_registry = metrics_registry or CollectorRegistry()
        self.metrics = ReconcilerMetrics(self.metrics_registry)
        self.limiter = RateLimiter(cfg.request_interval)
        self.schedule = CheckSchedule(
            base=timedelta(seconds=settings.reconcile_after),
            not_found_after=timedelta(seconds=cfg.not_found_after),
            max_backoff=timedelta(seconds=cfg.max_backoff),
        )
        self.clock = clock
        self.wall_clock = wall_clock
        self.passes = 0
        self.last_pass_at: datetime | None = None
        self._stop = asyncio.Event()
        self._sem: asyncio.Semaphore | None = None
        self._producer: AsyncProducer | None = None

    # --- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Register the receipt schema (waiting for the registry until stopped), start the producer."""
        self._sem = asyncio.Semaphore(self.config.concurrency)
        delay = 0.5
        while True:
            try:
                await asyncio.to_thread(lambda: self.codecs.receipts.schema_id)
                break
            except ChatpipeError as exc:
                if not exc.retriable:
                    raise
                if self._stop.is_set():
                    return  # stopped before the registry came: run() does nothing, close() is safe
                log.warning("schema registry not ready, retrying in %.1fs: %s", delay, exc)
                await self._sleep(delay)
                delay = min(delay * 2, 10.0)
        self._producer = AsyncProducer(producer_config(self.settings.kafka_bootstrap))
        self._producer.start()

    def stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        if self._producer is not None:
            left = self._producer.close(10.0)
            self._producer = None
            if left:
                log.error("reconciler closed with %d receipts not acknowledged topic=%s", left, RECEIPTS.name)
        if self._own_http:
            await self.http.aclose()
        if self._own_store:
            self.store.close()

    async def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Passes every `interval` seconds until `stop()`. A failed pass (store or broker away) is logged
        and the next one tries again."""
        await self.start()
        if on_ready is not None:
            on_ready()
        while not self._stop.is_set():
            started = self.clock()
            try:
                await self.run_pass()
            except Exception:
                log.exception("reconcile pass failed; next pass in %.0fs", self.config.interval)
            await self._sleep(self.config.interval - (self.clock() - started))

    async def _sleep(self, seconds: float) -> None:
        """Sleep, returning early on stop()."""
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    # --- one pass -----------------------------------------------------------------------------------

    async def run_pass(self) -> PassReport:
        """Scan, look up every due candidate (subaccounts in parallel), produce the receipts."""
        assert self._sem is not None and self._producer is not None, "start() first"
        cfg = self.config
        now = self.wall_clock()
        candidates = await asyncio.to_thread(
            scan_candidates,
            self.store,
            now,
            self.settings.reconcile_after,
            self.schedule,
            per_subaccount=cfg.per_subaccount,
            limit=cfg.per_pass,
            page_size=cfg.page_size,
        )
        self.metrics.candidates.set(len(candidates))
        report = PassReport(candidates=len(candidates), outcomes=defaultdict(int))
        by_sub: dict[str, list[Candidate]] = defaultdict(list)
        for c in candidates:
            by_sub[c.sub_account_id].append(c)
        if candidates:
            log.info("reconcile pass candidates=%d subaccounts=%d", len(candidates), len(by_sub))
        await asyncio.gather(*(self._subaccount(sub, queue, report) for sub, queue in by_sub.items()))
        self.limiter.prune(self.clock())
        self.passes += 1
        self.last_pass_at = self.wall_clock()
        self.metrics.last_pass.set(self.last_pass_at.timestamp())
        if candidates:
            log.info(
                "reconcile pass done candidates=%d requests=%d receipts=%d outcomes=%s",
                report.candidates,
                report.requests,
                report.receipts,
                ",".join(f"{k}:{v}" for k, v in sorted((report.outcomes or {}).items())),
            )
        return report

    async def _subaccount(self, sub: str, queue: Sequence[Candidate], report: PassReport) -> None:
        for c in queue:
            if self._stop.is_set():
                return
            outcome = await self._lookup(c, report)
            assert report.outcomes is not None
            report.outcomes[outcome] += 1
            self.metrics.lookups.labels(outcome).inc()
            self.schedule.record(c.umid, outcome, self.wall_clock())

    async def _request(self, sub: str, url: str) -> httpx.Response | Exception | None:
        """One GET once `sub`'s bucket has a token and a global slot is free; the token is taken right
        before sending, holding the slot, so two sends of one subaccount are never closer than the bucket
        allows. Transport errors are returned, not raised; None when stopped while waiting."""
        assert self._sem is not None
        while True:
            wait = self.limiter.wait_time(sub, self.clock())
            if wait > 0:
                self.metrics.rate_limited_waits.labels("bucket").inc()
                await self._sleep(wait)
                if self._stop.is_set():
                    return None
                continue
            async with self._sem:
                if self.limiter.acquire(sub, self.clock()) > 0:
                    continue
                try:
                    return await self.http.get(url, headers=self._headers)
                except httpx.HTTPError as exc:
                    return exc

    async def _lookup(self, c: Candidate, report: PassReport) -> str:
        sub, umid = c.sub_account_id, c.umid
        url = self.base_url + DETAILS_PATH.format(sub=quote(sub, safe=""), umid=quote(umid, safe=""))
        failures = limited = 0
        delay = self.config.backoff
        while True:
            answer = await self._request(sub, url)
            if answer is None:
                return Outcome.FAILED
            report.requests += 1
            if isinstance(answer, Exception):
                label = "timeout" if isinstance(answer, httpx.TimeoutException) else "error"
                self.metrics.requests.labels(label).inc()
                problem = f"{type(answer).__name__}: {answer}"
            else:
                status = answer.status_code
                self.metrics.requests.labels(str(status)).inc()
                if status == 200:
                    return await self._answered(c, answer.content, report)
                if status == 404:
                    log.info("reconcile unknown at 8x8 sub=%s umid=%s: %s", sub, umid, _message(answer))
                    return Outcome.NOT_FOUND
                if status == 429:
                    limited += 1
                    seconds = parse_retry_after(_message(answer), default=_retry_after_header(answer))
                    self.limiter.block(sub, self.clock(), seconds)
                    self.metrics.rate_limited_waits.labels("quota").inc()
                    log.warning("reconcile 429 sub=%s umid=%s: waiting %.1fs", sub, umid, seconds)
                    if limited > self.config.max_rate_limited:
                        return Outcome.FAILED
                    continue
                if status < 500:
                    log.warning(
                        "reconcile refused status=%d sub=%s umid=%s: %s", status, sub, umid, _message(answer)
                    )
                    return Outcome.REJECTED
                problem = f"HTTP {status}: {_message(answer)}"
            failures += 1
            if failures >= self.config.max_attempts:
                log.warning(
                    "reconcile gave up sub=%s umid=%s after %d attempts: %s", sub, umid, failures, problem
                )
                return Outcome.FAILED
            log.info("reconcile retry sub=%s umid=%s in %.1fs: %s", sub, umid, delay, problem)
            await self._sleep(delay)
            if self._stop.is_set():
                return Outcome.FAILED
            delay = min(delay * 2, self.config.backoff_max)

    async def _answered(self, c: Candidate, body: bytes, report: PassReport) -> str:
        try:
            receipts = details_to_receipts(
                c.sub_account_id, c.umid, body, self.wall_clock(), known_channels=c.channels
            )
        except InvalidEvent as exc:
            log.error("reconcile unreadable answer sub=%s umid=%s: %s", c.sub_account_id, c.umid, exc.reason)
            return Outcome.INVALID
        if not receipts:
            return Outcome.NOT_FOUND
        try:
            await self._produce(receipts)
        except ProduceFailed as exc:
            log.error("reconcile produce failed topic=%s umid=%s: %s", RECEIPTS.name, c.umid, exc)
            return Outcome.FAILED
        report.receipts += len(receipts)
        self.metrics.receipts.inc(len(receipts))
        log.info(
            "reconciled sub=%s umid=%s steps=%s",
            c.sub_account_id,
            c.umid,
            ">".join(f"{r.channel}:{r.status.state}" for r in receipts),
        )
        return Outcome.RECEIPTS

    async def _produce(self, receipts: Sequence[DeliveryReceipt]) -> None:
        assert self._producer is not None
        codec = self.codecs.receipts
        futures = [self._producer.publish(RECEIPTS.name, r.umid.encode(), codec.encode(r)) for r in receipts]
        await asyncio.gather(*futures)

    # --- health -------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "passes": self.passes,
            "lastPassAt": None if self.last_pass_at is None else self.last_pass_at.isoformat(),
            "scheduled": len(self.schedule),
        }


def _message(response: httpx.Response) -> str:
    """8x8's error `message` (or the start of the body)."""
    try:
        doc = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return response.text[:200]
    if isinstance(doc, dict) and isinstance(doc.get("message"), str):
        return doc["message"]
    return response.text[:200]


def _retry_after_header(response: httpx.Response) -> float:
    try:
        return max(1.0, float(response.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


def create_health_app(reconciler: Reconciler) -> Any:
    """/healthz and /metrics of a reconciler (aiohttp)."""
    from aiohttp import web

    async def healthz(_r: web.Request) -> web.Response:
        return web.json_response(reconciler.health())

    async def metrics(_r: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(reconciler.metrics_registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


async def serve(settings: Settings, on_ready: Callable[[], None] | None = None) -> None:
    """Run a reconciler (and its /healthz, /metrics on `metrics_port` when set) until SIGINT/SIGTERM."""
    from aiohttp import web

    reconciler = Reconciler(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, reconciler.stop)
    runner = None
    if settings.metrics_port:
        runner = web.AppRunner(create_health_app(reconciler), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, settings.api_host, settings.metrics_port).start()
        log.info("reconciler metrics on http://%s:%d", settings.api_host, settings.metrics_port)
    log.info(
        "reconciler on api=%s reconcile_after=%.0fs interval=%.0fs",
        settings.api_8x8_url,
        settings.reconcile_after,
        reconciler.config.interval,
    )
    try:
        await reconciler.run(on_ready)
    finally:
        await reconciler.close()
        if runner is not None:
            await runner.cleanup()
        log.info("reconciler stopped")


def run_reconciler(settings: Settings, on_ready: Callable[[], None] | None = None) -> int:
    """Entry point of `chatpipe reconcile`: 0 on a clean stop (SIGINT/SIGTERM) or when switched off."""
    if not settings.api_8x8_key:
        log.info("reconciler off: CHATPIPE_8X8_API_KEY is not set")
        return 0
    from chatpipe.serve import run

    run(serve(settings, on_ready), settings.event_loop)
    return 0
