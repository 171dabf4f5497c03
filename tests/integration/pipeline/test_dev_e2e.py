"""The walking skeleton end to end: `chatpipe dev` as a user runs it, a webhook in, the read API out.

Real embedded broker, real registry, real Faust worker, real SQLite; nothing mocked.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from schemas.catalog import CONVERSATIONS, MESSAGE_STEPS, STATUS_EVENTS
from schemas.codec import Codecs
from tests.fixtures.webhooks import load
from tests.support.dev import DevProcess, running_dev
from tests.support.kafka import read_topic

pytestmark = pytest.mark.integration


@pytest.fixture()
def dev(tmp_path: Path) -> Iterator[tuple[DevProcess, str, str]]:
    with running_dev(tmp_path) as running:
        yield running


def _poll_json(url: str, predicate, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        r = httpx.get(url, timeout=5)
        last = (r.status_code, r.text)
        if r.status_code == 200 and predicate(r.json()):
            return r.json()
        time.sleep(0.2)
    raise AssertionError(f"{url} never matched; last answer {last}")


def _pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # a zombie is dead for our purpose
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                continue
        except OSError:
            continue
        alive.append(pid)
    return alive


def test_sample_delivery_receipt_flows_to_the_read_api(
    dev: tuple[DevProcess, str, str], tmp_path: Path
) -> None:
    proc, _, _ = dev
    assert proc.env_value("CHATPIPE_KAFKA_BOOTSTRAP").startswith("127.0.0.1:")
    assert proc.env_value("CHATPIPE_SCHEMA_REGISTRY_URL").startswith("http://127.0.0.1:")
    assert "reconciler off: CHATPIPE_8X8_API_KEY is not set" in proc.output()
    sample_receipt_scenario(*dev, tmp_path)


def sample_receipt_scenario(proc: DevProcess, ingest: str, api: str, tmp_path: Path) -> None:
    """The walking skeleton's acceptance: the documented sample receipt posted, read back as from 8x8."""

    body = load("dr_source_whatsapp_undelivered")
    r = httpx.post(
        f"{ingest}/v1/webhooks/chatapps",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    sample = json.loads(body)["payload"]
    url = f"{api}/api/v1/subaccounts/{sample['subAccountId']}/messages/{sample['umid']}"
    doc = _poll_json(url, lambda d: d["data"][0]["status"]["state"] == "undelivered")
    [record] = doc["data"]
    assert record["umid"] == sample["umid"]
    assert record["subAccountId"] == sample["subAccountId"]
    assert record["channel"] == "WhatsApp"
    assert record["step"] == 1
    assert record["status"]["state"] == "undelivered"
    assert record["status"]["detail"] == "rejected_by_operator"
    assert record["status"]["errorCode"] == 15
    assert record["status"]["errorMessage"] == "Invalid destination"
    assert record["status"]["timestamp"] == "2016-01-01T00:00:00Z"
    assert record["clientMessageId"] == sample["clientMessageId"]
    assert record["batchId"] == sample["batchId"]

    # another subaccount does not see it, an unknown umid is a 404 in 8x8's error format
    other = httpx.get(f"{api}/api/v1/subaccounts/OtherAccount/messages/{sample['umid']}", timeout=5)
    assert other.status_code == 404
    err = other.json()
    assert set(err) == {"code", "message", "errorId", "timestamp"}

    # a malformed webhook is a precise 4xx, never a 5xx
    bad = httpx.post(
        f"{ingest}/v1/webhooks/chatapps",
        content=b'{"namespace":"ChatApps"',
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert bad.status_code == 400
    assert "JSON" in bad.json()["message"]

    # the step and status-history topics carry the message too
    bootstrap = proc.env_value("CHATPIPE_KAFKA_BOOTSTRAP")
    codecs = Codecs.connect(proc.env_value("CHATPIPE_SCHEMA_REGISTRY_URL"))
    steps = [codecs.steps.decode(m.value()) for m in read_topic(bootstrap, MESSAGE_STEPS.name, expect=1)]
    assert [(s.umid, s.step.step, s.step.state) for s in steps] == [(sample["umid"], 1, "undelivered")]
    events = [codecs.events.decode(m.value()) for m in read_topic(bootstrap, STATUS_EVENTS.name, expect=1)]
    assert [(e.umid, e.channel, e.event.state, e.event.error_code) for e in events] == [
        (sample["umid"], "whatsapp", "undelivered", 15)
    ]

    # inbound messages from one user (one of them retried) fold into one conversation
    inbound = json.loads(load("in_v3_whatsapp_text"))
    for umid, minute in (("in-1", "10"), ("in-2", "12"), ("in-1", "10")):
        inbound["payload"]["umid"] = umid
        inbound["payload"]["timestamp"] = f"2026-06-09T10:{minute}:00Z"
        r = httpx.post(f"{ingest}/v1/webhooks/chatapps", json=inbound, timeout=10)
        assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    conversation = None
    while time.monotonic() < deadline:
        records = read_topic(bootstrap, CONVERSATIONS.name, idle=1.0)
        versions = [codecs.conversations.decode(m.value()) for m in records]
        if versions and max(v.version for v in versions) >= 2:
            conversation = max(versions, key=lambda v: v.version)
            break
    assert conversation is not None, "no conversation state emitted"
    assert conversation.message_count == 2 and conversation.last_umid == "in-2"
    assert conversation.window_open_until is not None
    assert conversation.window_open_until.isoformat() == "2026-06-10T10:12:00+00:00"

    # SIGINT stops every child and exits 0, leaving no process behind
    run_dir = tmp_path / ".chatpipe" / "run"
    pids = [int(p.read_text()) for p in run_dir.glob("*.ready")]
    assert len(pids) >= 4
    proc.proc.send_signal(signal.SIGINT)
    assert proc.proc.wait(40) == 0, proc.output()
    assert "did not stop" not in proc.output()  # every child stopped on its own, none was killed
    deadline = time.monotonic() + 5
    while _pids_alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _pids_alive(pids) == []
