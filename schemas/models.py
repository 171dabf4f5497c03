"""Frozen dataclasses for every record chatpipe moves: the pure core's vocabulary.

Nothing here does I/O. Avro dicts never reach these types directly: `schemas.mapping` converts at the
edge. Timestamps are timezone-aware UTC `datetime`s (microsecond precision; 8x8 sends up to 7 fractional
digits, the 100 ns digit is dropped). Channel, state, detail and direction are normalised to lower case by
the parser so that the core compares plain strings.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime

from schemas.frozen import fast_init

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class EventKind(enum.StrEnum):
    DELIVERY_RECEIPT = "outbound_message_status_changed"
    INBOUND_MESSAGE = "inbound_message_received"


@fast_init
@dataclass(frozen=True, slots=True)
class User:
    """The end user a message is about. Any field may be absent (v9 drops msisdn for LINE)."""

    msisdn: str | None = None
    channel_user_id: str | None = None
    name: str | None = None
    username: str | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class Status:
    """8x8's universal status object, normalised (state/detail lower-case)."""

    state: str
    timestamp: datetime
    detail: str | None = None
    error_code: int | None = None
    error_message: str | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class DeliveryReceipt:
    """One `outbound_message_status_changed` webhook, parsed.

    `raw_json` is the exact request body as received, kept so nothing 8x8 sends is ever lost.
    """

    umid: str
    sub_account_id: str
    channel: str
    status: Status
    received_at: datetime
    raw_json: str
    user: User = field(default_factory=User)
    batch_id: str | None = None
    client_message_id: str | None = None
    client_batch_id: str | None = None
    version: int | None = None
    whatsapp_provider_error_code: str | None = None
    whatsapp_pricing_category: str | None = None
    outbound_content_json: str | None = None

    @property
    def kind(self) -> EventKind:
        return EventKind.DELIVERY_RECEIPT


@fast_init
@dataclass(frozen=True, slots=True)
class ButtonReply:
    id: str | None = None
    title: str | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class ListReply:
    id: str | None = None
    title: str | None = None
    description: str | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class CallPermissionReply:
    response: str | None = None
    is_permanent: bool | None = None
    expiration_timestamp: datetime | None = None
    response_source: str | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class Interactive:
    """`content.interactive` of an inbound message; `type` is kept as 8x8 spells it (e.g. `nfmReply`)."""

    type: str
    button_reply: ButtonReply | None = None
    list_reply: ListReply | None = None
    nfm_response_json: str | None = None
    call_permission_reply: CallPermissionReply | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class InboundContent:
    text: str | None = None
    url: str | None = None
    payload: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    interactive: Interactive | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One `inbound_message_received` webhook, parsed. `type` is canonical 8x8 casing (`Text`, ...)."""

    umid: str
    sub_account_id: str
    timestamp: datetime
    channel: str
    type: str
    received_at: datetime
    raw_json: str
    channel_id: str | None = None
    user: User = field(default_factory=User)
    content: InboundContent = field(default_factory=InboundContent)
    reply_to_umid: str | None = None
    version: int | None = None

    @property
    def kind(self) -> EventKind:
        return EventKind.INBOUND_MESSAGE


Event = DeliveryReceipt | InboundMessage


@fast_init
@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A request (or record) that could not be accepted, parked whole for replay after a fix."""

    error_id: str
    reason: str
    code: int
    http_status: int
    source: str
    received_at: datetime
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    field: str | None = None
    remote: str | None = None


# --- derived state (processors) ------------------------------------------------------------------


@fast_init
@dataclass(frozen=True, slots=True)
class StatusEvent:
    """One distinct status observed for one step; the identity used for dedup is the whole tuple
    (channel is implied by the step)."""

    state: str
    timestamp: datetime
    detail: str | None = None
    error_code: int | None = None
    error_message: str | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class Step:
    """One channel attempt of a message: its current (never regressing) status and its history."""

    step: int
    channel: str
    state: str
    status_timestamp: datetime
    first_event_at: datetime
    detail: str | None = None
    error_code: int | None = None
    error_message: str | None = None
    sent_at: datetime | None = None
    delivered_at: datetime | None = None
    read_at: datetime | None = None
    failed_at: datetime | None = None
    history: tuple[StatusEvent, ...] = ()
    duplicates: int = 0
    # authoritative fields from the Retrieve message details API (reconciler), when known
    channel_id: str | None = None
    country: str | None = None
    content_type: str | None = None
    created_at: datetime | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class MessageState:
    """The truth about one outbound message (umid), folded from its receipts.

    `version` grows by one each time the state really changes, so sinks can refuse older versions of the
    same `lineage`: a random id given when the state was created and kept by every later version. Two
    states of different lineages were folded from different sets of receipts (processor state lost or
    rebuilt in between): they are merged by content (`processors.join`), never ordered by version.
    """

    umid: str
    sub_account_id: str
    version: int
    state: str
    status_timestamp: datetime
    steps: tuple[Step, ...]
    updated_at: datetime
    detail: str | None = None
    error_code: int | None = None
    error_message: str | None = None
    user: User = field(default_factory=User)
    batch_id: str | None = None
    client_message_id: str | None = None
    client_batch_id: str | None = None
    first_sent_at: datetime | None = None
    delivered_at: datetime | None = None
    read_at: datetime | None = None
    final: bool = False
    duplicates: int = 0
    lineage: int = 0

    @property
    def channel_path(self) -> str:
        return ">".join(s.channel for s in self.steps)

    @property
    def fell_back(self) -> bool:
        return len(self.steps) > 1

    @property
    def current_channel(self) -> str:
        return self.steps[-1].channel if self.steps else ""


@fast_init
@dataclass(frozen=True, slots=True)
class MessageStep:
    """A step as published on the step topic: the step plus which message version it belongs to."""

    umid: str
    sub_account_id: str
    message_version: int
    step_count: int
    step: Step


@fast_init
@dataclass(frozen=True, slots=True)
class StatusEventRecord:
    """A distinct status newly recorded for a step, as published on the history topic."""

    umid: str
    sub_account_id: str
    channel: str
    step: int
    message_version: int
    event: StatusEvent


@fast_init
@dataclass(frozen=True, slots=True)
class Conversation:
    """What inbound messages tell about one (subaccount, channel, channelId, user); see
    `processors.conversation`."""

    key: str
    sub_account_id: str
    channel: str
    user_key: str
    version: int
    first_inbound_at: datetime
    last_inbound_at: datetime
    last_umid: str
    last_type: str
    updated_at: datetime
    channel_id: str | None = None
    user: User = field(default_factory=User)
    message_count: int = 0
    duplicates: int = 0
    counts_by_type: tuple[tuple[str, int], ...] = ()
    last_reply_to_umid: str | None = None
    window_open_until: datetime | None = None
    call_permission: str | None = None
    call_permission_at: datetime | None = None
    call_permission_until: datetime | None = None
    call_permission_permanent: bool | None = None
    profile_at: datetime | None = None
    recent_umids: tuple[str, ...] = ()
