"""A simulation across a restart of `chatpipe dev` (issue 15, Restarts): the first run stops at an event time
with messages in flight, dev is stopped (SIGINT) and started again in the same folder, the continuation
sends their later receipts (read after delivered, the fallback step after a failure, late duplicates)
and new messages; `chatpipe verify` finds the store and the read API equal to the truth after each run.

The embedded broker keeps its records in memory, so the second dev starts with empty topics and a wiped
processor state: the later receipts of earlier messages start new states, which the sink has to merge by
content with the stored ones (processors/join.py, sinks/rows.py `resolve_lineages`).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from chatpipe import simulate, verify
from chatpipe.proof.traffic import FAILURES
from chatpipe.proof.truth import load_lines
from tests.support.dev import running_dev

# minutes long: in the chaos tier (`scripts/test -m chaos`) so the default suite stays within its budget
pytestmark = [pytest.mark.integration, pytest.mark.chaos]

FIRST, SECOND = 1000, 600  # messages of each run: about 2,600 and 2,500 webhooks
RATE = 500
UNTIL = 200  # the first run stops 200 s of event time after its start: a fifth of its messages in flight


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """verify runs in this process: the stack's settings (PII hash key, store) are the defaults."""
    for name in list(os.environ):
        if name.startswith("CHATPIPE_"):
            monkeypatch.delenv(name)


def _verify(truth: Path, store: str, api: str, capsys: pytest.CaptureFixture[str], sent: str) -> None:
    code = verify.main(["--truth", str(truth), "--store", store, "--api", api, "--wait", "90"])
    out = capsys.readouterr().out
    assert code == 0, f"{sent}\n{out}"
    with capsys.disabled():
        print(f"\n{sent}{out}")


@pytest.mark.timeout(300)
def test_a_simulation_continued_after_a_dev_restart_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one, two = tmp_path / "truth-1.jsonl", tmp_path / "truth-2.jsonl"
    store = f"sqlite:///{tmp_path / '.chatpipe' / 'chatpipe.db'}"
    common = ["--rate", str(RATE), "--time-factor", "0.01"]
    with running_dev(tmp_path) as (proc, ingest, api):
        argv = ["--url", ingest, "--messages", str(FIRST), "--seed", "15", "--until", str(UNTIL)]
        assert simulate.main([*argv, "--truth", str(one), *common]) == 0
        sent = capsys.readouterr().out
        assert "held back for a --continue run" in sent, sent
        _verify(one, store, api, capsys, sent)
        proc.proc.send_signal(signal.SIGINT)
        assert proc.proc.wait(60) == 0, proc.output()

    with running_dev(tmp_path) as (proc, ingest, api):
        assert "kept from the last run" in proc.output(), proc.output()
        argv = ["--url", ingest, "--messages", str(SECOND), "--continue", str(one), "--truth", str(two)]
        assert simulate.main([*argv, *common]) == 0
        sent = capsys.readouterr().out
        _verify(two, store, api, capsys, sent)

    before = {m.umid: m for m in load_lines(one.read_text().splitlines()).messages}
    after = load_lines(two.read_text().splitlines())
    assert after.delivery is not None and not after.delivery.given_up  # nothing was excluded from either
    moved = [m for m in after.messages if m.umid in before and m != before[m.umid]]
    fallbacks = [
        m for m in moved if before[m.umid].state in FAILURES and len(m.steps) > len(before[m.umid].steps)
    ]
    reads = [m for m in moved if (before[m.umid].state, m.state) == ("delivered", "read")]
    assert len(moved) > 100 and fallbacks and reads, (len(moved), len(fallbacks), len(reads))
    assert len(after.messages) >= len(before) + SECOND
