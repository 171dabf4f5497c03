"""Conversations: what inbound messages tell about each (subaccount, channel, channelId, user). Pure.

A conversation records when the user last wrote (and, on WhatsApp, the 24-hour customer-service window
that message opens: `window_open_until`), how many messages of each type arrived, the last message and
what it replied to, and the user's latest call-permission answer (WhatsApp `callPermissionReply`).

Everything is a function of the SET of distinct inbound messages seen (by umid), so retries and
reordering give the same conversation; `version` grows by one per real change for monotonic sinks.
Only the most recent `recent_limit` umids are remembered for deduplication: 8x8 retries a webhook within
about two minutes, far inside that horizon.

Time range: a message may carry any time `datetime` can represent (like receipts, `processors.state`
"Time range"). Times are only compared, except the WhatsApp window (`last_inbound_at` + 24 h), which
saturates at `datetime.max` instead of overflowing: no decoded message makes `apply_inbound` raise, except
a message of another conversation (ValueError, a routing bug).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from processors.state import saturating_add
from schemas.models import Conversation, InboundMessage, User

WHATSAPP_SERVICE_WINDOW = timedelta(hours=24)
RECENT_LIMIT = 256


def conversation_key(msg: InboundMessage) -> str:
    """Key of the conversation a message belongs to; the user is their channel id, else their number."""
    return "|".join((msg.sub_account_id, msg.channel, msg.channel_id or "", user_key(msg.user)))


def user_key(user: User) -> str:
    return user.channel_user_id or user.msisdn or user.username or ""


def _merge_user(prev: Conversation, msg: InboundMessage) -> tuple[User, datetime | None]:
    """Ids fill in once; the profile (name, username) follows the newest message that carries one."""
    old, new = prev.user, msg.user
    profile = (old.name, old.username)
    profile_at = prev.profile_at
    if (new.name or new.username) and (
        profile_at is None
        or (msg.timestamp, new.name or "", new.username or "")
        > (profile_at, old.name or "", old.username or "")
    ):
        profile, profile_at = (new.name, new.username), msg.timestamp
    user = User(old.msisdn or new.msisdn, old.channel_user_id or new.channel_user_id, *profile)
    return user, profile_at


def apply_inbound(
    prev: Conversation | None, msg: InboundMessage, *, now: datetime
) -> tuple[Conversation, bool]:
    """Fold one inbound message; returns the conversation and whether it changed.

    A umid already counted changes nothing but `duplicates`. Raises ValueError when `msg` belongs to
    another conversation than `prev`.
    """
    key = conversation_key(msg)
    if prev is not None and prev.key != key:
        raise ValueError(f"message {msg.umid} belongs to {key!r}, not {prev.key!r}")
    if prev is not None and msg.umid in prev.recent_umids:
        return _replace_dup(prev), False
    counts = dict(prev.counts_by_type) if prev else {}
    counts[msg.type] = counts.get(msg.type, 0) + 1
    recent = ((prev.recent_umids if prev else ()) + (msg.umid,))[-RECENT_LIMIT:]
    newest = prev is None or (msg.timestamp, msg.umid) >= (prev.last_inbound_at, prev.last_umid)
    last_at = msg.timestamp if newest else prev.last_inbound_at  # type: ignore[union-attr]
    window = saturating_add(last_at, WHATSAPP_SERVICE_WINDOW) if msg.channel == "whatsapp" else None
    perm = _permission(prev, msg)
    if prev is None:
        user, profile_at = msg.user, (msg.timestamp if msg.user.name or msg.user.username else None)
    else:
        user, profile_at = _merge_user(prev, msg)
    return (
        Conversation(
            key=key,
            sub_account_id=msg.sub_account_id,
            channel=msg.channel,
            user_key=user_key(msg.user),
            version=(prev.version if prev else 0) + 1,
            first_inbound_at=min(prev.first_inbound_at, msg.timestamp) if prev else msg.timestamp,
            last_inbound_at=last_at,
            last_umid=msg.umid if newest else prev.last_umid,  # type: ignore[union-attr]
            last_type=msg.type if newest else prev.last_type,  # type: ignore[union-attr]
            updated_at=now,
            channel_id=msg.channel_id,
            user=user,
            message_count=(prev.message_count if prev else 0) + 1,
            duplicates=prev.duplicates if prev else 0,
            counts_by_type=tuple(sorted(counts.items())),
            last_reply_to_umid=(msg.reply_to_umid if newest else prev.last_reply_to_umid),  # type: ignore[union-attr]
            window_open_until=window,
            call_permission=perm[0],
            call_permission_at=perm[1],
            call_permission_until=perm[2],
            call_permission_permanent=perm[3],
            profile_at=profile_at,
            recent_umids=recent,
        ),
        True,
    )


def _replace_dup(prev: Conversation) -> Conversation:
    from dataclasses import replace

    return replace(prev, duplicates=prev.duplicates + 1)


def _permission(
    prev: Conversation | None, msg: InboundMessage
) -> tuple[str | None, datetime | None, datetime | None, bool | None]:
    """The latest call-permission answer by message time (equal times: `reject` < `accept` lexically,
    a deterministic choice so that arrival order never matters)."""
    old = (
        (
            prev.call_permission,
            prev.call_permission_at,
            prev.call_permission_until,
            prev.call_permission_permanent,
        )
        if prev
        else (None, None, None, None)
    )
    interactive = msg.content.interactive
    reply = interactive.call_permission_reply if interactive is not None else None
    if reply is None or reply.response is None:
        return old
    response = reply.response.lower()
    if old[1] is not None and old[0] is not None and (msg.timestamp, response) < (old[1], old[0]):
        return old
    until = None if reply.is_permanent else reply.expiration_timestamp
    return response, msg.timestamp, until, reply.is_permanent


def call_permission_granted(conv: Conversation, now: datetime) -> bool:
    """Whether the user's latest answer lets the business call them at `now`."""
    if conv.call_permission != "accept":
        return False
    return bool(conv.call_permission_permanent) or (
        conv.call_permission_until is not None and now < conv.call_permission_until
    )


def window_open(conv: Conversation, now: datetime) -> bool:
    """Whether the WhatsApp customer-service window is open at `now` (free-form replies allowed)."""
    return conv.window_open_until is not None and now < conv.window_open_until
