"""Pure mapping between the core dataclasses and the store's rows (8x8's shapes: `sinks.present`).

Nothing here does I/O or reads the clock. Rows are plain dicts keyed by column name; timestamps stay
aware UTC `datetime`s and each store adapts them (ISO text in SQLite, timestamptz in PostgreSQL).
The column tuples below are the single list both dialects write, in this order.

PII policy (`PiiPolicy`): by default a row never holds a phone number or message content in clear:
`msisdn_masked` is masked the way 8x8 masks it (`+63922110xxxx`), `msisdn_hash` is an HMAC-SHA256 of the
number (for joins), text is `**MASKED**`, and the clear-only columns (`msisdn`, `raw_json`, ...) are NULL.
With `clear=True` those columns are filled too.

Conversations (`conversations` table): the conversation key `subAccountId|channel|channelId|user` holds
the user id, which is the phone number whenever the user has no channelUserId (SMS, older webhooks). So
the table's primary key is `key_hash`, an HMAC-SHA256 of the whole key with the policy's `hash_key`,
under BOTH policies: the identity of a row never depends on `clear` (switching it never splits a
conversation in two), and the read API finds a row by hashing what it is asked for (`user_key_hash`,
`msisdn_hash`). `conversation_key` (the key itself) is a clear-only column; `user_key` is masked like an
msisdn when it looks like a phone number. Changing `hash_key` orphans every stored hash: rebuild the
table from the compacted `chatpipe.conversations.state` topic (a new sink consumer group) after rotating.
`channel_user_id` follows the inbound table (kept as is: it is how services address the user).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from schemas.models import Conversation, InboundMessage, MessageState, StatusEvent, Step, User

Row = dict[str, Any]

MASKED = "**MASKED**"

MESSAGE_COLUMNS: tuple[str, ...] = (
    "umid",
    "sub_account_id",
    "version",
    "state",
    "detail",
    "error_code",
    "error_message",
    "status_at",
    "channel_path",
    "current_channel",
    "fell_back",
    "step_count",
    "first_sent_at",
    "delivered_at",
    "read_at",
    "final",
    "duplicates",
    "msisdn_masked",
    "msisdn_hash",
    "msisdn",
    "channel_user_id",
    "batch_id",
    "client_message_id",
    "client_batch_id",
    "updated_at",
    "lineage",
)

STEP_COLUMNS: tuple[str, ...] = (
    "umid",
    "step",
    "channel",
    "state",
    "detail",
    "error_code",
    "error_message",
    "status_at",
    "first_event_at",
    "sent_at",
    "delivered_at",
    "read_at",
    "failed_at",
    "channel_id",
    "country",
    "content_type",
    "created_at",
    "duplicates",
    "version",
)

EVENT_COLUMNS: tuple[str, ...] = (
    "umid",
    "step",
    "sub_account_id",
    "channel",
    "state",
    "detail",
    "error_code",
    "error_message",
    "ts",
)

INBOUND_COLUMNS: tuple[str, ...] = (
    "umid",
    "sub_account_id",
    "channel",
    "channel_id",
    "type",
    "ts",
    "received_at",
    "msisdn_masked",
    "msisdn_hash",
    "msisdn",
    "channel_user_id",
    "user_name",
    "text",
    "url",
    "payload",
    "latitude",
    "longitude",
    "reply_to_umid",
    "interactive_type",
    "button_reply_id",
    "button_reply_title",
    "list_reply_id",
    "list_reply_title",
    "list_reply_description",
    "nfm_response_json",
    "call_permission_response",
    "call_permission_is_permanent",
    "call_permission_expires_at",
    "call_permission_source",
    "version",
    "raw_json",
)

CONVERSATION_COLUMNS: tuple[str, ...] = (
    "key_hash",
    "conversation_key",
    "sub_account_id",
    "channel",
    "channel_id",
    "user_key",
    "user_key_hash",
    "msisdn_masked",
    "msisdn_hash",
    "msisdn",
    "channel_user_id",
    "version",
    "first_inbound_at",
    "last_inbound_at",
    "last_umid",
    "last_type",
    "last_reply_to_umid",
    "window_open_until",
    "message_count",
    "duplicates",
    "counts_by_type",
    "call_permission",
    "call_permission_at",
    "call_permission_until",
    "call_permission_permanent",
    "updated_at",
)

# Columns holding a timestamp, per table: the stores convert these (SQLite keeps ISO text).
TIMESTAMP_COLUMNS: frozenset[str] = frozenset(
    {
        "status_at",
        "first_sent_at",
        "delivered_at",
        "read_at",
        "updated_at",
        "first_event_at",
        "sent_at",
        "failed_at",
        "created_at",
        "ts",
        "received_at",
        "call_permission_expires_at",
        "first_inbound_at",
        "last_inbound_at",
        "window_open_until",
        "call_permission_at",
        "call_permission_until",
    }
)
BOOLEAN_COLUMNS: frozenset[str] = frozenset(
    {"fell_back", "final", "call_permission_is_permanent", "call_permission_permanent"}
)
# What "looks like a phone number" for masking a conversation's user id: E.164 with or without `+`.
PHONE_LIKE = re.compile(r"^\+?[1-9][0-9]{5,14}$")


@functools.lru_cache(maxsize=8)
def _hmac_base(key: bytes) -> hmac.HMAC:
    return hmac.new(key, digestmod=hashlib.sha256)


def _hmac_hex(key: bytes, message: bytes) -> str:
    h = _hmac_base(key).copy()  # the keyed inner/outer pads computed once per key
    h.update(message)
    return h.hexdigest()


@dataclass(frozen=True)
class PiiPolicy:
    """What a row may hold about the end user.

    `clear=False` (default): msisdn masked + keyed hash, content `**MASKED**`, clear-only columns NULL.
    `clear=True`: additionally keep msisdn, content, location, names and `raw_json` in clear.
    `hash_key` keys the HMAC; an empty key still hashes (deterministic, but guessable for phone numbers:
    configure a secret in production). `repr` never shows the key.
    """

    clear: bool = False
    hash_key: bytes = b""

    def __post_init__(self) -> None:
        if not isinstance(self.hash_key, bytes):
            raise ValueError("PiiPolicy.hash_key must be bytes")

    def __repr__(self) -> str:
        return f"PiiPolicy(clear={self.clear}, hash_key={'***' if self.hash_key else ''!r})"

    @staticmethod
    def mask_msisdn(msisdn: str | None) -> str | None:
        """Mask the last 4 digits as 8x8 does: `+6581968289` -> `+658196xxxx`. Always masks."""
        if not msisdn:
            return None
        value = msisdn.strip()
        keep = max(len(value) - 4, 1 if value.startswith("+") else 0)
        return value[:keep] + "x" * (len(value) - keep)

    def hash_msisdn(self, msisdn: str | None) -> str | None:
        """HMAC-SHA256 (hex) of the number with `hash_key`; None when there is no number."""
        if not msisdn:
            return None
        return _hmac_hex(self.hash_key, msisdn.strip().encode("utf-8"))

    def clear_msisdn(self, msisdn: str | None) -> str | None:
        """The number itself when the policy keeps it in clear, else None."""
        return msisdn.strip() if self.clear and msisdn else None

    def hash_key_text(self, value: str) -> str:
        """HMAC-SHA256 (hex) of any identifier (a conversation key) with `hash_key`, taken as is."""
        return _hmac_hex(self.hash_key, value.encode("utf-8"))

    def user_id(self, value: str | None) -> str | None:
        """A user id as stored: masked like an msisdn when it looks like a phone number and the policy
        is not clear, else itself."""
        if value is None or self.clear or not PHONE_LIKE.match(value.strip()):
            return value
        return self.mask_msisdn(value)

    def text(self, value: str | None) -> str | None:
        """Content as stored: itself when clear, `**MASKED**` otherwise; None stays None."""
        if value is None:
            return None
        return value if self.clear else MASKED

    def clear_only(self, value: Any) -> Any:
        return value if self.clear else None


# --- core -> rows ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=65_536)
def _msisdn_columns(pii: PiiPolicy, msisdn: str | None) -> tuple[str | None, str | None, str | None]:
    """(masked, keyed hash, clear) of one number: every version of a message repeats it, so cached."""
    return pii.mask_msisdn(msisdn), pii.hash_msisdn(msisdn), pii.clear_msisdn(msisdn)


def message_values(
    state: MessageState, pii: PiiPolicy, msisdn: tuple[str | None, str | None, str | None] | None = None
) -> tuple[Any, ...]:
    """The `messages` row of one state as a tuple in `MESSAGE_COLUMNS` order (the write paths' form).
    `msisdn`: the (masked, hash, clear) columns to keep when the state has no number of its own (a state
    rebuilt from a masked row and merged, see `Merged`)."""
    steps = state.steps
    if msisdn is not None and not state.user.msisdn:
        masked, hashed, clear = msisdn
    else:
        masked, hashed, clear = _msisdn_columns(pii, state.user.msisdn)
    return (
        state.umid,
        state.sub_account_id,
        state.version,
        state.state,
        state.detail,
        state.error_code,
        state.error_message,
        state.status_timestamp,
        ">".join([s.channel for s in steps]),
        steps[-1].channel if steps else "",
        len(steps) > 1,
        len(steps),
        state.first_sent_at,
        state.delivered_at,
        state.read_at,
        state.final,
        state.duplicates,
        masked,
        hashed,
        clear,
        state.user.channel_user_id,
        state.batch_id,
        state.client_message_id,
        state.client_batch_id,
        state.updated_at,
        state.lineage,
    )


def step_values(state: MessageState) -> list[tuple[Any, ...]]:
    """The `message_steps` rows of one state, tuples in `STEP_COLUMNS` order."""
    umid, version = state.umid, state.version
    return [
        (
            umid,
            s.step,
            s.channel,
            s.state,
            s.detail,
            s.error_code,
            s.error_message,
            s.status_timestamp,
            s.first_event_at,
            s.sent_at,
            s.delivered_at,
            s.read_at,
            s.failed_at,
            s.channel_id,
            s.country,
            s.content_type,
            s.created_at,
            s.duplicates,
            version,
        )
        for s in state.steps
    ]


def event_values(state: MessageState) -> list[tuple[Any, ...]]:
    """The `status_events` rows of one state (every step's whole history), tuples in `EVENT_COLUMNS`
    order. The store deduplicates on `event_key`."""
    umid, sub = state.umid, state.sub_account_id
    return [
        (umid, s.step, sub, s.channel, e.state, e.detail, e.error_code, e.error_message, e.timestamp)
        for s in state.steps
        for e in s.history
    ]


def event_key(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """What makes a status event distinct (the stores' unique index): (umid, step, state, detail or '',
    ts), from an `event_values` tuple."""
    return (values[0], values[1], values[4], values[5] or "", values[8])


def state_rows(state: MessageState, pii: PiiPolicy) -> tuple[Row, list[Row]]:
    """The `messages` row and the `message_steps` rows of one message state, keyed by column."""
    return (
        dict(zip(MESSAGE_COLUMNS, message_values(state, pii), strict=True)),
        [dict(zip(STEP_COLUMNS, v, strict=True)) for v in step_values(state)],
    )


def status_event_rows(state: MessageState) -> list[Row]:
    """The `status_events` rows of one state: every step's history (dedup happens in the store)."""
    return [dict(zip(EVENT_COLUMNS, v, strict=True)) for v in event_values(state)]


def state_from_rows(message: Row, steps: Sequence[Row], events: Sequence[Row]) -> MessageState:
    """The state a stored message holds, rebuilt from its `messages` row, its `message_steps` rows and
    its `status_events` rows (every event ever stored for it, matched to steps by channel: step numbers
    of older versions may differ). The user's number is the clear column (None under a masking policy:
    `Merged.msisdn` keeps the stored masked and hashed columns then)."""
    by_channel: dict[str, set[StatusEvent]] = {}
    for e in events:
        by_channel.setdefault(e["channel"], set()).add(
            StatusEvent(e["state"], e["ts"], e["detail"], e["error_code"], e["error_message"])
        )
    rebuilt = tuple(
        Step(
            step=r["step"], channel=r["channel"], state=r["state"], status_timestamp=r["status_at"],
            first_event_at=r["first_event_at"], detail=r["detail"], error_code=r["error_code"],
            error_message=r["error_message"], sent_at=r["sent_at"], delivered_at=r["delivered_at"],
            read_at=r["read_at"], failed_at=r["failed_at"],
            history=tuple(sorted(by_channel.get(r["channel"], ()), key=_history_order)),
            duplicates=r["duplicates"], channel_id=r["channel_id"], country=r["country"],
            content_type=r["content_type"], created_at=r["created_at"],
        )
        for r in sorted(steps, key=operator.itemgetter("step"))
    )  # fmt: skip
    m = message
    return MessageState(
        umid=m["umid"], sub_account_id=m["sub_account_id"], version=m["version"], state=m["state"],
        status_timestamp=m["status_at"], steps=rebuilt, updated_at=m["updated_at"], detail=m["detail"],
        error_code=m["error_code"], error_message=m["error_message"],
        user=User(msisdn=m["msisdn"], channel_user_id=m["channel_user_id"]), batch_id=m["batch_id"],
        client_message_id=m["client_message_id"], client_batch_id=m["client_batch_id"],
        first_sent_at=m["first_sent_at"], delivered_at=m["delivered_at"], read_at=m["read_at"],
        final=bool(m["final"]), duplicates=m["duplicates"], lineage=m["lineage"],
    )  # fmt: skip


def _history_order(e: StatusEvent) -> tuple[Any, ...]:
    return (e.timestamp, e.state, e.detail or "", e.error_code or 0, e.error_message or "")


@dataclass(frozen=True)
class Merged:
    """What `resolve_lineages` makes of a batch: the states to write (each greater than the stored
    version), and for merged states whose user has no number, the stored msisdn columns to keep."""

    states: list[MessageState]
    msisdn: dict[str, tuple[str | None, str | None, str | None]]


def resolve_lineages(
    batch: Iterable[MessageState],
    held: dict[str, tuple[int, int]],
    load: Callable[[list[str]], dict[str, tuple[MessageState, Row]]],
    join: Callable[[MessageState, MessageState], MessageState | None],
    descends: Callable[[int, MessageState], bool],
) -> Merged:
    """The states a store writes for one batch, by the lineage rule (`processors.join`):

    - per umid, the highest version of each lineage in the batch;
    - a state that continues the stored row's lineage (`held[umid]` = (version, lineage)), or of a umid
      not stored, with no other lineage in the batch: as is (the version guard then decides, as before);
    - anything else (another lineage than the stored row's, a merged row, several lineages in one batch):
      `load` the stored states (umid -> (state rebuilt from rows, message row)) of those umids only, and
      `join` each state of the batch into it; a join that adds nothing writes nothing.
    Written states always have a version greater than the stored one. `load`, `join` and `descends` are
    the caller's (the store's read, `processors.join`'s rule): this function does no I/O itself.
    """
    best: dict[str, MessageState] = {}  # the highest version per umid, when it has one lineage
    mixed: dict[str, dict[int, MessageState]] = {}  # the highest per lineage, for umids with several
    for s in batch:
        umid = s.umid
        b = best.get(umid)
        if b is None:
            if umid in mixed:
                lineages = mixed[umid]
                if s.lineage not in lineages or s.version > lineages[s.lineage].version:
                    lineages[s.lineage] = s
            else:
                best[umid] = s
        elif b.lineage == s.lineage:
            if s.version > b.version:
                best[umid] = s
        else:
            mixed[umid] = {b.lineage: b, s.lineage: s}
            del best[umid]
    out: list[MessageState] = []
    slow: list[str] = list(mixed)
    for umid, s in best.items():
        stored = held.get(umid)
        if stored is None or descends(stored[1], s):
            out.append(s)
        else:
            slow.append(umid)
            mixed[umid] = {s.lineage: s}
    msisdn: dict[str, tuple[str | None, str | None, str | None]] = {}
    if slow:
        loaded = load([u for u in slow if u in held])
        for umid in slow:
            cur: MessageState | None = None
            row: Row | None = None
            if umid in loaded:
                cur, row = loaded[umid]
            changed = False
            for s in sorted(mixed[umid].values(), key=operator.attrgetter("version")):
                if cur is None:
                    cur, changed = s, True
                elif descends(cur.lineage, s):
                    if s.version > cur.version:
                        cur, changed = s, True
                else:
                    j = join(cur, s)
                    if j is not None:
                        cur, changed = j, True
            if changed and cur is not None:
                out.append(cur)
                if row is not None and row["msisdn_hash"] is not None:
                    msisdn[umid] = (row["msisdn_masked"], row["msisdn_hash"], row["msisdn"])
    return Merged(out, msisdn)


def latest_states(states: Iterable[MessageState]) -> list[MessageState]:
    """Keep only the highest version per umid, in first-seen order of the umids."""
    best: dict[str, MessageState] = {}
    for s in states:
        held = best.get(s.umid)
        if held is None or s.version > held.version:
            best[s.umid] = s
    return list(best.values())


def inbound_row(msg: InboundMessage, pii: PiiPolicy) -> Row:
    """The `inbound_messages` row of one inbound message (content masked unless the policy is clear)."""
    c = msg.content
    it = c.interactive
    button = it.button_reply if it else None
    lst = it.list_reply if it else None
    call = it.call_permission_reply if it else None
    msisdn = msg.user.msisdn
    return {
        "umid": msg.umid,
        "sub_account_id": msg.sub_account_id,
        "channel": msg.channel,
        "channel_id": msg.channel_id,
        "type": msg.type,
        "ts": msg.timestamp,
        "received_at": msg.received_at,
        "msisdn_masked": pii.mask_msisdn(msisdn),
        "msisdn_hash": pii.hash_msisdn(msisdn),
        "msisdn": pii.clear_msisdn(msisdn),
        "channel_user_id": msg.user.channel_user_id,
        "user_name": pii.clear_only(msg.user.name),
        "text": pii.text(c.text),
        "url": pii.text(c.url),
        "payload": pii.text(c.payload),
        "latitude": pii.clear_only(c.latitude),
        "longitude": pii.clear_only(c.longitude),
        "reply_to_umid": msg.reply_to_umid,
        "interactive_type": it.type if it else None,
        "button_reply_id": button.id if button else None,
        "button_reply_title": button.title if button else None,
        "list_reply_id": lst.id if lst else None,
        "list_reply_title": lst.title if lst else None,
        "list_reply_description": lst.description if lst else None,
        "nfm_response_json": pii.text(it.nfm_response_json) if it else None,
        "call_permission_response": call.response if call else None,
        "call_permission_is_permanent": call.is_permanent if call else None,
        "call_permission_expires_at": call.expiration_timestamp if call else None,
        "call_permission_source": call.response_source if call else None,
        "version": msg.version,
        "raw_json": pii.clear_only(msg.raw_json),
    }


def latest_conversations(convs: Iterable[Conversation]) -> list[Conversation]:
    """Keep only the highest version per conversation key, in first-seen order of the keys."""
    best: dict[str, Conversation] = {}
    for c in convs:
        held = best.get(c.key)
        if held is None or c.version > held.version:
            best[c.key] = c
    return list(best.values())


def conversation_values(conv: Conversation, pii: PiiPolicy) -> tuple[Any, ...]:
    """The `conversations` row of one conversation, a tuple in `CONVERSATION_COLUMNS` order.

    `counts_by_type` is a dict (type -> count); each store adapts it (JSON text / jsonb). The user part
    of the key is hashed the way `PiiPolicy.hash_msisdn` hashes a query's user (stripped), so a lookup by
    the user's id or number finds it.
    """
    masked, hashed, clear = _msisdn_columns(pii, conv.user.msisdn)
    return (
        pii.hash_key_text(conv.key),
        pii.clear_only(conv.key),
        conv.sub_account_id,
        conv.channel,
        conv.channel_id,
        pii.user_id(conv.user_key),
        pii.hash_msisdn(conv.user_key),
        masked,
        hashed,
        clear,
        conv.user.channel_user_id,
        conv.version,
        conv.first_inbound_at,
        conv.last_inbound_at,
        conv.last_umid,
        conv.last_type,
        conv.last_reply_to_umid,
        conv.window_open_until,
        conv.message_count,
        conv.duplicates,
        dict(conv.counts_by_type),
        conv.call_permission,
        conv.call_permission_at,
        conv.call_permission_until,
        conv.call_permission_permanent,
        conv.updated_at,
    )


def fixed_iso(value: datetime) -> str:
    """Fixed-width ISO 8601 UTC text (`2020-06-17T04:17:21.060000Z`): sorts as time does (the year is
    zero-padded to four digits, which strftime's %Y is not on Linux)."""
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.isoformat(timespec="microseconds")[:-6] + "Z"  # drop "+00:00"


def inbound_cursor(row: Row) -> str:
    """The list cursor after an inbound row: `<fixed ISO ts>|<umid>` (ordered by ts, then umid)."""
    return f"{fixed_iso(row['ts'])}|{row['umid']}"


def parse_inbound_cursor(cursor: str) -> tuple[datetime, str]:
    """(ts, umid) of an `inbound_cursor`; ValueError when it is not one."""
    ts, sep, umid = cursor.partition("|")
    if not sep or not umid or not ts.endswith("Z"):
        raise ValueError(f"malformed cursor: {cursor!r}")
    try:
        when = datetime.fromisoformat(ts)
    except ValueError:
        raise ValueError(f"malformed cursor: {cursor!r}") from None
    return when.astimezone(UTC), umid


_GETTERS: dict[tuple[str, ...], Callable[[Row], tuple[Any, ...]]] = {}


def as_tuple(row: Row, columns: tuple[str, ...]) -> tuple[Any, ...]:
    """The row's values in `columns` order (one of the column tuples above)."""
    getter = _GETTERS.get(columns)
    if getter is None:
        getter = _GETTERS[columns] = operator.itemgetter(*columns)
    return getter(row)  # type: ignore[no-any-return]
