"""Ingest never loses an acknowledged webhook: broker outage -> spool -> drain; crash leftovers; SIGTERM.

Each test gets its own Tansu broker (pausing it with SIGSTOP is the outage: killing Tansu would empty it).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from chatpipe.broker import free_port, start_tansu, wait_for_port
from chatpipe.runtime.config import Settings
from chatpipe.runtime.topics import ensure_topics
from ingest.app import INTAKE, create_app
from ingest.spool import Spool
from schemas.catalog import RECEIPTS
from schemas.codec import Codecs
from tests.fixtures.webhooks import load
from tests.support.kafka import discard_broker, read_topic

pytestmark = pytest.mark.integration
URL = "/v1/webhooks/chatapps"
TEMPLATE = json.loads(load("dr_v9_whatsapp_delivered_text"))


def receipt(umid: str) -> bytes:
    doc = json.loads(json.dumps(TEMPLATE))
    doc["payload"]["umid"] = umid
    return json.dumps(doc).encode()


@pytest.fixture()
def own_broker(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = start_tansu("127.0.0.1", port, tmp_path / "tansu.log")
    bootstrap = f"127.0.0.1:{port}"
    ensure_topics(bootstrap, partitions=4)
    yield bootstrap, proc
    discard_broker(proc)


def umids_in_topic(bootstrap: str, registry_url: str, expect: int) -> dict[str, list[str]]:
    codec = Codecs.connect(registry_url).receipts
    found: dict[str, list[str]] = {}
    for m in read_topic(bootstrap, RECEIPTS.name, expect=expect, timeout=60, idle=3):
        r = codec.decode(m.value())
        found.setdefault(r.umid, []).append(r.raw_json)
    return found


async def test_broker_outage_mid_load_is_absorbed_by_the_spool_and_nothing_acknowledged_is_lost(
    own_broker: tuple[str, subprocess.Popen[bytes]], registry_url: str, tmp_path: Path
) -> None:
    bootstrap, tansu = own_broker
    settings = Settings(
        kafka_bootstrap=bootstrap,
        schema_registry_url=registry_url,
        state_dir=tmp_path,
        partitions=4,
        produce_timeout=1.0,
    )
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    acked: list[str] = []
    refused: list[int] = []
    spooled_seen = 0
    try:

        async def post(umid: str) -> None:
            r = await client.post(URL, data=receipt(umid), headers={"Content-Type": "application/json"})
            (acked.append(umid) if r.status == 200 else refused.append(r.status))

        async def load_phase(n: int, concurrency: int = 16) -> None:
            umids = [str(uuid.uuid4()) for _ in range(n)]
            for i in range(0, n, concurrency):
                await asyncio.gather(*(post(u) for u in umids[i : i + concurrency]))

        await load_phase(200)
        os.kill(tansu.pid, signal.SIGSTOP)  # the broker stops answering, connections stay open
        try:
            await load_phase(300)
            spooled_seen = client.app[INTAKE].spool_depth
        finally:
            os.kill(tansu.pid, signal.SIGCONT)
        await load_phase(200)
        deadline = time.monotonic() + 60
        while client.app[INTAKE].spool_depth and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert client.app[INTAKE].spool_depth == 0
    finally:
        await client.close()
    assert refused == []  # the spool took everything: no 503 while it had room
    assert spooled_seen > 0  # the outage really sent records to the spool
    found = umids_in_topic(bootstrap, registry_url, expect=len(acked))
    missing = set(acked) - set(found)
    assert not missing, f"{len(missing)} acknowledged webhooks are not in Kafka"
    for umid in acked:  # duplicates (a late ack after spooling) are byte-identical: downstream dedups them
        assert {raw for raw in found[umid]} == {receipt(umid).decode()}


async def test_a_spool_left_by_a_crash_is_drained_at_start(
    own_broker: tuple[str, subprocess.Popen[bytes]], registry_url: str, tmp_path: Path
) -> None:
    bootstrap, _ = own_broker
    codecs = Codecs.connect(registry_url)
    from datetime import UTC, datetime

    from ingest.parse import parse_webhook

    spool_dir = tmp_path / "spool" / "ingest-0"
    umids = [str(uuid.uuid4()) for _ in range(50)]
    leftover = Spool(spool_dir)
    for u in umids:
        event = parse_webhook(receipt(u), datetime.now(UTC))
        leftover.append(RECEIPTS.name, u.encode(), codecs.receipts.encode(event))  # type: ignore[arg-type]
    leftover.close()  # as a crash would leave it: records fsynced, none acked
    settings = Settings(
        kafka_bootstrap=bootstrap, schema_registry_url=registry_url, state_dir=tmp_path, partitions=4
    )
    client = TestClient(TestServer(create_app(settings, spool_dir=spool_dir)))
    await client.start_server()
    try:
        deadline = time.monotonic() + 30
        while client.app[INTAKE].spool_depth and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        await client.close()
    found = umids_in_topic(bootstrap, registry_url, expect=len(umids))
    assert set(umids) <= set(found)


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_sigterm_during_load_loses_no_acknowledged_webhook(
    own_broker: tuple[str, subprocess.Popen[bytes]], registry_url: str, tmp_path: Path, event_loop: str
) -> None:
    bootstrap, _ = own_broker
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATPIPE_")}
    env.update(
        CHATPIPE_KAFKA_BOOTSTRAP=bootstrap,
        CHATPIPE_SCHEMA_REGISTRY_URL=registry_url,
        CHATPIPE_INGEST_PORT=str(port),
        CHATPIPE_STATE_DIR=str(tmp_path),
        CHATPIPE_PARTITIONS="4",
        CHATPIPE_EVENT_LOOP=event_loop,
        CHATPIPE_INSECURE="1",  # no token: this test posts without one
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatpipe.cli", "ingest"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port("127.0.0.1", port, timeout=30)
    acked: list[str] = []

    async def run_load() -> None:
        stop_at = time.monotonic() + 20
        async with aiohttp.ClientSession() as session:

            async def worker(i: int) -> None:
                while time.monotonic() < stop_at:
                    umid = str(uuid.uuid4())
                    try:
                        async with session.post(
                            f"http://127.0.0.1:{port}{URL}",
                            data=receipt(umid),
                            headers={"Content-Type": "application/json"},
                        ) as r:
                            if r.status == 200:
                                acked.append(umid)
                    except aiohttp.ClientError:
                        return  # the server is gone: this request was never acknowledged
                    if i == 0 and len(acked) >= 300 and proc.poll() is None and not signalled:
                        signalled.append(True)
                        proc.send_signal(signal.SIGTERM)

            signalled: list[bool] = []
            await asyncio.gather(*(worker(i) for i in range(16)))

    asyncio.run(run_load())
    assert proc.wait(30) == 0
    assert len(acked) >= 300
    found = umids_in_topic(bootstrap, registry_url, expect=len(acked))
    assert set(acked) <= set(found), f"{len(set(acked) - set(found))} acknowledged webhooks lost"
