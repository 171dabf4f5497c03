"""Ingest through broker outages of any length: the spool takes over, drains once the broker is back, and a
spool that stops draining is reported (readiness, metrics, an ERROR log) instead of stopping silently.

Each test gets its own Tansu broker; SIGSTOP is the outage (connections stay open, nothing is answered),
SIGCONT its end. On Tansu an outage longer than librdkafka's `message.timeout.ms` (10 s) leaves the
idempotent producer fenced for good (issue 20): only a new producer gets through.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from chatpipe.broker import free_port, start_tansu, wait_for_port
from chatpipe.runtime.config import Settings
from chatpipe.runtime.serve import start_site
from chatpipe.runtime.topics import ensure_topics
from ingest.app import INTAKE, create_app, fast_dispatch
from ingest.publisher import AsyncProducer, ProduceFailed, producer_config
from schemas.catalog import RECEIPTS
from schemas.codec import Codecs
from tests.fixtures.webhooks import load
from tests.support.kafka import discard_broker, read_topic

pytestmark = pytest.mark.integration
URL = "/v1/webhooks/chatapps"
JSON = {"Content-Type": "application/json"}
TEMPLATE = json.loads(load("dr_v9_whatsapp_delivered_text"))


def receipt(umid: str) -> bytes:
    doc = json.loads(json.dumps(TEMPLATE))
    doc["payload"]["umid"] = umid
    return json.dumps(doc).encode()


@dataclass
class Broker:
    bootstrap: str
    proc: subprocess.Popen[bytes]

    def pause(self) -> None:
        """SIGSTOP, and return once every thread stopped (kill returns before they do)."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        tasks = Path(f"/proc/{self.proc.pid}/task")
        deadline = time.monotonic() + 10
        while not all(self._stopped(t) for t in tasks.iterdir()):
            assert time.monotonic() < deadline, "tansu did not stop"
            time.sleep(0.001)

    @staticmethod
    def _stopped(task: Path) -> bool:
        try:
            return (task / "stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
        except FileNotFoundError:  # the thread ended
            return True

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)


@pytest.fixture()
def broker_of_own(tmp_path: Path) -> Iterator[Broker]:
    port = free_port()
    proc = start_tansu("127.0.0.1", port, tmp_path / "tansu.log")
    broker = Broker(f"127.0.0.1:{port}", proc)
    ensure_topics(broker.bootstrap, partitions=4)
    try:
        yield broker
    finally:
        discard_broker(proc)


@dataclass
class Ingest:
    """The ingest app served on a real port, as `chatpipe ingest` serves it (`app` when in this process)."""

    app: web.Application | None
    session: aiohttp.ClientSession

    async def ready(self) -> tuple[int, dict[str, Any]]:
        async with self.session.get("/readyz") as r:
            return r.status, await r.json()

    async def metrics(self) -> dict[str, float]:
        """Samples by `name` or `name{label="value"}`."""
        async with self.session.get("/metrics") as r:
            text = await r.text()
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    async def becomes(self, status: int, timeout: float, drained: bool = False) -> bool:
        """Whether /readyz answers `status` (and, with `drained`, an empty spool) within `timeout` s."""

        async def there() -> bool:
            got, body = await self.ready()
            return got == status and (not drained or body["spoolDepth"] == 0)

        return await wait_until(there, timeout)

    async def post_receipts(self, n: int) -> Load:
        load = Load(self, rate=0)
        await asyncio.gather(*(load.post(str(uuid.uuid4())) for _ in range(n)))
        return load


def client_session(port: int) -> aiohttp.ClientSession:
    # open-loop load: a request per tick whatever the answers take (up to 3 s while Kafka is away). A
    # connection per request: a reused one could be closed by the server's 10 s header timeout just as a
    # request goes out (a client starved of CPU is late to close its idle ones), which says nothing of ingest
    return aiohttp.ClientSession(
        f"http://127.0.0.1:{port}",
        connector=aiohttp.TCPConnector(limit=4000, force_close=True),
        timeout=aiohttp.ClientTimeout(total=60),
    )


@pytest.fixture()
async def serve(tmp_path: Path) -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(settings: Settings) -> Ingest:
        app = create_app(settings)
        port = free_port()
        runners.append(await start_site(app, "127.0.0.1", port, dispatch=fast_dispatch))
        session = client_session(port)
        sessions.append(session)
        return Ingest(app, session)

    yield start
    for session in sessions:
        await session.close()
    for runner in runners:
        await runner.cleanup()


@dataclass
class Load:
    """Receipts posted at a steady rate; who got a 2xx and who did not."""

    ingest: Ingest
    rate: float
    acked: set[str] = field(default_factory=set)
    refused: list[tuple[str, int]] = field(default_factory=list)  # ingest answered, not 2xx
    #: no answer (the connection dropped): not acknowledged, so ingest owes nothing, but it may have kept them
    unanswered: set[str] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def post(self, umid: str) -> None:
        try:
            async with self.ingest.session.post(URL, data=receipt(umid), headers=JSON) as r:
                await r.read()
                if 200 <= r.status < 300:
                    self.acked.add(umid)
                else:
                    self.refused.append((umid, r.status))
        except (aiohttp.ClientError, TimeoutError):
            self.unanswered.add(umid)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        start, sent = loop.time(), 0
        while not self._stop.is_set():
            due = int((loop.time() - start) * self.rate) + 1
            for _ in range(due - sent):
                task = loop.create_task(self.post(str(uuid.uuid4())))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            sent = max(sent, due)
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stop.set()
        while self._tasks:
            await asyncio.gather(*list(self._tasks))


def settings_for(broker: Broker, registry_url: str, state_dir: Path, **kw: Any) -> Settings:
    return Settings(
        kafka_bootstrap=broker.bootstrap,
        schema_registry_url=registry_url,
        state_dir=state_dir,
        partitions=4,
        **kw,
    )


def umids_in(bootstrap: str, registry_url: str) -> list[str]:
    codec = Codecs.connect(registry_url).receipts
    return [codec.decode(m.value()).umid for m in read_topic(bootstrap, RECEIPTS.name, timeout=120, idle=5)]


async def wait_until(what: Any, timeout: float, every: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await what():
            return True
        await asyncio.sleep(every)
    return False


@pytest.mark.timeout(120)
async def test_replace_fails_every_record_the_old_producer_held_and_the_new_one_delivers(
    broker_of_own: Broker,
) -> None:
    producer = AsyncProducer(producer_config(broker_of_own.bootstrap))
    producer.start()
    causes: list[str] = []
    producer.on_replace = causes.append
    try:
        await asyncio.wait_for(producer.publish(RECEIPTS.name, b"k", b"before"), 20)
        broker_of_own.pause()
        held = [producer.publish(RECEIPTS.name, b"k", b"held %d" % i) for i in range(100)]
        await asyncio.sleep(0.5)
        early = [f.exception() or "delivered" for f in held if f.done()]
        assert not early, f"{len(early)} held records done before the replacement, e.g. {early[:3]}"
        producer.replace("test", "by hand")
        done, _ = await asyncio.wait(held, timeout=10)
        assert len(done) == len(held)
        for f in held:
            assert isinstance(f.exception(), ProduceFailed)
            assert "producer replaced: test: by hand" in str(f.exception())
        assert not producer.healthy and causes == ["test"]
        broker_of_own.resume()
        await asyncio.wait_for(producer.publish(RECEIPTS.name, b"k", b"after"), 20)
        assert producer.healthy
    finally:
        broker_of_own.resume()
        assert producer.close(timeout=10) == 0


OUTAGE = 30.0  # seconds: three times librdkafka's message timeout
BACK_WITHIN = 30.0  # every acknowledged receipt is in Kafka this long after the broker's return


@pytest.fixture()
async def ingest_process(tmp_path: Path) -> AsyncIterator[Any]:
    """`chatpipe ingest` in its own process (the load generator must not share its event loop or GIL)."""
    procs: list[subprocess.Popen[bytes]] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(broker: Broker, registry_url: str) -> tuple[Ingest, Path]:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATPIPE_")}
        env.update(
            CHATPIPE_KAFKA_BOOTSTRAP=broker.bootstrap,
            CHATPIPE_SCHEMA_REGISTRY_URL=registry_url,
            CHATPIPE_INGEST_PORT=str(port),
            CHATPIPE_STATE_DIR=str(tmp_path),
            CHATPIPE_PARTITIONS="4",
            CHATPIPE_INSECURE="1",  # no token: the load posts without one
        )
        log = tmp_path / "ingest.log"
        with open(log, "wb") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "chatpipe.cli", "ingest"],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
        await asyncio.to_thread(wait_for_port, "127.0.0.1", port, 60)
        session = client_session(port)
        sessions.append(session)
        return Ingest(None, session), log

    yield start
    for session in sessions:
        await session.close()
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def spool_bytes(state_dir: Path) -> int:
    """Bytes in the spool's segments (all records since the spool was last empty and its segments went)."""
    return sum(f.stat().st_size for f in (state_dir / "spool" / "ingest-0").glob("spool-*.log"))


OUTAGE = 30.0  # seconds: three times librdkafka's message timeout
BACK_WITHIN = 30.0  # every acknowledged receipt is in Kafka this long after the broker's return


@pytest.mark.timeout(300)
async def test_a_30s_outage_under_steady_load_ends_with_every_acknowledged_receipt_in_kafka(
    broker_of_own: Broker, registry_url: str, tmp_path: Path, ingest_process: Any
) -> None:
    broker = broker_of_own
    ingest, log = await ingest_process(broker, registry_url)
    load = Load(ingest, rate=300)
    runner = asyncio.create_task(load.run())
    readiness: list[tuple[float, int, dict[str, Any]]] = []
    depths: list[tuple[float, int]] = []
    try:
        await asyncio.sleep(5)
        status, body = await ingest.ready()
        assert status == 200 and body["spoolDepth"] == 0 and len(load.acked) > 500, "no steady state"
        broker.pause()
        paused_at = time.monotonic()
        try:
            while time.monotonic() - paused_at < OUTAGE:
                await asyncio.sleep(1)
                readiness.append((time.monotonic() - paused_at, *await ingest.ready()))
        finally:
            broker.resume()
        back_at = time.monotonic()
        spooled_at_return = readiness[-1][2]["spoolDepth"]
        spooled_bytes = spool_bytes(tmp_path)
        assert spooled_at_return > 0, "the outage did not reach the spool"

        # load goes on: the drain has to overtake the new receipts queued behind the backlog
        async def drained_and_ready() -> bool:
            status, body = await ingest.ready()
            depths.append((round(time.monotonic() - back_at, 1), body["spoolDepth"]))
            return status == 200 and body["spoolDepth"] == 0

        drained = await wait_until(drained_and_ready, BACK_WITHIN, every=1.0)
        drained_after = time.monotonic() - back_at
        await asyncio.sleep(max(0.0, 5 - drained_after))  # some receipts straight to Kafka again
    finally:
        await load.stop()
        await runner
    final = await ingest.ready()
    metrics = await ingest.metrics()
    replaced = {k: v for k, v in metrics.items() if k.startswith("chatpipe_ingest_producer_replacements_t")}
    print(
        f"\noutage {OUTAGE:g} s: {spooled_at_return} receipts spooled at the return "
        f"({spooled_bytes / spooled_at_return:.0f} bytes each), drained {drained_after:.1f} s after it; "
        f"{len(load.acked)} acknowledged, {len(load.unanswered)} unanswered; producers replaced "
        f"{replaced}; spool depth by seconds after the return {depths}"
    )
    assert drained, (
        f"spool not drained {BACK_WITHIN:g} s after the broker's return: /readyz {final}; ingest log ends "
        + log.read_text(errors="replace")[-3000:]
    )
    assert all(status == 200 for _t, status, _body in readiness)  # the spool took over: still ready
    assert final[0] == 200 and final[1]["spoolDepth"] == 0
    assert load.refused == [], f"{len(load.refused)} refused, e.g. {load.refused[:3]}"
    found = umids_in(broker.bootstrap, registry_url)
    missing = load.acked - set(found)
    assert not missing, f"{len(missing)} of {len(load.acked)} acknowledged receipts are not in Kafka"
    assert set(found) - load.acked <= load.unanswered  # and nothing that was refused


def stall_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    return [m for m in errors if "stalled" in m]


@pytest.mark.timeout(180)
async def test_a_producer_that_keeps_failing_stalls_the_spool_visibly_until_a_good_one_drains_it(
    broker_of_own: Broker, registry_url: str, tmp_path: Path, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ingest")
    ingest = await serve(settings_for(broker_of_own, registry_url, tmp_path, spool_stall_failures=3))
    intake = ingest.app[INTAKE]
    producer = intake.producer
    before = await ingest.post_receipts(20)
    assert (await ingest.ready())[0] == 200
    # the broker is fine; every producer built from now on refuses our records (a receipt is > 1000 bytes)
    good_config = dict(producer.config)
    producer.config["message.max.bytes"] = 1000
    producer.replace("test", "producers from now on refuse every receipt")
    during = await ingest.post_receipts(30)
    assert intake.spool_depth == 30  # acknowledged from the spool

    assert await ingest.becomes(503, 60), f"never unready: {await ingest.ready()}"
    _status, body = await ingest.ready()
    metrics = await ingest.metrics()
    assert body["spoolStalled"] is True and body["spoolDepth"] == 30
    assert f"topic={RECEIPTS.name} seq=1" in body["reason"] and "MSG_SIZE_TOO_LARGE" in body["reason"]
    assert metrics["chatpipe_ingest_spool_stalled"] == 1
    assert metrics["chatpipe_ingest_spool_drain_failures_total"] >= 3
    assert metrics["chatpipe_ingest_spool_drain_age_seconds"] > 0
    assert metrics['chatpipe_ingest_producer_replacements_total{cause="failing"}'] >= 1  # tried, in vain
    logged = stall_logs(caplog)
    assert logged and f"topic={RECEIPTS.name} seq=1" in logged[0]

    producer.config = good_config
    producer.replace("test", "a producer that works")
    assert await ingest.becomes(200, 60, drained=True), f"not ready again: {await ingest.ready()}"
    metrics = await ingest.metrics()
    assert metrics["chatpipe_ingest_spool_stalled"] == 0
    assert metrics["chatpipe_ingest_spool_drain_age_seconds"] == 0
    acked = before.acked | during.acked
    assert before.refused == during.refused == [] and len(acked) == 50
    assert set(umids_in(broker_of_own.bootstrap, registry_url)) == acked


@pytest.mark.timeout(180)
async def test_a_broker_away_for_long_is_an_outage_the_spool_takes_not_a_stall(
    broker_of_own: Broker, registry_url: str, tmp_path: Path, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ingest")
    ingest = await serve(
        settings_for(broker_of_own, registry_url, tmp_path, produce_timeout=1.0, spool_stall_failures=1)
    )
    before = await ingest.post_receipts(20)
    broker_of_own.pause()
    during = await ingest.post_receipts(20)
    assert ingest.app[INTAKE].spool_depth > 0
    readiness = []
    away = 25.0  # two failed drain rounds at least (one per librdkafka message timeout, 10 s)
    deadline = time.monotonic() + away
    while time.monotonic() < deadline:
        readiness.append(await ingest.ready())
        await asyncio.sleep(1)
    metrics = await ingest.metrics()
    broker_of_own.resume()
    assert {status for status, _body in readiness} == {200}, readiness[-1]
    assert not any(body["spoolStalled"] for _status, body in readiness)
    assert metrics["chatpipe_ingest_spool_stalled"] == 0
    assert metrics["chatpipe_ingest_spool_drain_failures_total"] >= 2
    assert metrics["chatpipe_ingest_spool_drain_age_seconds"] >= away - 5
    assert not stall_logs(caplog)
    assert await ingest.becomes(200, 60, drained=True), f"not drained: {await ingest.ready()}"
    assert before.refused == during.refused == []
    assert before.acked | during.acked <= set(umids_in(broker_of_own.bootstrap, registry_url))
