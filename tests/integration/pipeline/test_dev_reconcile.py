"""`chatpipe dev` with an 8x8 API key runs the reconciler: receipts whose later receipts were lost end with
8x8's whole step timeline in the read API.

8x8 is played by a local aiohttp server (`tests.integration.processors.test_reconciler.Fake8x8`, in a
thread of the test): it answers the Retrieve message details endpoint with the documented shapes, requires
the API key, and enforces 1 request/second per subaccount with its own clock (429 in 8x8's format
otherwise). dev is configured only through the documented environment variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from chatpipe.broker import free_port
from tests.integration.processors.test_reconciler import KEY, Fake8x8, detail_record
from tests.support.dev import TEMPLATE, post_all, running_dev

pytestmark = pytest.mark.integration

SUBS = ("acme-dev-1", "acme-dev-2")


@contextlib.contextmanager
def serving(fake: Fake8x8) -> Iterator[str]:
    """`fake` on a free port, served by an event loop in a thread of its own; yields its base URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    port = free_port()

    async def start() -> web.AppRunner:
        runner = web.AppRunner(fake.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    runner = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def webhook(sub: str, umid: str, state: str, at: datetime) -> bytes:
    doc = json.loads(json.dumps(TEMPLATE))
    p = doc["payload"]
    p.update(umid=umid, subAccountId=sub, channel="whatsapp")
    p["status"].update(state=state, timestamp=at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-4] + "Z")
    p["status"].pop("detail", None)
    p["status"].pop("errorCode", None)
    p["status"].pop("errorMessage", None)
    return json.dumps(doc).encode()


def api_details(api: str, sub: str, umid: str) -> list[tuple[int, str, str, str, str]] | None:
    r = httpx.get(f"{api}/api/v1/subaccounts/{sub}/messages/{umid}", timeout=10)
    if r.status_code != 200:
        return None
    return [
        (d["step"], d["channel"], d["status"]["state"], d["channelId"], d["contentType"])
        for d in r.json()["data"]
    ]


def test_dev_reconciles_messages_whose_later_receipts_were_lost(tmp_path: Path) -> None:
    fake = Fake8x8()
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    bodies: list[bytes] = []
    expected: dict[tuple[str, str], list[tuple[int, str, str, str, str]]] = {}
    for sub in SUBS:
        # a WhatsApp -> SMS fallback of which only "sent" arrived, and a WhatsApp message 8x8 says was read
        fallback, read = str(uuid.uuid4()), str(uuid.uuid4())
        bodies += [webhook(sub, fallback, "sent", t0), webhook(sub, read, "sent", t0)]
        fake.answers[fallback] = [
            detail_record(
                fallback, sub, 1, "WhatsApp", "undelivered", t0 + timedelta(minutes=1), errorCode=7
            ),
            detail_record(fallback, sub, 2, "SMS", "delivered", t0 + timedelta(minutes=2)),
        ]
        fake.answers[read] = [detail_record(read, sub, 1, "WhatsApp", "read", t0 + timedelta(minutes=3))]
        ids = "00000000-0000-0000-0000-00000000000"
        expected[(sub, fallback)] = [
            (1, "WhatsApp", "undelivered", ids + "1", "Text"),
            (2, "SMS", "delivered", ids + "2", "Text"),
        ]
        expected[(sub, read)] = [(1, "WhatsApp", "read", ids + "1", "Text")]
    with (
        serving(fake) as url,
        running_dev(
            tmp_path,
            CHATPIPE_8X8_API_URL=url,
            CHATPIPE_8X8_API_KEY=KEY,
            CHATPIPE_RECONCILE_AFTER="2",
            CHATPIPE_RECONCILE_INTERVAL="1",
        ) as (proc, ingest, api),
    ):
        ready = next(line for line in proc.lines if "chatpipe ready" in line)
        assert "reconcile" in ready, proc.output()
        assert any("reconciler on" in line for line in proc.lines), proc.output()
        post_all(ingest, bodies)
        deadline = time.monotonic() + 120
        wrong: dict[tuple[str, str], object] = dict(expected)
        while wrong and time.monotonic() < deadline:
            wrong = {k: got for k, want in expected.items() if (got := api_details(api, *k)) != want}
            if wrong:
                time.sleep(0.5)
        log = (tmp_path / ".chatpipe" / "logs" / "reconcile.log").read_text(errors="replace")
        assert not wrong, f"{wrong}\n{proc.output()}\n{log[-3000:]}"
    assert fake.violations == 0, log[-3000:]  # zero 429s
    assert fake.unauthorized == 0  # every request carried the key
    asked = [u for _, u, _ in fake.requests]
    assert set(asked) == {umid for _, umid in expected}
