"""`chatpipe dev` supervises its children: kill -9 of any one of them under load loses no acknowledged
receipt, the child is restarted and says so, and dev keeps running (exit 0 on SIGINT at the end).

Real embedded broker, registry, worker, sink and SQLite; the load is receipts posted over HTTP.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.support.dev import Load, running_dev, wait_until_stored

pytestmark = pytest.mark.integration

#: every child dev restarts without losing anything; the broker is memory-only (see test below)
CHILDREN = ("worker", "sink", "ingest", "api", "registry")


def _pid(run_dir: Path, name: str) -> int:
    return int((run_dir / f"{name}.ready").read_text())


@pytest.mark.timeout(420)
def test_kill_9_of_each_child_under_load_loses_no_acknowledged_receipt(tmp_path: Path) -> None:
    with running_dev(tmp_path) as (proc, ingest, _api):
        run_dir = tmp_path / ".chatpipe" / "run"
        db = tmp_path / ".chatpipe" / "chatpipe.db"
        with Load(f"{ingest}/v1/webhooks/chatapps", rate=100) as load:
            time.sleep(3)
            for name in CHILDREN:
                before = len(proc.lines)
                os.kill(_pid(run_dir, name), signal.SIGKILL)
                proc.wait_for(f"{name} exited with code -9; restarting it", 30, before)
                proc.wait_for(f"{name} ready again", 120, before)
                acked_so_far = len(load.acked)
                time.sleep(3)  # the load goes on against the restarted child
                assert len(load.acked) > acked_so_far, f"nothing acknowledged after {name} came back"
        acked = set(load.acked)
        assert len(acked) > 500, (len(acked), load.failed)
        missing = wait_until_stored(db, acked, timeout=120)
        assert not missing, f"{len(missing)} of {len(acked)} acknowledged never stored: {sorted(missing)[:5]}"
        assert proc.proc.poll() is None, proc.output()
        proc.proc.send_signal(signal.SIGINT)
        assert proc.proc.wait(60) == 0, proc.output()
