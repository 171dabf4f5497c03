"""chatpipe/runtime/serve.py's `/healthz` + `/metrics` factory: the answers every service gives.

Served on a loopback port by aiohttp's own test server (no broker, no database): the status codes, the
JSON bodies byte for byte and the content types the services gave before the factory, and the 503 a
failing check gives."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from chatpipe.runtime.serve import HealthCheck, add_health_routes, always_ok, health_answer


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("chatpipe_test_things", "things", ["kind"], registry=registry).labels("x").inc(3)
    return registry


async def get(
    registry: CollectorRegistry, path: str, check: HealthCheck = always_ok
) -> tuple[int, str, bytes]:
    """(status, Content-Type, body) of GET `path` on an app with only the factory's routes."""
    app = web.Application()
    add_health_routes(app, registry, check)
    async with TestClient(TestServer(app)) as client:
        response = await client.get(path)
        return response.status, response.headers["Content-Type"], await response.read()


async def test_healthz_answers_ok_as_the_services_did(registry: CollectorRegistry) -> None:
    # ingest, the read API, the worker: `{"status": "ok"}`; the sink adds whether it has its partitions
    assert await get(registry, "/healthz") == (200, "application/json; charset=utf-8", b'{"status": "ok"}')
    status, _, body = await get(registry, "/healthz", lambda: (True, {"assigned": False}))
    assert (status, body) == (200, b'{"status": "ok", "assigned": false}')


async def test_the_reconcilers_own_status_stays_first_and_unchanged(registry: CollectorRegistry) -> None:
    health: dict[str, Any] = {"status": "ok", "passes": 2, "lastPassAt": None, "owner": "r-1", "leases": 0}
    status, _, body = await get(registry, "/healthz", lambda: (True, health))
    expected = b'{"status": "ok", "passes": 2, "lastPassAt": null, "owner": "r-1", "leases": 0}'
    assert (status, body) == (200, expected)


async def test_a_failing_check_answers_503_with_its_details(registry: CollectorRegistry) -> None:
    failing = {"status": "ok", "reason": "store down"}  # a status among the details is not the answer's
    status, kind, body = await get(registry, "/healthz", lambda: (False, failing))
    assert (status, kind) == (503, "application/json; charset=utf-8")
    assert body == b'{"status": "unavailable", "reason": "store down"}'


async def test_metrics_serves_the_registry_in_prometheus_text_format(registry: CollectorRegistry) -> None:
    status, kind, body = await get(registry, "/metrics")
    assert (status, kind) == (200, CONTENT_TYPE_LATEST)
    assert body == generate_latest(registry)
    assert b'chatpipe_test_things_total{kind="x"} 3.0' in body


def test_faust_pages_build_the_same_answer() -> None:
    assert health_answer(always_ok) == (200, {"status": "ok"})
    assert health_answer(lambda: (False, {})) == (503, {"status": "unavailable"})
