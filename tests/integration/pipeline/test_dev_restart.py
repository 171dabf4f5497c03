"""Restarts keep the truth: receipts posted after a restart for messages from before it move their state
on, exactly as without the restart (issue: a restarted `chatpipe dev` showed stale states).

Through `chatpipe dev` as a user runs it: the embedded broker is memory-only, so a restart is a reset
broker with a kept store; with an external broker, a lost processor state (new state directory, same
broker), then a reset broker with the store kept.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from chatpipe.broker import free_port, start_tansu
from tests.support.dev import DevProcess, details, post_all, receipt, running_dev, wait_for_details

pytestmark = pytest.mark.integration

N = 12
T = "2026-06-09T10:00:{:02d}Z"


def _stop(proc: DevProcess) -> None:
    proc.proc.send_signal(signal.SIGINT)
    assert proc.proc.wait(60) == 0, proc.output()


def _before(prefix: str) -> tuple[list[bytes], dict[str, list[tuple[int, str, str, str]]]]:
    """Half the messages sent on WhatsApp, half failed there (their SMS fallback comes later)."""
    bodies: list[bytes] = []
    expected = {}
    for i in range(N):
        umid = f"{prefix}-{i:02d}"
        bodies.append(receipt(umid, "sent", T.format(1), "whatsapp"))
        if i % 2:
            bodies.append(receipt(umid, "undelivered", T.format(5), "whatsapp"))
            expected[umid] = [(1, "WhatsApp", "undelivered", "2026-06-09T10:00:05Z")]
        else:
            expected[umid] = [(1, "WhatsApp", "sent", "2026-06-09T10:00:01Z")]
    return bodies, expected


def _after(prefix: str, second: int) -> tuple[list[bytes], dict[str, list[tuple[int, str, str, str]]]]:
    """The later receipts: delivered on WhatsApp, or delivered on the SMS fallback."""
    bodies: list[bytes] = []
    expected = {}
    ts = T.format(second)
    for i in range(N):
        umid = f"{prefix}-{i:02d}"
        if i % 2:
            bodies.append(receipt(umid, "delivered", ts, "sms"))
            expected[umid] = [
                (1, "WhatsApp", "undelivered", "2026-06-09T10:00:05Z"),
                (2, "SMS", "delivered", ts),
            ]
        else:
            bodies.append(receipt(umid, "delivered", ts, "whatsapp"))
            expected[umid] = [(1, "WhatsApp", "delivered", ts)]
    return bodies, expected


@pytest.mark.timeout(600)  # three dev starts; a safety net, not a measure (160-240 s at load 10-16)
def test_a_restarted_dev_moves_states_from_before_the_restart_on(tmp_path: Path) -> None:
    bodies, expected = _before("r")
    with running_dev(tmp_path) as (proc, ingest, api):
        post_all(ingest, bodies)
        assert wait_for_details(api, expected, 60) == {}
        _stop(proc)
    later, expected = _after("r", 30)
    with running_dev(tmp_path) as (proc, ingest, api):
        assert "kept" in proc.output() and "store" in proc.output(), proc.output()
        post_all(ingest, later)
        assert wait_for_details(api, expected, 60) == {}
        # the read receipt after that lands as it would have without the restart
        post_all(ingest, [receipt("r-00", "read", T.format(40), "whatsapp")])
        assert wait_for_details(api, {"r-00": [(1, "WhatsApp", "read", "2026-06-09T10:00:40Z")]}, 60) == {}
        _stop(proc)
    # and once more: the merged rows keep merging
    with running_dev(tmp_path) as (proc, ingest, api):
        post_all(ingest, [receipt("r-02", "read", T.format(50), "whatsapp")])
        assert wait_for_details(api, {"r-02": [(1, "WhatsApp", "read", "2026-06-09T10:00:50Z")]}, 60) == {}
        assert details(api, "r-01") == expected["r-01"]


@pytest.mark.timeout(600)
def test_a_lost_processor_state_then_a_reset_broker_with_the_store_kept(tmp_path: Path) -> None:
    brokers: list[subprocess.Popen[bytes]] = []

    def broker() -> str:
        port = free_port()
        brokers.append(start_tansu("127.0.0.1", port, tmp_path / f"tansu-{port}.log"))
        return f"127.0.0.1:{port}"

    try:
        first = broker()
        bodies, expected = _before("p")
        with running_dev(tmp_path, CHATPIPE_KAFKA_BOOTSTRAP=first) as (proc, ingest, api):
            post_all(ingest, bodies)
            assert wait_for_details(api, expected, 60) == {}
            _stop(proc)
        # production terms: the worker's state directory is lost, the broker (changelog, offsets) is kept
        shutil.rmtree(tmp_path / ".chatpipe" / "processor")
        later, expected = _after("p", 30)
        with running_dev(tmp_path, CHATPIPE_KAFKA_BOOTSTRAP=first) as (proc, ingest, api):
            post_all(ingest, later)
            assert wait_for_details(api, expected, 90) == {}
            _stop(proc)
        # a new cluster: nothing of Kafka survives, the processor starts afresh, the store is kept
        shutil.rmtree(tmp_path / ".chatpipe" / "processor")
        second = broker()
        with running_dev(tmp_path, CHATPIPE_KAFKA_BOOTSTRAP=second) as (proc, ingest, api):
            evens = [f"p-{i:02d}" for i in range(0, N, 2)]
            post_all(ingest, [receipt(umid, "read", T.format(45), "whatsapp") for umid in evens])
            expected.update({umid: [(1, "WhatsApp", "read", "2026-06-09T10:00:45Z")] for umid in evens})
            assert wait_for_details(api, expected, 90) == {}
    finally:
        for b in brokers:
            b.terminate()
            b.wait(10)
