"""`chatpipe reconcile`: ask 8x8 about messages whose receipts stopped coming. The I/O shell.

Every `interval` seconds a pass:
1. lists from the store (`Store.reconcile_candidates`: an index of open messages, oldest first, paged) the
   messages not final whose last change (`status_at` and `updated_at`) is older than
   `CHATPIPE_RECONCILE_AFTER` seconds and that are due (never looked up, or their `next_due` passed: a
   looked-up umid waits longer each time, a 404 hours);
2. takes a lease on their subaccounts (`Store.lease_subaccounts`, `lease` seconds, renewed while in use):
   only the process holding a subaccount's lease looks up its umids, so two reconcilers never ask about
   the same umid at once nor share a subaccount's quota. Having the lease, it lists that subaccount's due
   umids again (a lookup recorded by the previous holder is seen: it is recorded before the lease is given
   up), looks each one up, records the outcome (`Store.record_lookups`: outcome, attempts, next due time,
   what 8x8 said of each step) and releases the lease when done. The schedule lives in the store, so a
   restart does not ask again what was just asked;
3. looks each one up with `GET {CHATPIPE_8X8_API_URL}/api/v1/subaccounts/{sub}/messages/{umid}`
   (`Authorization: Bearer CHATPIPE_8X8_API_KEY`): one sequential queue per subaccount, all subaccounts in
   parallel under a global cap of requests in flight. Spacing (`processors.reconcile.Pacer`): the next
   request of a subaccount is sent 1 s + `CHATPIPE_RECONCILE_MARGIN` after the ANSWER to the previous
   one, so network jitter cannot make two arrive at 8x8 closer than 1 s. A 429 is honoured (the longer
   of its "try again in N second(s)" and `Retry-After`) and opens a circuit that slows the subaccount down
   until a quiet cooldown. 5xx, timeouts and connection errors are retried with exponential backoff,
   `max_attempts` in all; a 404 is recorded ("unknown at 8x8") and not retried for hours; other 4xx are
   logged and not retried soon;
4. produces each answer's synthetic delivery receipts (`processors.reconcile.details_to_receipts`) to
   `chatpipe.receipts.raw`, keyed by umid, with chatpipe's Avro codec, acks=all and idempotence (unless
   CHATPIPE_KAFKA_IDEMPOTENCE=0, as on dev's disk broker); the state processor folds them like webhooks
   (states never regress). What receipts cannot carry (8x8's step
   numbers, channelId, country, contentType, createdAt) goes to the store with the lookup and fills the
   read API's answer.

Leases compare the reconcilers' wall clocks: they must agree to well within `lease` (NTP does). /healthz and
/metrics are served on `CHATPIPE_METRICS_PORT` (off when 0). Without `CHATPIPE_8X8_API_KEY` the command
logs "reconciler off" and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import orjson
from prometheus_client import CollectorRegistry

from chatpipe.runtime.config import Settings
from chatpipe.runtime.metric_defs import ReconcilerMetrics
from ingest.publisher import AsyncProducer, ProduceFailed, producer_config
from processors.reconcile import (
    LIMIT_INTERVAL,
    Candidate,
    Outcome,
    Pacer,
    details_to_receipts,
    next_check,
    parse_retry_after,
    select_candidates,
    step_details,
)
from schemas.catalog import RECEIPTS
from schemas.codec import Codecs
from schemas.errors import ChatpipeError, InvalidEvent
from schemas.models import DeliveryReceipt
from sinks.connect import open_store
from sinks.store import LookupRecord, Store

log = logging.getLogger(__name__)

DETAILS_PATH = "/api/v1/subaccounts/{sub}/messages/{umid}"


@dataclass(frozen=True)
class ReconcilerConfig:
    """Tuning beyond docs/interface.md (defaults suit 8x8's documented limits)."""

    interval: float = 30.0  # seconds between the starts of two passes
    concurrency: int = 16  # requests in flight over all subaccounts
    margin: float = 0.05  # seconds added to 8x8's 1 s between an answer and the next request
    slow_factor: float = 2.0  # after a 429: spacing x this (doubling per further 429) ...
    cooldown: float = 60.0  # ... until this long without a 429
    timeout: float = 10.0  # per request
    max_attempts: int = 4  # per lookup, for 5xx / timeouts / connection errors
    max_rate_limited: int = 5  # 429s per lookup before it is left for a later pass
    backoff: float = 0.5  # first retry delay; doubles up to backoff_max
    backoff_max: float = 30.0
    per_subaccount: int = 300  # lookups per subaccount per pass (about 5.5 min at ~1/s)
    per_pass: int = 10_000
    page_size: int = 1000  # rows per candidate query
    lease: float = 120.0  # seconds a subaccount lease lasts; renewed at half-life while in use
    flush_every: float = 1.0  # seconds between writes of finished lookups to the store
    not_found_after: float = 6 * 3600.0  # a 404 (or unreadable answer) is asked again after this, growing
    max_backoff: float = 24 * 3600.0

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.timeout <= 0 or self.margin < 0:
            raise ValueError("interval and timeout must be positive, margin >= 0")
        if self.concurrency < 1 or self.max_attempts < 1 or self.per_subaccount < 1 or self.per_pass < 1:
            raise ValueError("concurrency, max_attempts, per_subaccount and per_pass must be >= 1")
        if self.page_size < 1 or self.max_rate_limited < 0:
            raise ValueError("page_size must be >= 1 and max_rate_limited >= 0")
        if self.lease < 4 * self.timeout:
            raise ValueError("lease must be at least 4 x timeout (a request must end within a lease)")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ReconcilerConfig:
        values: dict[str, Any] = {
            "interval": settings.reconcile_interval,
            "margin": settings.reconcile_margin,
        }
        values.update(overrides)
        return cls(**values)


# --- candidates from the store ---------------------------------------------------------------------


def scan_candidates(
    store: Store,
    now: datetime,
    reconcile_after: float,
    *,
    per_subaccount: int,
    limit: int,
    page_size: int = 1000,
    sub_account_id: str | None = None,
) -> list[Candidate]:
    """The due candidates (`Store.reconcile_candidates` through `processors.reconcile.select_candidates`),
    paging through the store until `limit` are found or the rows run out; at most `per_subaccount` per
    subaccount; of one subaccount when given."""
    cutoff = now - timedelta(seconds=reconcile_after)
    picked: list[Candidate] = []
    counts: dict[str, int] = defaultdict(int)
    after: tuple[datetime, str] | None = None
    while len(picked) < limit:
        rows = store.reconcile_candidates(
            cutoff, now, sub_account_id=sub_account_id, after=after, limit=page_size
        )
        for c in select_candidates(rows, now, reconcile_after):
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
    rate_limited: int = 0  # 429s received
    outcomes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    skipped_subaccounts: int = 0  # leased by another reconciler


class Reconciler:
    """One reconciler: `await start()`, then `await run_pass()` (tests) or `await run()`; `await close()`.
    Everything it needs can be injected (store, codecs, HTTP client, clocks) for tests."""

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
        owner: str | None = None,
    ) -> None:
        if not settings.api_8x8_key:
            raise ValueError("CHATPIPE_8X8_API_KEY is not set: the reconciler has nothing to call")
        if settings.reconcile_after <= 0:
            raise ValueError("CHATPIPE_RECONCILE_AFTER must be > 0")
        self.settings = settings
        self.config = cfg = config or ReconcilerConfig.from_settings(settings)
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
        self.pacer = Pacer(LIMIT_INTERVAL, cfg.margin, slow_factor=cfg.slow_factor, cooldown=cfg.cooldown)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.clock = clock
        self.wall_clock = wall_clock
        self.passes = 0
        self.last_pass_at: datetime | None = None
        self._stop = asyncio.Event()
        self._sem: asyncio.Semaphore | None = None
        self._producer: AsyncProducer | None = None
        self._pending: list[LookupRecord] = []
        self._leases: dict[str, datetime] = {}  # subaccount -> when our lease ends

    # --- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Register the receipt schema (waiting for the registry until stopped), start the producer."""
        self._sem = asyncio.Semaphore(self.config.concurrency)
        if self._own_store:  # the reconciler's tables (idempotent; the sink and the API migrate too)
            await asyncio.to_thread(self.store.migrate)
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
        self._producer = AsyncProducer(producer_config(self.settings))
        self._producer.start()

    def stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._flush()
        if self._leases:
            with contextlib.suppress(Exception):
                await self._release(list(self._leases))
            self._leases.clear()
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

    def _scan(self, now: datetime, sub_account_id: str | None = None) -> list[Candidate]:
        cfg = self.config
        return scan_candidates(
            self.store,
            now,
            self.settings.reconcile_after,
            per_subaccount=cfg.per_subaccount,
            limit=cfg.per_subaccount if sub_account_id else cfg.per_pass,
            page_size=cfg.page_size,
            sub_account_id=sub_account_id,
        )

    async def run_pass(self) -> PassReport:
        """Scan, lease the subaccounts with due candidates, look them up (subaccounts in parallel), produce
        the receipts, record the lookups, release the leases."""
        assert self._sem is not None and self._producer is not None, "start() first"
        now = self.wall_clock()
        candidates = await asyncio.to_thread(self._scan, now)
        report = PassReport()
        subs = list(dict.fromkeys(c.sub_account_id for c in candidates))  # oldest candidate first
        held = await self._lease(subs) if subs else []
        report.skipped_subaccounts = len(subs) - len(held)
        if candidates:
            log.info(
                "reconcile pass candidates=%d subaccounts=%d leased=%d",
                len(candidates),
                len(subs),
                len(held),
            )
        flusher = asyncio.create_task(self._flush_periodically())
        try:
            await asyncio.gather(*(self._subaccount(sub, report) for sub in held))
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            await self._flush()
        self.metrics.candidates.set(report.candidates)
        self.pacer.prune(self.clock())
        self.metrics.slowed.set(sum(1 for s in subs if self.pacer.slowed(s, self.clock())))
        self.passes += 1
        self.last_pass_at = self.wall_clock()
        self.metrics.last_pass.set(self.last_pass_at.timestamp())
        if candidates:
            log.info(
                "reconcile pass done candidates=%d requests=%d receipts=%d 429s=%d outcomes=%s",
                report.candidates,
                report.requests,
                report.receipts,
                report.rate_limited,
                ",".join(f"{k}:{v}" for k, v in sorted(report.outcomes.items())),
            )
        return report

    async def _lease(self, subs: list[str]) -> list[str]:
        now = self.wall_clock()
        until = now + timedelta(seconds=self.config.lease)
        held = await asyncio.to_thread(self.store.lease_subaccounts, self.owner, subs, now, until)
        for sub in held:
            self._leases[sub] = until
        return held

    async def _holds(self, sub: str) -> bool:
        """Whether we still hold `sub`'s lease for one more request, renewed at half-life. A lease with
        less than 2 timeouts left counts as lost (a request could outlive it; another reconciler may take
        it next): the subaccount is left for a later pass."""
        until = self._leases.get(sub)
        if until is None:
            return False
        left = (until - self.wall_clock()).total_seconds()
        if left > self.config.lease / 2:
            return True
        if left <= 2 * self.config.timeout:
            self._leases.pop(sub, None)
            log.warning("reconcile lease of sub=%s ran out; leaving it for a later pass", sub)
            return False
        return bool(await self._lease([sub]))

    async def _release(self, subs: list[str]) -> None:
        """Give up our leases of `subs`, each ending when its next request may be sent (by the pacer):
        another reconciler taking it over cannot then exceed 8x8's limit either."""
        now_m, now_w = self.clock(), self.wall_clock()
        by_time: dict[datetime, list[str]] = defaultdict(list)
        for sub in subs:
            if self._leases.pop(sub, None) is not None:
                wait = self.pacer.wait_time(sub, now_m)
                wait = self.pacer.spacing(sub, now_m) if wait == float("inf") else wait
                by_time[now_w + timedelta(seconds=wait)].append(sub)
        for free_at, group in by_time.items():
            await asyncio.to_thread(self.store.release_subaccounts, self.owner, group, free_at)

    async def _subaccount(self, sub: str, report: PassReport) -> None:
        try:
            # the due umids as seen now that we hold the lease: what an earlier holder recorded is out
            queue = await asyncio.to_thread(self._scan, self.wall_clock(), sub)
            report.candidates += len(queue)
            for c in queue:
                if self._stop.is_set():
                    return
                outcome, details = await self._lookup(c, report)
                if outcome is None:
                    return
                report.outcomes[outcome] += 1
                self.metrics.lookups.labels(outcome).inc()
                at = self.wall_clock()
                n, next_due = next_check(
                    c.attempts,
                    outcome,
                    at,
                    base=timedelta(seconds=self.settings.reconcile_after),
                    not_found_after=timedelta(seconds=self.config.not_found_after),
                    max_backoff=timedelta(seconds=self.config.max_backoff),
                )
                self._pending.append(LookupRecord(c.umid, sub, n, outcome, at, next_due, details))
        finally:
            await self._flush()  # recorded before the lease is given up: the next holder sees it
            await self._release([sub])

    async def _flush(self) -> None:
        if self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self.store.record_lookups, batch)
            except BaseException:
                self._pending[:0] = batch
                raise

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.flush_every)
            try:
                await self._flush()
            except ChatpipeError as exc:
                log.warning("reconcile could not record lookups yet: %s", exc)

    async def _request(self, sub: str, url: str) -> httpx.Response | Exception | None:
        """One GET once `sub` may send (the pacer) and a global slot is free; the pacer learns when the
        answer came (and whether it was a 429). Transport errors are returned, not raised; None when
        stopped while waiting."""
        assert self._sem is not None
        while True:
            wait = self.pacer.wait_time(sub, self.clock())
            if wait > 0:
                self.metrics.rate_limited_waits.labels("spacing").inc()
                await self._sleep(wait)
                if self._stop.is_set():
                    return None
                continue
            if not await self._holds(sub):
                return None
            async with self._sem:
                if not self.pacer.acquire(sub, self.clock()):
                    continue
                retry_after: float | None = None
                try:
                    answer = await self.http.get(url, headers=self._headers)
                    if answer.status_code == 429:
                        retry_after = retry_after_seconds(answer)
                    return answer
                except httpx.HTTPError as exc:
                    return exc
                finally:
                    self.pacer.done(sub, self.clock(), retry_after)

    async def _lookup(
        self, c: Candidate, report: PassReport
    ) -> tuple[str | None, list[dict[str, Any]] | None]:
        """(outcome, what 8x8 said of the steps); outcome None when abandoned (stop, lease lost)."""
        sub, umid = c.sub_account_id, c.umid
        url = self.base_url + DETAILS_PATH.format(sub=quote(sub, safe=""), umid=quote(umid, safe=""))
        failures = limited = 0
        delay = self.config.backoff
        while True:
            answer = await self._request(sub, url)
            if answer is None:  # stopped, or the lease lost: left as it was, nothing recorded
                return None, None
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
                    return Outcome.NOT_FOUND, None
                if status == 429:
                    limited += 1
                    report.rate_limited += 1
                    self.metrics.rate_limited_waits.labels("quota").inc()
                    log.warning(
                        "reconcile 429 sub=%s umid=%s: waiting %.1fs, then slower for %.0fs: %s",
                        sub,
                        umid,
                        retry_after_seconds(answer),
                        self.config.cooldown,
                        _message(answer),
                    )
                    if limited > self.config.max_rate_limited:
                        return Outcome.FAILED, None
                    continue
                if status < 500:
                    log.warning(
                        "reconcile refused status=%d sub=%s umid=%s: %s", status, sub, umid, _message(answer)
                    )
                    return Outcome.REJECTED, None
                problem = f"HTTP {status}: {_message(answer)}"
            failures += 1
            if failures >= self.config.max_attempts:
                log.warning(
                    "reconcile gave up sub=%s umid=%s after %d attempts: %s", sub, umid, failures, problem
                )
                return Outcome.FAILED, None
            log.info("reconcile retry sub=%s umid=%s in %.1fs: %s", sub, umid, delay, problem)
            await self._sleep(delay)
            if self._stop.is_set():
                return Outcome.FAILED, None
            delay = min(delay * 2, self.config.backoff_max)

    async def _answered(
        self, c: Candidate, body: bytes, report: PassReport
    ) -> tuple[str, list[dict[str, Any]] | None]:
        try:
            receipts = details_to_receipts(
                c.sub_account_id, c.umid, body, self.wall_clock(), known_channels=c.channels
            )
        except InvalidEvent as exc:
            log.error("reconcile unreadable answer sub=%s umid=%s: %s", c.sub_account_id, c.umid, exc.reason)
            return Outcome.INVALID, None
        if not receipts:
            return Outcome.NOT_FOUND, None
        try:
            await self._produce(receipts)
        except ProduceFailed as exc:
            log.error("reconcile produce failed topic=%s umid=%s: %s", RECEIPTS.name, c.umid, exc)
            return Outcome.FAILED, None
        report.receipts += len(receipts)
        self.metrics.receipts.inc(len(receipts))
        log.info(
            "reconciled sub=%s umid=%s steps=%s",
            c.sub_account_id,
            c.umid,
            ">".join(f"{r.channel}:{r.status.state}" for r in receipts),
        )
        return Outcome.RECEIPTS, step_details(receipts)

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
            "owner": self.owner,
            "leases": len(self._leases),
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


def retry_after_seconds(response: httpx.Response) -> float:
    """How long a 429 asks to wait: the longer of 8x8's "try again in N second(s)" and a `Retry-After`
    header in seconds; 1 s when neither says."""
    said = parse_retry_after(_message(response), default=-1.0)
    with contextlib.suppress(ValueError):
        said = max(said, min(float(response.headers.get("Retry-After", "-1")), 3600.0))
    return said if said >= 0 else LIMIT_INTERVAL


def create_health_app(reconciler: Reconciler) -> Any:
    """/healthz and /metrics of a reconciler (aiohttp)."""
    from aiohttp import web

    from chatpipe.runtime.serve import add_health_routes

    app = web.Application()
    add_health_routes(app, reconciler.metrics_registry, lambda: (True, reconciler.health()))
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
        "reconciler on api=%s reconcile_after=%.0fs interval=%.0fs margin=%.3fs owner=%s",
        settings.api_8x8_url,
        settings.reconcile_after,
        reconciler.config.interval,
        reconciler.config.margin,
        reconciler.owner,
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
    from chatpipe.runtime.serve import run

    run(serve(settings, on_ready), settings.event_loop)
    return 0
