"""`chatpipe export` on real stores (SQLite file, throw-away PostgreSQL): rows written through the store,
exported as CSV and Parquet, read back and compared with the rows the store was given."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from chatpipe.cli import main
from schemas.errors import TransientError
from schemas.models import InboundContent, InboundMessage, MessageState, StatusEvent, Step, User
from sinks import rows as R
from sinks.analytics_sql import Query
from sinks.connect import open_store
from sinks.export_rows import CLEAR_ONLY_COLUMNS, kind_of
from sinks.rows import PiiPolicy
from sinks.store import Store
from tests.support.postgres import store_url

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 1, 0, 0, 0, 250000, tzinfo=UTC)
SINCE, UNTIL = T0 + timedelta(hours=2), T0 + timedelta(hours=8)
PII = PiiPolicy(hash_key=b"export-test")
N = 40  # messages, one every 15 minutes from T0: 24 of them in [SINCE, UNTIL)
CHANNELS = ("whatsapp", "viber", "sms")


def step(n: int, channel: str, start: datetime, states: list[str], **kw: Any) -> Step:
    history = tuple(StatusEvent(s, start + timedelta(seconds=7 * i)) for i, s in enumerate(states))
    last = history[-1]
    times = {e.state: e.timestamp for e in history}
    return Step(
        step=n,
        channel=channel,
        state=last.state,
        status_timestamp=last.timestamp,
        first_event_at=history[0].timestamp,
        history=history,
        sent_at=times.get("sent"),
        delivered_at=times.get("delivered"),
        read_at=times.get("read"),
        failed_at=times.get("undelivered"),
        **kw,
    )


def message(i: int) -> MessageState:
    """Message i: first event at T0 + 15 min x i; every third falls back once or twice, some fail."""
    start = T0 + timedelta(minutes=15 * i)
    hops = 1 + (i % 3 == 0) + (i % 9 == 0)
    steps: list[Step] = []
    for n in range(hops):
        at = start + timedelta(minutes=n)
        if n < hops - 1:
            steps.append(step(n + 1, CHANNELS[n], at, ["sent", "undelivered"], error_code=1018,
                              error_message="Message rejected", detail="rejected_by_operator"))  # fmt: skip
        else:
            final = ["sent", "delivered", "read"][: 1 + i % 3] if i % 7 else ["sent", "undelivered"]
            steps.append(step(n + 1, CHANNELS[n], at, final, country="SG" if i % 2 else None))
    last = steps[-1]
    return MessageState(
        umid=f"{i:04d}-export-umid",
        sub_account_id="acme_01" if i % 4 else "beta_02",
        version=3,
        state=last.state,
        status_timestamp=last.status_timestamp,
        steps=tuple(steps),
        updated_at=last.status_timestamp + timedelta(seconds=1),
        error_code=last.error_code,
        user=User(msisdn=f"+6581{i:06d}"),
        batch_id=None if i % 5 else f"batch-{i}",
        first_sent_at=steps[0].sent_at,
        delivered_at=last.delivered_at,
        read_at=last.read_at,
        final=last.state in ("read", "undelivered"),
    )


def inbound(i: int) -> InboundMessage:
    at = T0 + timedelta(minutes=30 * i)
    return InboundMessage(
        umid=f"{i:04d}-inbound-umid",
        sub_account_id="acme_01",
        channel="whatsapp",
        channel_id="chan-1",
        type="Text",
        timestamp=at,
        received_at=at + timedelta(seconds=1),
        user=User(msisdn=f"+6590{i:06d}", name="Someone"),
        content=InboundContent(text=f"hello {i}"),
        raw_json='{"text": "hello"}',
    )


MESSAGES = [message(i) for i in range(N)]
INBOUND = [inbound(i) for i in range(12)]


def in_range(when: datetime) -> bool:
    return SINCE <= when < UNTIL


def expected(table: str) -> list[dict[str, Any]]:
    """The rows the store was given that `table` over [SINCE, UNTIL) must export, by primary key."""
    if table == "messages":
        rows = [R.state_rows(s, PII)[0] for s in MESSAGES if in_range(s.steps[0].first_event_at)]
        rows.sort(key=lambda r: r["umid"])
    elif table == "steps":
        rows = [r for s in MESSAGES for r in R.state_rows(s, PII)[1] if in_range(r["first_event_at"])]
        rows.sort(key=lambda r: (r["umid"], r["step"]))
    elif table == "events":
        rows = [r for s in MESSAGES for r in R.status_event_rows(s) if in_range(r["ts"])]
        rows.sort(key=lambda r: (r["umid"], r["step"], r["ts"], r["state"]))
    else:
        rows = [R.inbound_row(m, PII) for m in INBOUND if in_range(m.timestamp)]
        rows.sort(key=lambda r: r["umid"])
    return [{k: v for k, v in r.items() if k not in CLEAR_ONLY_COLUMNS} for r in rows]


def from_csv(text: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The header and the typed rows of an exported CSV."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader)
    parse = {
        "string": str,
        "int": int,
        "float": float,
        "bool": {"true": True, "false": False}.__getitem__,
        "timestamp": datetime.fromisoformat,
    }
    typed = [(c, parse[kind_of(c)], kind_of(c) != "string") for c in header]
    rows = [
        {c: None if v == "" and nullable else f(v) for (c, f, nullable), v in zip(typed, r, strict=True)}
        for r in reader
    ]
    return header, rows


def blank_strings(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CSV cannot tell NULL text from empty text: compare None text as ''."""
    return [{k: ("" if v is None and kind_of(k) == "string" else v) for k, v in r.items()} for r in rows]


@dataclass
class Backend:
    name: str
    url: str
    store: Store


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    url = store_url(request, tmp_path)
    store = open_store(url, PII)
    store.migrate()
    # in several batches, with a redelivery and an older version that must change nothing
    store.write_states(MESSAGES[:25])
    store.write_states(MESSAGES[20:])
    store.write_states([dataclasses.replace(MESSAGES[10], version=1, state="queued")])
    store.write_inbound(INBOUND)
    yield Backend(request.param, url, store)
    store.close()


def export(backend: Backend, *args: str, output: Path | None = None) -> int:
    argv = ["export", "--since", SINCE.isoformat(), "--until", UNTIL.isoformat(), "--batch", "7", *args]
    if output is not None:
        argv += ["--output", str(output)]
    return main(argv, env={"CHATPIPE_STORE_URL": backend.url, "CHATPIPE_PII_HASH_KEY": "export-test"})


@pytest.mark.parametrize("table", ["messages", "steps", "events", "inbound"])
def test_csv_and_parquet_exports_hold_exactly_the_rows_in_range(
    backend: Backend, table: str, tmp_path: Path
) -> None:
    want = expected(table)
    assert 0 < len(want) < len(expected_all(table))  # the range selects some rows, not all
    csv_file, parquet_file = tmp_path / f"{table}.csv", tmp_path / f"{table}.parquet"
    assert export(backend, "--format", "csv", "--table", table, "--progress", "never", output=csv_file) == 0
    header, got = from_csv(csv_file.read_text(encoding="utf-8"))
    assert header[0] == "umid" and header == list(want[0])
    assert got == blank_strings(want)

    assert export(backend, "--format", "parquet", "--table", table, output=parquet_file) == 0
    f = pq.ParquetFile(parquet_file)
    assert f.metadata.num_row_groups == -(-len(want) // 7)  # one row group per fetched batch
    assert f.read().to_pylist() == want
    assert not list(tmp_path.glob("*.part"))


def expected_all(table: str) -> list[Any]:
    if table == "messages":
        return MESSAGES
    if table == "inbound":
        return INBOUND
    return [
        r for s in MESSAGES for r in (R.state_rows(s, PII)[1] if table == "steps" else R.status_event_rows(s))
    ]


def test_masked_numbers_stay_masked_and_clear_columns_are_absent(backend: Backend, tmp_path: Path) -> None:
    out = tmp_path / "inbound.csv"
    assert export(backend, "--format", "csv", "--table", "inbound", output=out) == 0
    text = out.read_text(encoding="utf-8")
    header, rows = from_csv(text)
    assert not set(header) & CLEAR_ONLY_COLUMNS
    assert all(r["msisdn_masked"].endswith("xxxx") and r["text"] == R.MASKED for r in rows)
    for m in INBOUND:
        assert m.user.msisdn not in text and "hello" not in text and "Someone" not in text


def test_the_command_streams_csv_to_stdout_with_a_progress_bar_on_stderr(backend: Backend) -> None:
    """As a user runs it: its own process, CHATPIPE_STORE_URL, stdout, progress on stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATPIPE_")}
    env.update(CHATPIPE_STORE_URL=backend.url, CHATPIPE_PII_HASH_KEY="export-test")
    done = subprocess.run(
        [sys.executable, "-m", "chatpipe.cli", "export", "--format", "csv", "--table", "messages",
         "--since", SINCE.isoformat(), "--until", UNTIL.isoformat(), "--batch", "5", "--progress", "always"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    _, rows = from_csv(done.stdout)
    assert [r["umid"] for r in rows] == [r["umid"] for r in expected("messages")]
    assert sum(line.startswith("umid,") for line in done.stdout.splitlines()) == 1  # one header row
    n = len(rows)
    assert f"{n}/{n} rows" in done.stderr and "100%" in done.stderr


def test_aggregates_export_sums_to_the_stores_own_analytics_answers(backend: Backend, tmp_path: Path) -> None:
    since, until = (
        T0.replace(microsecond=0) + timedelta(hours=2),
        T0.replace(microsecond=0) + timedelta(hours=8),
    )
    out = tmp_path / "aggregates.parquet"
    argv = ["export", "--format", "parquet", "--table", "aggregates", "--output", str(out),
            "--since", since.isoformat(), "--until", until.isoformat()]  # fmt: skip
    assert main(argv, env={"CHATPIPE_STORE_URL": backend.url}) == 0
    rows = pq.read_table(out).to_pylist()
    # the truth: every message whose first event is in those hours, once
    firsts = [s for s in MESSAGES if since <= s.steps[0].first_event_at < until]
    assert sum(r["messages"] for r in rows) == len(firsts)
    assert {(r["sub_account_id"], r["path"]) for r in rows} == {
        (s.sub_account_id, ">".join(st.channel for st in s.steps)) for s in firsts
    }
    # per (subaccount, hour, channel, country), the export's paths add up to the store's funnel
    counters = ("messages", "pending", "sent", "delivered", "read", "failed", "final")
    summed: dict[tuple[Any, ...], list[int]] = {}
    for r in rows:
        key = (r["sub_account_id"], r["hour"], r["channel"], r["country"])
        summed[key] = [a + r[c] for a, c in zip(summed.get(key, [0] * 7), counters, strict=True)]
    answered = {}
    for sub in ("acme_01", "beta_02"):
        q = Query("funnel", sub, since, until, granularity="hour", group_by=("channel", "country"))
        for a in backend.store.analytics(q):
            answered[(sub, a["bucket"], a["channel"], a["country"])] = [a[c] for c in counters]
    assert summed == answered


def test_export_memory_does_not_grow_with_the_rows(tmp_path: Path) -> None:
    """Streaming: the peak of Python allocations while exporting 4x the rows stays about the same (a
    fetch-everything export would need about 4x)."""
    import tracemalloc

    url = f"sqlite:///{tmp_path / 'big.db'}"
    store = open_store(url, PII)
    store.migrate()
    many = [dataclasses.replace(message(i % N), umid=f"{i:06d}-big") for i in range(1200)]
    spread = [  # 1200 messages over 24 hours: the first event of message i at T0 + 72 s x i
        dataclasses.replace(m, steps=tuple(
            dataclasses.replace(s, first_event_at=T0 + timedelta(seconds=72 * i)) for s in m.steps
        ))
        for i, m in enumerate(many)
    ]  # fmt: skip
    for k in range(0, len(spread), 600):
        store.write_states(spread[k : k + 600])
    store.close()

    def peak(hours: int, traced: bool = True) -> tuple[int, int]:
        out = tmp_path / f"steps-{hours}.csv"
        argv = ["export", "--format", "csv", "--table", "steps", "--batch", "50", "--progress", "never",
                "--since", T0.isoformat(), "--until", (T0 + timedelta(hours=hours)).isoformat(),
                "--output", str(out)]  # fmt: skip
        if traced:
            tracemalloc.start()
        try:
            assert main(argv, env={"CHATPIPE_STORE_URL": url}) == 0
            return tracemalloc.get_traced_memory()[1], len(out.read_text().splitlines()) - 1
        finally:
            tracemalloc.stop()

    peak(1, traced=False)  # imports and caches warmed up, untraced (tracing them is slow)
    small, rows_small = peak(6)
    large, rows_large = peak(24)
    assert rows_large >= 3.5 * rows_small > 400
    assert large < 1.5 * small, (small, large)


def test_a_reader_that_stops_early_ends_the_export_quietly(tmp_path: Path) -> None:
    """`chatpipe export ... | head -1`: exit 0, no traceback, the cursor closed before the connection."""
    url = f"sqlite:///{tmp_path / 'pipe.db'}"
    store = open_store(url, PII)
    store.migrate()
    store.write_states([dataclasses.replace(message(i % N), umid=f"{i:06d}-pipe") for i in range(1500)])
    store.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATPIPE_")}
    env.update(CHATPIPE_STORE_URL=url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatpipe.cli", "export", "--format", "csv", "--table", "events",
         "--batch", "10", "--since", T0.isoformat(), "--until", (T0 + timedelta(days=1)).isoformat()],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().startswith("umid,")
    proc.stdout.close()  # far more than a pipe's buffer is still to come
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Exception" not in err, err


def test_store_stream_reads_one_snapshot_on_a_read_only_store(backend: Backend, tmp_path: Path) -> None:
    """`Store.stream` (what export reads through): the count and the rows agree, writes that land while
    it streams are not seen, and the read-only store it is opened on refuses writes (not retriably)."""
    reader = open_store(backend.url, PII, read_only=True)
    try:
        with reader.stream("inbound", SINCE, UNTIL, batch=2) as stream:  # counted: the snapshot is taken
            backend.store.write_inbound([dataclasses.replace(INBOUND[5], umid="9999-late-umid")])
            rows = [r for b in stream for r in b]
        want = [r["umid"] for r in expected("inbound")]
        assert [r[0] for r in rows] == want and stream.total == len(want) > 2  # the late one is not seen
        assert stream.columns[0] == "umid" and "msisdn" not in stream.columns  # clear-only: not with PII
        with reader.stream("inbound", SINCE, UNTIL) as stream:
            assert "9999-late-umid" in {r[0] for b in stream for r in b}  # a new stream sees it
        with pytest.raises(Exception) as refused:
            reader.write_inbound([dataclasses.replace(INBOUND[5], umid="9999-refused-umid")])
        assert not isinstance(refused.value, TransientError)
    finally:
        reader.close()
    with pytest.raises(sqlite3.OperationalError):
        open_store(f"sqlite:///{tmp_path / 'absent' / 'x.db'}", PII, read_only=True)
    assert not (tmp_path / "absent").exists()  # nothing created
