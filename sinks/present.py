"""The read API's answers: rows of the store (`sinks.store`) -> 8x8's JSON shapes. Pure: no I/O, no clock.

The store persists and answers rows (dicts keyed by column, aware UTC datetimes) and `StoredMessage`s;
this module alone knows 8x8's vocabulary: camelCase keys in the documented order, 8x8's channel casing,
ISO 8601 text (`schemas.timefmt`), optional keys left out when unknown, `**MASKED**` content.
- `message_details`: Retrieve-message-details `data[]` of a `StoredMessage` (`detail_records`), then
  `complete_details` (the read API's last touch: the operator's channelIds, required strings never null);
- `summary_record`, `inbound_record`: one row of a list answer; `conversation_record`: a conversation
  row evaluated at `now` (an argument: this module never reads the clock).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from schemas.timefmt import format_iso8601, parse_iso8601
from sinks.rows import MASKED, Row
from sinks.store import StoredMessage

# 8x8's display casing of channel names (the core keeps them lower-case).
CHANNEL_DISPLAY: dict[str, str] = {
    "sms": "SMS",
    "whatsapp": "WhatsApp",
    "rcs": "RCS",
    "viber": "Viber",
    "line": "Line",
    "facebook": "Facebook",
    "messenger": "Facebook",
    "wechat": "WeChat",
    "zalo": "Zalo",
    "kakao": "Kakao",
    "kakaotalk": "Kakao",
    "telegram": "Telegram",
    "instagram": "Instagram",
    "applebusinesschat": "AppleBusinessChat",
    "googlebusinessmessages": "GoogleBusinessMessages",
}


def display_channel(channel: str) -> str:
    """8x8's casing for a lower-case channel name; an unknown channel is returned as stored."""
    return CHANNEL_DISPLAY.get(channel.lower(), channel) if channel else channel


def _iso(value: datetime | None) -> str | None:
    return format_iso8601(value) if value is not None else None


def _compact(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _user(row: Row) -> dict[str, Any] | None:
    user = _compact(
        {"msisdn": row.get("msisdn") or row.get("msisdn_masked"), "channelUserId": row.get("channel_user_id")}
    )
    return user or None


def detail_records(
    message: Row,
    steps: Sequence[Row],
    *,
    clear: bool = False,
    looked_up: Sequence[Mapping[str, Any]] | None = None,
    channel_ids: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """8x8 Retrieve-message-details `data[]`: one record per step, keys in the documented order.

    Optional keys whose value is unknown are left out (as in 8x8's second example); the required ones
    (umid, subAccountId, channel, channelId, direction, status, contentType, createdAt, step) are always
    present. `createdAt` is the submission time the details API reported; when chatpipe never learned
    it, the earliest event time of the message stands in (never null). `channelId`/`contentType` are
    null when unknown. `content` is `**MASKED**` unless the store keeps content in clear (outbound
    content is not stored, so it is then left out).

    `looked_up`: what 8x8's details API said of the steps (`processors.reconcile.step_details`, kept by
    the reconciler): authoritative, it gives each step of the same channel 8x8's step number (when those
    numbers stay distinct) and fills channelId, country, contentType and createdAt. `channel_ids`: channel
    -> the subaccount's only channelId seen on inbound messages of that channel, for steps still lacking it.
    """
    ordered = [dict(r) for r in sorted(steps, key=lambda r: r["step"])]
    if looked_up or channel_ids:
        ordered = _fill_steps(ordered, looked_up or (), channel_ids or {})
    known_created = [r["created_at"] for r in ordered if r.get("created_at") is not None]
    fallback_created = (
        min(known_created)
        if known_created
        else (min(r["first_event_at"] for r in ordered) if ordered else None)
    )
    user = _user(message)
    records = []
    for s in ordered:
        status = {"state": s["state"], "timestamp": _iso(s["status_at"])}
        status.update(
            _compact(
                {"detail": s["detail"], "errorCode": s["error_code"], "errorMessage": s["error_message"]}
            )
        )
        status = {
            k: status[k] for k in ("state", "detail", "errorCode", "errorMessage", "timestamp") if k in status
        }
        record: dict[str, Any] = {
            "umid": message["umid"],
            "subAccountId": message["sub_account_id"],
            "channel": display_channel(s["channel"]),
            "channelId": s.get("channel_id"),
            "direction": "outbound",
            "country": s.get("country"),
            "status": status,
            "user": user,
            "contentType": s.get("content_type"),
            "content": None if clear else MASKED,
            "createdAt": _iso(s.get("created_at") or fallback_created),
            "clientMessageId": message.get("client_message_id"),
            "clientBatchId": message.get("client_batch_id"),
            "batchId": message.get("batch_id"),
            "step": s["step"],
        }
        required = ("channelId", "contentType", "createdAt")
        records.append({k: v for k, v in record.items() if v is not None or k in required})
    return records


_LOOKED_UP_FIELDS = (
    ("channelId", "channel_id"),
    ("country", "country"),
    ("contentType", "content_type"),
    ("createdAt", "created_at"),
)


def _fill_steps(
    steps: list[dict[str, Any]], looked_up: Sequence[Mapping[str, Any]], channel_ids: Mapping[str, str]
) -> list[dict[str, Any]]:
    by_channel = {str(d.get("channel", "")).lower(): d for d in looked_up}
    for s in steps:
        d = by_channel.get(s["channel"])
        if d is not None:
            for key, column in _LOOKED_UP_FIELDS:
                if s.get(column) is None and d.get(key):
                    s[column] = _created_at(d[key]) if column == "created_at" else d[key]
        if s.get("channel_id") is None and s["channel"] in channel_ids:
            s["channel_id"] = channel_ids[s["channel"]]
    numbers = [
        by_channel[s["channel"]].get("step") if s["channel"] in by_channel else s["step"] for s in steps
    ]
    if all(isinstance(n, int) for n in numbers) and len(set(numbers)) == len(numbers):
        for s, n in zip(steps, numbers, strict=True):
            s["step"] = n
        steps.sort(key=lambda r: r["step"])
    return steps


def _created_at(value: str) -> datetime | None:
    try:
        return parse_iso8601(value)
    except (ValueError, OverflowError):
        return None


#: what the read API answers for a required string 8x8's document allows no null for, when unknown
UNKNOWN = ""


def complete_details(
    records: Sequence[dict[str, Any]], operator_ids: Mapping[tuple[str, str], str] | None = None
) -> list[dict[str, Any]]:
    """The read API's last touch on `detail_records`: a `channelId` still unknown is taken from the
    operator's map ((subAccountId, channel lower-cased) -> channelId, `CHATPIPE_CHANNEL_IDS`), and the
    required strings still unknown (`channelId`, `contentType`) become `UNKNOWN` (8x8's OpenAPI document
    requires strings there). Returns new dicts."""
    out = []
    for r in records:
        r = dict(r)
        if not r.get("channelId") and operator_ids:
            r["channelId"] = operator_ids.get((r["subAccountId"], str(r["channel"]).lower()))
        for key in ("channelId", "contentType"):
            if r.get(key) is None:
                r[key] = UNKNOWN
        out.append(r)
    return out


def message_details(
    found: StoredMessage, operator_ids: Mapping[tuple[str, str], str] | None = None
) -> list[dict[str, Any]]:
    """The read API's `data[]` of Retrieve message details for a stored message: `detail_records`, then
    `complete_details` with the operator's channelIds (`CHATPIPE_CHANNEL_IDS`). Empty for a message
    without steps (the API answers 404 then)."""
    return complete_details(stored_details(found), operator_ids)


def stored_details(found: StoredMessage) -> list[dict[str, Any]]:
    """`detail_records` of a stored message, with what its last lookup said and the channelIds its
    subaccount's inbound messages show (what `chatpipe verify` compares with the truth)."""
    return detail_records(
        found.message,
        found.steps,
        clear=found.clear,
        looked_up=found.looked_up,
        channel_ids=found.channel_ids,
    )


def summary_record(message: Row) -> dict[str, Any]:
    """One message of a list answer: its current status, path and identifiers (camelCase, nulls out)."""
    status = _compact(
        {
            "state": message["state"],
            "detail": message["detail"],
            "errorCode": message["error_code"],
            "errorMessage": message["error_message"],
            "timestamp": _iso(message["status_at"]),
        }
    )
    path = message["channel_path"]
    return _compact(
        {
            "umid": message["umid"],
            "subAccountId": message["sub_account_id"],
            "channel": display_channel(message["current_channel"]),
            "channelPath": [display_channel(c) for c in path.split(">")] if path else [],
            "fellBack": bool(message["fell_back"]),
            "stepCount": message["step_count"],
            "direction": "outbound",
            "status": status,
            "user": _user(message),
            "clientMessageId": message["client_message_id"],
            "clientBatchId": message["client_batch_id"],
            "batchId": message["batch_id"],
            "firstSentAt": _iso(message["first_sent_at"]),
            "deliveredAt": _iso(message["delivered_at"]),
            "readAt": _iso(message["read_at"]),
            "final": bool(message["final"]),
            "version": message["version"],
            "updatedAt": _iso(message["updated_at"]),
        }
    )


def inbound_record(row: Row) -> dict[str, Any]:
    """One inbound message of a conversation listing, in 8x8's inbound webhook vocabulary."""
    interactive = None
    if row.get("interactive_type"):
        interactive = _compact(
            {
                "type": row["interactive_type"],
                "buttonReply": _compact({"id": row["button_reply_id"], "title": row["button_reply_title"]})
                or None,
                "listReply": _compact(
                    {
                        "id": row["list_reply_id"],
                        "title": row["list_reply_title"],
                        "description": row["list_reply_description"],
                    }
                )
                or None,
            }
        )
    content = _compact(
        {
            "text": row.get("text"),
            "url": row.get("url"),
            "payload": row.get("payload"),
            "interactive": interactive,
        }
    )
    return _compact(
        {
            "umid": row["umid"],
            "subAccountId": row["sub_account_id"],
            "channel": display_channel(row["channel"]),
            "channelId": row.get("channel_id"),
            "direction": "inbound",
            "type": row["type"],
            "timestamp": _iso(row["ts"]),
            "user": _user(row),
            "content": content or None,
            "replyToUmid": row.get("reply_to_umid"),
        }
    )


def conversation_record(row: Row, now: datetime) -> dict[str, Any]:
    """The read API's conversation: the stored row in camelCase, with `windowOpen` and
    `callPermission.granted` evaluated at `now` (the same rules as `processors.conversation.window_open`
    and `call_permission_granted`). Every key is present; unknown values are null."""
    counts = row["counts_by_type"]
    if isinstance(counts, str):  # SQLite keeps JSON text, PostgreSQL answers jsonb as a dict
        counts = json.loads(counts)
    until = row["window_open_until"]
    response = row["call_permission"]
    permanent = None if row["call_permission_permanent"] is None else bool(row["call_permission_permanent"])
    perm_until = row["call_permission_until"]
    granted = response == "accept" and (bool(permanent) or (perm_until is not None and now < perm_until))
    return {
        "subAccountId": row["sub_account_id"],
        "channel": display_channel(row["channel"]),
        "channelId": row["channel_id"],
        "user": {
            "msisdn": row.get("msisdn") or row.get("msisdn_masked"),
            "channelUserId": row.get("channel_user_id"),
        },
        "firstInboundAt": _iso(row["first_inbound_at"]),
        "lastInboundAt": _iso(row["last_inbound_at"]),
        "lastUmid": row["last_umid"],
        "lastType": row["last_type"],
        "lastReplyToUmid": row["last_reply_to_umid"],
        "windowOpenUntil": _iso(until),
        "windowOpen": until is not None and now < until,
        "messageCount": row["message_count"],
        "countsByType": dict(sorted(counts.items())),
        "callPermission": {
            "response": response,
            "at": _iso(row["call_permission_at"]),
            "until": _iso(perm_until),
            "permanent": permanent,
            "granted": granted,
        },
        "version": row["version"],
    }
