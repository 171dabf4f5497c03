"""`chatpipe simulate` against a real `chatpipe dev`, then `chatpipe verify` against its store and read API.

Nothing mocked: the embedded broker, registry, ingest, Faust worker, sink, SQLite and read API of
`chatpipe dev`. 20,000 messages (about 62,000 webhooks with duplicates, shuffled receipts, inbound
replies and malformed bodies) at 1,500 webhooks/s; verify waits for the pipeline to catch up.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from chatpipe import simulate, verify
from chatpipe.proof.truth import load_lines
from schemas.catalog import INGEST_DLQ
from schemas.codec import Codecs
from tests.support.dev import running_dev
from tests.support.kafka import read_topic

pytestmark = pytest.mark.integration

MESSAGES = 20_000
RATE = 1500  # webhooks/s: about 45 s of sending on 2 shared cores


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """verify runs in this process: the stack's settings (PII hash key, store) are the defaults."""
    for name in list(os.environ):
        if name.startswith("CHATPIPE_"):
            monkeypatch.delenv(name)


def _corrupt(db: Path, umid: str, state: str) -> None:
    with sqlite3.connect(db, timeout=30) as conn:
        conn.execute("UPDATE message_steps SET state = ? WHERE umid = ?", (state, umid))
        conn.execute("UPDATE messages SET state = ? WHERE umid = ?", (state, umid))


def _row(out: str, source: str) -> dict[str, str]:
    """One source's row of verify's summary table, by column name."""
    lines = [line.split() for line in out.splitlines()]
    header = next(words for words in lines if words[:1] == ["source"])
    return dict(zip(header, next(words for words in lines if words[:1] == [source]), strict=True))


@pytest.mark.timeout(480)
def test_simulated_traffic_verifies_against_store_and_api_and_a_corrupted_row_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truth_file = tmp_path / "truth.jsonl"
    with running_dev(tmp_path) as (proc, ingest, api):
        code = simulate.main(
            [
                "--url",
                ingest,
                "--messages",
                str(MESSAGES),
                "--rate",
                str(RATE),
                "--seed",
                "15",
                "--truth",
                str(truth_file),
                "--time-factor",
                "0.01",
                "--malformed-share",
                "0.01",
            ]
        )
        sent = capsys.readouterr().out
        assert code == 0, sent
        truth = load_lines(truth_file.read_text().splitlines())
        assert truth.delivery is not None
        assert len(truth.messages) == MESSAGES and truth.inbound and truth.malformed

        db = tmp_path / ".chatpipe" / "chatpipe.db"
        store = f"sqlite:///{db}"
        code = verify.main(["--truth", str(truth_file), "--store", store, "--api", api, "--wait", "150"])
        out = capsys.readouterr().out
        assert code == 0, f"{sent}\n{out}"
        assert "verify: OK" in out
        with capsys.disabled():  # the figures of the run, for whoever reads the log
            print(f"\n{sent}{out}")

        # every malformed body is in ingest's dead-letter topic, once per refusal (8x8 retries 4xx too)
        codec = Codecs.connect(proc.env_value("CHATPIPE_SCHEMA_REGISTRY_URL")).ingest_dlq
        records = read_topic(
            proc.env_value("CHATPIPE_KAFKA_BOOTSTRAP"),
            INGEST_DLQ.name,
            expect=truth.delivery.dlq_records,
            timeout=60,
        )
        parked = Counter(hashlib.sha256(codec.decode(m.value()).body).hexdigest() for m in records)
        assert set(parked) == {b.sha256 for b in truth.malformed}
        assert sum(parked.values()) == truth.delivery.dlq_records

        # one message's rows corrupted on purpose: verify fails and names it
        given_up = truth.delivery.given_up
        victim = next(
            m for m in truth.messages if m.state in ("delivered", "read") and m.umid not in given_up
        )
        _corrupt(db, victim.umid, "sent")
        code = verify.main(["--truth", str(truth_file), "--store", store])
        out = capsys.readouterr().out
        assert code == 1, out
        assert victim.umid in out and "verify: FAILED" in out
        counts = _row(out, "store")
        assert int(counts["matched"]) == int(counts["checked"]) - 1
        assert (counts["state"], counts["missing"], counts["times"]) == ("1", "0", "0")
