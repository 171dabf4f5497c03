"""PostgreSQL store (psycopg 3): binary COPY straight into the tables, one transaction a batch.

Write path of `write_states` (one transaction, the highest version per umid of the batch):
1. Read the stored versions of the batch's umids; drop the states that do not advance (older or equal).
2. For the umids already stored with a lower version: `DELETE` their `messages` row, guarded by
   `version < new version` (the deleted count must match, else a concurrent writer moved first), their
   `message_steps` rows, and read their stored status events.
3. Binary COPY the advancing messages, their steps, and only the status events not stored yet straight
   into `messages`, `message_steps` and `status_events` (no staging, no per-row conflict handling).

The unique keys still guard everything: if a concurrent writer (a rebalance overlap) inserted one of the
umids in between, or events exist without their message, the COPY fails with a unique violation (or the
guarded DELETE count differs), the transaction rolls back, and the batch is written again by the merge
path: COPY into TEMP staging tables + `INSERT ... ON CONFLICT (umid) DO UPDATE ... WHERE excluded.version >
messages.version`, steps replaced and events appended with `ON CONFLICT DO NOTHING` for the advanced
umids. Either way the batch is idempotent and monotonic.

`write_conversations` always takes the staging path (COPY into `stage_conversations`, one guarded
`INSERT ... ON CONFLICT (key_hash) DO UPDATE ... WHERE excluded.version > t.version`): one row per
inbound message at most, so the simple path is fast enough.

`synchronous_commit=False` (opt-in; also possible with `?options=-c%20synchronous_commit%3Doff` in the
URL) sets `synchronous_commit = off` on the session: a crash of the server (not of chatpipe) may then lose
the last commits although the sink already committed their Kafka offsets, so at-least-once no longer
holds across a database crash. The default keeps synchronous commits.

Connection loss (`psycopg.OperationalError`, including a refused reconnect) raises `TransientError`; the
connection is dropped and the next call reconnects, so the caller retries the same batch.
One connection per store guarded by a lock.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from hashlib import md5
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row, tuple_row
from psycopg.types.json import Jsonb

from processors.join import descends, join
from schemas.errors import TransientError
from schemas.models import Conversation, InboundMessage, MessageState
from sinks import aggregates as A
from sinks import analytics_sql as Q
from sinks import export_rows as X
from sinks import rows as R
from sinks.rows import PiiPolicy
from sinks.store import (
    DEFAULT_LIMIT,
    MIGRATIONS_TABLE,
    LookupRecord,
    RowStream,
    StoredMessage,
    clamp_limit,
    equalities,
    inbound_filters,
    message_filters,
    paginate,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

CONNECT_TIMEOUT_S = 10
BACKFILL_BATCH = 5000
MIGRATION_LOCK_ID = 0x63686174  # pg_advisory_xact_lock key shared by every chatpipe process ("chat")

MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (
        1,
        "initial schema",
        (
            """
            CREATE TABLE messages (
                umid              text PRIMARY KEY,
                sub_account_id    text NOT NULL,
                version           bigint NOT NULL,
                state             text NOT NULL,
                detail            text,
                error_code        integer,
                error_message     text,
                status_at         timestamptz NOT NULL,
                channel_path      text NOT NULL,
                current_channel   text NOT NULL,
                fell_back         boolean NOT NULL,
                step_count        integer NOT NULL,
                first_sent_at     timestamptz,
                delivered_at      timestamptz,
                read_at           timestamptz,
                final             boolean NOT NULL,
                duplicates        bigint NOT NULL DEFAULT 0,
                msisdn_masked     text,
                msisdn_hash       text,
                msisdn            text,
                channel_user_id   text,
                batch_id          text,
                client_message_id text,
                client_batch_id   text,
                updated_at        timestamptz NOT NULL
            )
            """,
            "CREATE INDEX messages_client_message_id ON messages (sub_account_id, client_message_id)",
            "CREATE INDEX messages_batch_id ON messages (sub_account_id, batch_id)",
            "CREATE INDEX messages_updated_at ON messages (sub_account_id, updated_at)",
            """
            CREATE TABLE message_steps (
                umid            text NOT NULL,
                step            integer NOT NULL,
                channel         text NOT NULL,
                state           text NOT NULL,
                detail          text,
                error_code      integer,
                error_message   text,
                status_at       timestamptz NOT NULL,
                first_event_at  timestamptz NOT NULL,
                sent_at         timestamptz,
                delivered_at    timestamptz,
                read_at         timestamptz,
                failed_at       timestamptz,
                channel_id      text,
                country         text,
                content_type    text,
                created_at      timestamptz,
                duplicates      bigint NOT NULL DEFAULT 0,
                version         bigint NOT NULL,
                PRIMARY KEY (umid, step)
            )
            """,
            "CREATE INDEX message_steps_channel_day ON message_steps (channel, status_at)",
            """
            CREATE TABLE status_events (
                umid           text NOT NULL,
                step           integer NOT NULL,
                sub_account_id text NOT NULL,
                channel        text NOT NULL,
                state          text NOT NULL,
                detail         text,
                error_code     integer,
                error_message  text,
                ts             timestamptz NOT NULL
            )
            """,
            "CREATE UNIQUE INDEX status_events_dedup"
            " ON status_events (umid, step, state, coalesce(detail, ''), ts)",
            """
            CREATE TABLE inbound_messages (
                umid                         text PRIMARY KEY,
                sub_account_id               text NOT NULL,
                channel                      text NOT NULL,
                channel_id                   text,
                type                         text NOT NULL,
                ts                           timestamptz NOT NULL,
                received_at                  timestamptz NOT NULL,
                msisdn_masked                text,
                msisdn_hash                  text,
                msisdn                       text,
                channel_user_id              text,
                user_name                    text,
                text                         text,
                url                          text,
                payload                      text,
                latitude                     double precision,
                longitude                    double precision,
                reply_to_umid                text,
                interactive_type             text,
                button_reply_id              text,
                button_reply_title           text,
                list_reply_id                text,
                list_reply_title             text,
                list_reply_description       text,
                nfm_response_json            text,
                call_permission_response     text,
                call_permission_is_permanent boolean,
                call_permission_expires_at   timestamptz,
                call_permission_source       text,
                version                      bigint,
                raw_json                     text
            )
            """,
            "CREATE INDEX inbound_by_user"
            " ON inbound_messages (sub_account_id, channel_id, channel_user_id, ts)",
            "CREATE INDEX inbound_by_msisdn"
            " ON inbound_messages (sub_account_id, channel_id, msisdn_hash, ts)",
        ),
    ),
    (
        2,
        "lighter indexes on messages",
        (
            # every advance of a message rewrites its row (new index entries in every index): keep the
            # hot table's b-trees to the read API's lookups, only for rows that have the id (partial),
            # and serve time-range analytics with a BRIN (updated_at follows insertion order closely)
            "DROP INDEX messages_updated_at",
            "CREATE INDEX messages_updated_at_brin ON messages USING brin (updated_at)",
            "DROP INDEX messages_client_message_id",
            "CREATE INDEX messages_client_message_id ON messages (sub_account_id, client_message_id)"
            " WHERE client_message_id IS NOT NULL",
            "DROP INDEX messages_batch_id",
            "CREATE INDEX messages_batch_id ON messages (sub_account_id, batch_id)"
            " WHERE batch_id IS NOT NULL",
        ),
    ),
    (
        3,
        "conversations",
        (
            """
            CREATE TABLE conversations (
                key_hash                  text PRIMARY KEY,
                conversation_key          text,
                sub_account_id            text NOT NULL,
                channel                   text NOT NULL,
                channel_id                text,
                user_key                  text,
                user_key_hash             text,
                msisdn_masked             text,
                msisdn_hash               text,
                msisdn                    text,
                channel_user_id           text,
                version                   bigint NOT NULL,
                first_inbound_at          timestamptz NOT NULL,
                last_inbound_at           timestamptz NOT NULL,
                last_umid                 text NOT NULL,
                last_type                 text NOT NULL,
                last_reply_to_umid        text,
                window_open_until         timestamptz,
                message_count             bigint NOT NULL,
                duplicates                bigint NOT NULL DEFAULT 0,
                counts_by_type            jsonb NOT NULL,
                call_permission           text,
                call_permission_at        timestamptz,
                call_permission_until     timestamptz,
                call_permission_permanent boolean,
                updated_at                timestamptz NOT NULL
            )
            """,
            "CREATE INDEX conversations_by_last_inbound"
            " ON conversations (sub_account_id, channel_id, last_inbound_at)",
            "CREATE INDEX conversations_by_user ON conversations (sub_account_id, channel_id, user_key_hash)",
            "CREATE INDEX conversations_by_msisdn ON conversations (sub_account_id, channel_id, msisdn_hash)"
            " WHERE msisdn_hash IS NOT NULL",
        ),
    ),
    (
        4,
        "message_steps: BRIN for time ranges",
        (
            # the read API reads steps by umid only (the primary key); every advance of a message
            # rewrites its steps, and the (channel, status_at) b-tree cost ~7% of the sink's server time
            # for analytics alone: serve those by a BRIN on status_at, as migration 2 did for messages
            "DROP INDEX message_steps_channel_day",
            "CREATE INDEX message_steps_status_at_brin ON message_steps USING brin (status_at)",
        ),
    ),
    (
        5,
        "messages.lineage: states of another lineage are merged by content",
        ("ALTER TABLE messages ADD COLUMN lineage bigint NOT NULL DEFAULT 0",),
    ),
    (
        6,
        "reconciler: lookups, subaccount leases, open messages by age, channel ids of inbound messages",
        (
            """
            CREATE TABLE reconcile_checks (
                umid           text PRIMARY KEY,
                sub_account_id text NOT NULL,
                attempts       integer NOT NULL,
                outcome        text NOT NULL,
                checked_at     timestamptz NOT NULL,
                next_due       timestamptz NOT NULL,
                details        jsonb
            )
            """,
            """
            CREATE TABLE reconcile_leases (
                sub_account_id text PRIMARY KEY,
                owner          text NOT NULL,
                expires_at     timestamptz NOT NULL
            )
            """,
            # partial: only open messages (few) are in them, so the sink's rewrites of final ones skip them
            "CREATE INDEX messages_open ON messages (updated_at, umid) WHERE NOT final",
            "CREATE INDEX messages_open_by_subaccount ON messages (sub_account_id, updated_at, umid)"
            " WHERE NOT final",
            "CREATE INDEX inbound_channel_ids ON inbound_messages (sub_account_id, channel, channel_id)"
            " WHERE channel_id IS NOT NULL",
        ),
    ),
    (*Q.MIGRATION, Q.POSTGRES_DDL),
    # listed before 9, and so applied before its backfill (which writes `wa_at`), on any store
    (
        10,
        "analytics: WhatsApp sends kept in messages.wa_at (a partial index), not analytics_wa_outbound",
        (
            # the fast path rewrites a message's row anyway: the send goes with it, instead of a row in a
            # table of its own (heap, two indexes, deleted and inserted again when the message advances)
            "ALTER TABLE messages ADD COLUMN wa_at timestamptz",
            "UPDATE messages m SET wa_at = o.wa_at FROM analytics_wa_outbound o WHERE o.umid = m.umid",
            "CREATE INDEX messages_wa_sends ON messages (sub_account_id, msisdn_hash, wa_at)"
            " WHERE wa_at IS NOT NULL",
            "DROP TABLE analytics_wa_outbound",
        ),
    ),
    (*Q.BACKFILL, ()),  # PostgresStore.migrate runs it in batches (_backfill_batch)
    (
        11,
        "analytics: the aggregate tables keep half of each page free (fillfactor 50)",
        # every batch adds to the same few hundred rows: with room on their page, the new row versions
        # are HOT updates (no index entry) and the page is pruned in place; measured with
        # pg_stat_statements, 2,000-record batches: the upserts' server time -18% (fillfactor 20) to -20%
        # (50). It applies to pages written from now on: no rewrite, a brief lock
        tuple(
            f"ALTER TABLE analytics_{name}{daily} SET (fillfactor = 50)"
            for name in ("messages", "latency", "errors", "inbound", "window")
            for daily in ("", "_daily")
        ),
    ),
)

_CANDIDATES = (
    "SELECT m.umid, m.sub_account_id, m.final, m.status_at, m.updated_at, m.channel_path,"
    " coalesce(c.attempts, 0) AS attempts"
    " FROM messages m LEFT JOIN reconcile_checks c ON c.umid = m.umid"
    " WHERE NOT m.final AND m.updated_at < %s AND m.status_at < %s"
    " AND (c.next_due IS NULL OR c.next_due <= %s)"
)
_LEASE = (
    "INSERT INTO reconcile_leases (sub_account_id, owner, expires_at) SELECT unnest(%s::text[]), %s, %s"
    " ON CONFLICT (sub_account_id) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at"
    " WHERE reconcile_leases.expires_at <= %s OR reconcile_leases.owner = excluded.owner"
    " RETURNING sub_account_id"
)
_RECORD_LOOKUP = (
    "INSERT INTO reconcile_checks (umid, sub_account_id, attempts, outcome, checked_at, next_due, details)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (umid) DO UPDATE SET attempts = excluded.attempts,"
    " outcome = excluded.outcome, checked_at = excluded.checked_at, next_due = excluded.next_due,"
    " details = coalesce(excluded.details, reconcile_checks.details)"
    " WHERE excluded.checked_at >= reconcile_checks.checked_at"
)
# the channel's only channelId on the subaccount's inbound messages (min = max), by inbound_channel_ids
_CHANNEL_IDS = (
    "SELECT channel, (SELECT min(channel_id) FROM inbound_messages i WHERE i.sub_account_id = %(sub)s"
    " AND i.channel = c.channel AND channel_id IS NOT NULL) AS low,"
    " (SELECT max(channel_id) FROM inbound_messages i WHERE i.sub_account_id = %(sub)s"
    " AND i.channel = c.channel AND channel_id IS NOT NULL) AS high"
    " FROM unnest(%(channels)s::text[]) AS c(channel)"
)

# Staging tables: same columns as their targets, no constraints, emptied at every commit.
_TEMP = "CREATE TEMP TABLE IF NOT EXISTS"
_STAGING = (
    f"{_TEMP} stage_messages (LIKE messages INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
    f"{_TEMP} stage_steps (LIKE message_steps INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
    f"{_TEMP} stage_events (LIKE status_events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
    f"{_TEMP} stage_inbound (LIKE inbound_messages INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
    f"{_TEMP} stage_advanced (umid text NOT NULL, updated boolean NOT NULL) ON COMMIT DELETE ROWS",
    f"{_TEMP} stage_conversations (LIKE conversations INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
)


def _columns(cols: Sequence[str], prefix: str = "") -> str:
    return ", ".join(prefix + c for c in cols)


#: a `messages` row as the stores write it: `sinks.rows.message_values` and the first event of its WhatsApp
#: step (`wa_at`: the analytics' WhatsApp send, `sinks.aggregates.whatsapp_send`; NULL without analytics)
_MESSAGE_WRITE_COLUMNS = (*R.MESSAGE_COLUMNS, "wa_at")
_MESSAGE_COLS = _columns(_MESSAGE_WRITE_COLUMNS)
_STEP_COLS = _columns(R.STEP_COLUMNS)
_EVENT_COLS = _columns(R.EVENT_COLUMNS)
_INBOUND_COLS = _columns(R.INBOUND_COLUMNS)
_CONVERSATION_COLS = _columns(R.CONVERSATION_COLUMNS)

_UPSERT_MESSAGES = (
    f"WITH advanced AS ("
    f" INSERT INTO messages AS t ({_MESSAGE_COLS}) SELECT {_MESSAGE_COLS} FROM stage_messages"
    " ON CONFLICT (umid) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _MESSAGE_WRITE_COLUMNS if c != "umid")
    # xmax is 0 on a freshly inserted row: only updated messages have step rows to delete
    + " WHERE excluded.version > t.version RETURNING t.umid, t.xmax <> 0 AS updated"
    ") INSERT INTO stage_advanced (umid, updated) SELECT umid, updated FROM advanced"
)
_DELETE_STEPS = "DELETE FROM message_steps s USING stage_advanced a WHERE s.umid = a.umid AND a.updated"
_INSERT_STEPS = (
    f"INSERT INTO message_steps ({_STEP_COLS})"
    f" SELECT {_columns(R.STEP_COLUMNS, 's.')} FROM stage_steps s JOIN stage_advanced a ON a.umid = s.umid"
)
_INSERT_EVENTS = (
    f"INSERT INTO status_events ({_EVENT_COLS})"
    f" SELECT {_columns(R.EVENT_COLUMNS, 'e.')} FROM stage_events e JOIN stage_advanced a ON a.umid = e.umid"
    " ON CONFLICT DO NOTHING"
)
# umid lists go as binary arrays (%b): half the client time of dumping thousands of strings as text
_HELD_VERSIONS = "SELECT umid, version, lineage FROM messages WHERE umid = ANY(%b)"
# the rows of messages a batch merges by content (a few: those whose lineage changed), locked
_LOAD_MESSAGES = "SELECT * FROM messages WHERE umid = ANY(%s) FOR UPDATE"
_LOAD_STEPS = "SELECT * FROM message_steps WHERE umid = ANY(%s)"
_LOAD_EVENTS = "SELECT * FROM status_events WHERE umid = ANY(%s)"
_DELETE_REPLACED = (
    "DELETE FROM messages m USING unnest(%b::text[], %b::bigint[]) AS n(umid, version)"
    " WHERE m.umid = n.umid AND m.version < n.version"
)
_DELETE_REPLACED_STEPS = "DELETE FROM message_steps WHERE umid = ANY(%b)"
_STORED_EVENTS = "SELECT umid, step, state, coalesce(detail, ''), ts FROM status_events WHERE umid = ANY(%b)"
_INSERT_INBOUND = (
    f"INSERT INTO inbound_messages ({_INBOUND_COLS}) SELECT {_INBOUND_COLS} FROM stage_inbound"
    " ON CONFLICT (umid) DO NOTHING RETURNING umid"
)
# analytics (sinks.aggregates): facts read back, aggregate `+=` upserts, WhatsApp window matching (and its
# locks); migration 9's batches computed by the server (sinks.analytics_sql: `_MAINTAIN`, `_REWINDOW`)
_OLD_MESSAGE_COLS = ", ".join(A.MESSAGE_FACT_COLUMNS)
_OLD_STEP_COLS = ", ".join(A.STEP_FACT_COLUMNS)
_AGG_TEMP = (f"{_TEMP} agg_rewindow (sub text, usr text, at timestamptz) ON COMMIT DELETE ROWS",)
_OLD_MESSAGES = f"SELECT {_OLD_MESSAGE_COLS} FROM messages WHERE umid = ANY(%b)"
_OLD_STEPS = f"SELECT {_OLD_STEP_COLS} FROM message_steps WHERE umid = ANY(%b)"
# the fast path's deletes, returning what the old contributions are computed from
_DELETE_REPLACED_RETURNING = (
    _DELETE_REPLACED + " RETURNING " + ", ".join("m." + c for c in A.MESSAGE_FACT_COLUMNS)
)
_DELETE_REPLACED_STEPS_RETURNING = _DELETE_REPLACED_STEPS + f" RETURNING {_OLD_STEP_COLS}"
#: the WhatsApp service window as a PostgreSQL interval (sinks.aggregates.WINDOW)
_WINDOW = f"interval '{int(A.WINDOW.total_seconds())} seconds'"

# inbound WhatsApp messages whose window holds one of the (sub, user, t): t - 24 h < ts <= t
_WA_INBOUND_AROUND = (
    "SELECT DISTINCT i.umid, i.sub_account_id, i.wa_user, i.ts, i.hour, i.country, i.answered"
    " FROM unnest(%b::text[], %b::text[], %b::timestamptz[]) AS q(sub, usr, at)"
    " JOIN analytics_wa_inbound i ON i.sub_account_id = q.sub AND i.wa_user = q.usr"
    f" AND i.ts > q.at - {_WINDOW} AND i.ts <= q.at"
)
_WA_INBOUND_ANY = "SELECT EXISTS (SELECT 1 FROM analytics_wa_inbound WHERE sub_account_id = ANY(%s)) AS found"
_SET_ANSWERED = (
    "UPDATE analytics_wa_inbound i SET answered = q.answered"
    " FROM unnest(%b::text[], %b::bigint[]) AS q(umid, answered) WHERE i.umid = q.umid"
)
_SET_WA_SENDS = (
    "UPDATE messages m SET wa_at = q.at FROM unnest(%b::text[], %b::timestamptz[]) AS q(umid, at)"
    " WHERE m.umid = q.umid"
)
_AGG_UPSERTS = Q.pg_unnest_upserts()
_DELTAS = Q.delta_selects(Q.PG, "g", "e")
# Migration 9's batches (param umids: messages not counted yet), one statement: the facts of their rows
# (`sinks.analytics_sql.facts`), the messages that are not plain left to Python (returned); every aggregate
# table's hourly and daily deltas added; their WhatsApp sends stored, and kept in agg_rewindow for
# `_REWINDOW`.
_MAINTAIN = (
    f"WITH f AS MATERIALIZED ({Q.facts(Q.PG, 'messages', 'message_steps', 1)}),"
    " odd AS (SELECT DISTINCT umid FROM f WHERE plain = 0),"
    " g AS MATERIALIZED (SELECT * FROM f WHERE umid NOT IN (SELECT umid FROM odd)),"
    f" e AS MATERIALIZED ({Q.error_facts(Q.PG, 'message_steps', 1)}),"
    + "".join(
        f" d_{n} AS MATERIALIZED ({sql}),"
        f" h_{n} AS ({Q.upsert_from(Q.PG, n, 'd_' + n, daily=False)}),"
        f" y_{n} AS ({Q.upsert_from(Q.PG, n, 'd_' + n, daily=True)}),"
        for n, sql in _DELTAS.items()
    )
    + " nb AS MATERIALIZED (SELECT umid, sub_account_id, wa_user, wa_at FROM g"
    " WHERE wa_at IS NOT NULL AND wa_user IS NOT NULL),"
    " oi AS (UPDATE messages m SET wa_at = nb.wa_at FROM nb WHERE m.umid = nb.umid),"
    " rw AS (INSERT INTO agg_rewindow (sub, usr, at) SELECT sub_account_id, wa_user, wa_at FROM nb)"
    " SELECT umid FROM odd"
)
# The WhatsApp window share's ordering guarantee: a transaction that writes one side of a window (an
# inbound WhatsApp message: `_count_inbound`; a WhatsApp send that appears, moves or goes: `_flush`,
# `_rewindow_sql`) takes, before it reads the other side, a transaction-scoped advisory lock per
# (subaccount, user) stripe, in stripe order (no deadlock; at most WINDOW_LOCK_STRIPES locks). Two writers
# of the same user's two sides are thus serialized: the second reads after the first committed (READ
# COMMITTED: each statement sees what committed before it started), so an inbound message and its reply
# written concurrently by two sink processes never both miss each other.
WINDOW_LOCK_CLASS = 0x636877  # pg_advisory_xact_lock(class, stripe): the WhatsApp window locks
WINDOW_LOCK_STRIPES = 256  # stripes of (subaccount, user): at most this many locks a transaction
# a (subaccount, user)'s stripe, modulo the stripes, in SQL and in Python (`window_stripes`: a write sends
# its distinct stripes, not every user; the server only locks them): the first byte of the user itself when
# it starts with two lowercase hex digits (users are keyed hashes of numbers, HMAC-SHA256 in hex: uniform
# already), else the first byte of md5(subaccount|user)
_STRIPE = (
    "mod(CASE WHEN usr ~ '^[0-9a-f]{2}' THEN get_byte(decode(left(usr, 2), 'hex'), 0)"
    f" ELSE get_byte(decode(md5(sub || '|' || usr), 'hex'), 0) END, {WINDOW_LOCK_STRIPES})"
)
_LOCK_WINDOWS = (
    f"SELECT count(*) FROM (SELECT pg_advisory_xact_lock({WINDOW_LOCK_CLASS}, k) FROM"
    f" (SELECT DISTINCT {_STRIPE} AS k FROM agg_rewindow ORDER BY 1) AS s) AS l"
)
_LOCK_STRIPES = (
    f"SELECT count(*) FROM (SELECT pg_advisory_xact_lock({WINDOW_LOCK_CLASS}, k) FROM"
    " (SELECT DISTINCT k FROM unnest(%b::int[]) AS q(k) ORDER BY 1) AS s) AS l"
)


def window_stripes(users: Iterable[tuple[str, str]]) -> list[int]:
    """The window-lock stripes of (subaccount, user) pairs, distinct and in lock order (`_STRIPE`)."""
    found = set()
    for sub, usr in users:
        byte = _HEX_BYTES.get(usr[:2])
        found.add(md5(f"{sub}|{usr}".encode()).digest()[0] if byte is None else byte)
    return sorted({b % WINDOW_LOCK_STRIPES for b in found})


#: two lowercase hex digits -> the byte they spell
_HEX_BYTES = {f"{b:02x}": b for b in range(256)}


# the inbound WhatsApp messages whose window holds a send of agg_rewindow (t - 24 h < ts <= t): answered
# recomputed, and the window counts moved
_REWINDOW = (
    "WITH q AS (SELECT DISTINCT sub, usr, at FROM agg_rewindow),"
    " found AS (SELECT DISTINCT i.umid, i.sub_account_id, i.wa_user, i.ts, i.hour, i.country, i.answered"
    " FROM q JOIN analytics_wa_inbound i ON i.sub_account_id = q.sub AND i.wa_user = q.usr"
    f" AND i.ts > q.at - {_WINDOW} AND i.ts <= q.at),"
    " cur AS (SELECT found.*, EXISTS (SELECT 1 FROM messages o WHERE"
    " o.sub_account_id = found.sub_account_id AND o.msisdn_hash = found.wa_user AND o.wa_at >= found.ts"
    f" AND o.wa_at < found.ts + {_WINDOW})::int AS now FROM found),"
    " upd AS (UPDATE analytics_wa_inbound i SET answered = cur.now FROM cur"
    " WHERE i.umid = cur.umid AND cur.now <> cur.answered"
    " RETURNING cur.sub_account_id, cur.hour, cur.country, cur.now - cur.answered AS d),"
    " w AS MATERIALIZED (SELECT sub_account_id, hour, country, 0::bigint AS inbound,"
    " sum(d)::bigint AS answered"
    " FROM upd GROUP BY 1, 2, 3 HAVING sum(d) <> 0),"
    f" h AS ({Q.upsert_from(Q.PG, 'window', 'w', daily=False)})"
    f" {Q.upsert_from(Q.PG, 'window', 'w', daily=True)}"
)
# whether each (sub, user, ts) has an outbound WhatsApp message at ts <= t < ts + 24 h
_WA_ANSWERED = (
    "SELECT EXISTS (SELECT 1 FROM messages f WHERE f.sub_account_id = q.sub"
    f" AND f.msisdn_hash = q.usr AND f.wa_at >= q.ts AND f.wa_at < q.ts + {_WINDOW})::int"
    " FROM unnest(%b::text[], %b::text[], %b::timestamptz[]) WITH ORDINALITY AS q(sub, usr, ts, n)"
    " ORDER BY q.n"
)
_INSERT_WA_INBOUND = (
    "INSERT INTO analytics_wa_inbound (umid, sub_account_id, wa_user, ts, hour, country, answered)"
    " SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::timestamptz[], %b::timestamptz[],"
    " %b::text[], %b::bigint[]) ON CONFLICT (umid) DO NOTHING"
)
_BACKFILL_MOVE = (
    "INSERT INTO analytics_backfill (source, after) VALUES (%s, %s)"
    " ON CONFLICT (source) DO UPDATE SET after = excluded.after"
)
_ANALYTICS_DAY = "date_trunc('day', hour, 'UTC')"
_NUMBER = R.MESSAGE_COLUMNS.index("msisdn")
_MASKED = R.MESSAGE_COLUMNS.index("msisdn_masked")
_HASH = R.MESSAGE_COLUMNS.index("msisdn_hash")


def _columns_of(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Row tuples as one list per column (the arrays of an unnest() statement)."""
    return [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


_UPSERT_CONVERSATIONS = (
    f"INSERT INTO conversations AS t ({_CONVERSATION_COLS})"
    f" SELECT {_CONVERSATION_COLS} FROM stage_conversations"
    " ON CONFLICT (key_hash) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in R.CONVERSATION_COLUMNS if c != "key_hash")
    + " WHERE excluded.version > t.version"
)
# the user's own conversation first (keyed by `user`), then the most recent; key_hash breaks ties
_GET_CONVERSATION = (
    "SELECT * FROM conversations WHERE sub_account_id = %(sub)s AND channel_id = %(channel_id)s"
    " AND (user_key_hash = %(hash)s OR msisdn_hash = %(hash)s)"
    " ORDER BY (user_key_hash = %(hash)s) IS TRUE DESC, last_inbound_at DESC, key_hash LIMIT 1"
)


def _old_contributions(
    messages: Sequence[tuple[Any, ...]], steps: Sequence[tuple[Any, ...]]
) -> dict[str, A.Contribution]:
    """Contributions of stored messages from their rows (tuples in `MESSAGE_FACT_COLUMNS` and
    `STEP_FACT_COLUMNS` order)."""
    by_umid: dict[str, list[tuple[Any, ...]]] = {}
    for r in steps:
        by_umid.setdefault(r[0], []).append(r)
    out = {}
    for m in messages:
        c = A.contribution_from_tuples(m, by_umid.get(m[0], []))
        if c is not None:
            out[m[0]] = c
    return out


class _Raced(Exception):
    """A concurrent writer changed a row between the version read and the write: use the merge path."""


class PostgresStore:
    """See `sinks.store.Store` for the contract."""

    def __init__(
        self,
        url: str,
        pii: PiiPolicy,
        *,
        synchronous_commit: bool = True,
        aggregates: bool = True,
        read_only: bool = False,
    ) -> None:
        self.url = url
        self.pii = pii
        self.read_only = read_only  # every transaction READ ONLY (`open_store(read_only=True)`)
        self.aggregates = aggregates  # False: analytics tables not maintained (benchmarks only)
        self.synchronous_commit = synchronous_commit
        self.merge_fallbacks = 0  # batches written by the merge path after a race (for tests/metrics)
        self._lock = threading.RLock()
        self._conn: psycopg.Connection[dict[str, Any]] | None = None
        self._staged = False
        self.backfill_batch = BACKFILL_BATCH  # rows a transaction of migration 9 counts
        self._types: dict[tuple[str, str], str] = {}
        self._run(lambda conn: None)  # connect now: a wrong URL fails at start

    def __repr__(self) -> str:
        return "PostgresStore(<url hidden>)"

    # --- connection handling -----------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[dict[str, Any]]:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                log.warning("postgres connection lost; reconnecting")
                conn.close()
            self._conn = None
            self._staged = False
            conn = psycopg.connect(self.url, row_factory=dict_row, connect_timeout=CONNECT_TIMEOUT_S)
            conn.read_only = self.read_only or None
            # the session in UTC, whatever the server's default: timestamps load with datetime.UTC (the
            # same tzinfo as the states': cheaper to compare and to cache by), no SQL depends on a zone
            conn.execute("SET TIME ZONE 'UTC'")
            if not self.synchronous_commit:
                conn.execute("SET synchronous_commit = off")
            conn.commit()
            self._conn = conn
        return conn

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
                self._staged = False

    def _run(self, work: Callable[[psycopg.Connection[dict[str, Any]]], T]) -> T:
        """Run `work` in one transaction; a lost connection becomes TransientError (nothing committed).

        A connection that was open before this call may have been ended meanwhile (a server restart, an
        idle timeout): then `work` is tried once more on a fresh connection. Writes are idempotent and the
        failed transaction committed nothing, so a second try is always safe."""
        with self._lock:
            for attempt in (1, 2):
                reused = self._conn is not None
                try:
                    conn = self._connection()
                    staged = self._staged
                    try:
                        with conn.transaction():
                            return work(conn)
                    except BaseException:
                        # the staging tables this transaction created (`_stage`) went with its rollback
                        self._staged = staged
                        raise
                except psycopg.OperationalError as exc:
                    self._drop()
                    if attempt == 1 and reused:
                        log.info("postgres connection ended (%s); retrying on a new one", exc)
                        continue
                    raise TransientError(f"postgres unavailable: {exc}") from exc
            raise AssertionError("unreachable")  # pragma: no cover

    def _stage(self, conn: psycopg.Connection[Any]) -> None:
        if not self._staged:
            for sql in _STAGING:
                conn.execute(sql)
            self._load_types(conn)
            self._staged = True

    def _load_types(self, conn: psycopg.Connection[Any], *, refresh: bool = False) -> None:
        if refresh or not self._types:
            self._types = {
                (r["table"], r["column"]): r["type"]
                for r in conn.execute(
                    "SELECT attrelid::regclass::text AS table, attname AS column,"
                    " format_type(atttypid, atttypmod) AS type FROM pg_attribute"
                    " WHERE attrelid = ANY(%s::regclass[]) AND attnum > 0 AND NOT attisdropped",
                    (
                        [
                            "messages",
                            "message_steps",
                            "status_events",
                            "inbound_messages",
                            "conversations",
                        ],
                    ),
                )
            }

    def _copy_rows(
        self, conn: psycopg.Connection[Any], stage: str, table: str, columns: Sequence[str], rows: Any
    ) -> None:
        """Binary COPY of `rows` (tuples in `columns` order) into `stage` (a staging table, or the target
        itself); the column types are those of `table` (binary COPY needs them, ~3x cheaper than text)."""
        if any((table, c) not in self._types for c in columns):  # created since the types were read
            self._load_types(conn, refresh=True)  # (not inside the COPY: it holds the connection)
        with (
            conn.cursor() as cur,
            cur.copy(f"COPY {stage} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.set_types([self._types[(table, c)] for c in columns])
            for row in rows:
                copy.write_row(row)

    # --- schema ------------------------------------------------------------------------------

    def migrate(self) -> None:
        """Apply the migrations not recorded yet, each in one transaction under the migration lock;
        migration 9 (the analytics backfill) in bounded batches, one transaction each (`_backfill_batch`),
        resumed where it stopped after an interruption, by whichever process migrates next."""

        def work(conn: psycopg.Connection[Any]) -> bool:
            """Apply what precedes the backfill (or follows it); True when the backfill is due."""
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_ID,))
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            applied = {r["version"] for r in conn.execute(f"SELECT version FROM {MIGRATIONS_TABLE}")}
            for version, name, statements in MIGRATIONS:
                if version in applied:
                    continue
                if version == Q.BACKFILL[0]:
                    return True
                for sql in statements:
                    conn.execute(sql)
                conn.execute(
                    f"INSERT INTO {MIGRATIONS_TABLE} (version, name) VALUES (%s, %s)", (version, name)
                )
            return False

        while self._run(work):
            while not self._run(self._backfill_batch):
                pass

    # --- writes ------------------------------------------------------------------------------

    def write_states(self, states: Sequence[MessageState]) -> int:
        if not states:
            return 0
        try:
            return self._run(lambda conn: self._copy_states(conn, states))
        except (psycopg.errors.UniqueViolation, _Raced) as exc:
            self.merge_fallbacks += 1
            log.info("write_states: concurrent write detected (%s); writing the batch by merge", exc)
            return self._run(lambda conn: self._merge_states(conn, states))

    def _resolve(
        self, conn: psycopg.Connection[Any], states: Sequence[MessageState]
    ) -> tuple[dict[str, int], R.Merged]:
        """The stored versions of the batch's umids, and the states to write by the lineage rule
        (`sinks.rows.resolve_lineages`)."""
        umids = list(dict.fromkeys(s.umid for s in states))
        with conn.cursor(row_factory=tuple_row) as cur:
            held = {u: (v, g) for u, v, g in cur.execute(_HELD_VERSIONS, (umids,)).fetchall()}
        load = functools.partial(self._load_states, conn)
        return {u: v for u, (v, _) in held.items()}, R.resolve_lineages(states, held, load, join, descends)

    @staticmethod
    def _load_states(
        conn: psycopg.Connection[Any], umids: list[str]
    ) -> dict[str, tuple[MessageState, R.Row]]:
        """The stored states of `umids` (those that have a row), rebuilt from their rows, locked."""
        if not umids:
            return {}
        messages = conn.execute(_LOAD_MESSAGES, (umids,)).fetchall()
        steps: dict[str, list[R.Row]] = {}
        for r in conn.execute(_LOAD_STEPS, (umids,)):
            steps.setdefault(r["umid"], []).append(r)
        events: dict[str, list[R.Row]] = {}
        for r in conn.execute(_LOAD_EVENTS, (umids,)):
            events.setdefault(r["umid"], []).append(r)
        return {
            m["umid"]: (R.state_from_rows(m, steps.get(m["umid"], []), events.get(m["umid"], [])), m)
            for m in messages
        }

    def _copy_states(self, conn: psycopg.Connection[Any], states: Sequence[MessageState]) -> int:
        """The fast path (module docstring); raises UniqueViolation or _Raced on a concurrent write."""
        self._load_types(conn)
        pii = self.pii
        held, merged = self._resolve(conn, states)
        with conn.cursor(row_factory=tuple_row) as cur:
            advancing = [s for s in merged.states if s.version > held.get(s.umid, -1)]
            if not advancing:
                return 0
            replaced = [s for s in advancing if s.umid in held]
            stored: set[tuple[Any, ...]] = set()
            old: dict[str, A.Contribution] = {}
            if replaced:
                umids = [s.umid for s in replaced]
                versions = [s.version for s in replaced]
                if self.aggregates:  # the deletes return what the old contributions are made of
                    # binary results: timestamps load without parsing text
                    found = cur.execute(_DELETE_REPLACED_RETURNING, (umids, versions), binary=True).fetchall()
                    deleted = len(found)
                    old_steps = cur.execute(
                        _DELETE_REPLACED_STEPS_RETURNING, (umids,), binary=True
                    ).fetchall()
                    old = _old_contributions(found, old_steps)
                else:
                    deleted = cur.execute(_DELETE_REPLACED, (umids, versions)).rowcount
                    cur.execute(_DELETE_REPLACED_STEPS, (umids,))
                if deleted != len(replaced):
                    raise _Raced(f"{len(replaced) - deleted} message rows changed meanwhile")
                stored = set(cur.execute(_STORED_EVENTS, (umids,)).fetchall())
        changes = A.Changes()
        news: list[A.Contribution] = []  # of the messages without an old contribution
        aggregates = self.aggregates

        # Each table's rows are built lazily inside its own COPY: the server ingests (parses, checks
        # keys, updates indexes) the rows already sent while the next ones are built, so the client's
        # work and the server's overlap instead of adding up.
        def message_rows() -> Iterator[tuple[Any, ...]]:
            contribution, msisdn = A.contribution, merged.msisdn
            fresh, rewindow = news.append, changes.rewindow.append
            for s in advancing:
                values = R.message_values(s, pii, msisdn.get(s.umid))
                if not aggregates:
                    yield (*values, None)
                    continue
                # here, while the server ingests the rows already sent
                new = contribution(s, values[_NUMBER] or values[_MASKED], values[_HASH])
                was = old.get(s.umid)
                if was is not None:
                    changes.record(s.umid, was, new)
                    yield (*values, A.whatsapp_send(new))
                elif new is None:
                    yield (*values, None)
                else:  # counted in bulk below (`Changes.count_new`), its WhatsApp send kept here
                    fresh(new)
                    if new[10] is None:  # `whatsapp_send`
                        yield (*values, None)
                    else:  # a WhatsApp send: in the row (wa_at), and its windows to check
                        rewindow((new[0], new[10], new[11]))
                        yield (*values, new[11])

        def step_rows() -> Iterator[tuple[Any, ...]]:
            for s in advancing:
                yield from R.step_values(s)

        def event_rows() -> Iterator[tuple[Any, ...]]:
            for s in advancing:
                if s.umid in held:  # only the events not stored yet
                    yield from (e for e in R.event_values(s) if R.event_key(e) not in stored)
                else:  # no message row, no events (else: unique violation, and the merge path)
                    yield from R.event_values(s)

        self._copy_rows(conn, "messages", "messages", _MESSAGE_WRITE_COLUMNS, message_rows())
        self._copy_rows(conn, "message_steps", "message_steps", R.STEP_COLUMNS, step_rows())
        self._copy_rows(conn, "status_events", "status_events", R.EVENT_COLUMNS, event_rows())
        if self.aggregates:
            changes.count_new(news)
            self._flush(conn, changes)
        return len(advancing)

    def _merge_states(self, conn: psycopg.Connection[Any], states: Sequence[MessageState]) -> int:
        """The conflict-proof path: staging tables + guarded upsert (module docstring)."""
        self._stage(conn)
        pii = self.pii
        held, merged = self._resolve(conn, states)
        old: dict[str, A.Contribution] = {}
        if self.aggregates and held:
            umids = list(held)
            with conn.cursor(row_factory=tuple_row) as cur:
                found = cur.execute(_OLD_MESSAGES + " FOR UPDATE", (umids,)).fetchall()
                old = _old_contributions(found, cur.execute(_OLD_STEPS, (umids,)).fetchall())
        message_rows, step_rows, event_rows = [], [], []
        news: dict[str, A.Contribution | None] = {}
        for s in merged.states:
            values = R.message_values(s, pii, merged.msisdn.get(s.umid))
            if self.aggregates:
                new = news[s.umid] = A.contribution(s, values[_NUMBER] or values[_MASKED], values[_HASH])
                values = (*values, A.whatsapp_send(new))
            else:
                values = (*values, None)
            message_rows.append(values)
            step_rows += R.step_values(s)
            event_rows += R.event_values(s)
        self._copy_rows(conn, "stage_messages", "messages", _MESSAGE_WRITE_COLUMNS, message_rows)
        self._copy_rows(conn, "stage_steps", "message_steps", R.STEP_COLUMNS, step_rows)
        self._copy_rows(conn, "stage_events", "status_events", R.EVENT_COLUMNS, event_rows)
        advanced = conn.execute(_UPSERT_MESSAGES).rowcount
        if advanced:
            # temp tables get no autovacuum statistics; without them the DELETE plans a seq scan
            conn.execute("ANALYZE stage_advanced")
            conn.execute(_DELETE_STEPS)
            conn.execute(_INSERT_STEPS)
            conn.execute(_INSERT_EVENTS)
            if self.aggregates:
                changes = A.Changes()
                for r in conn.execute("SELECT umid FROM stage_advanced"):
                    changes.record(r["umid"], old.get(r["umid"]), news[r["umid"]])
                self._flush(conn, changes)  # the sends went with the rows (wa_at)
        return advanced

    # --- analytics (sinks.aggregates) --------------------------------------------------------

    def _flush(self, conn: psycopg.Connection[Any], changes: A.Changes) -> None:
        """Write what a batch changes in the analytics tables (`sinks.aggregates.Changes`); the upserts
        and the window lookup go in one pipeline (one round trip). The WhatsApp sends that appeared, moved
        or went (`changes.outbound`, `changes.gone`) are the `wa_at` of the rows the caller wrote."""
        deltas = changes.deltas()
        rewindow = changes.rewindow
        if rewindow:
            # the window locks of these users (`_LOCK_WINDOWS`) before the inbound side is read: then
            # only subaccounts that ever got a WhatsApp inbound message have windows to check
            conn.execute(_LOCK_STRIPES, (window_stripes((k[0], k[1]) for k in rewindow),))
            subs = sorted({k[0] for k in rewindow})
            any_inbound = conn.execute(_WA_INBOUND_ANY, (subs,)).fetchone()
            if not (any_inbound and any_inbound["found"]):
                rewindow = []
        with conn.pipeline():
            self._apply(conn, deltas)
            around = conn.execute(_WA_INBOUND_AROUND, _columns_of(rewindow, 3)) if rewindow else None
        if around is not None:
            self._rewindow(conn, around.fetchall())

    def _apply(self, conn: psycopg.Connection[Any], deltas: A.Deltas) -> None:
        self._upsert(conn, "messages", A.message_rows(deltas))
        self._upsert(conn, "latency", A.latency_rows(deltas))
        self._upsert(conn, "errors", A.error_rows(deltas))

    @staticmethod
    def _upsert(conn: psycopg.Connection[Any], table: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """Add `rows` (`sinks.analytics_sql` upsert rows) to the hourly table and its daily table (one
        statement: the server rolls them up by day)."""
        if rows:
            conn.execute(_AGG_UPSERTS[table], _columns_of(rows, len(rows[0])))

    @staticmethod
    def _answered(conn: psycopg.Connection[Any], keys: Sequence[tuple[str, str, datetime]]) -> list[int]:
        """For each (sub, user, ts): 1 when an outbound WhatsApp message answers it in its window."""
        if not keys:
            return []
        with conn.cursor(row_factory=tuple_row) as cur:
            return [r[0] for r in cur.execute(_WA_ANSWERED, _columns_of(keys, 3)).fetchall()]

    def _rewindow(self, conn: psycopg.Connection[Any], found: Sequence[R.Row]) -> None:
        """Recompute `answered` of the WhatsApp inbound messages `found` (`_WA_INBOUND_AROUND`: whose
        window holds a WhatsApp send that appeared, moved or went), and move the window counts."""
        if not found:
            return
        now = self._answered(conn, [(r["sub_account_id"], r["wa_user"], r["ts"]) for r in found])
        window: dict[tuple[str, datetime, str], list[int]] = {}
        changed: list[tuple[str, int]] = []
        for r, answered in zip(found, now, strict=True):
            if answered != r["answered"]:
                changed.append((r["umid"], answered))
                key = (r["sub_account_id"], r["hour"], r["country"])
                window.setdefault(key, [0, 0])[1] += answered - r["answered"]
        if changed:
            conn.execute(_SET_ANSWERED, _columns_of(changed, 2))
            self._upsert(conn, "window", [(*k, *v) for k, v in sorted(window.items())])

    # --- analytics: the server's own computation (sinks.analytics_sql), migration 9 ---------

    @staticmethod
    def _agg_tables(conn: psycopg.Connection[Any]) -> None:
        """The temp tables `_maintain_sql` uses (every batch: a rolled back one takes them away)."""
        for sql in _AGG_TEMP:
            conn.execute(sql)

    def _maintain_sql(self, conn: psycopg.Connection[Any], umids: list[str]) -> None:
        """Count the stored messages `umids`, not counted yet (migration 9), in the analytics tables: the
        server computes their contributions (`_MAINTAIN`), except for the messages that are not plain
        (`sinks.analytics_sql`), which the Python definition counts; then the windows of their sends."""
        if umids:
            with conn.cursor(row_factory=tuple_row) as cur:
                odd = [r[0] for r in cur.execute(_MAINTAIN, {"umids": umids}).fetchall()]
            if odd:
                self._maintain_in_python(conn, odd)
        self._rewindow_sql(conn)

    def _maintain_in_python(self, conn: psycopg.Connection[Any], umids: list[str]) -> None:
        """`_maintain_sql` of the messages the SQL leaves out: `contribution_from_tuples`, `_flush`."""
        with conn.cursor(row_factory=tuple_row) as cur:
            new = _old_contributions(
                cur.execute(_OLD_MESSAGES, (umids,)).fetchall(), cur.execute(_OLD_STEPS, (umids,)).fetchall()
            )
        changes = A.Changes()
        for umid in umids:
            changes.record(umid, None, new.get(umid))
        if changes.outbound:  # rows stored before: their sends set here
            conn.execute(_SET_WA_SENDS, ([o[0] for o in changes.outbound], [o[3] for o in changes.outbound]))
        self._flush(conn, changes)

    def _rewindow_sql(self, conn: psycopg.Connection[Any]) -> None:
        """Recompute `answered` of the WhatsApp inbound messages whose window holds a send of agg_rewindow
        (one that appeared, moved or went), and move the window counts: after locking the stripes of
        their users (`WINDOW_LOCK_CLASS`: the reads below see every earlier writer of those users)."""
        conn.execute(_LOCK_WINDOWS)
        conn.execute(_REWINDOW)

    def _count_inbound(self, conn: psycopg.Connection[Any], rows: Sequence[R.Row]) -> None:
        """Count newly stored inbound messages (their rows) by type; WhatsApp ones in the window table."""
        counts: dict[tuple[Any, ...], int] = {}
        wa: list[tuple[R.Row, tuple[Any, ...]]] = []
        for r in rows:
            key = A.inbound_key(r)
            counts[key] = counts.get(key, 0) + 1
            if key[2] == A.WHATSAPP and r["msisdn_hash"] is not None:
                wa.append((r, key))
        self._upsert(conn, "inbound", [(*k, n) for k, n in sorted(counts.items())])
        if not wa:
            return
        # the window locks of these users (`_LOCK_WINDOWS`) before their sends are read
        conn.execute(_LOCK_STRIPES, (window_stripes((key[0], r["msisdn_hash"]) for r, key in wa),))
        answered = self._answered(conn, [(key[0], r["msisdn_hash"], r["ts"]) for r, key in wa])
        window: dict[tuple[str, datetime, str], list[int]] = {}
        facts = []
        for (r, key), a in zip(wa, answered, strict=True):
            facts.append((r["umid"], key[0], r["msisdn_hash"], r["ts"], key[1], key[3], a))
            w = window.setdefault((key[0], key[1], key[3]), [0, 0])
            w[0] += 1
            w[1] += a
        conn.execute(_INSERT_WA_INBOUND, _columns_of(facts, 7))
        self._upsert(conn, "window", [(*k, *v) for k, v in sorted(window.items())])

    def _backfill_batch(self, conn: psycopg.Connection[Any]) -> bool:
        """One transaction of migration 9: count the next `backfill_batch` messages (by umid, the server
        computing their contributions as for a write) or, once every message is counted, the next
        inbound messages; the position is kept in `analytics_backfill` in the same transaction, so a batch
        counts once (idempotent) and an interrupted backfill resumes after its last committed batch. True
        when done (migration 9 recorded)."""
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_ID,))
        applied = conn.execute(f"SELECT 1 FROM {MIGRATIONS_TABLE} WHERE version = %s", (Q.BACKFILL[0],))
        if applied.fetchone():  # another process finished it
            return True
        conn.execute(Q.BACKFILL_PROGRESS_DDL)
        after = {
            r["source"]: r["after"] for r in conn.execute("SELECT source, after FROM analytics_backfill")
        }
        n = self.backfill_batch
        if after.get("messages") != Q.BACKFILL_DONE:
            found = conn.execute(
                "SELECT umid FROM messages WHERE umid > %s ORDER BY umid LIMIT %s",
                (after.get("messages", ""), n),
            ).fetchall()
            umids = [r["umid"] for r in found]
            if umids:
                self._agg_tables(conn)
                self._maintain_sql(conn, umids)
            conn.execute(_BACKFILL_MOVE, ("messages", umids[-1] if len(umids) == n else Q.BACKFILL_DONE))
            return False
        rows = conn.execute(
            "SELECT * FROM inbound_messages WHERE umid > %s ORDER BY umid LIMIT %s",
            (after.get("inbound", ""), n),
        ).fetchall()
        if rows:
            self._count_inbound(conn, rows)
            conn.execute(_BACKFILL_MOVE, ("inbound", rows[-1]["umid"]))
            return False
        conn.execute("DELETE FROM analytics_backfill")
        conn.execute(f"INSERT INTO {MIGRATIONS_TABLE} (version, name) VALUES (%s, %s)", Q.BACKFILL)
        return True

    def analytics(self, query: Q.Query) -> list[dict[str, Any]]:
        sql, params = Q.select(query, "%s", _ANALYTICS_DAY)
        found = self._run(lambda conn: conn.execute(sql, params).fetchall())
        # SUM(bigint) is numeric in PostgreSQL: counts back to int
        return [{k: int(v) if isinstance(v, Decimal) else v for k, v in r.items()} for r in found]

    def write_inbound(self, msgs: Sequence[InboundMessage]) -> int:
        if not msgs:
            return 0
        first: dict[str, InboundMessage] = {}
        for m in msgs:
            first.setdefault(m.umid, m)
        pii = self.pii

        def work(conn: psycopg.Connection[Any]) -> int:
            self._stage(conn)
            rows = (R.as_tuple(R.inbound_row(m, pii), R.INBOUND_COLUMNS) for m in first.values())
            self._copy_rows(conn, "stage_inbound", "inbound_messages", R.INBOUND_COLUMNS, rows)
            inserted = [r["umid"] for r in conn.execute(_INSERT_INBOUND).fetchall()]
            if self.aggregates:
                self._count_inbound(conn, [R.inbound_row(first[u], pii) for u in inserted])
            return len(inserted)

        return self._run(work)

    def write_conversations(self, convs: Sequence[Conversation]) -> int:
        """COPY into a staging table, then one guarded upsert (`WHERE excluded.version > t.version`);
        the batch holds one row per key (highest version), as ON CONFLICT DO UPDATE requires."""
        latest = R.latest_conversations(convs)
        if not latest:
            return 0
        pii = self.pii
        jsonb = R.CONVERSATION_COLUMNS.index("counts_by_type")

        def rows() -> Iterator[tuple[Any, ...]]:
            for c in latest:
                values = list(R.conversation_values(c, pii))
                values[jsonb] = Jsonb(values[jsonb])
                yield tuple(values)

        def work(conn: psycopg.Connection[Any]) -> int:
            self._stage(conn)
            self._copy_rows(conn, "stage_conversations", "conversations", R.CONVERSATION_COLUMNS, rows())
            return conn.execute(_UPSERT_CONVERSATIONS).rowcount

        return self._run(work)

    # --- reads -------------------------------------------------------------------------------

    def get_message(self, sub_account_id: str, umid: str) -> StoredMessage | None:
        def work(conn: psycopg.Connection[Any]) -> tuple[R.Row | None, list[R.Row], Any, dict[str, str]]:
            found = conn.execute(
                "SELECT * FROM messages WHERE umid = %s AND sub_account_id = %s", (umid, sub_account_id)
            ).fetchone()
            if found is None:
                return None, [], None, {}
            steps = conn.execute(
                "SELECT * FROM message_steps WHERE umid = %s ORDER BY step", (umid,)
            ).fetchall()
            looked = conn.execute("SELECT details FROM reconcile_checks WHERE umid = %s", (umid,)).fetchone()
            missing = sorted({r["channel"] for r in steps if r["channel_id"] is None})
            ids: dict[str, str] = {}
            if missing:
                for r in conn.execute(_CHANNEL_IDS, {"sub": sub_account_id, "channels": missing}):
                    if r["low"] is not None and r["low"] == r["high"]:
                        ids[r["channel"]] = r["low"]
            return found, steps, looked["details"] if looked else None, ids

        message, steps, details, ids = self._run(work)
        if message is None:
            return None
        return StoredMessage(message, tuple(steps), details, ids, self.pii.clear)

    def get_conversation(self, sub_account_id: str, channel_id: str, user: str) -> R.Row | None:
        params = {"sub": sub_account_id, "channel_id": channel_id, "hash": self.pii.hash_msisdn(user)}
        found: R.Row | None = self._run(lambda conn: conn.execute(_GET_CONVERSATION, params).fetchone())
        return found

    def list_messages(
        self,
        sub_account_id: str,
        *,
        client_message_id: str | None = None,
        batch_id: str | None = None,
        after: str | None = None,
        limit: int = DEFAULT_LIMIT,
    ) -> tuple[list[R.Row], str | None]:
        limit = clamp_limit(limit)
        filters = message_filters(sub_account_id, client_message_id, batch_id)
        where, params = equalities(filters, "%s")
        if after is not None:
            where.append("umid > %s")
            params.append(after)
        sql = f"SELECT * FROM messages WHERE {' AND '.join(where)} ORDER BY umid LIMIT %s"
        found = self._run(lambda conn: conn.execute(sql, (*params, limit + 1)).fetchall())
        return paginate(found, limit, lambda row: row["umid"])

    def list_inbound(
        self,
        sub_account_id: str,
        *,
        channel_id: str | None = None,
        channel_user_id: str | None = None,
        msisdn: str | None = None,
        after: str | None = None,
        limit: int = DEFAULT_LIMIT,
    ) -> tuple[list[R.Row], str | None]:
        limit = clamp_limit(limit)
        filters = inbound_filters(self.pii, sub_account_id, channel_id, channel_user_id, msisdn)
        where, params = equalities(filters, "%s")
        if after is not None:
            where.append("(ts, umid) > (%s, %s)")
            params.extend(R.parse_inbound_cursor(after))
        sql = f"SELECT * FROM inbound_messages WHERE {' AND '.join(where)} ORDER BY ts, umid LIMIT %s"
        found = self._run(lambda conn: conn.execute(sql, (*params, limit + 1)).fetchall())
        return paginate(found, limit, R.inbound_cursor)

    def stream(self, table: str, since: datetime, until: datetime, *, batch: int = 5000) -> RowStream:
        """A named (server-side) cursor in one REPEATABLE READ, READ ONLY transaction on a connection of
        its own, fetched `batch` rows at a time (the count and the rows see one snapshot)."""
        spec = X.TABLES[table]
        columns = spec.exported_columns(self.pii)
        conn = psycopg.connect(self.url, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True)
        try:
            conn.execute("SET TIME ZONE 'UTC'")
            conn.autocommit = False
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True  # the first statement starts the one snapshot every read sees
            row = conn.execute(X.count_sql(spec, "%s"), (since, until)).fetchone()
        except BaseException:
            conn.close()
            raise

        def batches() -> Generator[list[tuple[Any, ...]], None, None]:
            with conn.cursor(name="chatpipe_stream") as cur:
                cur.itersize = batch
                cur.execute(X.select_sql(spec, columns, "%s"), (since, until))
                while rows := cur.fetchmany(batch):
                    yield rows

        def release() -> None:
            conn.rollback()
            conn.close()

        kinds = tuple(spec.kind(c) for c in columns)
        return RowStream(columns, kinds, int(row[0]) if row else 0, batches(), release)

    # --- reconciliation ----------------------------------------------------------------------------

    def reconcile_candidates(
        self,
        cutoff: datetime,
        now: datetime,
        *,
        sub_account_id: str | None = None,
        after: tuple[datetime, str] | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        sql = _CANDIDATES
        params: list[Any] = [cutoff, cutoff, now]
        if sub_account_id is not None:
            sql += " AND m.sub_account_id = %s"
            params.append(sub_account_id)
        if after is not None:
            sql += " AND (m.updated_at, m.umid) > (%s, %s)"
            params.extend(after)
        sql += " ORDER BY m.updated_at, m.umid LIMIT %s"
        params.append(max(1, int(limit)))
        return [dict(r) for r in self._run(lambda conn: conn.execute(sql, params).fetchall())]

    def lease_subaccounts(
        self, owner: str, sub_account_ids: Sequence[str], now: datetime, until: datetime
    ) -> list[str]:
        subs = list(dict.fromkeys(sub_account_ids))
        if not subs:
            return []
        got = self._run(lambda conn: conn.execute(_LEASE, (subs, owner, until, now)).fetchall())
        mine = {r["sub_account_id"] for r in got}
        return [sub for sub in subs if sub in mine]

    def release_subaccounts(self, owner: str, sub_account_ids: Sequence[str], free_at: datetime) -> None:
        if not sub_account_ids:
            return
        self._run(
            lambda conn: conn.execute(
                "UPDATE reconcile_leases SET expires_at = %s WHERE owner = %s AND sub_account_id = ANY(%s)",
                (free_at, owner, list(sub_account_ids)),
            )
        )

    def record_lookups(self, lookups: Sequence[LookupRecord]) -> None:
        if not lookups:
            return
        rows = [
            (
                x.umid,
                x.sub_account_id,
                x.attempts,
                x.outcome,
                x.checked_at,
                x.next_due,
                None if x.details is None else Jsonb(list(x.details)),
            )
            for x in lookups
        ]
        self._run(lambda conn: conn.cursor().executemany(_RECORD_LOOKUP, rows))

    def close(self) -> None:
        with self._lock:
            self._drop()
