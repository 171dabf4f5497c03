"""The reconciler end to end: real SQLite (and PostgreSQL) store, real Tansu broker, real schema registry.

8x8 is an external API: a local aiohttp server plays its Retrieve message details endpoint, enforcing
8x8's documented 1 request/second per subaccount itself (answering 429 in 8x8's format when violated) and
counting requests. One reconciler pass must look up exactly the candidates, provoke no 429, record the
404, and put receipts on `chatpipe.receipts.raw` that decode to 8x8's statuses for each umid.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from chatpipe.broker import free_port
from chatpipe.reconciler import Reconciler, ReconcilerConfig, run_reconciler, scan_candidates
from chatpipe.runtime.config import Settings
from processors.reconcile import Outcome
from processors.state import apply_many
from schemas.catalog import RECEIPTS
from schemas.codec import Codecs
from schemas.models import DeliveryReceipt, MessageState, Status
from sinks.connect import open_store
from sinks.rows import PiiPolicy
from sinks.store import LookupRecord, Store
from tests.support.kafka import read_topic
from tests.support.postgres import PostgresServer, fresh_database

pytestmark = pytest.mark.integration

KEY = "test-api-key"
NOW = datetime.now(UTC).replace(microsecond=0)
OLD = NOW - timedelta(hours=2)
PII = PiiPolicy(hash_key=b"k")


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-4] + "Z"


# --- a stand-in for 8x8 --------------------------------------------------------------------------------


@dataclass
class Fake8x8:
    """GET /api/v1/subaccounts/{sub}/messages/{umid}: answers from `answers` (umid -> data records), 404
    otherwise; 429 in 8x8's format when a subaccount asks twice within a second; 401 without the key;
    `script` makes it fail a umid's first requests with the given statuses."""

    answers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    script: dict[str, list[int]] = field(default_factory=dict)  # umid -> statuses to answer first (5xx)
    requests: list[tuple[str, str, float]] = field(default_factory=list)
    violations: int = 0
    unauthorized: int = 0
    last: dict[str, float] = field(default_factory=dict)
    retry_after: str | None = None  # a Retry-After header on 429s

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/subaccounts/{sub}/messages/{umid}", self.details)
        return app

    @staticmethod
    def error(status: int, code: int, message: str) -> web.Response:
        body = {
            "code": code,
            "message": message,
            "errorId": str(uuid.uuid4()),
            "timestamp": iso(datetime.now(UTC)),
        }
        return web.json_response(body, status=status)

    async def details(self, request: web.Request) -> web.Response:
        sub, umid = request.match_info["sub"], request.match_info["umid"]
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            self.unauthorized += 1
            return self.error(401, 1200, "Request was not authenticated properly")
        now = time.monotonic()
        self.requests.append((sub, umid, now))
        previous = self.last.get(sub)
        self.last[sub] = now
        if previous is not None and now - previous < 1.0:
            self.violations += 1
            answer = self.error(429, 429, "Quota exceeded. Please try again in 1 second(s).")
            if self.retry_after is not None:
                answer.headers["Retry-After"] = self.retry_after
            return answer
        if self.script.get(umid):
            return self.error(self.script[umid].pop(0), 5000, "Service unavailable")
        records = self.answers.get(umid)
        if records is None:
            return self.error(404, 1300, "Message not found")
        return web.json_response({"data": records})


@pytest.fixture()
async def fake_8x8() -> AsyncIterator[tuple[Fake8x8, str]]:
    fake = Fake8x8()
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


# --- messages in the store -----------------------------------------------------------------------------


def receipt(umid: str, sub: str, channel: str, state: str, at: datetime) -> DeliveryReceipt:
    return DeliveryReceipt(
        umid=umid,
        sub_account_id=sub,
        channel=channel,
        status=Status(state, at),
        received_at=at,
        raw_json="{}",
    )


def folded(
    umid: str, sub: str, channel: str, state: str, at: datetime, *, now: datetime = OLD
) -> MessageState:
    """A state as the processor would have it, its last change at `now`."""
    return apply_many(None, [receipt(umid, sub, channel, state, at)], now=now).state


def detail_record(
    umid: str, sub: str, step: int, channel: str, state: str, at: datetime, **status: Any
) -> dict[str, Any]:
    return {
        "umid": umid,
        "subAccountId": sub,
        "channel": channel,
        "channelId": f"00000000-0000-0000-0000-00000000000{step}",
        "direction": "outbound",
        "country": "SG",
        "status": {"state": state, "timestamp": iso(at), **status},
        "user": {"msisdn": "+6591234xxxx"},
        "contentType": "Text",
        "content": "**MASKED**",
        "createdAt": iso(OLD - timedelta(minutes=1)),
        "step": step,
    }


@dataclass
class Scenario:
    expected: dict[str, list[tuple[str, str]]]  # umid -> [(channel, state)] from 8x8, step order
    not_found: set[str]
    not_candidates: set[str]
    subs: list[str]


def fill_store(store: Store, fake: Fake8x8, subs: int = 3) -> Scenario:
    """Per subaccount: a WhatsApp message 8x8 says was read, a Viber -> SMS fallback the processor only saw
    the start of, one unknown at 8x8 (404); plus a final one and a recent one (neither is a candidate)."""
    states: list[MessageState] = []
    expected: dict[str, list[tuple[str, str]]] = {}
    not_found: set[str] = set()
    not_candidates: set[str] = set()
    names = [f"acme-{uuid.uuid4().hex[:8]}" for _ in range(subs)]
    t0 = OLD - timedelta(minutes=10)
    for sub in names:
        read_umid, fallback_umid, lost_umid, final_umid, fresh_umid = (str(uuid.uuid4()) for _ in range(5))
        states.append(folded(read_umid, sub, "whatsapp", "delivered", t0))
        fake.answers[read_umid] = [
            detail_record(read_umid, sub, 1, "WhatsApp", "read", t0 + timedelta(minutes=3))
        ]
        expected[read_umid] = [("whatsapp", "read")]

        states.append(folded(fallback_umid, sub, "viber", "sent", t0))
        fake.answers[fallback_umid] = [
            detail_record(
                fallback_umid,
                sub,
                2,
                "SMS",
                "Delivered",
                t0 + timedelta(minutes=5),
                detail="delivered_to_operator",
            ),
            detail_record(
                fallback_umid,
                sub,
                1,
                "Viber",
                "undelivered",
                t0 + timedelta(minutes=4),
                errorCode=2008,
                errorMessage="Expired",
            ),
        ]
        expected[fallback_umid] = [("viber", "undelivered"), ("sms", "delivered")]

        states.append(folded(lost_umid, sub, "whatsapp", "queued", t0))
        not_found.add(lost_umid)

        states.append(folded(final_umid, sub, "whatsapp", "read", t0))
        states.append(folded(fresh_umid, sub, "whatsapp", "sent", NOW - timedelta(seconds=30), now=NOW))
        not_candidates |= {final_umid, fresh_umid}
    assert store.write_states(states) == len(states)
    return Scenario(expected, not_found, not_candidates, names)


def checks(db: Path) -> dict[str, tuple[int, str, str]]:
    """umid -> (attempts, outcome, next_due) of the lookups the reconciler recorded."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT umid, attempts, outcome, next_due FROM reconcile_checks").fetchall()
    return {u: (a, o, d) for u, a, o, d in rows}


# --- the pass ------------------------------------------------------------------------------------------


async def test_one_pass_looks_up_each_candidate_once_and_produces_receipts(
    tmp_path: Path, broker: str, registry_url: str, fake_8x8: tuple[Fake8x8, str]
) -> None:
    fake, url = fake_8x8
    db = tmp_path / "chatpipe.db"
    store = open_store(f"sqlite:///{db}", PII)
    store.migrate()
    scenario = fill_store(store, fake)
    candidates = set(scenario.expected) | scenario.not_found
    settings = Settings(
        kafka_bootstrap=broker,
        schema_registry_url=registry_url,
        store_url=f"sqlite:///{db}",
        api_8x8_url=url + "/",
        api_8x8_key=KEY,
        reconcile_after=900.0,
    )
    reconciler = Reconciler(settings, config=ReconcilerConfig(concurrency=4), store=store)
    await reconciler.start()
    try:
        report = await reconciler.run_pass()
        # a second pass right away asks nothing: every umid was just looked up (404s wait for hours)
        again = await reconciler.run_pass()
    finally:
        await reconciler.close()
        store.close()

    assert fake.violations == 0, "the reconciler provoked 429s"
    assert fake.unauthorized == 0
    assert sorted(u for _, u, _ in fake.requests) == sorted(candidates)  # each candidate exactly once
    assert report.candidates == report.requests == len(candidates)
    assert report.rate_limited == 0
    assert again.candidates == again.requests == 0
    assert report.outcomes == {Outcome.RECEIPTS: 6, Outcome.NOT_FOUND: 3}
    assert report.receipts == 9
    # per subaccount at least 1 s apart at the fake (it enforces it too); subaccounts ran in parallel: each
    # one's first request came before every other one's last
    by_sub: dict[str, list[float]] = defaultdict(list)
    for sub, _, at in fake.requests:
        by_sub[sub].append(at)
    for times in by_sub.values():
        assert all(b - a >= 1.0 for a, b in itertools.pairwise(times))
    assert max(times[0] for times in by_sub.values()) < min(times[-1] for times in by_sub.values())
    recorded = checks(db)
    for umid in scenario.not_found:
        attempts, outcome, next_due = recorded[umid]
        assert (attempts, outcome) == (1, Outcome.NOT_FOUND)
        assert next_due > iso(NOW + timedelta(hours=1))
    for umid in scenario.expected:
        assert recorded[umid][:2] == (1, Outcome.RECEIPTS)

    # the receipts on the topic, decoded with chatpipe's codec, keyed by umid
    codecs = Codecs.connect(registry_url)
    got: dict[str, list[DeliveryReceipt]] = defaultdict(list)
    for msg in read_topic(broker, RECEIPTS.name, idle=3.0):
        key = (msg.key() or b"").decode()
        if key in candidates or key in scenario.not_candidates:
            r = codecs.receipts.decode(msg.value())
            assert r.umid == key
            got[key].append(r)
    assert set(got) == set(scenario.expected)
    for umid, statuses in scenario.expected.items():
        assert [(r.channel, r.status.state) for r in got[umid]] == statuses
        assert all(r.received_at >= NOW - timedelta(minutes=5) and '"step"' in r.raw_json for r in got[umid])
    fallback = next(u for u, s in scenario.expected.items() if len(s) == 2)
    viber, sms = got[fallback]
    assert (viber.status.error_code, viber.status.error_message) == (2008, "Expired")
    assert sms.status.detail == "delivered_to_operator"

    # and the state machine folds them onto what the processor had
    store = open_store(f"sqlite:///{db}", PII)
    try:
        found = store.get_message(viber.sub_account_id, fallback)
        assert found is not None and [s["channel"] for s in found.steps] == ["viber"]
    finally:
        store.close()
    before = folded(fallback, viber.sub_account_id, "viber", "sent", OLD - timedelta(minutes=10))
    after = apply_many(before, got[fallback], now=NOW).state
    assert (after.channel_path, after.state, after.final) == ("viber>sms", "delivered", True)


async def test_429_and_5xx_are_retried_within_bounds(
    tmp_path: Path, broker: str, registry_url: str, fake_8x8: tuple[Fake8x8, str]
) -> None:
    """Someone else just used the subaccount's quota: the first request gets 429 and the subaccount waits
    what 8x8 asked. A umid answering 503 once is still reconciled; one that keeps answering 503 is given
    up after `max_attempts` and due again after `reconcile_after`."""
    fake, url = fake_8x8
    db = tmp_path / "chatpipe.db"
    store = open_store(f"sqlite:///{db}", PII)
    store.migrate()
    sub = f"acme-{uuid.uuid4().hex[:8]}"
    ok, broken = str(uuid.uuid4()), str(uuid.uuid4())
    early = OLD - timedelta(seconds=1)
    store.write_states(
        [folded(ok, sub, "sms", "sent", OLD), folded(broken, sub, "sms", "sent", early, now=early)]
    )
    fake.answers[ok] = [detail_record(ok, sub, 1, "SMS", "delivered", OLD + timedelta(seconds=5))]
    fake.answers[broken] = [detail_record(broken, sub, 1, "SMS", "delivered", OLD + timedelta(seconds=5))]
    fake.script = {ok: [503], broken: [502, 503, 500, 503]}
    settings = Settings(
        kafka_bootstrap=broker,
        schema_registry_url=registry_url,
        store_url=f"sqlite:///{db}",
        api_8x8_url=url,
        api_8x8_key=KEY,
        reconcile_after=900.0,
    )
    reconciler = Reconciler(settings, config=ReconcilerConfig(max_attempts=3, backoff=0.2), store=store)
    await reconciler.start()
    fake.retry_after = "2"  # longer than the message's "1 second(s)": the longer one is honoured
    try:
        fake.last[sub] = time.monotonic()  # the quota was just used elsewhere
        report = await reconciler.run_pass()
    finally:
        await reconciler.close()
        store.close()
    assert report.outcomes == {Outcome.FAILED: 1, Outcome.RECEIPTS: 1}
    assert fake.violations == 1 and report.rate_limited == 1  # only the one provoked on purpose
    asked = [u for _, u, _ in fake.requests]
    assert asked == [broken] * 4 + [ok] * 2  # broken: 429 then 3 failures (max_attempts); ok: 503, answer
    at = [t for _, _, t in fake.requests]
    assert at[1] - at[0] >= 2.0  # Retry-After honoured
    assert all(b - a >= 2.0 for a, b in itertools.pairwise(at[1:]))  # then slowed down: the circuit
    recorded = checks(db)
    assert recorded[broken][:2] == (0, Outcome.FAILED)
    assert iso(datetime.now(UTC) + timedelta(seconds=800)) < recorded[broken][2]
    assert recorded[ok][:2] == (1, Outcome.RECEIPTS)
    metrics = reconciler.metrics_registry
    assert metrics.get_sample_value("chatpipe_reconciler_rate_limited_waits_total", {"reason": "quota"}) == 1
    assert metrics.get_sample_value("chatpipe_reconciler_requests_total", {"status": "429"}) == 1
    assert metrics.get_sample_value("chatpipe_reconciler_requests_total", {"status": "503"}) == 2
    assert metrics.get_sample_value("chatpipe_reconciler_requests_total", {"status": "200"}) == 1
    assert metrics.get_sample_value("chatpipe_reconciler_receipts_total") == 1


async def test_two_reconcilers_never_ask_the_same_umid_and_a_restart_does_not_ask_again(
    tmp_path: Path, broker: str, registry_url: str, fake_8x8: tuple[Fake8x8, str]
) -> None:
    """Two reconcilers on one store, in parallel: each subaccount is looked up by the one holding its
    lease, so every candidate is asked exactly once over both, and 8x8's per-subaccount limit holds across
    them. A third one started afterwards (a restart: a new process, a new owner) asks nothing: the store
    says when each umid is due again."""
    fake, url = fake_8x8
    db = tmp_path / "chatpipe.db"
    stores = [open_store(f"sqlite:///{db}", PII) for _ in range(3)]
    stores[0].migrate()
    scenario = fill_store(stores[0], fake, subs=4)
    candidates = set(scenario.expected) | scenario.not_found
    # each holds two subaccounts already (say from its previous pass); neither gets the other's
    now = datetime.now(UTC)
    assert stores[0].lease_subaccounts("a", scenario.subs[2:], now, now + timedelta(minutes=2))
    assert stores[1].lease_subaccounts("b", scenario.subs[:2], now, now + timedelta(minutes=2))
    settings = Settings(
        kafka_bootstrap=broker,
        schema_registry_url=registry_url,
        store_url=f"sqlite:///{db}",
        api_8x8_url=url,
        api_8x8_key=KEY,
        reconcile_after=900.0,
    )
    a, b, c = (Reconciler(settings, store=s, owner=o) for s, o in zip(stores, "abc", strict=True))
    try:
        for r in (a, b, c):
            await r.start()
        first, second = await asyncio.gather(a.run_pass(), b.run_pass())
        restarted = await c.run_pass()
    finally:
        for r in (a, b, c):
            await r.close()
        for s in stores:
            s.close()
    asked = [u for _, u, _ in fake.requests]
    assert sorted(asked) == sorted(candidates)  # each exactly once over both
    assert first.requests > 0 and second.requests > 0  # both worked, on different subaccounts
    assert first.skipped_subaccounts == second.skipped_subaccounts == 2
    assert fake.violations == 0
    assert restarted.candidates == restarted.requests == 0


def test_reconciler_off_without_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    assert run_reconciler(Settings(api_8x8_key=None)) == 0
    assert "reconciler off" in caplog.text


# --- the candidate query on both dialects --------------------------------------------------------------


def _candidate_query_contract(store: Store) -> None:
    store.migrate()
    sub = "acme"
    states = [
        folded(f"u{i:03d}", sub, "whatsapp", "sent", OLD, now=OLD + timedelta(seconds=i % 7))
        for i in range(25)
    ]
    states.append(folded("final", sub, "whatsapp", "read", OLD))
    states.append(folded("fresh", sub, "whatsapp", "sent", NOW, now=NOW))
    store.write_states(states)
    cutoff = NOW - timedelta(seconds=900)
    pages: list[str] = []
    after = None
    while True:
        rows = store.reconcile_candidates(cutoff, NOW, after=after, limit=4)
        pages.extend(r["umid"] for r in rows)
        if len(rows) < 4:
            break
        after = (rows[-1]["updated_at"], rows[-1]["umid"])
    assert sorted(pages) == [f"u{i:03d}" for i in range(25)] and len(pages) == 25
    first = store.reconcile_candidates(cutoff, NOW, limit=1)[0]
    assert first["updated_at"] == OLD and first["final"] in (0, False) and first["channel_path"] == "whatsapp"
    assert first["attempts"] == 0
    assert store.reconcile_candidates(cutoff, NOW, sub_account_id="other") == []
    picked = scan_candidates(store, NOW, 900, per_subaccount=10, limit=100, page_size=3)
    assert len(picked) == 10 and all(c.sub_account_id == sub for c in picked)
    assert [c.umid for c in picked] == pages[:10]  # oldest first
    later = NOW + timedelta(hours=1)
    store.record_lookups(
        [LookupRecord(c.umid, sub, 1, Outcome.RECEIPTS, NOW, later, [{"step": 1}]) for c in picked]
    )
    rest = scan_candidates(store, NOW, 900, per_subaccount=100, limit=100, page_size=3, sub_account_id=sub)
    assert len(rest) == 15 and not {c.umid for c in rest} & {c.umid for c in picked}
    # an older record changes nothing; once due again they are candidates, with their attempts
    store.record_lookups([LookupRecord(picked[0].umid, sub, 0, Outcome.FAILED, OLD, OLD)])
    again = store.reconcile_candidates(cutoff, later, limit=100)
    assert len(again) == 25 and {r["attempts"] for r in again if r["umid"] in pages[:10]} == {1}
    # leases: one owner at a time; a released lease is free from its `free_at`
    soon = NOW + timedelta(seconds=60)
    assert store.lease_subaccounts("a", ["s1", "s2"], NOW, soon) == ["s1", "s2"]
    assert store.lease_subaccounts("b", ["s2", "s3"], NOW, soon) == ["s3"]
    assert store.lease_subaccounts("a", ["s2"], NOW, soon + timedelta(seconds=60)) == ["s2"]  # renewed
    assert store.lease_subaccounts("b", ["s1"], soon, soon + timedelta(seconds=60)) == ["s1"]  # expired
    store.release_subaccounts("a", ["s2"], NOW + timedelta(seconds=1))
    store.release_subaccounts("a", ["s3"], NOW)  # not a's: left alone
    assert store.lease_subaccounts("b", ["s2", "s3"], NOW, soon) == ["s3"]
    assert store.lease_subaccounts("b", ["s2"], NOW + timedelta(seconds=1), soon) == ["s2"]


def test_candidate_query_sqlite(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'c.db'}", PII)
    try:
        _candidate_query_contract(store)
    finally:
        store.close()


def test_candidate_query_postgres(postgres_server: PostgresServer) -> None:
    store = open_store(fresh_database(postgres_server), PII)
    try:
        _candidate_query_contract(store)
    finally:
        store.close()


# --- the process --------------------------------------------------------------------------------------


def test_process_serves_health_and_metrics_and_stops_on_sigterm(
    tmp_path: Path, broker: str, registry_url: str
) -> None:
    """`run_reconciler` as its own process (what `chatpipe reconcile` runs): /healthz, /metrics, a clean
    exit 0 on SIGTERM. 8x8 is unreachable here (nothing to look up: the store is empty)."""
    port = free_port()
    code = (
        "import logging, sys\n"
        "from chatpipe.runtime.config import Settings\n"
        "from chatpipe.reconciler import run_reconciler\n"
        "logging.basicConfig(level='INFO')\n"
        f"s = Settings(kafka_bootstrap={broker!r}, schema_registry_url={registry_url!r},"
        f" store_url={'sqlite:///' + str(tmp_path / 'c.db')!r}, api_8x8_url='http://127.0.0.1:9',"
        f" api_8x8_key='k', metrics_port={port})\n"
        "sys.exit(run_reconciler(s))\n"
    )
    store = open_store(f"sqlite:///{tmp_path / 'c.db'}", PII)
    store.migrate()
    store.close()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=os.getcwd(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        health: bytes | None = None
        while time.monotonic() < deadline and health is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    health = r.read()
            except OSError:
                time.sleep(0.2)
        assert health is not None and b'"status": "ok"' in health
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
        assert "chatpipe_reconciler_last_pass_timestamp_seconds" in text
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "reconciler stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
