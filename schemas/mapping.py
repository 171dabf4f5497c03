"""Pure conversions between the core dataclasses and Avro-shaped dicts (field names as in `*.avsc`).

Only the edges (codec users) call these; the pure core never sees an Avro dict. Timestamps stay
`datetime`: fastavro encodes aware datetimes for `timestamp-micros` and decodes them back as aware UTC.
"""

from __future__ import annotations

from typing import Any

from schemas.models import (
    ButtonReply,
    CallPermissionReply,
    DeadLetter,
    DeliveryReceipt,
    InboundContent,
    InboundMessage,
    Interactive,
    ListReply,
    MessageState,
    Status,
    StatusEvent,
    Step,
    User,
)

Record = dict[str, Any]


def user_to_dict(u: User) -> Record:
    return {"msisdn": u.msisdn, "channelUserId": u.channel_user_id, "name": u.name, "username": u.username}


def user_from_dict(d: Record) -> User:
    return User(d.get("msisdn"), d.get("channelUserId"), d.get("name"), d.get("username"))


def status_to_dict(s: Status) -> Record:
    return {
        "state": s.state,
        "detail": s.detail,
        "timestamp": s.timestamp,
        "errorCode": s.error_code,
        "errorMessage": s.error_message,
    }


def status_from_dict(d: Record) -> Status:
    return Status(d["state"], d["timestamp"], d.get("detail"), d.get("errorCode"), d.get("errorMessage"))


def receipt_to_dict(r: DeliveryReceipt) -> Record:
    return {
        "umid": r.umid,
        "subAccountId": r.sub_account_id,
        "channel": r.channel,
        "status": status_to_dict(r.status),
        "user": user_to_dict(r.user),
        "batchId": r.batch_id,
        "clientMessageId": r.client_message_id,
        "clientBatchId": r.client_batch_id,
        "version": r.version,
        "whatsappProviderErrorCode": r.whatsapp_provider_error_code,
        "whatsappPricingCategory": r.whatsapp_pricing_category,
        "outboundContentJson": r.outbound_content_json,
        "receivedAt": r.received_at,
        "rawJson": r.raw_json,
    }


def receipt_from_dict(d: Record) -> DeliveryReceipt:
    return DeliveryReceipt(
        umid=d["umid"],
        sub_account_id=d["subAccountId"],
        channel=d["channel"],
        status=status_from_dict(d["status"]),
        received_at=d["receivedAt"],
        raw_json=d["rawJson"],
        user=user_from_dict(d["user"]),
        batch_id=d.get("batchId"),
        client_message_id=d.get("clientMessageId"),
        client_batch_id=d.get("clientBatchId"),
        version=d.get("version"),
        whatsapp_provider_error_code=d.get("whatsappProviderErrorCode"),
        whatsapp_pricing_category=d.get("whatsappPricingCategory"),
        outbound_content_json=d.get("outboundContentJson"),
    )


def _interactive_to_dict(i: Interactive | None) -> Record | None:
    if i is None:
        return None
    b, lr, cp = i.button_reply, i.list_reply, i.call_permission_reply
    return {
        "type": i.type,
        "buttonReplyId": b.id if b else None,
        "buttonReplyTitle": b.title if b else None,
        "listReplyId": lr.id if lr else None,
        "listReplyTitle": lr.title if lr else None,
        "listReplyDescription": lr.description if lr else None,
        "nfmResponseJson": i.nfm_response_json,
        "callPermissionResponse": cp.response if cp else None,
        "callPermissionIsPermanent": cp.is_permanent if cp else None,
        "callPermissionExpiresAt": cp.expiration_timestamp if cp else None,
        "callPermissionResponseSource": cp.response_source if cp else None,
    }


def _interactive_from_dict(d: Record | None) -> Interactive | None:
    if d is None:
        return None
    button = None
    if d.get("buttonReplyId") is not None or d.get("buttonReplyTitle") is not None:
        button = ButtonReply(d.get("buttonReplyId"), d.get("buttonReplyTitle"))
    lst = None
    if any(d.get(k) is not None for k in ("listReplyId", "listReplyTitle", "listReplyDescription")):
        lst = ListReply(d.get("listReplyId"), d.get("listReplyTitle"), d.get("listReplyDescription"))
    perm = None
    perm_keys = (
        "callPermissionResponse",
        "callPermissionIsPermanent",
        "callPermissionExpiresAt",
        "callPermissionResponseSource",
    )
    if any(d.get(k) is not None for k in perm_keys):
        perm = CallPermissionReply(*(d.get(k) for k in perm_keys))
    return Interactive(d["type"], button, lst, d.get("nfmResponseJson"), perm)


def inbound_to_dict(m: InboundMessage) -> Record:
    c = m.content
    return {
        "umid": m.umid,
        "subAccountId": m.sub_account_id,
        "timestamp": m.timestamp,
        "channel": m.channel,
        "channelId": m.channel_id,
        "type": m.type,
        "user": user_to_dict(m.user),
        "content": {
            "text": c.text,
            "url": c.url,
            "payload": c.payload,
            "latitude": c.latitude,
            "longitude": c.longitude,
            "interactive": _interactive_to_dict(c.interactive),
        },
        "replyToUmid": m.reply_to_umid,
        "version": m.version,
        "receivedAt": m.received_at,
        "rawJson": m.raw_json,
    }


def inbound_from_dict(d: Record) -> InboundMessage:
    c = d["content"]
    return InboundMessage(
        umid=d["umid"],
        sub_account_id=d["subAccountId"],
        timestamp=d["timestamp"],
        channel=d["channel"],
        type=d["type"],
        received_at=d["receivedAt"],
        raw_json=d["rawJson"],
        channel_id=d.get("channelId"),
        user=user_from_dict(d["user"]),
        content=InboundContent(
            c.get("text"),
            c.get("url"),
            c.get("payload"),
            c.get("latitude"),
            c.get("longitude"),
            _interactive_from_dict(c.get("interactive")),
        ),
        reply_to_umid=d.get("replyToUmid"),
        version=d.get("version"),
    )


def dead_letter_to_dict(x: DeadLetter) -> Record:
    headers: dict[str, str] = {}
    for k, v in x.headers:
        headers[k] = f"{headers[k]}, {v}" if k in headers else v
    return {
        "errorId": x.error_id,
        "reason": x.reason,
        "code": x.code,
        "httpStatus": x.http_status,
        "source": x.source,
        "field": x.field,
        "remote": x.remote,
        "receivedAt": x.received_at,
        "headers": headers,
        "body": x.body,
    }


def dead_letter_from_dict(d: Record) -> DeadLetter:
    return DeadLetter(
        error_id=str(d["errorId"]),
        reason=d["reason"],
        code=d["code"],
        http_status=d["httpStatus"],
        source=d["source"],
        received_at=d["receivedAt"],
        body=d["body"],
        headers=tuple(sorted(d.get("headers", {}).items())),
        field=d.get("field"),
        remote=d.get("remote"),
    )


def _event_to_dict(e: StatusEvent) -> Record:
    return {
        "state": e.state,
        "detail": e.detail,
        "timestamp": e.timestamp,
        "errorCode": e.error_code,
        "errorMessage": e.error_message,
    }


def _event_from_dict(d: Record) -> StatusEvent:
    return StatusEvent(d["state"], d["timestamp"], d.get("detail"), d.get("errorCode"), d.get("errorMessage"))


def step_to_dict(s: Step) -> Record:
    return {
        "step": s.step,
        "channel": s.channel,
        "state": s.state,
        "detail": s.detail,
        "errorCode": s.error_code,
        "errorMessage": s.error_message,
        "statusTimestamp": s.status_timestamp,
        "firstEventAt": s.first_event_at,
        "sentAt": s.sent_at,
        "deliveredAt": s.delivered_at,
        "readAt": s.read_at,
        "failedAt": s.failed_at,
        "duplicates": s.duplicates,
        "channelId": s.channel_id,
        "country": s.country,
        "contentType": s.content_type,
        "createdAt": s.created_at,
        "history": [_event_to_dict(e) for e in s.history],
    }


def step_from_dict(d: Record) -> Step:
    return Step(
        step=d["step"],
        channel=d["channel"],
        state=d["state"],
        status_timestamp=d["statusTimestamp"],
        first_event_at=d["firstEventAt"],
        detail=d.get("detail"),
        error_code=d.get("errorCode"),
        error_message=d.get("errorMessage"),
        sent_at=d.get("sentAt"),
        delivered_at=d.get("deliveredAt"),
        read_at=d.get("readAt"),
        failed_at=d.get("failedAt"),
        history=tuple(_event_from_dict(e) for e in d.get("history", ())),
        duplicates=d.get("duplicates", 0),
        channel_id=d.get("channelId"),
        country=d.get("country"),
        content_type=d.get("contentType"),
        created_at=d.get("createdAt"),
    )


def state_to_dict(m: MessageState) -> Record:
    return {
        "umid": m.umid,
        "subAccountId": m.sub_account_id,
        "version": m.version,
        "state": m.state,
        "detail": m.detail,
        "errorCode": m.error_code,
        "errorMessage": m.error_message,
        "statusTimestamp": m.status_timestamp,
        "user": user_to_dict(m.user),
        "batchId": m.batch_id,
        "clientMessageId": m.client_message_id,
        "clientBatchId": m.client_batch_id,
        "firstSentAt": m.first_sent_at,
        "deliveredAt": m.delivered_at,
        "readAt": m.read_at,
        "final": m.final,
        "duplicates": m.duplicates,
        "updatedAt": m.updated_at,
        "steps": [step_to_dict(s) for s in m.steps],
    }


def state_from_dict(d: Record) -> MessageState:
    return MessageState(
        umid=d["umid"],
        sub_account_id=d["subAccountId"],
        version=d["version"],
        state=d["state"],
        status_timestamp=d["statusTimestamp"],
        steps=tuple(step_from_dict(s) for s in d["steps"]),
        updated_at=d["updatedAt"],
        detail=d.get("detail"),
        error_code=d.get("errorCode"),
        error_message=d.get("errorMessage"),
        user=user_from_dict(d["user"]),
        batch_id=d.get("batchId"),
        client_message_id=d.get("clientMessageId"),
        client_batch_id=d.get("clientBatchId"),
        first_sent_at=d.get("firstSentAt"),
        delivered_at=d.get("deliveredAt"),
        read_at=d.get("readAt"),
        final=d.get("final", False),
        duplicates=d.get("duplicates", 0),
    )
