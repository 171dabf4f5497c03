"""Rebuilding every derived state from the raw topics: `chatpipe replay --topic ... --dump` on one
pipeline, `chatpipe replay --file` into a fresh one (new broker, new processor state, empty store), and
`chatpipe verify` finds the same truth there. Dead letters replay too, and are refused again.

Real `chatpipe dev` twice (embedded broker, registry, worker, sink, SQLite); nothing mocked.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chatpipe import replay, simulate, verify
from chatpipe.proof.truth import load_lines
from schemas.catalog import INBOUND, INGEST_DLQ, RECEIPTS
from tests.support.dev import running_dev

pytestmark = pytest.mark.integration

MESSAGES = 400


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CHATPIPE_"):
            monkeypatch.delenv(name)


def _attach(proc: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point this process's settings at the running stack (what dev printed)."""
    for name in ("CHATPIPE_KAFKA_BOOTSTRAP", "CHATPIPE_SCHEMA_REGISTRY_URL"):
        monkeypatch.setenv(name, proc.env_value(name))  # type: ignore[attr-defined]


@pytest.mark.timeout(420)
def test_raw_topics_dumped_and_replayed_into_a_fresh_pipeline_rebuild_the_same_truth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    truth_file = tmp_path / "truth.jsonl"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    dumps = {t: tmp_path / f"{t}.jsonl" for t in (RECEIPTS.name, INBOUND.name, INGEST_DLQ.name)}
    with running_dev(first) as (proc, ingest, api):
        sent = simulate.main(
            ["--url", ingest, "--messages", str(MESSAGES), "--rate", "400", "--seed", "21",
             "--truth", str(truth_file), "--time-factor", "0.01", "--malformed-share", "0.02"]
        )  # fmt: skip
        assert sent == 0, capsys.readouterr().out
        store = f"sqlite:///{first / '.chatpipe' / 'chatpipe.db'}"
        assert verify.main(["--truth", str(truth_file), "--store", store, "--wait", "90"]) == 0
        _attach(proc, monkeypatch)
        for topic, path in dumps.items():
            assert replay.main(["--topic", topic, "--dump", str(path)]) == 0
    capsys.readouterr()
    truth = load_lines(truth_file.read_text().splitlines())
    assert truth.delivery is not None
    lines = {t: path.read_text().splitlines() for t, path in dumps.items()}
    assert len(lines[INGEST_DLQ.name]) == truth.delivery.dlq_records > 0
    assert len(lines[INBOUND.name]) >= len(truth.inbound) > 0
    assert len(lines[RECEIPTS.name]) >= MESSAGES

    monkeypatch.delenv("CHATPIPE_KAFKA_BOOTSTRAP")
    monkeypatch.delenv("CHATPIPE_SCHEMA_REGISTRY_URL")
    with running_dev(second) as (proc, ingest, api):
        for topic in (RECEIPTS.name, INBOUND.name):
            code = replay.main(["--file", str(dumps[topic]), "--url", ingest, "--rate", "1000"])
            assert code == 0, capsys.readouterr().out
        store = f"sqlite:///{second / '.chatpipe' / 'chatpipe.db'}"
        assert verify.main(["--truth", str(truth_file), "--store", store, "--api", api, "--wait", "90"]) == 0
        # dead letters go back through ingest's checks: still refused (4xx), never given up on, counted
        capsys.readouterr()
        letters = str(dumps[INGEST_DLQ.name])
        assert replay.main(["--file", letters, "--url", ingest, "--time-factor", "0"]) == 1
        out = capsys.readouterr().out
        assert f"accepted 0, given up {truth.delivery.dlq_records}" in out, out
