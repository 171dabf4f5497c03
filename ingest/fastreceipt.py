"""The hot path for the commonest webhook: a delivery receipt whose fields all have their documented types,
written straight into the Avro body of `schemas/delivery_receipt.avsc` without building a `DeliveryReceipt`.

`encode_receipt(body, received_at, prefix)` returns `(umid, prefix + avro)` or None. None only means "not
the simple case" (another event kind, a field of an unusual type, a number given as a string, a timestamp
with an offset, a body deeper than the bracket bound, ... or anything invalid): the caller then runs
`parse_webhook` and the codec, which accept, normalise or reject it with the precise error. Whenever it
returns bytes they are exactly the codec's encoding of `parse_webhook(body, received_at)`: the same
checks, the same normalisation (lower-cased channel/state/detail, the `googlercs` alias, `version` from
the envelope first, `outboundContent` re-encoded compactly, the body itself as `rawJson`) and the same
limits (`schemas.ids` formats, `ingest.parse`'s STATES, MAX_* lengths and time window: anything outside
them is left to the parser, which refuses it with the reason). That equality
is the contract; `tests/unit/ingest/test_fastreceipt.py` checks it on every fixture and on generated and
mutated receipts, and `LAYOUT` must equal the codec's schema (`matches`) or the caller must not use it.

No I/O, no clock: pure like `ingest.parse`, about 3x cheaper than parse + encode per receipt.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson

from ingest.parse import (
    DEFAULT_MAX_DEPTH,
    EARLIEST,
    EVENT_DELIVERY_RECEIPT,
    MAX_AHEAD,
    MAX_CHANNEL_USER_ID,
    MAX_DETAIL,
    MAX_ERROR_MESSAGE,
    MAX_MSISDN,
    MAX_PRICING_CATEGORY,
    MAX_PROVIDER_ERROR_CODE,
    MAX_USER_NAME,
    NAMESPACE,
    STATES,
    UTF8_BOM,
    channel_ok,
)
from schemas.fastpath import (
    EPOCH,
    LENGTHS,
    LENGTHS_TABLE,
    ONE_MICROSECOND,
    UNION1_LENGTHS,
    varint,
    write_long,
)
from schemas.fields import INT32_MAX, INT32_MIN, normalise_channel
from schemas.ids import BATCH_ID, CLIENT_BATCH_ID, CLIENT_MESSAGE_ID, SUBACCOUNT_ID, UMID
from schemas.timefmt import parse_iso8601

__all__ = ["LAYOUT", "encode_receipt", "layout_of", "matches"]

_NULL_STR = ["null", "string"]
_NULL_INT = ["null", "int"]
_MICROS = {"type": "long", "logicalType": "timestamp-micros"}

#: the delivery-receipt record as `encode_receipt` writes it: (field, type) in schema order
LAYOUT: tuple[tuple[str, Any], ...] = (
    ("umid", "string"),
    ("subAccountId", "string"),
    ("channel", "string"),
    (
        "status",
        (
            ("state", "string"),
            ("detail", _NULL_STR),
            ("timestamp", _MICROS),
            ("errorCode", _NULL_INT),
            ("errorMessage", _NULL_STR),
        ),
    ),
    (
        "user",
        (
            ("msisdn", _NULL_STR),
            ("channelUserId", _NULL_STR),
            ("name", _NULL_STR),
            ("username", _NULL_STR),
        ),
    ),
    ("batchId", _NULL_STR),
    ("clientMessageId", _NULL_STR),
    ("clientBatchId", _NULL_STR),
    ("version", _NULL_INT),
    ("whatsappProviderErrorCode", _NULL_STR),
    ("whatsappPricingCategory", _NULL_STR),
    ("outboundContentJson", _NULL_STR),
    ("receivedAt", _MICROS),
    ("rawJson", "string"),
)


def layout_of(schema: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A record schema's fields as (name, type), nested records as tuples; docs and defaults dropped."""

    def kind(t: Any) -> Any:
        if isinstance(t, dict) and t.get("type") == "record":
            return layout_of(t)
        if isinstance(t, dict) and "logicalType" in t:
            return {"type": t["type"], "logicalType": t["logicalType"]}
        return t

    return tuple((f["name"], kind(f["type"])) for f in schema["fields"])


def matches(schema: dict[str, Any]) -> bool:
    """Whether `schema` (parsed JSON of the receipts topic's schema) is the one this module writes."""
    return layout_of(schema) == LAYOUT


_RECEIPT = EVENT_DELIVERY_RECEIPT
_NONE = b"\x00"
_EARLIEST = (EARLIEST - EPOCH) // ONE_MICROSECOND
_AHEAD = MAX_AHEAD // ONE_MICROSECOND
_UMID_OK, _SUB_OK = UMID.ok, SUBACCOUNT_ID.ok
_BATCH_OK = BATCH_ID.ok
# values already found valid, by kind: a few subaccounts, channels and batches recur in every receipt, and a
# set lookup costs a tenth of the regular expression. Bounded (cleared when full), so no input can grow them.
_GOOD_SUBS: set[str] = set()
_GOOD_CHANNELS: set[str] = set()
_GOOD_BATCHES: set[str] = set()
_GOOD_MAX = 4096


def _remember(good: set[str], value: str) -> None:
    if len(good) >= _GOOD_MAX:
        good.clear()
    good.add(value)


# printable ids, checked inline (a call of `IdFormat.ok` costs a Python frame); test_fastreceipt's parity
# tests prove these checks are exactly CLIENT_MESSAGE_ID.ok and CLIENT_BATCH_ID.ok
assert CLIENT_MESSAGE_ID.chars is None and CLIENT_BATCH_ID.chars is None
assert CLIENT_MESSAGE_ID.min_len == CLIENT_BATCH_ID.min_len == 1
_CMID_MAX, _CBID_MAX = CLIENT_MESSAGE_ID.max_len, CLIENT_BATCH_ID.max_len


def _micros(ts: str) -> int:
    """`parse_iso8601(ts)` as microseconds since the epoch (raises ValueError/OverflowError like it)."""
    # the shape 8x8 sends (`2020-12-22T01:24:30.6030893Z`) is parsed by fromisoformat alone; the
    # reference function for everything else
    n = len(ts)
    if 20 <= n <= 30 and ts[-1] == "Z" and ts[10] == "T" and (n == 20 or ts[19] == ".") and ts.isascii():
        dt = datetime.fromisoformat(ts)
    else:
        dt = parse_iso8601(ts)
    return (dt - EPOCH) // ONE_MICROSECOND


def _opt(buf: bytearray, s: str | None) -> None:
    if s is None:
        buf += _NONE
    else:
        b = s.encode()
        n = len(b)
        buf += UNION1_LENGTHS[n] if n < LENGTHS_TABLE else b"\x02" + varint(n)
        buf += b


def encode_receipt(
    body: bytes, received_at: datetime, prefix: bytes = b"", *, max_depth: int = DEFAULT_MAX_DEPTH
) -> tuple[str, bytes] | None:
    """`(umid, prefix + Avro body)` for a simple delivery receipt, None for anything else (see module doc)."""
    if body[:3] == UTF8_BOM or b"\\u0000" in body:  # (a NUL in a string: the parser says which field)
        return None
    try:
        env = orjson.loads(body)
        if not body.isascii():
            body.decode("utf-8")  # what parse_webhook requires of rawJson
    except (orjson.JSONDecodeError, UnicodeDecodeError):
        return None
    if type(env) is not dict or body.count(b"{") + body.count(b"[") > max_depth:
        return None
    et, ns, p = env.get("eventType"), env.get("namespace"), env.get("payload")
    if type(et) is not str or et.lower() != _RECEIPT or type(ns) is not str or ns.lower() != NAMESPACE:
        return None
    if type(p) is not dict:
        return None
    get: Callable[[str], Any] = p.get
    umid, sub, channel, status = get("umid"), get("subAccountId"), get("channel"), get("status")
    if type(umid) is not str or type(sub) is not str or type(channel) is not str or type(status) is not dict:
        return None
    if not _UMID_OK(umid):
        return None
    if sub not in _GOOD_SUBS:
        if not _SUB_OK(sub):
            return None
        _remember(_GOOD_SUBS, sub)
    if channel not in _GOOD_CHANNELS:
        if not channel_ok(channel):
            return None
        _remember(_GOOD_CHANNELS, channel)
    state, ts, detail = status.get("state"), status.get("timestamp"), status.get("detail")
    code, message = status.get("errorCode"), status.get("errorMessage")
    if type(state) is not str or type(ts) is not str:
        return None
    state = state.lower()
    if state not in STATES:
        return None
    if not (detail is None or (type(detail) is str and len(detail) <= MAX_DETAIL)):
        return None
    if not (message is None or (type(message) is str and len(message) <= MAX_ERROR_MESSAGE)):
        return None
    if code is not None and (type(code) is not int or not INT32_MIN <= code <= INT32_MAX):
        return None
    version = env.get("version")
    if version is None:
        version = get("version")
    if version is not None and (type(version) is not int or not INT32_MIN <= version <= INT32_MAX):
        return None
    try:
        micros = _micros(ts)
    except (ValueError, OverflowError):
        return None
    received = (received_at - EPOCH) // ONE_MICROSECOND
    if not _EARLIEST <= micros <= received + _AHEAD:
        return None

    # no helper call per field for the common short values: their length prefixes come from tables (umid
    # and subAccountId are at most MAX_ID_LENGTH characters, so theirs always do)
    e_umid, e_sub = umid.encode(), sub.encode()
    e_channel, e_state = normalise_channel(channel).encode(), state.encode()
    buf = bytearray(prefix)
    buf += LENGTHS[len(e_umid)]
    buf += e_umid
    buf += LENGTHS[len(e_sub)]
    buf += e_sub
    n = len(e_channel)
    buf += LENGTHS[n] if n < LENGTHS_TABLE else varint(n)
    buf += e_channel
    n = len(e_state)
    buf += LENGTHS[n] if n < LENGTHS_TABLE else varint(n)
    buf += e_state
    _opt(buf, detail.lower() if detail else None)
    buf += write_long(micros)
    if code is None:
        buf += _NONE
    else:
        buf += b"\x02"
        buf += write_long(code)
    _opt(buf, message)

    user = get("user")
    if user:
        if type(user) is not dict:
            return None
        uget = user.get
        users: tuple[Any, ...] = (uget("msisdn"), uget("channelUserId"), uget("name"), uget("username"))
    elif user is None or type(user) is dict:
        users = (None, None, None, None)
    else:
        return None  # a falsy non-object (0, "", [], false): the reference rejects it
    batch, cmid, cbid = get("batchId"), get("clientMessageId"), get("clientBatchId")
    for v in (*users, batch, cmid, cbid):
        if v is None:
            buf += _NONE
        elif type(v) is str:
            e = v.encode()
            n = len(e)
            buf += UNION1_LENGTHS[n] if n < LENGTHS_TABLE else b"\x02" + varint(n)
            buf += e
        else:
            return None
    if user:  # the loop above made each a str or None
        msisdn, cuid, name, username = users
        if (
            (msisdn and len(msisdn) > MAX_MSISDN)
            or (cuid and len(cuid) > MAX_CHANNEL_USER_ID)
            or (name and len(name) > MAX_USER_NAME)
            or (username and len(username) > MAX_USER_NAME)
        ):
            return None
    if batch and batch not in _GOOD_BATCHES:
        if not _BATCH_OK(batch):
            return None
        _remember(_GOOD_BATCHES, batch)
    if cmid and (len(cmid) > _CMID_MAX or not cmid.isprintable()):
        return None
    if cbid and (len(cbid) > _CBID_MAX or not cbid.isprintable()):
        return None
    if version is None:
        buf += _NONE
    else:
        buf += b"\x02"
        buf += write_long(version)

    whatsapp = get("whatsapp")
    if whatsapp:
        if type(whatsapp) is not dict:
            return None
        provider_code, pricing = whatsapp.get("providerErrorCode"), whatsapp.get("pricingCategory")
        if type(provider_code) is int:
            provider_code = str(provider_code)
        if provider_code is not None and (
            type(provider_code) is not str or len(provider_code) > MAX_PROVIDER_ERROR_CODE
        ):
            return None
        if not (pricing is None or (type(pricing) is str and len(pricing) <= MAX_PRICING_CATEGORY)):
            return None
        _opt(buf, provider_code)
        _opt(buf, pricing)
    elif whatsapp is None or type(whatsapp) is dict:
        buf += _NONE
        buf += _NONE
    else:
        return None
    outbound = get("outboundContent")
    if outbound is None:
        buf += _NONE
    elif type(outbound) is dict:
        try:
            compact = orjson.dumps(outbound)
        except orjson.JSONEncodeError:
            return None
        n = len(compact)
        buf += UNION1_LENGTHS[n] if n < LENGTHS_TABLE else b"\x02" + varint(n)
        buf += compact
    else:
        return None
    buf += write_long(received)
    buf += write_long(len(body))
    buf += body
    return umid, bytes(buf)
