"""Pure parsing of 8x8 Chat Apps webhook bodies: bytes in, a `DeliveryReceipt` or `InboundMessage` out.

Contract: `parse_webhook` never does I/O, never reads the clock (`received_at` is an argument) and, for any
input bytes whatsoever, either returns an event or raises `InvalidEvent`; it raises nothing else. The
`InvalidEvent` names the offending field by its JSON path (`payload.status.timestamp`) in `field` and at
the start of `reason`, and carries the 8x8-style `code` and `http_status` the HTTP layer answers with.

Parsing is lenient where 8x8's own docs disagree (case of channel/state/detail/type, ids given as numbers
where the docs say string, unknown extra fields) and strict about what the pipeline needs (ids, channel,
status state and timestamps). Content-type and body-size checks belong to the HTTP layer, not here.

Limits (each refusal names the field and the rule broken):
- ids follow `schemas.ids` (the read API's own checks): subAccountId 8x8's own format;
  umid, replyToUmid, batchId, recipient.channelId `^[A-Za-z0-9-]{1,100}$`; clientMessageId,
  clientBatchId printable, at most 50 / 100 characters. An optional id may be absent or empty.
- `status.state` is one of the states 8x8 documents (`STATES`), in any case. 8x8 documents the set as
  closed ("Possible values") in the status reference, the details API and the channel list, so anything
  else is a defect upstream or forged: refused here, never stored. The processor still treats a state
  it does not rank (`unknown`) as rank 0, so its "unknown states are never errors" stays true for
  records already stored. Channels stay open (8x8 adds channels; `README` of the docs: "Unknown channels
  must still be accepted"): any name of `CHANNEL_CHARS`, up to `MAX_CHANNEL` characters.
- every other string has a maximum length (`MAX_*` below, in characters): 8x8's documented limit where
  there is one, else a generous bound well above anything 8x8 documents or sends.
- event times (`status.timestamp`, inbound `timestamp`) lie between `EARLIEST` (2000-01-01) and
  `received_at + MAX_AHEAD` (1 day: clock skew, never a receipt from the future); a call permission's
  `expirationTimestamp` up to `MAX_EXPIRY_AHEAD` (30 days; 8x8 documents 7) after `received_at`.
  `received_at` is the reference because this parser never reads the clock.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from schemas import ids
from schemas.errors import InvalidEvent
from schemas.fields import (
    CODE_INVALID,
    NUL_MESSAGE,
    FieldError,
    JSONObject,
    bad,
    field_path,
    jtype,
    normalise_channel,
    opt_int32,
    opt_obj,
    opt_str,
    req_obj,
    req_str,
    show,
    wrong_type,
)
from schemas.models import (
    ButtonReply,
    CallPermissionReply,
    DeliveryReceipt,
    InboundContent,
    InboundMessage,
    Interactive,
    ListReply,
    Status,
    User,
)
from schemas.timefmt import format_iso8601, parse_iso8601

__all__ = [
    "CODE_INVALID",
    "CODE_UNSUPPORTED",
    "DEFAULT_MAX_DEPTH",
    "HTTP_INVALID",
    "HTTP_UNSUPPORTED",
    "error_body",
    "parse_webhook",
]

"""8x8 "Invalid parameter": the body is not a well-formed webhook of a kind we accept."""
HTTP_INVALID = 400
CODE_UNSUPPORTED = 1003
"""Well-formed, but a namespace or eventType this service does not process."""
HTTP_UNSUPPORTED = 422

DEFAULT_MAX_DEPTH = 32

NAMESPACE = "chatapps"
EVENT_DELIVERY_RECEIPT = "outbound_message_status_changed"
EVENT_INBOUND_MESSAGE = "inbound_message_received"

UTF8_BOM = b"\xef\xbb\xbf"
_ORJSON_MAX_DEPTH = 1024


#: every `status.state` 8x8 documents (message-status-references.md, the details API's MessageStatus,
#: list-of-supported-chatapps-channels.md and chatapps-fallback-management.md for `accepted`), lower case
STATES = frozenset(
    {
        "queued",
        "accepted",
        "sent",
        "delivered",
        "read",
        "undelivered",
        "rejected",
        "failed",
        "unknown",
        "ok",
        "error",
    }
)
_STATES_SHOWN = ", ".join(sorted(STATES))
#: a channel name: every value 8x8 documents (sms, WhatsApp, LineNotification, GoogleRCS, ...) is an ASCII
#: word; unknown channels of that shape are accepted
CHANNEL_CHARS = r"[A-Za-z0-9_.\-]"
MAX_CHANNEL = 32
channel_ok = re.compile(f"{CHANNEL_CHARS}{{1,{MAX_CHANNEL}}}").fullmatch
MAX_DETAIL = 64  # longest documented: undelivered_to_recipient (24)
MAX_ERROR_MESSAGE = 1000  # no documented limit; 8x8's are a few words
MAX_MSISDN = 32  # E.164: 15 digits and "+"; masked forms (+63922110xxxx) are as long
MAX_CHANNEL_USER_ID = 128  # WhatsApp BSUID, LINE user ids (33)
MAX_USER_NAME = 256  # user.name, user.username
MAX_PROVIDER_ERROR_CODE = 32  # WhatsApp error codes (131026)
MAX_PRICING_CATEGORY = 64  # marketing, utility, ...
MAX_TYPE = 32  # inbound `type`: Text, Interactive, ...
MAX_TEXT = 35_000  # content.text: 8x8's send API caps message text at 35000 (OpenAPI maxLength)
MAX_URL = 4096  # content.url: twice the 2048 8x8's send API allows for URLs; signed media URLs are long
MAX_PAYLOAD = 2048  # content.payload: 8x8's postbackData maxLength 2048
MAX_REPLY_ID = 256  # button/list reply ids: 8x8's reply.id maxLength 256 (rows.id 200)
MAX_REPLY_TEXT = 1024  # reply titles, descriptions: 8x8 caps them at 20 to 200 (interactive body 1024)
MAX_RESPONSE_JSON = 65_536  # a WhatsApp Flow's answer (nfmReply.responseJson), re-encoded if an object
MAX_SHORT = 64  # interactive.type, callPermissionReply.response/responseSource (accept, user_action)

EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
MAX_AHEAD = timedelta(days=1)
MAX_EXPIRY_AHEAD = timedelta(days=30)

# inbound `type`, lower-case -> 8x8 casing; values not listed are kept as sent
_INBOUND_TYPES = {
    t.lower(): t
    for t in (
        "None",
        "Text",
        "Audio",
        "Video",
        "Image",
        "Location",
        "File",
        "Document",
        "Carousel",
        "List",
        "Buttons",
        "Template",
        "Interactive",
    )
}

# interactive type, lower-case without underscores -> the key 8x8 documents for its sub-object
_BUTTON, _LIST, _NFM, _CALL = "buttonreply", "listreply", "nfmreply", "callpermissionreply"
_INTERACTIVE_KEYS = {
    _BUTTON: "button_reply",
    _LIST: "list_reply",
    _NFM: "nfmReply",
    _CALL: "callPermissionReply",
}


def _req_id(obj: JSONObject, key: str, parent: str, fmt: ids.IdFormat) -> str:
    value = req_str(obj, key, parent)
    problem = fmt.problem(value)
    if problem is not None:
        bad(parent, key, problem)
    return value


def _opt_id(obj: JSONObject, key: str, parent: str, fmt: ids.IdFormat) -> str | None:
    """An optional id: absent, null, empty (kept as given) or of format `fmt`."""
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not str:
        wrong_type(parent, key, "string", value)
    problem = None if value == "" else fmt.problem(value)
    if problem is not None:
        bad(parent, key, problem)
    return value


def _channel(obj: JSONObject, key: str, parent: str) -> str:
    value = req_str(obj, key, parent, MAX_CHANNEL)
    if not channel_ok(value):
        char = next(c for c in value if not re.fullmatch(CHANNEL_CHARS, c))
        bad(parent, key, f"character {char!r} (U+{ord(char):04X}) is not allowed in a channel name")
    return normalise_channel(value)


def _opt_code_str(obj: JSONObject, key: str, parent: str, max_len: int) -> str | None:
    """A code documented as string that may arrive as a JSON integer: kept as text."""
    value = obj.get(key)
    if type(value) is int:
        value = str(value)
    return opt_str({key: value}, key, parent, max_len)


def _opt_bool(obj: JSONObject, key: str, parent: str) -> bool | None:
    value = obj.get(key)
    if value is None or type(value) is bool:
        return value
    wrong_type(parent, key, "boolean", value)


def _opt_coordinate(obj: JSONObject, key: str, parent: str, limit: float) -> float | None:
    """A degree value given as a JSON number or a numeric string, within [-limit, limit]."""
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is float or type(value) is int:
        number = float(value)
    elif type(value) is str:
        try:
            number = float(value)
        except ValueError:
            bad(parent, key, f"not a number: {show(value)}")
    else:
        wrong_type(parent, key, "number", value)
    if not math.isfinite(number) or not -limit <= number <= limit:
        bad(parent, key, f"out of range [-{limit:g}, {limit:g}]: {show(value)}")
    return number


def _timestamp(value: object, parent: str, key: str, latest: datetime, ahead: str) -> datetime:
    if type(value) is not str:
        wrong_type(parent, key, "string", value)
    try:
        ts = parse_iso8601(value)
    except (ValueError, OverflowError):
        # OverflowError: a valid-looking timestamp whose UTC equivalent leaves datetime's range
        bad(parent, key, f"not an ISO 8601 timestamp: {show(value)}")
    if ts < EARLIEST:
        bad(parent, key, f"before 2000-01-01: {show(value)}")
    if ts > latest:
        bad(parent, key, f"more than {ahead} after the request was received: {show(value)}")
    return ts


def _req_timestamp(obj: JSONObject, key: str, parent: str, received_at: datetime) -> datetime:
    """An event time: from EARLIEST to MAX_AHEAD after `received_at`."""
    value = obj.get(key)
    if value is None:
        bad(parent, key, "required")
    return _timestamp(value, parent, key, received_at + MAX_AHEAD, "1 day")


def _opt_expiry(obj: JSONObject, key: str, parent: str, received_at: datetime) -> datetime | None:
    """An expiry time: from EARLIEST to MAX_EXPIRY_AHEAD after `received_at`."""
    value = obj.get(key)
    if value is None:
        return None
    return _timestamp(value, parent, key, received_at + MAX_EXPIRY_AHEAD, "30 days")


def _compact_json(value: object, parent: str, key: str) -> str:
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError as exc:  # only past orjson's own depth limit
        bad(parent, key, f"cannot be re-encoded: {exc}")


def _version(envelope: JSONObject, payload: JSONObject) -> int | None:
    # v9 / v3 put `version` in the envelope; accept it inside the payload too
    if envelope.get("version") is not None:
        return opt_int32(envelope, "version", "")
    return opt_int32(payload, "version", "payload")


# --- the two event kinds ------------------------------------------------------------------------


def _user(payload: JSONObject, parent: str) -> User:
    obj = opt_obj(payload, "user", parent)
    if not obj:
        return User()
    user_path = field_path(parent, "user")
    return User(
        msisdn=opt_str(obj, "msisdn", user_path, MAX_MSISDN),
        channel_user_id=opt_str(obj, "channelUserId", user_path, MAX_CHANNEL_USER_ID),
        name=opt_str(obj, "name", user_path, MAX_USER_NAME),
        username=opt_str(obj, "username", user_path, MAX_USER_NAME),
    )


def _status(payload: JSONObject, received_at: datetime) -> Status:
    status = req_obj(payload, "status", "payload")
    path = "payload.status"
    given = req_str(status, "state", path)
    state = given.lower()
    if state not in STATES:
        bad(path, "state", f"unknown value {show(given)} (8x8 documents {_STATES_SHOWN})")
    timestamp = _req_timestamp(status, "timestamp", path, received_at)
    detail = opt_str(status, "detail", path, MAX_DETAIL)
    return Status(
        state=state,
        timestamp=timestamp,
        detail=detail.lower() if detail else None,
        error_code=opt_int32(status, "errorCode", path),
        error_message=opt_str(status, "errorMessage", path, MAX_ERROR_MESSAGE),
    )


def _delivery_receipt(
    envelope: JSONObject, payload: JSONObject, received_at: datetime, raw_json: str
) -> DeliveryReceipt:
    p = "payload"
    umid = _req_id(payload, "umid", p, ids.UMID)
    sub_account_id = _req_id(payload, "subAccountId", p, ids.SUBACCOUNT_ID)
    channel = _channel(payload, "channel", p)
    status = _status(payload, received_at)
    provider_error_code = pricing_category = None
    whatsapp = opt_obj(payload, "whatsapp", p)
    if whatsapp:
        w = "payload.whatsapp"
        provider_error_code = _opt_code_str(whatsapp, "providerErrorCode", w, MAX_PROVIDER_ERROR_CODE)
        pricing_category = opt_str(whatsapp, "pricingCategory", w, MAX_PRICING_CATEGORY)
    outbound = opt_obj(payload, "outboundContent", p)
    return DeliveryReceipt(
        umid=umid,
        sub_account_id=sub_account_id,
        channel=channel,
        status=status,
        received_at=received_at,
        raw_json=raw_json,
        user=_user(payload, p),
        batch_id=_opt_id(payload, "batchId", p, ids.BATCH_ID),
        client_message_id=_opt_id(payload, "clientMessageId", p, ids.CLIENT_MESSAGE_ID),
        client_batch_id=_opt_id(payload, "clientBatchId", p, ids.CLIENT_BATCH_ID),
        version=_version(envelope, payload),
        whatsapp_provider_error_code=provider_error_code,
        whatsapp_pricing_category=pricing_category,
        outbound_content_json=None if outbound is None else _compact_json(outbound, p, "outboundContent"),
    )


def _reply_object(interactive: JSONObject, kind: str, path: str) -> tuple[JSONObject | None, str]:
    """Find the sub-object for `kind` under its documented key, else any key equal ignoring case and `_`."""
    key = _INTERACTIVE_KEYS[kind]
    if key not in interactive:
        for candidate in interactive:
            if candidate.lower().replace("_", "") == kind:
                key = candidate
                break
    return opt_obj(interactive, key, path), field_path(path, key)


def _interactive(content: JSONObject, received_at: datetime) -> Interactive | None:
    parent = "payload.content"
    obj = opt_obj(content, "interactive", parent)
    if obj is None:
        return None
    path = "payload.content.interactive"
    itype = req_str(obj, "type", path, MAX_SHORT)
    kind = itype.lower().replace("_", "")
    if kind not in _INTERACTIVE_KEYS:
        return Interactive(type=itype)
    sub, sub_path = _reply_object(obj, kind, path)
    if sub is None:
        return Interactive(type=itype)
    if kind == _BUTTON:
        button = ButtonReply(
            id=opt_str(sub, "id", sub_path, MAX_REPLY_ID),
            title=opt_str(sub, "title", sub_path, MAX_REPLY_TEXT),
        )
        return Interactive(type=itype, button_reply=button)
    if kind == _LIST:
        listed = ListReply(
            id=opt_str(sub, "id", sub_path, MAX_REPLY_ID),
            title=opt_str(sub, "title", sub_path, MAX_REPLY_TEXT),
            description=opt_str(sub, "description", sub_path, MAX_REPLY_TEXT),
        )
        return Interactive(type=itype, list_reply=listed)
    if kind == _NFM:
        response = sub.get("responseJson")
        if response is not None and type(response) is not str:
            if type(response) not in (dict, list):
                wrong_type(sub_path, "responseJson", "string", response)
            response = _compact_json(response, sub_path, "responseJson")
        if response is not None and len(response) > MAX_RESPONSE_JSON:
            bad(sub_path, "responseJson", f"longer than {MAX_RESPONSE_JSON} characters")
        if response is not None and "\x00" in response:
            bad(sub_path, "responseJson", NUL_MESSAGE)
        return Interactive(type=itype, nfm_response_json=response)
    call = CallPermissionReply(
        response=opt_str(sub, "response", sub_path, MAX_SHORT),
        is_permanent=_opt_bool(sub, "isPermanent", sub_path),
        expiration_timestamp=_opt_expiry(sub, "expirationTimestamp", sub_path, received_at),
        response_source=opt_str(sub, "responseSource", sub_path, MAX_SHORT),
    )
    return Interactive(type=itype, call_permission_reply=call)


def _content(payload: JSONObject, received_at: datetime) -> InboundContent:
    content = opt_obj(payload, "content", "payload")
    if not content:
        return InboundContent()
    p = "payload.content"
    latitude = longitude = None
    location = opt_obj(content, "location", p)
    if location:
        latitude = _opt_coordinate(location, "latitude", "payload.content.location", 90.0)
        longitude = _opt_coordinate(location, "longitude", "payload.content.location", 180.0)
    return InboundContent(
        text=opt_str(content, "text", p, MAX_TEXT),
        url=opt_str(content, "url", p, MAX_URL),
        payload=opt_str(content, "payload", p, MAX_PAYLOAD),
        latitude=latitude,
        longitude=longitude,
        interactive=_interactive(content, received_at),
    )


def _inbound_message(
    envelope: JSONObject, payload: JSONObject, received_at: datetime, raw_json: str
) -> InboundMessage:
    p = "payload"
    umid = _req_id(payload, "umid", p, ids.UMID)
    sub_account_id = _req_id(payload, "subAccountId", p, ids.SUBACCOUNT_ID)
    timestamp = _req_timestamp(payload, "timestamp", p, received_at)
    recipient = req_obj(payload, "recipient", p)
    channel = _channel(recipient, "channel", "payload.recipient")
    mtype = req_str(payload, "type", p, MAX_TYPE)
    return InboundMessage(
        umid=umid,
        sub_account_id=sub_account_id,
        timestamp=timestamp,
        channel=channel,
        type=_INBOUND_TYPES.get(mtype.lower(), mtype),
        received_at=received_at,
        raw_json=raw_json,
        channel_id=_opt_id(recipient, "channelId", "payload.recipient", ids.CHANNEL_ID),
        user=_user(payload, p),
        content=_content(payload, received_at),
        reply_to_umid=_opt_id(payload, "replyToUmid", p, ids.UMID),
        version=_version(envelope, payload),
    )


# --- the envelope -------------------------------------------------------------------------------


def _too_deep(value: object, limit: int) -> bool:
    """Whether containers nest deeper than `limit` (the top-level object is depth 1); no recursion."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if type(node) is dict else node:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))
    return False


def _decode(body: bytes, max_depth: int) -> tuple[JSONObject, str]:
    try:
        raw_json = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FieldError("body", f"not UTF-8 (byte {exc.start})") from None
    if not raw_json or raw_json.isspace():
        raise FieldError("body", "empty")
    data = body[len(UTF8_BOM) :] if body.startswith(UTF8_BOM) else body
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if "depth" in exc.msg or "recursion" in exc.msg:  # orjson stops at 1024 levels
            limit = min(max_depth, _ORJSON_MAX_DEPTH)
            raise FieldError("body", f"JSON nesting deeper than {limit}") from None
        raise FieldError("body", f"not valid JSON (line {exc.lineno} column {exc.colno})") from None
    if type(value) is not dict:
        raise FieldError("body", f"expected a JSON object, got {jtype(value)}")
    # cheap bound first: nesting cannot exceed the number of opening brackets in the text
    if data.count(b"{") + data.count(b"[") > max_depth and _too_deep(value, max_depth):
        raise FieldError("body", f"JSON nesting deeper than {max_depth}")
    return value, raw_json


def _parse(body: bytes, received_at: datetime, max_depth: int) -> DeliveryReceipt | InboundMessage:
    envelope, raw_json = _decode(body, max_depth)
    # eventType first: other 8x8 webhooks (WhatsApp business management) carry no namespace at all and
    # must be refused as unsupported, not as malformed
    event_type = req_str(envelope, "eventType", "")
    kind = event_type.lower()
    if kind != EVENT_DELIVERY_RECEIPT and kind != EVENT_INBOUND_MESSAGE:
        raise FieldError("eventType", f"unsupported value {show(event_type)}", CODE_UNSUPPORTED)
    namespace = req_str(envelope, "namespace", "")
    if namespace.lower() != NAMESPACE:
        raise FieldError("namespace", f"unsupported value {show(namespace)}", CODE_UNSUPPORTED)
    payload = req_obj(envelope, "payload", "")
    if kind == EVENT_DELIVERY_RECEIPT:
        return _delivery_receipt(envelope, payload, received_at, raw_json)
    return _inbound_message(envelope, payload, received_at, raw_json)


def parse_webhook(
    body: bytes, received_at: datetime, *, max_depth: int = DEFAULT_MAX_DEPTH
) -> DeliveryReceipt | InboundMessage:
    """Parse one 8x8 Chat Apps webhook request body.

    Returns a `DeliveryReceipt` (`outbound_message_status_changed`) or an `InboundMessage`
    (`inbound_message_received`) with channel, state, detail and inbound type normalised, and `raw_json`
    the body exactly as received. Raises `InvalidEvent` and nothing else for any `body`: code
    `CODE_INVALID` (HTTP 400) when the body is not a valid webhook, `CODE_UNSUPPORTED` (HTTP 422) for
    a namespace or eventType this service does not handle. `field` is the JSON path of the culprit
    (`body` for problems with the body as a whole). Raises ValueError only for `max_depth` < 1.
    """
    if max_depth < 1:
        raise ValueError(f"max_depth must be at least 1, got {max_depth}")
    try:
        return _parse(body, received_at, max_depth)
    except FieldError as problem:
        status = HTTP_UNSUPPORTED if problem.code == CODE_UNSUPPORTED else HTTP_INVALID
        raise InvalidEvent(
            f"{problem.field}: {problem.message}",
            field=problem.field,
            code=problem.code,
            http_status=status,
            raw=body,
        ) from None


def error_body(code: int, message: str, error_id: str, timestamp: datetime) -> bytes:
    """8x8's error JSON: `{"code": .., "message": .., "errorId": .., "timestamp": ..}`."""
    return orjson.dumps(
        {"code": code, "message": message, "errorId": error_id, "timestamp": format_iso8601(timestamp)}
    )
