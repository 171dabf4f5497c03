"""The analytics read API (`sinks.api_analytics`) over real stores, against the simulator's truth."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from chatpipe.runtime.config import Settings
from sinks import aggregates as A
from sinks.api import create_app
from sinks.connect import open_store
from sinks.store import Store
from tests.integration.sinks.test_analytics_store import (
    PII,
    SINCE,
    START,
    UNTIL,
    Dataset,
    _write,
    build,
    truth,
)
from tests.support.postgres import store_url

pytestmark = pytest.mark.integration

RANGE = {"since": SINCE.isoformat(), "until": UNTIL.isoformat()}


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return build(messages=250, seed=5)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Any, dataset: Dataset) -> Iterator[Store]:
    s = open_store(store_url(request, tmp_path), PII)
    s.migrate()
    _write(s, dataset, 400, random.Random(1))
    yield s
    s.close()


@pytest.fixture()
async def client(store: Store) -> AsyncIterator[TestClient]:
    c = TestClient(TestServer(create_app(Settings(), store=store, clock=lambda: START + timedelta(days=1))))
    await c.start_server()
    try:
        yield c
    finally:
        await c.close()


async def get(client: TestClient, sub: str, view: str, status: int = 200, **params: Any) -> Any:
    r = await client.get(f"/api/v1/subaccounts/{sub}/analytics/{view}", params={**RANGE, **params})
    text = await r.text()
    assert r.status == status, text
    return json.loads(text)


async def test_funnel_fallback_and_window_totals_equal_the_truth_per_subaccount(
    client: TestClient, dataset: Dataset
) -> None:
    t = truth(dataset)
    for sub in dataset.traffic.sub_accounts:
        mine = Counter({k: v for k, v in t["funnel"].items() if k[0] == sub})
        by_channel: Counter[tuple[str, str]] = Counter()
        for (_, _, channel, _, _, counter), n in mine.items():
            by_channel[(channel, counter)] += n
        body = await get(client, sub, "funnel", granularity="total", groupBy="channel")
        assert body["subAccountId"] == sub and body["groupBy"] == ["channel"]
        for row in body["data"]:
            assert row["bucket"] is None
            for c in A.MESSAGE_COUNTERS:
                assert row[c] == by_channel[(row["channel"], c)], (sub, row["channel"], c)
            n = row["messages"]
            assert row["deliveredRate"] == round((row["delivered"] + row["read"]) / n, 4)
        assert sum(r["messages"] for r in body["data"]) == sum(
            n for k, n in mine.items() if k[-1] == "messages"
        )
        fb = await get(client, sub, "fallback", granularity="total")
        paths: Counter[str] = Counter()
        for (_, _, _, _, path, counter), n in mine.items():
            if counter == "messages":
                paths[path] += n
        assert {r["path"]: r["messages"] for r in fb["data"]} == dict(paths)
        for s in fb["summary"]:
            fell = sum(n for p, n in paths.items() if p.startswith(s["firstChannel"] + ">"))
            assert s["fellBack"] == fell
        win = await get(client, sub, "window", granularity="total")
        inbound = sum(n for k, n in t["window"].items() if k[0] == sub and k[-1] == "inbound")
        answered = sum(n for k, n in t["window"].items() if k[0] == sub and k[-1] == "answered")
        assert [(r["inbound"], r["answered"]) for r in win["data"]] == (
            [(inbound, answered)] if inbound else []
        )


async def test_latency_percentiles_come_from_the_true_durations(client: TestClient, dataset: Dataset) -> None:
    t = truth(dataset)
    sub = dataset.traffic.sub_accounts[0]
    hist: dict[int, int] = {}
    for k, n in t["latency"].items():
        if k[0] == sub and k[4] == "deliver":
            hist[k[5]] = hist.get(k[5], 0) + n
    body = await get(client, sub, "latency", granularity="total", metric="deliver")
    [row] = body["data"]
    assert row["count"] == sum(hist.values())
    assert {h["bucket"]: h["count"] for h in row["histogram"]} == hist
    found = A.percentile(hist, 0.9)
    assert found is not None and row["p90"] == round(found.value, 3)
    assert row["p90Bucket"][0] <= row["p90"] <= (row["p90Bucket"][1] or math.inf)


async def test_top_errors_carry_8x8s_meaning_and_shares(client: TestClient, dataset: Dataset) -> None:
    t = truth(dataset)
    sub = dataset.traffic.sub_accounts[0]
    codes: Counter[int] = Counter()
    for k, n in t["errors"].items():
        if k[0] == sub:
            codes[k[4]] += n
    body = await get(client, sub, "errors", limit="3")
    assert [(r["errorCode"], r["count"]) for r in body["data"]] == sorted(
        codes.items(), key=lambda kv: (-kv[1], kv[0])
    )[:3]
    for r in body["data"]:
        assert (r["reason"], r["description"]) == (A.error_meaning(r["errorCode"]) or (None, None))
        assert r["share"] == round(r["count"] / sum(codes.values()), 4)


async def test_inbound_by_type_and_day(client: TestClient, dataset: Dataset) -> None:
    t = truth(dataset)
    sub = dataset.traffic.sub_accounts[0]
    days: Counter[tuple[Any, ...]] = Counter()
    for (s, hour, channel, _, typ, itype), n in t["inbound"].items():
        if s == sub:
            days[(A.day_of(hour).strftime("%Y-%m-%dT%H:%M:%SZ"), channel, typ, itype or None)] += n
    body = await get(client, sub, "inbound")
    got = {(r["bucket"], r["channel"], r["type"], r["interactiveType"]): r["count"] for r in body["data"]}
    assert got == dict(days)


async def test_a_subaccount_sees_only_its_own_numbers(client: TestClient, dataset: Dataset) -> None:
    body = await get(client, "SomeoneElse", "funnel", granularity="total")
    assert body["data"] == []
    a, b = dataset.traffic.sub_accounts[:2]
    fa = await get(client, a, "funnel", granularity="total")
    fb = await get(client, b, "funnel", granularity="total")
    t = truth(dataset)["funnel"]
    for sub, body in ((a, fa), (b, fb)):
        assert body["data"][0]["messages"] == sum(
            n for k, n in t.items() if k[0] == sub and k[-1] == "messages"
        )


@pytest.mark.parametrize(
    "params",
    [{"granularity": "week"}, {"groupBy": "path"}, {"since": "yesterday"}, {"since": UNTIL.isoformat()},
     {"metric": "sent"}, {"limit": "0"}],
)  # fmt: skip
async def test_bad_parameters_are_answered_400_in_8x8s_shape(
    client: TestClient, params: dict[str, str]
) -> None:
    body = await get(client, "sub", "latency" if "metric" in params else "errors", 400, **params)
    assert body["code"] == 1000 and body["errorId"] and body["message"]
    unknown = await get(client, "sub", "nope", 404)
    assert unknown["code"] == 1300
