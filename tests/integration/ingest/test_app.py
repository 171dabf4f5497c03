"""Ingest against the real embedded broker and registry: accepted, rejected, parked, authenticated."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatpipe.broker import free_port
from chatpipe.runtime.config import Settings
from chatpipe.runtime.patches import install_dispatch
from chatpipe.runtime.serve import start_site
from ingest.app import WEBHOOK, create_app, fast_dispatch
from ingest.parse import parse_webhook
from schemas.catalog import INBOUND, INGEST_DLQ, RECEIPTS
from schemas.codec import Codecs
from schemas.models import DeliveryReceipt
from tests.fixtures.webhooks import ALL, UNSUPPORTED, load
from tests.support.kafka import read_topic

pytestmark = pytest.mark.integration
URL = "/v1/webhooks/chatapps"
JSON = {"Content-Type": "application/json"}


def with_umid(name: str, umid: str) -> bytes:
    doc = json.loads(load(name))
    doc["payload"]["umid"] = umid
    return json.dumps(doc).encode()


def ingest_settings(broker: str, registry_url: str, state_dir: Path, **kw: object) -> Settings:
    return Settings(
        kafka_bootstrap=broker, schema_registry_url=registry_url, state_dir=state_dir, partitions=4, **kw
    )  # type: ignore[arg-type]


async def client_for(settings: Settings) -> TestClient:
    """A client of the app served as `chatpipe ingest` serves it: webhooks through `fast_dispatch`."""
    app = create_app(settings)
    client = TestClient(TestServer(app))
    await client.start_server()
    install_dispatch(client.server.runner, app, fast_dispatch)  # type: ignore[attr-defined]
    return client


@pytest.fixture()
async def client(broker: str, registry_url: str, state_dir: Path) -> AsyncIterator[TestClient]:
    c = await client_for(ingest_settings(broker, registry_url, state_dir))
    yield c
    await c.close()


def _dead_letters(broker: str, registry_url: str, error_ids: set[str]) -> dict[str, object]:
    codec = Codecs.connect(registry_url).ingest_dlq
    found = {}
    for m in read_topic(broker, INGEST_DLQ.name, idle=2.0):
        letter = codec.decode(m.value())
        if letter.error_id in error_ids:
            found[letter.error_id] = letter
    return found


async def test_every_documented_webhook_is_accepted_and_readable_from_its_topic(
    client: TestClient, broker: str, registry_url: str
) -> None:
    sent: dict[str, bytes] = {}
    for name in ALL:
        umid = str(uuid.uuid4())
        body = with_umid(name, umid)
        r = await client.post(URL, data=body, headers=JSON)
        assert r.status == 200, (name, await r.text())
        assert (await r.json())["umid"] == umid
        sent[umid] = body
    assert client.app is not None and client.app[WEBHOOK].fast_dispatched == len(ALL)
    codecs = Codecs.connect(registry_url)
    got = {}
    # the session's broker holds every test's records: a read that ends after 2 s without news can stop
    # early on a loaded machine (a slow fetch is not the end of the topic), so read again until all are
    # found or 60 s have passed
    deadline = time.monotonic() + 60
    while set(got) != set(sent) and time.monotonic() < deadline:
        for topic, codec in ((RECEIPTS.name, codecs.receipts), (INBOUND.name, codecs.inbound)):
            for m in read_topic(broker, topic, idle=2.0):
                if not m.value().startswith(b"\x00"):
                    continue  # another test's bytes on the session's broker (test_publisher.py: not Avro)
                event = codec.decode(m.value())
                if event.umid in sent:
                    assert m.key() == event.umid.encode()
                    got[event.umid] = event
    assert set(got) == set(sent)
    for umid, event in got.items():
        assert event.raw_json.encode() == sent[umid]  # the original JSON, byte for byte
        expected = parse_webhook(sent[umid], event.received_at)
        assert event == expected
        assert isinstance(event, DeliveryReceipt) == ('"outbound_message_status_changed"' in event.raw_json)


async def test_requests_fast_dispatch_leaves_to_the_router_are_still_served(client: TestClient) -> None:
    assert client.app is not None
    webhook = client.app[WEBHOOK]
    umid = str(uuid.uuid4())
    # a client that waits for "100 Continue" gets it from the app's route, then its webhook is accepted
    r = await client.post(URL, data=with_umid(ALL[0], umid), headers={**JSON, "Expect": "100-continue"})
    assert r.status == 200 and (await r.json())["umid"] == umid
    assert webhook.fast_dispatched == 0
    assert (await client.get(URL)).status == 405
    assert (await client.post(URL + "/x", data=b"{}", headers=JSON)).status == 404
    assert (await client.get("/healthz")).status == 200
    r = await client.post(URL, data=with_umid(ALL[0], str(uuid.uuid4())), headers=JSON)
    assert r.status == 200 and webhook.fast_dispatched == 1


async def test_a_body_that_arrives_in_pieces_is_read_whole(client: TestClient, broker: str) -> None:
    """The handler reads a body the parser already holds without waiting, and waits for one still coming."""
    import asyncio

    umid = str(uuid.uuid4())
    body = with_umid(ALL[0], umid)
    head = (
        f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(head + body[:10])
    await writer.drain()
    await asyncio.sleep(0.2)  # the handler is waiting for the rest by now
    writer.write(body[10:])
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert answer.endswith(b'"umid":"' + umid.encode() + b'"}')
    stored = {m.key(): m.value() for m in read_topic(broker, RECEIPTS.name, idle=2.0)}
    assert umid.encode() in stored and body in stored[umid.encode()]


async def test_start_site_serves_webhooks_through_fast_dispatch(
    broker: str, registry_url: str, state_dir: Path
) -> None:
    import aiohttp

    app = create_app(ingest_settings(broker, registry_url, state_dir))
    port = free_port()
    runner = await start_site(app, "127.0.0.1", port, dispatch=fast_dispatch)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            for _ in range(3):
                async with session.post(URL, data=with_umid(ALL[0], str(uuid.uuid4())), headers=JSON) as r:
                    assert r.status == 200, await r.text()
            async with session.get("/readyz") as r:
                assert r.status == 200
    finally:
        await runner.cleanup()
    assert app[WEBHOOK].fast_dispatched == 3


BAD_INPUTS = [
    ("not json", b"hello", JSON, 400, 1000, "body"),
    ("truncated json", b'{"namespace": "ChatApps", ', JSON, 400, 1000, "body"),
    ("not utf-8", b'{"a": "\xff\xfe"}', JSON, 400, 1000, "body"),
    ("top-level array", b"[1, 2]", JSON, 400, 1000, "body"),
    ("deep nesting", b"[" * 100 + b"]" * 100, JSON, 400, 1000, "body"),
    ("missing umid", None, JSON, 400, 1000, "payload.umid"),
    ("bad timestamp", None, JSON, 400, 1000, "payload.status.timestamp"),
    ("unknown event type", None, JSON, 422, 1003, "eventType"),
    ("wrong content type", None, {"Content-Type": "application/xml"}, 415, 1005, "Content-Type"),
]


def _bad_body(label: str) -> bytes:
    doc = json.loads(load("dr_source_whatsapp_undelivered"))
    if label == "missing umid":
        del doc["payload"]["umid"]
    elif label == "bad timestamp":
        doc["payload"]["status"]["timestamp"] = "yesterday"
    elif label == "unknown event type":
        doc["eventType"] = "outbound_message_exploded"
    return json.dumps(doc).encode()


async def test_each_bad_input_class_gets_its_4xx_and_is_parked_whole(
    client: TestClient, broker: str, registry_url: str
) -> None:
    parked: dict[str, tuple[bytes, str]] = {}
    for label, body, headers, status, code, field in BAD_INPUTS:
        body = body if body is not None else _bad_body(label)
        r = await client.post(URL, data=body, headers={**headers, "Authorization": "Bearer not-checked"})
        assert r.status == status, (label, await r.text())
        err = await r.json()
        assert set(err) == {"code", "message", "errorId", "timestamp"}
        assert err["code"] == code, label
        assert field in err["message"], (label, err["message"])
        datetime.fromisoformat(err["timestamp"].replace("Z", "+00:00"))
        parked[err["errorId"]] = (body, field)
    letters = _dead_letters(broker, registry_url, set(parked))
    assert set(letters) == set(parked)
    for error_id, (body, field) in parked.items():
        letter = letters[error_id]
        assert letter.body == body  # type: ignore[attr-defined]
        assert letter.field == field  # type: ignore[attr-defined]
        headers = dict(letter.headers)  # type: ignore[attr-defined]
        assert "Authorization" not in headers and "authorization" not in headers


async def test_body_over_the_limit_is_413_and_parked(broker: str, registry_url: str, state_dir: Path) -> None:
    client = await client_for(ingest_settings(broker, registry_url, state_dir, max_body_bytes=2048))
    try:
        body = b'{"namespace": "ChatApps", "pad": "' + b"x" * 5000 + b'"}'
        r = await client.post(URL, data=body, headers=JSON)
        assert r.status == 413
        err = await r.json()
        assert err["code"] == 1004 and "2048" in err["message"]
        letter = _dead_letters(broker, registry_url, {err["errorId"]})[err["errorId"]]
        assert letter.body == body[:2048]  # type: ignore[attr-defined]
    finally:
        await client.close()


async def test_unauthenticated_requests_get_401_with_code_1200(
    broker: str, registry_url: str, state_dir: Path
) -> None:
    client = await client_for(ingest_settings(broker, registry_url, state_dir, webhook_token="s3cret"))
    body = with_umid("dr_source_whatsapp_undelivered", str(uuid.uuid4()))
    try:
        basic_ok = "Basic " + base64.b64encode(b"8x8:s3cret").decode()
        basic_bad = "Basic " + base64.b64encode(b"8x8:nope").decode()
        for auth, status in [
            (None, 401),
            ("Bearer nope", 401),
            (basic_bad, 401),
            ("Basic !!", 401),
            ("Bearer s3cret", 200),
            (basic_ok, 200),
        ]:
            headers = dict(JSON)
            if auth:
                headers["Authorization"] = auth
            r = await client.post(URL, data=body, headers=headers)
            assert r.status == status, auth
            if status == 401:
                assert (await r.json())["code"] == 1200
    finally:
        await client.close()


async def test_an_authorization_header_that_is_not_utf8_gets_401_not_500(
    broker: str, registry_url: str, state_dir: Path
) -> None:
    """Raw header bytes over a socket to the server as `chatpipe ingest` runs it: aiohttp hands bytes that
    are not UTF-8 over as surrogate escapes, which used to raise in the token check (a 500)."""
    import asyncio

    settings = ingest_settings(broker, registry_url, state_dir, webhook_token="s3cret")
    port = free_port()
    runner = await start_site(create_app(settings), "127.0.0.1", port, dispatch=fast_dispatch)
    try:
        body = with_umid(ALL[0], str(uuid.uuid4()))
        for auth in (b"Bearer \xff\xfe", b"Basic \xff", b"Bearer s3cret\xff"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            head = (
                f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\nAuthorization: "
            ).encode()
            writer.write(head + auth + b"\r\n\r\n" + body)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            status_line, _, rest = answer.partition(b"\r\n")
            assert status_line.startswith(b"HTTP/1.1 401"), (auth, answer[:300])
            assert json.loads(rest.partition(b"\r\n\r\n")[2])["code"] == 1200
    finally:
        await runner.cleanup()


async def test_oauth2_client_credentials_tokens_open_the_webhook(
    broker: str, registry_url: str, state_dir: Path
) -> None:
    settings = ingest_settings(
        broker,
        registry_url,
        state_dir,
        oauth_client_id="eightbyeight",
        oauth_client_secret="client-secret",
        oauth_token_ttl=60,
    )
    client = await client_for(settings)
    body = with_umid("in_v3_whatsapp_text", str(uuid.uuid4()))
    try:
        r = await client.post(
            "/oauth2/token",
            data={"grant_type": "client_credentials", "client_id": "eightbyeight", "client_secret": "wrong"},
        )
        assert r.status == 401 and (await r.json())["error"] == "invalid_client"
        r = await client.post("/oauth2/token", data={"grant_type": "password"})
        assert r.status == 400
        basic = "Basic " + base64.b64encode(b"eightbyeight:client-secret").decode()
        r = await client.post(
            "/oauth2/token", data={"grant_type": "client_credentials"}, headers={"Authorization": basic}
        )
        assert r.status == 200
        tok = await r.json()
        assert tok["token_type"] == "Bearer" and tok["expires_in"] == 60
        r = await client.post(
            URL, data=body, headers={**JSON, "Authorization": f"Bearer {tok['access_token']}"}
        )
        assert r.status == 200
        forged = tok["access_token"][:-2] + ("AA" if not tok["access_token"].endswith("AA") else "BB")
        r = await client.post(URL, data=body, headers={**JSON, "Authorization": f"Bearer {forged}"})
        assert r.status == 401
    finally:
        await client.close()


async def test_source_allowlist_honours_forwarded_for_only_from_trusted_proxies(
    broker: str, registry_url: str, state_dir: Path
) -> None:
    settings = ingest_settings(
        broker, registry_url, state_dir, allowed_ips="8x8", trusted_proxies="127.0.0.1/32"
    )
    client = await client_for(settings)
    body = with_umid("dr_source_whatsapp_undelivered", str(uuid.uuid4()))
    try:
        r = await client.post(URL, data=body, headers=JSON)  # direct from 127.0.0.1: not 8x8
        assert r.status == 403 and (await r.json())["code"] == 1201
        r = await client.post(URL, data=body, headers={**JSON, "X-Forwarded-For": "52.220.117.120"})
        assert r.status == 200
        r = await client.post(URL, data=body, headers={**JSON, "X-Forwarded-For": "52.220.117.120, 10.9.9.9"})
        assert r.status == 403  # the proxy says it came from 10.9.9.9
    finally:
        await client.close()
    # without a trusted proxy, X-Forwarded-For is ignored
    client = await client_for(ingest_settings(broker, registry_url, state_dir, allowed_ips="8x8"))
    try:
        r = await client.post(URL, data=body, headers={**JSON, "X-Forwarded-For": "52.220.117.120"})
        assert r.status == 403
    finally:
        await client.close()


async def test_unsupported_documented_events_are_refused_not_crashed(client: TestClient) -> None:
    for name in UNSUPPORTED:
        r = await client.post(URL, data=load(name), headers=JSON)
        assert r.status == 422, name


async def test_arbitrary_and_mutated_bodies_never_get_a_5xx(client: TestClient) -> None:
    """Hypothesis generates the bodies (arbitrary bytes, valid payloads with junk spliced in); the real
    handler, broker and registry answer each one."""
    valid = [load(n) for n in ALL]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.one_of(
            st.binary(max_size=2048),
            st.tuples(st.sampled_from(valid), st.integers(0, 4000), st.binary(max_size=16)).map(
                lambda t: t[0][: t[1] % (len(t[0]) + 1)] + t[2] + t[0][t[1] % (len(t[0]) + 1) :]
            ),
        )
    )
    def check(body: bytes) -> None:
        bodies.append(body)

    bodies: list[bytes] = []
    check()
    for body in bodies:
        r = await client.post(URL, data=body, headers=JSON)
        assert r.status < 500, (body, await r.text())
        assert r.status in (200, 400, 413, 415, 422)
    assert len(bodies) >= 100


def _samples(text: str) -> dict[str, float]:
    """`name{labels} value` lines of a Prometheus exposition, by `name{labels}`."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


async def test_metrics_count_webhooks_by_kind_and_outcome_with_latency_histograms(
    broker: str, registry_url: str, state_dir: Path
) -> None:
    client = await client_for(ingest_settings(broker, registry_url, state_dir, webhook_token="s3cret"))
    auth = {**JSON, "Authorization": "Bearer s3cret"}
    try:
        for _ in range(5):
            body = with_umid("dr_source_whatsapp_undelivered", str(uuid.uuid4()))
            assert (await client.post(URL, data=body, headers=auth)).status == 200
        inbound = with_umid("in_source_whatsapp_text", str(uuid.uuid4()))
        assert (await client.post(URL, data=inbound, headers=auth)).status == 200
        assert (await client.post(URL, data=b"{", headers=auth)).status == 400
        assert (await client.post(URL, data=inbound, headers=JSON)).status == 401
        r = await client.get("/metrics")
        assert r.status == 200
        m = _samples(await r.text())
    finally:
        await client.close()
    assert m['chatpipe_ingest_webhooks_total{kind="receipt",outcome="accepted"}'] == 5
    assert m['chatpipe_ingest_webhooks_total{kind="inbound",outcome="accepted"}'] == 1
    assert m['chatpipe_ingest_webhooks_total{kind="invalid",outcome="rejected"}'] == 1
    assert m['chatpipe_ingest_webhooks_total{kind="unknown",outcome="unauthorized"}'] == 1
    assert m['chatpipe_ingest_auth_failures_total{reason="credentials"}'] == 1
    assert sum(v for k, v in m.items() if k.startswith("chatpipe_ingest_dead_letters_total{")) == 1
    assert m["chatpipe_ingest_spool_depth"] == 0
    # every webhook request is timed; every record the broker acked (6 events, 1 dead letter) too
    for name, count in (("request", 8), ("produce", 7)):
        assert m[f"chatpipe_ingest_{name}_seconds_count"] == count
        assert m[f'chatpipe_ingest_{name}_seconds_bucket{{le="+Inf"}}'] == count
        assert 0 < m[f"chatpipe_ingest_{name}_seconds_sum"] < 30
        buckets = [v for k, v in m.items() if k.startswith(f"chatpipe_ingest_{name}_seconds_bucket")]
        assert buckets == sorted(buckets)


# --- slow and vanishing clients --------------------------------------------------------------------------


async def _served(port: int) -> int:
    """The status a normal webhook gets from the server on `port`."""
    import aiohttp

    body = with_umid(ALL[0], str(uuid.uuid4()))
    async with (
        aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session,
        session.post(URL, data=body, headers=JSON) as r,
    ):
        return r.status


def _head(length: int) -> bytes:
    return (
        f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


@pytest.fixture()
async def slow_server(broker: str, registry_url: str, state_dir: Path) -> AsyncIterator[int]:
    """Ingest started as `chatpipe ingest` starts it, with header and body timeouts of 0.5 s."""
    settings = ingest_settings(
        broker, registry_url, state_dir, ingest_header_timeout=0.5, ingest_body_timeout=0.5
    )
    port = free_port()
    runner = await start_site(
        create_app(settings),
        "127.0.0.1",
        port,
        dispatch=fast_dispatch,
        header_timeout=settings.ingest_header_timeout,
    )
    yield port
    await runner.cleanup()


async def _answer_and_eof(reader: Any, within: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    import asyncio
    import time

    t0 = time.monotonic()
    answer = await asyncio.wait_for(reader.read(), within)
    return answer, time.monotonic() - t0


async def test_a_client_sending_headers_slowly_is_disconnected_and_others_are_served(
    slow_server: int,
) -> None:
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", slow_server)
    try:
        writer.write(b"POST " + URL.encode() + b" HTTP/1.1\r\nHost: x\r\n")  # ... and never the rest
        await writer.drain()
        status = await _served(slow_server)  # meanwhile the server serves others
        trickle = asyncio.create_task(_trickle(writer))  # a byte now and then does not extend the deadline
        answer, elapsed = await _answer_and_eof(reader, within=5)
        trickle.cancel()
    finally:
        writer.close()
    assert status == 200
    assert answer == b""  # closed without an answer: no request to answer yet
    assert elapsed < 2.0
    assert await _served(slow_server) == 200


async def _trickle(writer: Any) -> None:
    import asyncio
    import contextlib

    with contextlib.suppress(ConnectionError):
        for _ in range(50):
            writer.write(b"X")
            await writer.drain()
            await asyncio.sleep(0.1)


async def test_a_client_stalling_mid_body_gets_408_and_is_disconnected(slow_server: int, broker: str) -> None:
    import asyncio
    import time

    umid = str(uuid.uuid4())
    body = with_umid(ALL[0], umid)
    reader, writer = await asyncio.open_connection("127.0.0.1", slow_server)
    try:
        t0 = time.monotonic()
        writer.write(_head(len(body)) + body[: len(body) // 2])  # ... and the rest never comes
        await writer.drain()
        assert await _served(slow_server) == 200  # meanwhile the server serves others
        answer, _ = await _answer_and_eof(reader, within=5)
        elapsed = time.monotonic() - t0
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    head, _, err = answer.partition(b"\r\n\r\n")
    assert b"Connection: close" in head
    assert json.loads(err)["message"] == "body: not received within 0.5 s"
    assert 0.4 < elapsed < 2.0  # the body timeout, not aiohttp's 10 s lingering read
    assert await _served(slow_server) == 200
    assert umid.encode() not in {m.key() for m in read_topic(broker, RECEIPTS.name, idle=1.0)}


async def test_a_client_that_disconnects_mid_request_logs_no_error(
    slow_server: int, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import logging

    body = with_umid(ALL[0], str(uuid.uuid4()))
    caplog.set_level(logging.DEBUG)
    for sent in (
        _head(len(body)) + body[:20],  # mid-body
        _head(len(body)),  # headers only
        _head(len(body))[:30],  # mid-headers
    ):
        _, writer = await asyncio.open_connection("127.0.0.1", slow_server)
        writer.write(sent)
        await writer.drain()
        await asyncio.sleep(0.1)  # the handler is waiting for the body by now
        writer.transport.abort()  # gone, with an RST
        await asyncio.sleep(0.1)
    assert await _served(slow_server) == 200
    await asyncio.sleep(0.6)  # past both timeouts: nothing left to log either
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [(r.name, r.getMessage()) for r in errors]
    assert any(r.getMessage() == "webhook body not read: the client disconnected" for r in caplog.records)
