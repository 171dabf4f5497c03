"""The read API over real stores (SQLite file, throw-away PostgreSQL), filled through the store API."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from chatpipe.runtime.config import Settings
from ingest.fastreceipt import encode_receipt
from ingest.parse import parse_webhook
from schemas.errors import InvalidEvent
from schemas.models import User
from sinks.api import create_app
from sinks.connect import open_store
from sinks.rows import PiiPolicy
from sinks.store import Store
from tests.fixtures import webhooks
from tests.integration.sinks.test_store import MSISDN, T0, conversation_versions, inbound, mk_state, mk_step
from tests.support.postgres import store_url
from tests.unit.ingest.test_parse import patched

pytestmark = pytest.mark.integration

PII = PiiPolicy(hash_key=b"k")
SUB = "sub_account_id"
UMID = "dec02e44-c76f-4a0a-b69f-6ac2a4386eb9"
BATCH = "c9c01382-38bf-4e27-8962-ae0684ab56c3"

# 8x8's two example answers (shared/8x8-docs/retrieve-message-details-api.txt), adapted to ONE message
# that failed on Viber (step 1) and fell back to WhatsApp (step 2, read):
# - example 1 becomes step 1: channel Viber and state undelivered/rejected_by_operator instead of the
#   example's inconsistent WhatsApp + delivered/"delivered_to_carrier" with an error message; its
#   errorCode 0 is kept (0 is a value, not "unknown"); subAccountId and ids from example 2;
# - example 2 stays step 2 except "direction": the schema documents `outbound`, the example says
#   "Outbound"; the user carries the channelUserId known from step 1 (same message, same user).
# Key order is the documented one (example 1's); example 2 lists the same keys in another order.
EXAMPLE_STEP_1 = {
    "umid": UMID,
    "subAccountId": SUB,
    "channel": "Viber",
    "channelId": "8e4d1303-5754-e911-8154-020897df5459",
    "direction": "outbound",
    "country": "SG",
    "status": {
        "state": "undelivered",
        "detail": "rejected_by_operator",
        "errorCode": 0,
        "errorMessage": "Invalid message length",
        "timestamp": "2020-06-17T04:17:21.06Z",
    },
    "user": {"msisdn": "+63922110xxxx", "channelUserId": "string"},
    "contentType": "Text",
    "content": "**MASKED**",
    "createdAt": "2020-06-17T04:13:21.06Z",
    "clientMessageId": "client message id",
    "clientBatchId": "client batch id",
    "batchId": BATCH,
    "step": 1,
}
EXAMPLE_STEP_2 = {
    "umid": UMID,
    "subAccountId": SUB,
    "channel": "WhatsApp",
    "channelId": "904d1303-5754-e911-8154-020897df5459",
    "direction": "outbound",
    "status": {"state": "read", "timestamp": "2020-06-17T04:25:21.06Z"},
    "contentType": "Text",
    "createdAt": "2020-06-17T04:15:21.06Z",
    "step": 2,
    "country": "SG",
    "user": {"msisdn": "+63922110xxxx", "channelUserId": "string"},
    "content": "**MASKED**",
    "clientMessageId": "client message id",
    "clientBatchId": "client batch id",
    "batchId": BATCH,
}
ERROR_KEYS = ["code", "message", "errorId", "timestamp"]
NOW = T0 + timedelta(hours=30)  # the API's clock: past the WhatsApp window, inside the call permission


def fallback_message(umid: str = UMID, sub: str = SUB, version: int = 5) -> Any:
    viber = mk_step(
        1,
        "viber",
        [("sent", 0), ("undelivered", 120)],
        detail="rejected_by_operator",
        error_code=0,
        error_message="Invalid message length",
        channel_id="8e4d1303-5754-e911-8154-020897df5459",
        country="SG",
        content_type="Text",
        created_at=T0 - timedelta(minutes=2),
    )
    whatsapp = mk_step(
        2,
        "whatsapp",
        [("sent", 130), ("delivered", 300), ("read", 600)],
        channel_id="904d1303-5754-e911-8154-020897df5459",
        country="SG",
        content_type="Text",
        created_at=T0,
    )
    return mk_state(
        umid,
        version,
        (viber, whatsapp),
        sub=sub,
        user=User(msisdn="+639221101234", channel_user_id="string"),
        client_message_id="client message id",
        client_batch_id="client batch id",
        batch_id=BATCH,
        final=True,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Store]:
    s = open_store(store_url(request, tmp_path), PII)
    s.migrate()
    yield s
    s.close()


@pytest.fixture()
async def client(store: Store) -> AsyncIterator[TestClient]:
    c = TestClient(TestServer(create_app(Settings(), store=store, clock=lambda: NOW)))
    await c.start_server()
    try:
        yield c
    finally:
        await c.close()


async def get(client: TestClient, path: str, status: int = 200, **params: Any) -> Any:
    r = await client.get(path, params=params)
    text = await r.text()
    assert r.status == status, text
    assert r.content_type == "application/json"
    return json.loads(text)


def assert_error(body: dict[str, Any], code: int) -> None:
    assert list(body) == ERROR_KEYS
    assert body["code"] == code
    assert isinstance(body["message"], str) and body["message"]
    uuid.UUID(body["errorId"])
    assert body["timestamp"].endswith("Z") and "T" in body["timestamp"]


async def walk(client: TestClient, path: str, limit: int, **params: Any) -> tuple[list[Any], int]:
    """Every item of a paginated list, following `next`; also how many pages it took."""
    items: list[Any] = []
    after, pages = None, 0
    while True:
        query = {**params, "limit": limit, **({"after": after} if after else {})}
        body = await get(client, path, **query)
        assert list(body) == ["data", "next"]
        assert len(body["data"]) <= limit
        items += body["data"]
        pages += 1
        after = body["next"]
        if after is None:
            return items, pages
        assert len(body["data"]) == limit
        assert pages < 1000


# --- message details -----------------------------------------------------------------------------


async def test_multi_step_message_answers_8x8s_shape(store: Store, client: TestClient) -> None:
    assert store.write_states([fallback_message()]) == 1
    r = await client.get(f"/api/v1/subaccounts/{SUB}/messages/{UMID}")
    assert r.status == 200
    body = json.loads(await r.text())
    assert list(body) == ["data"]
    first, second = body["data"]
    assert first == EXAMPLE_STEP_1
    assert list(first) == list(EXAMPLE_STEP_1)  # the documented key order
    assert list(first["status"]) == list(EXAMPLE_STEP_1["status"])
    assert second == EXAMPLE_STEP_2
    assert set(second) == set(EXAMPLE_STEP_1)  # 8x8's example 2: same keys as example 1


async def test_an_older_version_does_not_change_the_answer(store: Store, client: TestClient) -> None:
    store.write_states([fallback_message(version=5)])
    store.write_states([mk_state(UMID, 2, (mk_step(1, "viber", [("sent", 0)]),), sub=SUB)])
    body = await get(client, f"/api/v1/subaccounts/{SUB}/messages/{UMID}")
    assert body["data"] == [EXAMPLE_STEP_1, EXAMPLE_STEP_2]


async def test_unknown_umid_is_404_with_8x8s_error_body(store: Store, client: TestClient) -> None:
    store.write_states([fallback_message()])
    body = await get(client, f"/api/v1/subaccounts/{SUB}/messages/0000-unknown", 404)
    assert_error(body, 1300)


async def test_another_subaccount_never_sees_the_message(store: Store, client: TestClient) -> None:
    store.write_states([fallback_message(), fallback_message("other-umid-1", sub="OtherAccount")])
    body = await get(client, f"/api/v1/subaccounts/OtherAccount/messages/{UMID}", 404)
    assert_error(body, 1300)
    body = await get(client, f"/api/v1/subaccounts/{SUB}/messages/other-umid-1", 404)
    assert_error(body, 1300)
    listed = await get(client, f"/api/v1/subaccounts/{SUB}/messages", batchId=BATCH)
    assert [m["umid"] for m in listed["data"]] == [UMID]


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/api/v1/subaccounts/ab/messages/m-1", 1001),  # too short
        ("/api/v1/subaccounts/bad%20sub/messages/m-1", 1001),
        (f"/api/v1/subaccounts/{'x' * 51}/messages/m-1", 1001),
        (f"/api/v1/subaccounts/{SUB}/messages/bad_umid", 1008),
        (f"/api/v1/subaccounts/{SUB}/messages/{'a' * 101}", 1008),
        (f"/api/v1/subaccounts/{SUB}/messages/bad%20umid", 1008),
        ("/api/v1/subaccounts/a!b/messages", 1001),
        (f"/api/v1/subaccounts/{SUB}/messages?limit=ten", 1000),
        (f"/api/v1/subaccounts/{SUB}/messages?limit=0", 1000),
        (f"/api/v1/subaccounts/{SUB}/messages?batchId={'b' * 201}", 1000),
        (f"/api/v1/subaccounts/{SUB}/conversations/ch-1/messages", 1000),  # no user
        (f"/api/v1/subaccounts/{SUB}/conversations/ch_1/messages?user=u", 1008),
        (f"/api/v1/subaccounts/{SUB}/conversations/ch-1/messages?user=u&after=nonsense", 1000),
        (f"/api/v1/subaccounts/{SUB}/conversations/ch-1/messages?user=u&after=2020-01-01|", 1000),
        (f"/api/v1/subaccounts/{SUB}/conversations/ch-1/messages?user=u&limit=-1", 1000),
        ("/api/v1/subaccounts/x/conversations/ch-1/messages?user=u", 1001),
        (f"/api/v1/subaccounts/{SUB}/conversations/ch-1", 1000),  # no user
        (f"/api/v1/subaccounts/{SUB}/conversations/ch-1?user=", 1000),
        (f"/api/v1/subaccounts/{SUB}/conversations/ch-1?user=%07bell", 1000),
        (f"/api/v1/subaccounts/{SUB}/conversations/ch-1?user={'u' * 201}", 1000),
        (f"/api/v1/subaccounts/{SUB}/conversations/ch_1?user=u", 1008),
        ("/api/v1/subaccounts/x/conversations/ch-1?user=u", 1001),
    ],
)
async def test_malformed_requests_are_400_with_8x8s_error_body(
    client: TestClient, path: str, code: int
) -> None:
    r = await client.get(path)
    assert r.status == 400, await r.text()
    assert_error(json.loads(await r.text()), code)


# --- ingest and the API agree on ids (schemas.ids) ------------------------------------------------

# the ids the issue found stored by ingest and refused by the API, and their cousins
ODD_UMIDS = [
    "caf\u00e9-1",
    "\u0430bc",
    "\uff41bc",
    "a/b",
    "a?b",
    "a#b",
    "a%41b",
    "a b",
    "a\tb",
    "abc\n",
    "a\x00b",
    "\u200fabc",
    "ab\u202ec",
    "a_b",
    "a.b",
    "x" * 101,
]
ODD_SUBACCOUNTS = [
    "ab",
    "s" * 51,
    "s" * 60,
    "bad sub",
    " sub",
    "sub\u200f",
    "s\u00fcb",
    "a/b",
    "a?b",
    "a#b",
    "a%b",
    "abc\n",
    "ab\x7f",
    "\u202esub",
]
# every id of the fixtures, and 8x8's documented examples
GOOD_UMIDS = sorted(
    {orjson.loads(webhooks.load(n))["payload"]["umid"] for n in webhooks.ALL}
    | {"abc123-def456-ghi789", "dec02e44-c76f-4a0a-b69f-6ac2a4386eb9", "m-1", "x" * 100}
)
GOOD_SUBACCOUNTS = sorted(
    {orjson.loads(webhooks.load(n))["payload"]["subAccountId"] for n in webhooks.ALL}
    | {"Onion_Marketing", "umsg_AGG001", "SubAccount-1", "sub_account_id", "a.b&c-_d", "abc", "s" * 50}
)


RECEIVED_AT = datetime(2026, 7, 3, 12, 0, tzinfo=UTC)  # after every fixture's event times


def _ingest_refuses(field: str, value: str) -> bool:
    """Whether ingest refuses a receipt and an inbound message carrying `value` as payload.`field`,
    naming that field (the fast path leaving the receipt to the parser)."""
    for name in ("dr_v9_whatsapp_read", "in_v3_whatsapp_text"):
        body = patched(name, {f"payload.{field}": value})
        try:
            parse_webhook(body, RECEIVED_AT)
        except InvalidEvent as exc:
            if exc.field != f"payload.{field}":
                return False
        else:
            return False
        if encode_receipt(body, RECEIVED_AT) is not None:
            return False
    return True


def _ingest_accepts(field: str, value: str) -> bool:
    for name in ("dr_v9_whatsapp_read", "in_v3_whatsapp_text"):
        event = parse_webhook(patched(name, {f"payload.{field}": value}), RECEIVED_AT)
        if getattr(event, "umid" if field == "umid" else "sub_account_id") != value:
            return False
    receipt = patched("dr_v9_whatsapp_read", {f"payload.{field}": value})
    return encode_receipt(receipt, RECEIVED_AT) is not None


async def _api_status(client: TestClient, sub: str, umid: str) -> tuple[int, int]:
    path = f"/api/v1/subaccounts/{quote(sub, safe='')}/messages/{quote(umid, safe='')}"
    r = await client.get(path)
    return r.status, (await r.json())["code"]


async def test_ingest_and_the_api_refuse_the_same_odd_ids(client: TestClient) -> None:
    for umid in ODD_UMIDS:
        assert _ingest_refuses("umid", umid), umid
        assert await _api_status(client, SUB, umid) == (400, 1008), umid
    for sub in ODD_SUBACCOUNTS:
        assert _ingest_refuses("subAccountId", sub), sub
        assert await _api_status(client, sub, UMID) == (400, 1001), sub


async def test_ingest_and_the_api_accept_every_documented_id(client: TestClient) -> None:
    for umid in GOOD_UMIDS:
        assert _ingest_accepts("umid", umid), umid
        assert await _api_status(client, SUB, umid) == (404, 1300), umid  # well-formed, just not stored
    for sub in GOOD_SUBACCOUNTS:
        assert _ingest_accepts("subAccountId", sub), sub
        assert await _api_status(client, sub, UMID) == (404, 1300), sub


# --- message lists ---------------------------------------------------------------------------------


async def test_message_list_pages_walk_every_message_exactly_once(store: Store, client: TestClient) -> None:
    mine = [
        mk_state(
            f"{i:04d}-m",
            1 + i % 3,
            (mk_step(1, "sms", [("sent", i)]),),
            sub=SUB,
            batch_id="b-even" if i % 2 == 0 else "b-odd",
            client_message_id=f"c-{i % 4}",
        )
        for i in range(23)
    ]
    others = [mk_state(f"{i:04d}-o", 1, (mk_step(1, "sms", [("sent", i)]),), sub="other") for i in range(9)]
    store.write_states(list(reversed(mine)) + others)
    path = f"/api/v1/subaccounts/{SUB}/messages"

    for limit in (1, 5, 23, 1000):
        items, pages = await walk(client, path, limit)
        assert [m["umid"] for m in items] == [s.umid for s in mine]
        assert pages == -(-23 // limit)

    evens, _ = await walk(client, path, 4, batchId="b-even")
    assert [m["umid"] for m in evens] == [s.umid for s in mine[::2]]
    both, _ = await walk(client, path, 2, batchId="b-odd", clientMessageId="c-1")
    assert [m["umid"] for m in both] == [f"{i:04d}-m" for i in range(23) if i % 4 == 1]
    assert await get(client, path, clientMessageId="nope") == {"data": [], "next": None}


async def test_message_summary_is_useful(store: Store, client: TestClient) -> None:
    store.write_states([fallback_message()])
    body = await get(client, f"/api/v1/subaccounts/{SUB}/messages", clientMessageId="client message id")
    assert body == {
        "data": [
            {
                "umid": UMID,
                "subAccountId": SUB,
                "channel": "WhatsApp",
                "channelPath": ["Viber", "WhatsApp"],
                "fellBack": True,
                "stepCount": 2,
                "direction": "outbound",
                "status": {"state": "read", "timestamp": "2020-06-17T04:25:21.06Z"},
                "user": {"msisdn": "+63922110xxxx", "channelUserId": "string"},
                "clientMessageId": "client message id",
                "clientBatchId": "client batch id",
                "batchId": BATCH,
                "final": True,
                "version": 5,
                "updatedAt": "2020-06-17T04:25:22.06Z",
            }
        ],
        "next": None,
    }


# --- conversations ---------------------------------------------------------------------------------


async def test_conversation_pages_walk_every_inbound_message_once(store: Store, client: TestClient) -> None:
    # 14 messages of one user with only 5 distinct timestamps (ties broken by umid), another user, and
    # the same user on another channel and in another subaccount: none of those may show up
    mine = [inbound(f"in-{i:02d}", i % 5, sub=SUB) for i in range(14)]
    noise = [inbound("in-other-user", 1, user="6599999999", sub=SUB), inbound("in-other-sub", 1, sub="other")]
    other_channel = dataclasses.replace(inbound("in-other-channel", 1, sub=SUB), channel_id="ch-2")
    assert store.write_inbound(mine + noise + [other_channel]) == 17
    path = f"/api/v1/subaccounts/{SUB}/conversations/ch-1/messages"
    expected = sorted((m.timestamp, m.umid) for m in mine)

    for user in ("6581968289", "+6581968289"):  # channelUserId, or the E.164 number (hash-matched)
        for limit in (1, 3, 14, 100):
            items, pages = await walk(client, path, limit, user=user)
            assert [m["umid"] for m in items] == [u for _, u in expected]
            assert pages == max(1, -(-14 // limit))
    first = (await get(client, path, user="+6581968289", limit=1))["data"][0]
    assert first == {
        "umid": "in-00",
        "subAccountId": SUB,
        "channel": "WhatsApp",
        "channelId": "ch-1",
        "direction": "inbound",
        "type": "Text",
        "timestamp": "2020-06-17T04:15:21.06Z",
        "user": {"msisdn": "+658196xxxx", "channelUserId": "6581968289"},
        "content": {"text": "**MASKED**"},
    }
    other = await get(client, "/api/v1/subaccounts/other/conversations/ch-1/messages", user="6581968289")
    assert [m["umid"] for m in other["data"]] == ["in-other-sub"]
    assert await get(client, path, user="nobody") == {"data": [], "next": None}


async def test_conversation_answers_by_channel_user_id_or_number(store: Store, client: TestClient) -> None:
    versions = conversation_versions(sub=SUB)
    theirs = conversation_versions(sub="other", n=1)[-1]
    assert store.write_conversations([*reversed(versions), theirs]) == 2
    path = f"/api/v1/subaccounts/{SUB}/conversations/ch-1"
    body = await get(client, path, user="BSUID.1")
    assert body == {
        "subAccountId": SUB,
        "channel": "WhatsApp",
        "channelId": "ch-1",
        "user": {"msisdn": "+658196xxxx", "channelUserId": "BSUID.1"},
        "firstInboundAt": "2020-06-17T04:15:21.06Z",
        "lastInboundAt": "2020-06-17T04:15:51.06Z",
        "lastUmid": versions[-1].last_umid,
        "lastType": "Text",
        "lastReplyToUmid": None,
        "windowOpenUntil": "2020-06-18T04:15:51.06Z",
        "windowOpen": False,
        "messageCount": 4,
        "countsByType": {"Interactive": 1, "Text": 3},
        "callPermission": {
            "response": "accept",
            "at": "2020-06-17T04:15:31.06Z",
            "until": "2020-06-24T04:15:21.06Z",
            "permanent": False,
            "granted": True,
        },
        "version": 4,
    }
    assert await get(client, path, user=MSISDN) == body
    other = await get(client, "/api/v1/subaccounts/other/conversations/ch-1", user="BSUID.1")
    assert other["messageCount"] == 1 and other["subAccountId"] == "other"


async def test_unknown_conversation_is_404_with_8x8s_error_body(store: Store, client: TestClient) -> None:
    store.write_conversations([conversation_versions(sub=SUB, n=1)[-1]])
    for path, user in [
        (f"/api/v1/subaccounts/{SUB}/conversations/ch-1", "BSUID.2"),
        (f"/api/v1/subaccounts/{SUB}/conversations/ch-1", "+6581968288"),
        (f"/api/v1/subaccounts/{SUB}/conversations/ch-2", "BSUID.1"),
        ("/api/v1/subaccounts/OtherAccount/conversations/ch-1", "BSUID.1"),
    ]:
        assert_error(await get(client, path, 404, user=user), 1300)


async def test_health_and_metrics(client: TestClient) -> None:
    assert await get(client, "/healthz") == {"status": "ok"}
    await client.get(f"/api/v1/subaccounts/{SUB}/messages/nope-1")
    r = await client.get("/metrics")
    assert r.status == 200
    assert 'chatpipe_api_requests_total{route="message",status="404"} 1.0' in await r.text()
