"""`chatpipe dev` as a user runs it, for integration tests: started in a folder on free ports, its output
read line by line, and a steady load of delivery receipts that counts what ingest acknowledged."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from chatpipe.broker import free_port
from tests.fixtures.webhooks import load

READY_TIMEOUT = 120.0


class DevProcess:
    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chatpipe.cli", "dev"],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if "chatpipe ready" in line:
                self.ready.set()

    def env_value(self, name: str) -> str:
        for line in self.lines:
            if line.startswith(name + "="):
                return line.split("=", 1)[1]
        raise KeyError(name)

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float, after: int = 0) -> int:
        """Wait for a line containing `text` among the lines from index `after` on; returns its index."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i in range(after, len(self.lines)):
                if text in self.lines[i]:
                    return i
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no line with {text!r} within {timeout:.0f}s:\n{self.output()}")


@contextlib.contextmanager
def running_dev(tmp_path: Path, **extra_env: str) -> Iterator[tuple[DevProcess, str, str]]:
    """`chatpipe dev` in `tmp_path` on free ports; `extra_env` may point it at an external broker,
    registry or store (CHATPIPE_KAFKA_BOOTSTRAP, CHATPIPE_SCHEMA_REGISTRY_URL, CHATPIPE_STORE_URL)."""
    ingest_port, api_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATPIPE_")}
    env.update(CHATPIPE_INGEST_PORT=str(ingest_port), CHATPIPE_API_PORT=str(api_port), PYTHONUNBUFFERED="1")
    env.update(extra_env)
    proc = DevProcess(tmp_path, env)
    try:
        if not proc.ready.wait(READY_TIMEOUT):
            pytest.fail(f"chatpipe dev not ready in {READY_TIMEOUT}s:\n{proc.output()}")
        yield proc, f"http://127.0.0.1:{ingest_port}", f"http://127.0.0.1:{api_port}"
    finally:
        if proc.proc.poll() is None:
            proc.proc.send_signal(signal.SIGINT)
            try:
                proc.proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.proc.kill()


TEMPLATE = json.loads(load("dr_v9_whatsapp_delivered_text"))


SUB_ACCOUNT = TEMPLATE["payload"]["subAccountId"]


def receipt(
    umid: str, state: str = "delivered", timestamp: str = "2026-06-09T10:00:00Z", channel: str = "whatsapp"
) -> bytes:
    """A documented v9 WhatsApp receipt, for `umid`, in `state` at `timestamp` (on `channel`)."""
    doc = json.loads(json.dumps(TEMPLATE))
    doc["payload"]["umid"] = umid
    doc["payload"]["channel"] = channel
    doc["payload"]["status"]["state"] = state
    doc["payload"]["status"]["timestamp"] = timestamp
    if state != "delivered":
        doc["payload"]["status"].pop("detail", None)
    return json.dumps(doc).encode()


def post_all(ingest: str, bodies: list[bytes]) -> None:
    """Post every body to ingest's webhook endpoint; each must be answered 2xx."""
    with httpx.Client(timeout=15) as client:
        for body in bodies:
            r = client.post(
                f"{ingest}/v1/webhooks/chatapps", content=body, headers={"Content-Type": "application/json"}
            )
            assert r.status_code // 100 == 2, r.text


def details(api: str, umid: str, sub: str = SUB_ACCOUNT) -> list[tuple[int, str, str, str]] | None:
    """(step, channel, state, timestamp) of each record the read API answers for `umid`, or None (404)."""
    r = httpx.get(f"{api}/api/v1/subaccounts/{sub}/messages/{umid}", timeout=10)
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    return [(d["step"], d["channel"], d["status"]["state"], d["status"]["timestamp"]) for d in data]


def wait_for_details(
    api: str, expected: dict[str, list[tuple[int, str, str, str]]], timeout: float
) -> dict[str, object]:
    """Poll the read API until every umid answers its expected records; returns the mismatches left."""
    deadline = time.monotonic() + timeout
    wrong: dict[str, object] = dict(expected)
    while wrong and time.monotonic() < deadline:
        wrong = {}
        for umid, want in expected.items():
            got = details(api, umid)
            if got != want:
                wrong[umid] = got
        if wrong:
            time.sleep(0.5)
    return wrong


class Load:
    """Posts one receipt per new umid, about `rate` a second from one thread, until `stop()`; keeps the
    umids answered 2xx (`acked`). A refused connection, a reset or a non-2xx is what 8x8 would retry:
    the umid is not counted and the next one is tried after a short pause."""

    def __init__(self, url: str, rate: float = 100.0, prefix: str = "load") -> None:
        self.url, self.interval, self.prefix = url, 1.0 / rate, prefix
        self.acked: list[str] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        n = 0
        next_at = time.monotonic()
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                umid = f"{self.prefix}-{n:07d}"
                n += 1
                try:
                    r = client.post(
                        self.url, content=receipt(umid), headers={"Content-Type": "application/json"}
                    )
                    ok = r.status_code // 100 == 2
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.acked.append(umid)
                else:
                    self.failed += 1
                    self._stop.wait(0.2)
                next_at = max(next_at + self.interval, time.monotonic() - 1.0)
                self._stop.wait(max(0.0, next_at - time.monotonic()))


def stored_umids(db: Path) -> set[str]:
    """The umids in the SQLite store's messages table (empty while it does not exist yet)."""
    if not db.exists():
        return set()
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        try:
            return {r[0] for r in conn.execute("SELECT umid FROM messages")}
        except sqlite3.OperationalError:
            return set()


def wait_until_stored(db: Path, umids: set[str], timeout: float) -> set[str]:
    """Wait until every umid of `umids` is in the store; returns those still missing after `timeout`."""
    deadline = time.monotonic() + timeout
    missing = set(umids)
    while missing and time.monotonic() < deadline:
        missing -= stored_umids(db)
        if missing:
            time.sleep(0.5)
    return missing
