"""The store interface every sink and the read API use, and the factory choosing a dialect by URL.

Contract shared by both dialects (`sinks.sqlite`, `sinks.postgres`):
- `migrate()` applies the versioned migrations not yet recorded in `chatpipe_schema_migrations`;
  calling it again (or from two processes at once) is a no-op.
- `write_states(states)` writes one batch in ONE transaction. It is idempotent and monotonic: only the
  highest version per umid in the batch is considered, and a message row (with its step rows) is replaced
  only when that version is greater than the stored one, so a redelivered or older batch never moves a
  message backwards. Status events from the step histories are appended, deduplicated on
  (umid, step, state, detail, ts). Returns how many messages were inserted or advanced.
- `write_inbound(msgs)` inserts inbound messages, ignoring umids already stored. Returns rows inserted.
- `write_conversations(convs)` upserts conversations in ONE transaction, idempotent and monotonic like
  `write_states`: the highest version per conversation key in the batch, stored only when greater than
  the stored version. Returns how many conversations were inserted or advanced. Rows are keyed by the
  keyed hash of the conversation key (PII: see `sinks.rows`).
- Reads never see another subaccount's messages: an umid of another subaccount is "unknown".
- Analytics (`sinks.aggregates`, docs/analytics.md): `write_states` and `write_inbound` also move the
  aggregate tables, in the same transaction, by each message's `new - old` contribution (a store opened
  with `aggregates=False`, for benchmarks only, leaves them alone); `analytics(query)` reads them.
- A connection the database ended between calls (a restart, an idle timeout) is replaced and the call
  tried once more. A database that stays unreachable raises `schemas.errors.TransientError` (nothing of
  the batch is committed); the next call reconnects, so the caller pauses and retries the same batch.
- Reads answer rows (dicts keyed by column, `sinks.rows`) and `StoredMessage`s, never 8x8's shapes: the
  read API builds those (`sinks.present`). Timestamps are aware UTC datetimes in rows.
- `stream(table, since, until)` reads one table's rows in a time range (`chatpipe export`) in constant
  memory, counted and read in one snapshot on a read-only connection of its own.
- Reconciliation (`chatpipe.reconciler`): `reconcile_candidates` lists the open messages due for a lookup,
  oldest first, paged, from a partial index on open messages; `lease_subaccounts` gives one reconciler
  process at a time a subaccount (so two never look up its umids, nor share its 8x8 quota);
  `record_lookups` keeps each lookup's outcome, when the umid is due again and what 8x8 said of its
  steps, so a restarted reconciler does not ask again what it just asked, and `get_message` returns it
  (`StoredMessage.looked_up`) to fill the step fields receipts lack (step numbers, channelId, country,
  contentType, createdAt).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol

from schemas.models import Conversation, InboundMessage, MessageState
from sinks.analytics_sql import Query
from sinks.export_rows import Kind
from sinks.rows import PiiPolicy, Row

MIGRATIONS_TABLE = "chatpipe_schema_migrations"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class LookupRecord:
    """One finished lookup of 8x8's details API (`Store.record_lookups`). `details`: what 8x8 said of each
    step (`processors.reconcile.step_details`), None when it said nothing (404, error)."""

    umid: str
    sub_account_id: str
    attempts: int
    outcome: str
    checked_at: datetime
    next_due: datetime
    details: Sequence[dict[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """What the store holds of one outbound message (`Store.get_message`); the read API presents it.

    `message`: its `messages` row; `steps`: its `message_steps` rows ordered by step; `looked_up`: what
    8x8's details API said of its steps at the last lookup (`LookupRecord.details`), None when never
    said; `channel_ids`: channel -> the subaccount's only channelId seen on inbound messages of that
    channel, for the step channels whose row lacks one; `clear`: the store keeps PII in clear
    (`PiiPolicy.clear`: outbound content is then not stored at all rather than masked)."""

    message: Row
    steps: tuple[Row, ...]
    looked_up: Sequence[Mapping[str, Any]] | None
    channel_ids: Mapping[str, str]
    clear: bool


class RowStream:
    """One table's rows in a time range (`Store.stream`), read from one snapshot on a connection of its
    own: `columns` (the header), `kinds` (`sinks.export_rows.Kind` of each column), `total` (the rows the
    batches will yield, counted in the same snapshot); iterating yields lists of tuples of typed values
    (aware UTC datetimes, bools, ints, floats, text), at most `batch` rows each. `close()` (or leaving a
    `with` block) ends the cursor, then the snapshot and the connection; the batches stop there."""

    def __init__(
        self,
        columns: tuple[str, ...],
        kinds: tuple[Kind, ...],
        total: int,
        batches: Generator[list[tuple[Any, ...]], None, None],
        release: Callable[[], None],
    ) -> None:
        self.columns = columns
        self.kinds = kinds
        self.total = total
        self._batches = batches
        self._release = release

    def __iter__(self) -> Generator[list[tuple[Any, ...]], None, None]:
        return self._batches

    def close(self) -> None:
        try:
            self._batches.close()  # a stream cut short (a closed pipe) leaves its cursor open: close it first
        finally:
            self._release()

    def __enter__(self) -> RowStream:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


#: the keys of a `Store.reconcile_candidates` row
CANDIDATE_COLUMNS = ("umid", "sub_account_id", "final", "status_at", "updated_at", "channel_path", "attempts")


class Store(Protocol):
    def migrate(self) -> None:
        """Apply pending migrations (idempotent, safe to run concurrently)."""

    def write_states(self, states: Sequence[MessageState]) -> int:
        """Write one batch of message states in one transaction; see the module contract."""

    def write_inbound(self, msgs: Sequence[InboundMessage]) -> int:
        """Insert inbound messages, idempotent by umid; returns rows inserted."""

    def write_conversations(self, convs: Sequence[Conversation]) -> int:
        """Upsert one batch of conversations in one transaction (version guard); returns how many were
        inserted or advanced."""

    def get_conversation(self, sub_account_id: str, channel_id: str, user: str) -> Row | None:
        """The `conversations` row of `user` on one of the subaccount's channels, or None (the read API
        presents it with `sinks.present.conversation_record`). `user` is the channelUserId, the E.164
        number, or whatever else keyed the conversation; matched through keyed hashes (the user id of the
        key, the msisdn). When several conversations match (a number seen before its channelUserId was),
        the one keyed by `user` itself wins, then the most recent."""

    def get_message(self, sub_account_id: str, umid: str) -> StoredMessage | None:
        """The message as stored, read in one snapshot, or None when the umid is unknown to this
        subaccount (`sinks.present.message_details` makes 8x8's Retrieve-message-details `data[]`)."""

    def list_messages(
        self,
        sub_account_id: str,
        *,
        client_message_id: str | None = None,
        batch_id: str | None = None,
        after: str | None = None,
        limit: int = DEFAULT_LIMIT,
    ) -> tuple[list[Row], str | None]:
        """`messages` rows ordered by umid, filtered by the given ids (the read API presents each with
        `sinks.present.summary_record`).

        `after` is the cursor returned by the previous page; the second item is the next cursor, None
        on the last page. `limit` is clamped to 1..MAX_LIMIT.
        """

    def list_inbound(
        self,
        sub_account_id: str,
        *,
        channel_id: str | None = None,
        channel_user_id: str | None = None,
        msisdn: str | None = None,
        after: str | None = None,
        limit: int = DEFAULT_LIMIT,
    ) -> tuple[list[Row], str | None]:
        """`inbound_messages` rows of one conversation, oldest first, paginated like `list_messages`
        (presented with `sinks.present.inbound_record`). `msisdn` is matched through its keyed hash."""

    def reconcile_candidates(
        self,
        cutoff: datetime,
        now: datetime,
        *,
        sub_account_id: str | None = None,
        after: tuple[datetime, str] | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """Open messages to look up in 8x8's details API: not final, `updated_at` and `status_at` before
        `cutoff`, and due (no lookup recorded, or its `next_due` <= `now`); of one subaccount when given.
        Rows with `CANDIDATE_COLUMNS` (`attempts`: lookups recorded so far), ordered by (updated_at, umid)
        oldest first, starting after the `after` key; at most `limit`. Read-only."""

    def lease_subaccounts(
        self, owner: str, sub_account_ids: Sequence[str], now: datetime, until: datetime
    ) -> list[str]:
        """Take or extend, in one transaction, the reconcile lease of each subaccount for `owner` until
        `until`, where it is free (never leased, expired at `now`, or `owner`'s already); returns the
        subaccounts `owner` now holds. While one owner holds a lease no other gets it."""

    def release_subaccounts(self, owner: str, sub_account_ids: Sequence[str], free_at: datetime) -> None:
        """End `owner`'s leases of these subaccounts at `free_at` (when the next request to the subaccount
        may be sent, by 8x8's limit); others' leases are left alone."""

    def record_lookups(self, lookups: Sequence[LookupRecord]) -> None:
        """Keep each lookup's outcome, attempts and next due time in one transaction; a record older than
        the stored one (`checked_at`) changes nothing; `details` None keeps the stored details."""

    def analytics(self, query: Query) -> list[dict[str, Any]]:
        """The aggregate rows of one subaccount (`sinks.analytics_sql.select`): `bucket` (an aware
        datetime, None for granularity `total`), the view's keys, the summed counters."""

    def stream(self, table: str, since: datetime, until: datetime, *, batch: int = 5000) -> RowStream:
        """The rows of `table` (a name of `sinks.export_rows.TABLES`) whose time is in [since, until),
        ordered by primary key, in constant memory: counted and read in one snapshot on a read-only
        connection of its own (the store's other calls are not held up). The columns are the table's,
        without the clear-only ones unless the store's PII policy is clear. Close the stream (or use it
        in a `with` block). Raises KeyError for an unknown table, the driver's error when the database
        cannot be read."""

    def close(self) -> None:
        """Release the connection; the store is unusable afterwards."""


def clamp_limit(limit: int) -> int:
    return max(1, min(int(limit), MAX_LIMIT))


def message_filters(
    sub_account_id: str, client_message_id: str | None, batch_id: str | None
) -> list[tuple[str, Any]]:
    """The equality filters (column, value) of `Store.list_messages`, for both dialects."""
    filters: list[tuple[str, Any]] = [("sub_account_id", sub_account_id)]
    if client_message_id is not None:
        filters.append(("client_message_id", client_message_id))
    if batch_id is not None:
        filters.append(("batch_id", batch_id))
    return filters


def inbound_filters(
    pii: PiiPolicy,
    sub_account_id: str,
    channel_id: str | None,
    channel_user_id: str | None,
    msisdn: str | None,
) -> list[tuple[str, Any]]:
    """The equality filters (column, value) of `Store.list_inbound`; a msisdn is matched by its hash."""
    filters: list[tuple[str, Any]] = [("sub_account_id", sub_account_id)]
    if channel_id is not None:
        filters.append(("channel_id", channel_id))
    if channel_user_id is not None:
        filters.append(("channel_user_id", channel_user_id))
    if msisdn is not None:
        filters.append(("msisdn_hash", pii.hash_msisdn(msisdn)))
    return filters


def equalities(filters: Sequence[tuple[str, Any]], mark: str) -> tuple[list[str], list[Any]]:
    """The `column = <mark>` clauses of `filters` and their values, for a dialect's placeholder."""
    return [f"{column} = {mark}" for column, _ in filters], [value for _, value in filters]


def paginate(found: Sequence[Row], limit: int, cursor: Callable[[Row], str]) -> tuple[list[Row], str | None]:
    """A page from up to `limit` + 1 rows: its rows, and the cursor after it (None on the last page)."""
    page = list(found[:limit])
    return page, (cursor(page[-1]) if len(found) > limit else None)
