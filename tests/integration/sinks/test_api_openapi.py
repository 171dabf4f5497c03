"""Every answer of the read API's details endpoint (200s and errors) validates against 8x8's own OpenAPI
document (`shared/8x8-docs/business_messaging_api.json`, next to the repository) with openapi-core, for
messages known only from receipts, reconciled ones, and every way a request can go wrong; and the fields
receipts lack are filled from the sources that know them (8x8's details answer, inbound messages, the
operator's map), in that order, "" when none does.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from chatpipe.runtime.config import Settings
from processors.reconcile import Outcome
from processors.state import apply_many
from schemas.models import DeliveryReceipt, InboundContent, InboundMessage, Status, User
from sinks.api import create_app
from sinks.connect import open_store
from sinks.rows import PiiPolicy
from sinks.store import LookupRecord, Store
from tests.support.postgres import store_url

pytestmark = pytest.mark.integration

# next to the repository: /work/shared for /work/main, and for a worktree /work/wt/NAME as well
DOC = next(
    (
        d / "shared" / "8x8-docs" / "business_messaging_api.json"
        for d in Path(__file__).resolve().parents[4:]
        if (d / "shared" / "8x8-docs" / "business_messaging_api.json").is_file()
    ),
    Path(__file__).resolve().parents[4] / "shared" / "8x8-docs" / "business_messaging_api.json",
)
PII = PiiPolicy(hash_key=b"k")
SUB = "acme-01"
T0 = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
CHANNELS = ["whatsapp", "viber", "sms", "rcs", "line", "zalo", "telegram"]
STATES = ["queued", "sent", "delivered", "read", "undelivered", "failed", "unknown"]
WA_ID = "904d1303-5754-e911-8154-020897df5459"


@pytest.fixture(scope="module")
def openapi() -> Any:
    if not DOC.exists():
        pytest.skip(f"8x8's OpenAPI document not found at {DOC}")
    from openapi_core import OpenAPI

    return OpenAPI.from_file_path(str(DOC))


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = open_store(store_url(request, tmp_path), PII)
    s.migrate()
    yield s
    s.close()


@pytest.fixture()
async def client(store: Store) -> AsyncIterator[TestClient]:
    settings = Settings(channel_ids=f"{SUB}:SMS=sms-channel-of-acme, other:Viber=not-ours")
    c = TestClient(TestServer(create_app(settings, store=store)))
    await c.start_server()
    try:
        yield c
    finally:
        await c.close()


async def answer(
    client: TestClient, openapi: Any, sub: str, umid: str, key: str | None = None
) -> tuple[int, Any]:
    """GET the details of `umid` (presenting `key` when given) and validate the answer against 8x8's
    document (raises if invalid)."""
    from openapi_core.testing import MockRequest, MockResponse

    path = f"/api/v1/subaccounts/{sub}/messages/{umid}"
    r = await client.get(path, headers={} if key is None else {"Authorization": f"Bearer {key}"})
    body = await r.read()
    request = MockRequest("https://chatapps.8x8.com", "get", path, headers={"Authorization": "Bearer k"})
    openapi.validate_response(request, MockResponse(body, r.status, content_type=r.content_type))
    return r.status, json.loads(body)


def receipt(umid: str, channel: str, state: str, at: datetime, **kw: Any) -> DeliveryReceipt:
    return DeliveryReceipt(
        umid=umid,
        sub_account_id=SUB,
        channel=channel,
        status=Status(
            state, at, kw.pop("detail", None), kw.pop("error_code", None), kw.pop("error_message", None)
        ),
        received_at=at,
        raw_json="{}",
        **kw,
    )


def random_receipts(rng: random.Random, umid: str) -> list[DeliveryReceipt]:
    """1-3 channels, 1-4 receipts each, random states, errors, users and client ids."""
    out = []
    user = rng.choice([User(), User(msisdn="+6591234567"), User(channel_user_id="u-1")])
    for i, channel in enumerate(rng.sample(CHANNELS, rng.randint(1, 3))):
        for j in range(rng.randint(1, 4)):
            failed = rng.random() < 0.3
            out.append(
                receipt(
                    umid,
                    channel,
                    rng.choice(STATES),
                    T0 + timedelta(minutes=10 * i + j),
                    detail=rng.choice([None, "delivered_to_operator", "rejected_by_operator"]),
                    error_code=rng.choice([0, 7, 2008]) if failed else None,
                    error_message="Expired" if failed else None,
                    user=user,
                    client_message_id=rng.choice([None, "cm-1"]),
                    batch_id=rng.choice([None, "b-1"]),
                )
            )
    rng.shuffle(out)
    return out


async def test_messages_known_only_from_receipts_validate(
    store: Store, client: TestClient, openapi: Any
) -> None:
    rng = random.Random(16)
    umids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(40)]
    states = [apply_many(None, random_receipts(rng, u), now=T0 + timedelta(hours=1)).state for u in umids]
    assert store.write_states(states) == len(states)
    for umid, state in zip(umids, states, strict=True):
        status, body = await answer(client, openapi, SUB, umid)
        assert status == 200
        assert [r["step"] for r in body["data"]] == list(range(1, len(state.steps) + 1))
        for rec in body["data"]:
            assert rec["contentType"] == ""  # nothing told it: "" where the document requires a string
            expected = "sms-channel-of-acme" if rec["channel"] == "SMS" else ""  # the operator's map
            assert rec["channelId"] == expected


async def test_errors_validate(store: Store, client: TestClient, openapi: Any) -> None:
    store.write_states([apply_many(None, [receipt("m-1", "sms", "sent", T0)], now=T0).state])
    cases = [
        (SUB, "00000000-0000-4000-8000-000000000999", 404),  # unknown umid
        ("another-sub", "m-1", 404),  # another subaccount's message
        ("a", "m-1", 400),  # subAccountId too short
        (SUB, "x" * 300, 400),  # malformed umid
    ]
    for sub, umid, expected in cases:
        status, body = await answer(client, openapi, sub, umid)
        assert status == expected, body
        assert set(body) == {"code", "message", "errorId", "timestamp"}


async def test_refused_keys_validate(store: Store, openapi: Any) -> None:
    """With API keys configured, no key, an unknown key and a key of another subaccount are answered in a
    shape and status 8x8's document lists for this endpoint (it has 401, no 403)."""
    store.write_states([apply_many(None, [receipt("m-1", "sms", "sent", T0)], now=T0).state])
    c = TestClient(TestServer(create_app(Settings(api_keys=f"mine:{SUB};theirs:another-sub"), store=store)))
    await c.start_server()
    try:
        for key in (None, "unknown", "theirs"):
            status, body = await answer(c, openapi, SUB, "m-1", key=key)
            assert status == 401, body
            assert body["code"] == (1201 if key == "theirs" else 1200)
        status, body = await answer(c, openapi, SUB, "m-1", key="mine")
        assert status == 200 and body["data"][0]["umid"] == "m-1"
    finally:
        await c.close()


async def test_reconciled_and_inbound_fields_fill_the_answer(
    store: Store, client: TestClient, openapi: Any
) -> None:
    """A Viber -> WhatsApp -> SMS fallback: receipts told only the channels and states. 8x8's details
    answer (recorded by the reconciler) gives Viber's and WhatsApp's channelId, country, contentType,
    createdAt and step numbers; an inbound WhatsApp message carries the same channelId (no conflict);
    SMS, unknown to both, takes the operator's id; a fourth step 8x8 did not report keeps its own."""
    umid = "11111111-0000-4000-8000-000000000001"
    receipts = [
        receipt(umid, "viber", "undelivered", T0, error_code=2008, error_message="Expired"),
        receipt(umid, "whatsapp", "delivered", T0 + timedelta(minutes=5)),
        receipt(umid, "sms", "sent", T0 + timedelta(minutes=9)),
        receipt(umid, "line", "sent", T0 + timedelta(minutes=20)),
    ]
    store.write_states([apply_many(None, receipts, now=T0 + timedelta(hours=1)).state])
    created = "2026-07-01T11:59:00.12Z"
    looked_up = [
        {"step": 1, "channel": "viber", "channelId": "viber-id", "country": "SG", "contentType": "Text",
         "createdAt": created},
        {"step": 2, "channel": "whatsapp", "channelId": WA_ID, "contentType": "Template",
         "createdAt": created},
    ]  # fmt: skip
    at = T0 + timedelta(hours=2)
    store.record_lookups(
        [LookupRecord(umid, SUB, 1, Outcome.RECEIPTS, at, at + timedelta(hours=1), looked_up)]
    )
    # an older lookup (a 404 from before) neither overwrites nor erases what 8x8 said
    store.record_lookups([LookupRecord(umid, SUB, 0, Outcome.NOT_FOUND, T0, T0)])
    store.write_inbound([inbound("in-1", "whatsapp", WA_ID), inbound("in-2", "line", "line-a"),
                         inbound("in-3", "line", "line-b")])  # fmt: skip
    status, body = await answer(client, openapi, SUB, umid)
    assert status == 200
    got = [
        (r["step"], r["channel"], r["channelId"], r.get("country"), r["contentType"]) for r in body["data"]
    ]
    assert got == [
        (1, "Viber", "viber-id", "SG", "Text"),
        (2, "WhatsApp", WA_ID, None, "Template"),
        (3, "SMS", "sms-channel-of-acme", None, ""),
        (4, "Line", "", None, ""),  # two Line channelIds on inbound messages: which one is unknown
    ]
    assert body["data"][0]["createdAt"] == created


async def test_8x8s_step_numbers_win_when_they_differ(store: Store, client: TestClient, openapi: Any) -> None:
    """The state machine orders steps by first event time; when a late first receipt of step 1 arrived
    after step 2's, 8x8's own numbers (from the details API) are the truth the read API shows."""
    umid = "22222222-0000-4000-8000-000000000002"
    receipts = [
        receipt(umid, "sms", "delivered", T0),
        receipt(umid, "viber", "failed", T0 + timedelta(minutes=1)),
    ]
    store.write_states([apply_many(None, receipts, now=T0 + timedelta(hours=1)).state])
    looked_up = [{"step": 1, "channel": "viber"}, {"step": 2, "channel": "sms"}]
    store.record_lookups([LookupRecord(umid, SUB, 1, Outcome.RECEIPTS, T0, T0, looked_up)])
    status, body = await answer(client, openapi, SUB, umid)
    assert status == 200
    assert [(r["step"], r["channel"]) for r in body["data"]] == [(1, "Viber"), (2, "SMS")]


def inbound(umid: str, channel: str, channel_id: str) -> InboundMessage:
    return InboundMessage(
        umid=umid,
        sub_account_id=SUB,
        timestamp=T0,
        channel=channel,
        type="Text",
        received_at=T0,
        raw_json="{}",
        channel_id=channel_id,
        user=User(msisdn="+6591234567"),
        content=InboundContent(text="hi"),
    )
