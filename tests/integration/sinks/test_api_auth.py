"""The read API's API keys (sinks/auth.py wired in sinks/api.py) over a real SQLite store: 401 without
or with a wrong key, 403 for another subaccount's data, both in 8x8's error body; /healthz and /metrics
stay open; without keys the API is open (what `chatpipe dev` and `create_app(Settings())` do)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from chatpipe.runtime.config import Settings
from sinks.api import CODE_FORBIDDEN, CODE_UNAUTHORIZED, create_app
from sinks.connect import open_store
from sinks.store import Store
from tests.integration.sinks.test_api import NOW, PII, SUB, UMID, assert_error, fallback_message

pytestmark = pytest.mark.integration

OTHER = "other_sub"
OTHER_UMID = "0a5e5a8e-5b63-4d4e-9d7e-3c1b8f3f0c11"
DETAILS = f"/api/v1/subaccounts/{SUB}/messages/{UMID}"


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'chatpipe.db'}", PII)
    s.migrate()
    s.write_states([fallback_message(), fallback_message(umid=OTHER_UMID, sub=OTHER)])
    yield s
    s.close()


async def _client(settings: Settings, store: Store) -> TestClient:
    c = TestClient(TestServer(create_app(settings, store=store, clock=lambda: NOW)))
    await c.start_server()
    return c


@pytest.fixture()
async def client(store: Store, tmp_path: Path) -> AsyncIterator[TestClient]:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# file keys\nfile-key:{OTHER}\n", encoding="utf-8")
    c = await _client(Settings(api_keys=f"mine:{SUB};ops:*", api_keys_file=keys_file), store)
    try:
        yield c
    finally:
        await c.close()


async def _get(client: TestClient, path: str, key: str | None, status: int) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    r = await client.get(path, headers=headers)
    text = await r.text()
    assert r.status == status, text
    assert r.content_type == "application/json"
    return json.loads(text)


async def test_a_key_reads_its_own_subaccount(client: TestClient) -> None:
    body = await _get(client, DETAILS, "mine", 200)
    assert [r["umid"] for r in body["data"]] == [UMID, UMID]
    assert (await _get(client, f"/api/v1/subaccounts/{SUB}/messages", "ops", 200))["data"][0]["umid"] == UMID
    other = await _get(client, f"/api/v1/subaccounts/{OTHER}/messages/{OTHER_UMID}", "file-key", 200)
    assert other["data"][0]["subAccountId"] == OTHER


@pytest.mark.parametrize("key", [None, "", "wrong", "mine2", "min"])
async def test_no_or_a_wrong_key_is_401_in_8x8s_error_body(client: TestClient, key: str | None) -> None:
    r = await client.get(DETAILS, headers={} if key is None else {"Authorization": f"Bearer {key}"})
    assert r.status == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert_error(json.loads(await r.text()), CODE_UNAUTHORIZED)


async def test_basic_credentials_are_not_an_api_key(client: TestClient) -> None:
    r = await client.get(DETAILS, headers={"Authorization": "Basic bWluZTptaW5l"})  # mine:mine
    assert r.status == 401


async def test_another_subaccounts_details_are_401_as_8x8_documents_no_403(client: TestClient) -> None:
    path = f"/api/v1/subaccounts/{OTHER}/messages/{OTHER_UMID}"
    assert_error(await _get(client, path, "mine", 401), CODE_FORBIDDEN)


@pytest.mark.parametrize(
    "path",
    [
        f"/api/v1/subaccounts/{OTHER}/messages",
        f"/api/v1/subaccounts/{OTHER}/conversations/abc?user=u1",
        f"/api/v1/subaccounts/{OTHER}/conversations/abc/messages?user=u1",
    ],
)
async def test_another_subaccounts_data_is_403_on_chatpipes_own_routes(client: TestClient, path: str) -> None:
    assert_error(await _get(client, path, "mine", 403), CODE_FORBIDDEN)


async def test_health_and_metrics_stay_open_and_count_refusals(client: TestClient) -> None:
    await _get(client, DETAILS, None, 401)
    await _get(client, f"/api/v1/subaccounts/{OTHER}/messages", "mine", 403)
    assert await _get(client, "/healthz", None, 200) == {"status": "ok"}
    r = await client.get("/metrics")
    assert r.status == 200
    text = await r.text()
    assert 'chatpipe_api_requests_total{route="auth",status="401"} 1.0' in text
    assert 'chatpipe_api_requests_total{route="auth",status="403"} 1.0' in text


async def test_without_keys_the_api_is_open(store: Store) -> None:
    c = await _client(Settings(), store)
    try:
        assert (await _get(c, DETAILS, None, 200))["data"][0]["umid"] == UMID
    finally:
        await c.close()


def test_chatpipe_api_process_enforces_its_keys(store: Store, tmp_path: Path) -> None:
    """`chatpipe api` as production runs it (its own process, keys from the environment)."""
    import os
    import subprocess
    import sys

    import httpx

    from chatpipe.broker import free_port, wait_for_port

    key = "k-9f3c0e77-process-secret"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATPIPE_")}
    env.update(
        CHATPIPE_STORE_URL=f"sqlite:///{tmp_path / 'chatpipe.db'}",
        CHATPIPE_API_PORT=str(port),
        CHATPIPE_STATE_DIR=str(tmp_path / "state"),
        CHATPIPE_API_KEYS=f"{key}:{SUB}",
        CHATPIPE_PII_HASH_KEY="k",  # the store fixture's PII policy
    )
    log = tmp_path / "api.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chatpipe.cli", "api"], env=env, stdout=out, stderr=out
        )
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=30) as client:
            assert client.get("/healthz").status_code == 200
            assert client.get(DETAILS).status_code == 401
            assert client.get(DETAILS, headers={"Authorization": f"Bearer {key}"}).status_code == 200
            other = f"/api/v1/subaccounts/{OTHER}/messages"
            assert client.get(other, headers={"Authorization": f"Bearer {key}"}).status_code == 403
    finally:
        proc.terminate()
        proc.wait(30)
    assert key not in log.read_text(encoding="utf-8", errors="replace")


async def test_verify_presents_its_api_key(client: TestClient) -> None:
    """`chatpipe verify --api URL --api-key KEY` reads through an authenticated API; without the key it
    reports the 401 instead of a verdict."""
    from chatpipe.verify import ApiSource

    base = str(client.make_url("/"))
    with_key = ApiSource(base, 2, "mine")
    try:
        assert await with_key.umids(SUB) == {UMID}
    finally:
        await with_key.close()
    without = ApiSource(base, 2)
    try:
        with pytest.raises(RuntimeError, match="HTTP 401"):
            await without.umids(SUB)
    finally:
        await without.close()
