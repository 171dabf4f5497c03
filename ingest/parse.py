"""Pure parsing of 8x8 Chat Apps webhook bodies: bytes in, a `DeliveryReceipt` or `InboundMessage` out.

Contract: `parse_webhook` never does I/O, never reads the clock (`received_at` is an argument) and, for any
input bytes whatsoever, either returns an event or raises `InvalidEvent`; it raises nothing else. The
`InvalidEvent` names the offending field by its JSON path (`payload.status.timestamp`) in `field` and at
the start of `reason`, and carries the 8x8-style `code` and `http_status` the HTTP layer answers with.

Parsing is lenient where 8x8's own docs disagree (case of channel/state/detail/type, ids given as numbers
where the docs say string, unknown extra fields) and strict about what the pipeline needs (ids, channel,
status state and timestamps). Content-type and body-size checks belong to the HTTP layer, not here.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, NoReturn

import orjson

from schemas.errors import InvalidEvent
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

CODE_INVALID = 1000
"""8x8 "Invalid parameter": the body is not a well-formed webhook of a kind we accept."""
HTTP_INVALID = 400
CODE_UNSUPPORTED = 1003
"""Well-formed, but a namespace or eventType this service does not process."""
HTTP_UNSUPPORTED = 422

DEFAULT_MAX_DEPTH = 32
MAX_ID_LENGTH = 100
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

NAMESPACE = "chatapps"
EVENT_DELIVERY_RECEIPT = "outbound_message_status_changed"
EVENT_INBOUND_MESSAGE = "inbound_message_received"

UTF8_BOM = b"\xef\xbb\xbf"
_ORJSON_MAX_DEPTH = 1024
_SHOW_MAX = 80

CHANNEL_ALIASES = {"googlercs": "rcs"}

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

_JSON_TYPE_NAMES: dict[type, str] = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}

JSONObject = dict[str, Any]


class _Bad(Exception):
    """Raised by the field helpers; `parse_webhook` adds the raw body and re-raises as InvalidEvent."""

    def __init__(self, field: str, message: str, code: int = CODE_INVALID) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.code = code


def _path(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _jtype(value: object) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _show(value: object) -> str:
    """repr() for reasons, cut short: a reason ends up in logs, the DLQ and the HTTP answer."""
    text = repr(value)
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 1] + "…"


def _bad(parent: str, key: str, message: str, code: int = CODE_INVALID) -> NoReturn:
    raise _Bad(_path(parent, key), message, code)


def _wrong_type(parent: str, key: str, expected: str, value: object) -> NoReturn:
    _bad(parent, key, f"expected {expected}, got {_jtype(value)}")


# --- field helpers: `obj` is a JSON object, `parent` its path ------------------------------------


def _req_str(obj: JSONObject, key: str, parent: str, max_len: int | None = None) -> str:
    value = obj.get(key)
    if value is None:
        _bad(parent, key, "required")
    if type(value) is not str:
        _wrong_type(parent, key, "string", value)
    if not value or value.isspace():
        _bad(parent, key, "must not be empty")
    if max_len is not None and len(value) > max_len:
        _bad(parent, key, f"longer than {max_len} characters")
    return value


def _opt_str(obj: JSONObject, key: str, parent: str) -> str | None:
    value = obj.get(key)
    if value is None or type(value) is str:
        return value
    _wrong_type(parent, key, "string", value)


def _req_obj(obj: JSONObject, key: str, parent: str) -> JSONObject:
    value = obj.get(key)
    if value is None:
        _bad(parent, key, "required")
    if type(value) is not dict:
        _wrong_type(parent, key, "object", value)
    return value


def _opt_obj(obj: JSONObject, key: str, parent: str) -> JSONObject | None:
    value = obj.get(key)
    if value is None or type(value) is dict:
        return value
    _wrong_type(parent, key, "object", value)


def _opt_int(obj: JSONObject, key: str, parent: str) -> int | None:
    """An int32, given as a JSON integer or a string of ASCII digits (`15` or `"15"`)."""
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is int:
        number = value
    elif type(value) is str:
        text = value.strip()
        digits = text[1:] if text[:1] in ("-", "+") else text
        if not (digits.isascii() and digits.isdigit()) or len(digits) > 10:
            _bad(parent, key, f"not an integer: {_show(value)}")
        number = int(text)
    else:
        _wrong_type(parent, key, "integer", value)
    if not INT32_MIN <= number <= INT32_MAX:
        _bad(parent, key, f"out of range: {number}")
    return number


def _opt_code_str(obj: JSONObject, key: str, parent: str) -> str | None:
    """A code documented as string that may arrive as a JSON integer: kept as text."""
    value = obj.get(key)
    if value is None or type(value) is str:
        return value
    if type(value) is int:
        return str(value)
    _wrong_type(parent, key, "string", value)


def _opt_bool(obj: JSONObject, key: str, parent: str) -> bool | None:
    value = obj.get(key)
    if value is None or type(value) is bool:
        return value
    _wrong_type(parent, key, "boolean", value)


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
            _bad(parent, key, f"not a number: {_show(value)}")
    else:
        _wrong_type(parent, key, "number", value)
    if not math.isfinite(number) or not -limit <= number <= limit:
        _bad(parent, key, f"out of range [-{limit:g}, {limit:g}]: {_show(value)}")
    return number


def _timestamp(value: object, parent: str, key: str) -> datetime:
    if type(value) is not str:
        _wrong_type(parent, key, "string", value)
    try:
        return parse_iso8601(value)
    except (ValueError, OverflowError):
        # OverflowError: a valid-looking timestamp whose UTC equivalent leaves datetime's range
        _bad(parent, key, f"not an ISO 8601 timestamp: {_show(value)}")


def _req_timestamp(obj: JSONObject, key: str, parent: str) -> datetime:
    value = obj.get(key)
    if value is None:
        _bad(parent, key, "required")
    return _timestamp(value, parent, key)


def _opt_timestamp(obj: JSONObject, key: str, parent: str) -> datetime | None:
    value = obj.get(key)
    return None if value is None else _timestamp(value, parent, key)


def normalise_channel(value: str) -> str:
    """Lower case, aliases resolved (`GoogleRCS` -> `rcs`): the channel as chatpipe stores it."""
    lowered = value.lower()
    return CHANNEL_ALIASES.get(lowered, lowered)


def _compact_json(value: object, parent: str, key: str) -> str:
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError as exc:  # only past orjson's own depth limit
        _bad(parent, key, f"cannot be re-encoded: {exc}")


def _version(envelope: JSONObject, payload: JSONObject) -> int | None:
    # v9 / v3 put `version` in the envelope; accept it inside the payload too
    if envelope.get("version") is not None:
        return _opt_int(envelope, "version", "")
    return _opt_int(payload, "version", "payload")


# --- the two event kinds ------------------------------------------------------------------------


def _user(payload: JSONObject, parent: str) -> User:
    obj = _opt_obj(payload, "user", parent)
    if not obj:
        return User()
    path = _path(parent, "user")
    return User(
        msisdn=_opt_str(obj, "msisdn", path),
        channel_user_id=_opt_str(obj, "channelUserId", path),
        name=_opt_str(obj, "name", path),
        username=_opt_str(obj, "username", path),
    )


def _status(payload: JSONObject) -> Status:
    status = _req_obj(payload, "status", "payload")
    path = "payload.status"
    state = _req_str(status, "state", path).lower()
    timestamp = _req_timestamp(status, "timestamp", path)
    detail = _opt_str(status, "detail", path)
    return Status(
        state=state,
        timestamp=timestamp,
        detail=detail.lower() if detail else None,
        error_code=_opt_int(status, "errorCode", path),
        error_message=_opt_str(status, "errorMessage", path),
    )


def _delivery_receipt(
    envelope: JSONObject, payload: JSONObject, received_at: datetime, raw_json: str
) -> DeliveryReceipt:
    p = "payload"
    umid = _req_str(payload, "umid", p, MAX_ID_LENGTH)
    sub_account_id = _req_str(payload, "subAccountId", p, MAX_ID_LENGTH)
    channel = normalise_channel(_req_str(payload, "channel", p))
    status = _status(payload)
    provider_error_code = pricing_category = None
    whatsapp = _opt_obj(payload, "whatsapp", p)
    if whatsapp:
        provider_error_code = _opt_code_str(whatsapp, "providerErrorCode", "payload.whatsapp")
        pricing_category = _opt_str(whatsapp, "pricingCategory", "payload.whatsapp")
    outbound = _opt_obj(payload, "outboundContent", p)
    return DeliveryReceipt(
        umid=umid,
        sub_account_id=sub_account_id,
        channel=channel,
        status=status,
        received_at=received_at,
        raw_json=raw_json,
        user=_user(payload, p),
        batch_id=_opt_str(payload, "batchId", p),
        client_message_id=_opt_str(payload, "clientMessageId", p),
        client_batch_id=_opt_str(payload, "clientBatchId", p),
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
    return _opt_obj(interactive, key, path), _path(path, key)


def _interactive(content: JSONObject) -> Interactive | None:
    parent = "payload.content"
    obj = _opt_obj(content, "interactive", parent)
    if obj is None:
        return None
    path = "payload.content.interactive"
    itype = _req_str(obj, "type", path)
    kind = itype.lower().replace("_", "")
    if kind not in _INTERACTIVE_KEYS:
        return Interactive(type=itype)
    sub, sub_path = _reply_object(obj, kind, path)
    if sub is None:
        return Interactive(type=itype)
    if kind == _BUTTON:
        button = ButtonReply(id=_opt_str(sub, "id", sub_path), title=_opt_str(sub, "title", sub_path))
        return Interactive(type=itype, button_reply=button)
    if kind == _LIST:
        listed = ListReply(
            id=_opt_str(sub, "id", sub_path),
            title=_opt_str(sub, "title", sub_path),
            description=_opt_str(sub, "description", sub_path),
        )
        return Interactive(type=itype, list_reply=listed)
    if kind == _NFM:
        response = sub.get("responseJson")
        if response is not None and type(response) is not str:
            if type(response) not in (dict, list):
                _wrong_type(sub_path, "responseJson", "string", response)
            response = _compact_json(response, sub_path, "responseJson")
        return Interactive(type=itype, nfm_response_json=response)
    call = CallPermissionReply(
        response=_opt_str(sub, "response", sub_path),
        is_permanent=_opt_bool(sub, "isPermanent", sub_path),
        expiration_timestamp=_opt_timestamp(sub, "expirationTimestamp", sub_path),
        response_source=_opt_str(sub, "responseSource", sub_path),
    )
    return Interactive(type=itype, call_permission_reply=call)


def _content(payload: JSONObject) -> InboundContent:
    content = _opt_obj(payload, "content", "payload")
    if not content:
        return InboundContent()
    p = "payload.content"
    latitude = longitude = None
    location = _opt_obj(content, "location", p)
    if location:
        latitude = _opt_coordinate(location, "latitude", "payload.content.location", 90.0)
        longitude = _opt_coordinate(location, "longitude", "payload.content.location", 180.0)
    return InboundContent(
        text=_opt_str(content, "text", p),
        url=_opt_str(content, "url", p),
        payload=_opt_str(content, "payload", p),
        latitude=latitude,
        longitude=longitude,
        interactive=_interactive(content),
    )


def _inbound_message(
    envelope: JSONObject, payload: JSONObject, received_at: datetime, raw_json: str
) -> InboundMessage:
    p = "payload"
    umid = _req_str(payload, "umid", p, MAX_ID_LENGTH)
    sub_account_id = _req_str(payload, "subAccountId", p, MAX_ID_LENGTH)
    timestamp = _req_timestamp(payload, "timestamp", p)
    recipient = _req_obj(payload, "recipient", p)
    channel = normalise_channel(_req_str(recipient, "channel", "payload.recipient"))
    mtype = _req_str(payload, "type", p)
    return InboundMessage(
        umid=umid,
        sub_account_id=sub_account_id,
        timestamp=timestamp,
        channel=channel,
        type=_INBOUND_TYPES.get(mtype.lower(), mtype),
        received_at=received_at,
        raw_json=raw_json,
        channel_id=_opt_str(recipient, "channelId", "payload.recipient"),
        user=_user(payload, p),
        content=_content(payload),
        reply_to_umid=_opt_str(payload, "replyToUmid", p),
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
        raise _Bad("body", f"not UTF-8 (byte {exc.start})") from None
    if not raw_json or raw_json.isspace():
        raise _Bad("body", "empty")
    data = body[len(UTF8_BOM) :] if body.startswith(UTF8_BOM) else body
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if "depth" in exc.msg or "recursion" in exc.msg:  # orjson stops at 1024 levels
            raise _Bad("body", f"JSON nesting deeper than {min(max_depth, _ORJSON_MAX_DEPTH)}") from None
        raise _Bad("body", f"not valid JSON (line {exc.lineno} column {exc.colno})") from None
    if type(value) is not dict:
        raise _Bad("body", f"expected a JSON object, got {_jtype(value)}")
    # cheap bound first: nesting cannot exceed the number of opening brackets in the text
    if data.count(b"{") + data.count(b"[") > max_depth and _too_deep(value, max_depth):
        raise _Bad("body", f"JSON nesting deeper than {max_depth}")
    return value, raw_json


def _parse(body: bytes, received_at: datetime, max_depth: int) -> DeliveryReceipt | InboundMessage:
    envelope, raw_json = _decode(body, max_depth)
    # eventType first: other 8x8 webhooks (WhatsApp business management) carry no namespace at all and
    # must be refused as unsupported, not as malformed
    event_type = _req_str(envelope, "eventType", "")
    kind = event_type.lower()
    if kind != EVENT_DELIVERY_RECEIPT and kind != EVENT_INBOUND_MESSAGE:
        raise _Bad("eventType", f"unsupported value {_show(event_type)}", CODE_UNSUPPORTED)
    namespace = _req_str(envelope, "namespace", "")
    if namespace.lower() != NAMESPACE:
        raise _Bad("namespace", f"unsupported value {_show(namespace)}", CODE_UNSUPPORTED)
    payload = _req_obj(envelope, "payload", "")
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
    except _Bad as bad:
        status = HTTP_UNSUPPORTED if bad.code == CODE_UNSUPPORTED else HTTP_INVALID
        raise InvalidEvent(
            f"{bad.field}: {bad.message}", field=bad.field, code=bad.code, http_status=status, raw=body
        ) from None


def error_body(code: int, message: str, error_id: str, timestamp: datetime) -> bytes:
    """8x8's error JSON: `{"code": .., "message": .., "errorId": .., "timestamp": ..}`."""
    return orjson.dumps(
        {"code": code, "message": message, "errorId": error_id, "timestamp": format_iso8601(timestamp)}
    )
