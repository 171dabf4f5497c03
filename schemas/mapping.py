"""Pure conversions between the core dataclasses and Avro-shaped dicts (field names as in `*.avsc`).

Only the edges (codec users) call these; the pure core never sees an Avro dict. Timestamps stay
`datetime`: fastavro encodes aware datetimes for `timestamp-micros` and decodes them back as aware UTC.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from schemas.models import (
    ButtonReply,
    CallPermissionReply,
    Conversation,
    DeadLetter,
    DeliveryReceipt,
    InboundContent,
    InboundMessage,
    Interactive,
    ListReply,
    MessageState,
    MessageStep,
    Status,
    StatusEvent,
    StatusEventRecord,
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


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.title() for word in rest)


def _by_field_name(records: dict[str, type]) -> dict[str, tuple[type, dict[str, str]]]:
    """Objects straight from (and to) the compiled Avro codec (`fastpath.compile_reader/writer(build=)`)
    for records whose Avro fields are their dataclass's attributes in camelCase: {record full name:
    (class, {Avro field: attribute})}. A field missing from the class makes the compiler refuse the
    topic (the codec then goes through the dicts below); tests/unit/schemas/test_codec.py compares both paths
    on every sample and checks that these topics compile."""
    return {
        name: (cls, {_camel(f.name): f.name for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
        for name, cls in records.items()
    }


_STEP = {"io.chatpipe.state.Step": Step, "io.chatpipe.state.StatusEvent": StatusEvent}
RECEIPT_BUILD = _by_field_name(
    {"io.chatpipe.raw.DeliveryReceipt": DeliveryReceipt, "io.chatpipe.common.Status": Status,
     "io.chatpipe.common.User": User}
)  # fmt: skip
STATE_BUILD = _by_field_name(
    {"io.chatpipe.state.MessageState": MessageState, **_STEP, "io.chatpipe.common.User": User}
)
MESSAGE_STEP_BUILD = _by_field_name({"io.chatpipe.state.MessageStep": MessageStep, **_STEP})
STATUS_EVENT_RECORD_BUILD = _by_field_name(
    {"io.chatpipe.state.StatusEventRecord": StatusEventRecord, "io.chatpipe.state.StatusEvent": StatusEvent}
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
        "lineage": m.lineage,
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
        lineage=d.get("lineage", 0),
    )


def message_step_to_dict(x: MessageStep) -> Record:
    return {
        "umid": x.umid,
        "subAccountId": x.sub_account_id,
        "messageVersion": x.message_version,
        "stepCount": x.step_count,
        "step": step_to_dict(x.step),
    }


def message_step_from_dict(d: Record) -> MessageStep:
    return MessageStep(
        d["umid"], d["subAccountId"], d["messageVersion"], d["stepCount"], step_from_dict(d["step"])
    )


def status_event_record_to_dict(x: StatusEventRecord) -> Record:
    return {
        "umid": x.umid,
        "subAccountId": x.sub_account_id,
        "channel": x.channel,
        "step": x.step,
        "messageVersion": x.message_version,
        "event": _event_to_dict(x.event),
    }


def status_event_record_from_dict(d: Record) -> StatusEventRecord:
    return StatusEventRecord(
        d["umid"],
        d["subAccountId"],
        d["channel"],
        d["step"],
        d["messageVersion"],
        _event_from_dict(d["event"]),
    )


def conversation_to_dict(c: Conversation) -> Record:
    return {
        "key": c.key,
        "subAccountId": c.sub_account_id,
        "channel": c.channel,
        "channelId": c.channel_id,
        "userKey": c.user_key,
        "user": user_to_dict(c.user),
        "version": c.version,
        "firstInboundAt": c.first_inbound_at,
        "lastInboundAt": c.last_inbound_at,
        "lastUmid": c.last_umid,
        "lastType": c.last_type,
        "lastReplyToUmid": c.last_reply_to_umid,
        "windowOpenUntil": c.window_open_until,
        "messageCount": c.message_count,
        "duplicates": c.duplicates,
        "countsByType": dict(c.counts_by_type),
        "callPermission": c.call_permission,
        "callPermissionAt": c.call_permission_at,
        "callPermissionUntil": c.call_permission_until,
        "callPermissionPermanent": c.call_permission_permanent,
        "profileAt": c.profile_at,
        "recentUmids": list(c.recent_umids),
        "updatedAt": c.updated_at,
    }


def conversation_from_dict(d: Record) -> Conversation:
    return Conversation(
        key=d["key"],
        sub_account_id=d["subAccountId"],
        channel=d["channel"],
        user_key=d["userKey"],
        version=d["version"],
        first_inbound_at=d["firstInboundAt"],
        last_inbound_at=d["lastInboundAt"],
        last_umid=d["lastUmid"],
        last_type=d["lastType"],
        updated_at=d["updatedAt"],
        channel_id=d.get("channelId"),
        user=user_from_dict(d["user"]),
        message_count=d["messageCount"],
        duplicates=d.get("duplicates", 0),
        counts_by_type=tuple(sorted(d.get("countsByType", {}).items())),
        last_reply_to_umid=d.get("lastReplyToUmid"),
        window_open_until=d.get("windowOpenUntil"),
        call_permission=d.get("callPermission"),
        call_permission_at=d.get("callPermissionAt"),
        call_permission_until=d.get("callPermissionUntil"),
        call_permission_permanent=d.get("callPermissionPermanent"),
        profile_at=d.get("profileAt"),
        recent_umids=tuple(d.get("recentUmids", ())),
    )
