"""The validation vocabulary of JSON fields, shared by every source of events. Pure: no I/O.

8x8 reaches chatpipe two ways: webhooks (`ingest/parse.py`) and the Retrieve-message-details answers the
reconciler fetches (`processors/reconcile.py`). Both check the same kinds of fields with the same rules
and say what is wrong in the same words: a JSON path (`payload.status.errorCode`), then the reason
(`expected integer, got string`, `out of range: 2147483648`, `longer than 64 characters`). Those rules and
words live here, once.

Each check takes the JSON object, the key and the parent's path, and raises `FieldError` (the path, the
reason and chatpipe's error code) on the first problem; each source turns that into its own `InvalidEvent`
with the raw body attached.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NoReturn

from schemas import ids
from schemas.timefmt import parse_iso8601

#: chatpipe's error code for a body that breaks 8x8's documented format (the read API's 1000)
CODE_INVALID = 1000

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
#: the longest id chatpipe accepts (umid, subAccountId, batch and client ids)
MAX_ID_LENGTH = ids.UMID.max_len

#: channel spellings that name a channel chatpipe stores under another name
CHANNEL_ALIASES = {"googlercs": "rcs"}

_SHOW_MAX = 80

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


class FieldError(Exception):
    """One field's problem: `field` its JSON path, `message` the reason, `code` chatpipe's error code."""

    def __init__(self, field: str, message: str, code: int = CODE_INVALID) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.code = code


def field_path(parent: str, key: str) -> str:
    """The JSON path of `key` in the object at `parent` (`payload.status` + `state`)."""
    return f"{parent}.{key}" if parent else key


def jtype(value: object) -> str:
    """The JSON name of a decoded value's type (`object`, `array`, `string`, `number`, ...)."""
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def show(value: object) -> str:
    """repr() for reasons, cut short: a reason ends up in logs, the DLQ and the HTTP answer."""
    text = repr(value)
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 1] + "…"


def bad(parent: str, key: str, message: str, code: int = CODE_INVALID) -> NoReturn:
    raise FieldError(field_path(parent, key), message, code)


def wrong_type(parent: str, key: str, expected: str, value: object) -> NoReturn:
    bad(parent, key, f"expected {expected}, got {jtype(value)}")


#: why a string holding U+0000 is refused: PostgreSQL's text cannot store it, so the sink could never write
#: the record (it would stop its partition); no 8x8 field carries it
NUL_MESSAGE = "must not contain the NUL character (\\u0000): the store cannot keep it"


def req_str(obj: JSONObject, key: str, parent: str, max_len: int | None = None) -> str:
    """A required, non-blank string of at most `max_len` characters."""
    value = obj.get(key)
    if value is None:
        bad(parent, key, "required")
    if type(value) is not str:
        wrong_type(parent, key, "string", value)
    if not value or value.isspace():
        bad(parent, key, "must not be empty")
    if max_len is not None and len(value) > max_len:
        bad(parent, key, f"longer than {max_len} characters")
    if "\x00" in value:
        bad(parent, key, NUL_MESSAGE)
    return value


def opt_str(obj: JSONObject, key: str, parent: str, max_len: int | None = None) -> str | None:
    """An optional string (absent or null: None) of at most `max_len` characters."""
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not str:
        wrong_type(parent, key, "string", value)
    if max_len is not None and len(value) > max_len:
        bad(parent, key, f"longer than {max_len} characters")
    if "\x00" in value:
        bad(parent, key, NUL_MESSAGE)
    return value


def req_obj(obj: JSONObject, key: str, parent: str) -> JSONObject:
    value = obj.get(key)
    if value is None:
        bad(parent, key, "required")
    if type(value) is not dict:
        wrong_type(parent, key, "object", value)
    return value


def opt_obj(obj: JSONObject, key: str, parent: str) -> JSONObject | None:
    value = obj.get(key)
    if value is None or type(value) is dict:
        return value
    wrong_type(parent, key, "object", value)


def int32(value: object, parent: str, key: str) -> int:
    """An int32, given as a JSON integer or a string of ASCII digits (`15` or `"15"`)."""
    if type(value) is int:
        number = value
    elif type(value) is str:
        text = value.strip()
        digits = text[1:] if text[:1] in ("-", "+") else text
        if not (digits.isascii() and digits.isdigit()) or len(digits) > 10:
            bad(parent, key, f"not an integer: {show(value)}")
        number = int(text)
    else:
        wrong_type(parent, key, "integer", value)
    if not INT32_MIN <= number <= INT32_MAX:
        bad(parent, key, f"out of range: {number}")
    return number


def opt_int32(obj: JSONObject, key: str, parent: str) -> int | None:
    value = obj.get(key)
    return None if value is None else int32(value, parent, key)


def iso_timestamp(value: object, parent: str, key: str) -> datetime:
    """An ISO 8601 timestamp string (any offset), as an aware UTC datetime; no range check."""
    if type(value) is not str:
        wrong_type(parent, key, "string", value)
    try:
        return parse_iso8601(value)
    except (ValueError, OverflowError):
        # OverflowError: a valid-looking timestamp whose UTC equivalent leaves datetime's range
        bad(parent, key, f"not an ISO 8601 timestamp: {show(value)}")


def normalise_channel(value: str) -> str:
    """Lower case, aliases resolved (`GoogleRCS` -> `rcs`): the channel as chatpipe stores it."""
    lowered = value.lower()
    return CHANNEL_ALIASES.get(lowered, lowered)
