"""The Faust application: topics, the message-state table, the stored-value format and the worker settings.

Processing guarantee: at-least-once with idempotent, monotonic outputs. Tansu (the embedded broker) has no
working exactly-once, so every state record carries a version that grows on each change and sinks refuse
versions they have already passed. How a crash can never emit two different contents under one version
(and never loses an output) is explained in `processors.agents`.

The table (`message_state`, RocksDB, changelog `chatpipe-processor-message_state-changelog`) maps the umid
(bytes) to a `Stored` value, encoded by `encode_stored`:

    byte 0      kind: 1 = LIVE (a MessageState follows), 2 = GONE (compact tombstone of a forgotten
                final message: its last version follows); 0 = a legacy value (plain Confluent Avro)
    bytes 1-8   input offset (big-endian int64) of the last receipt folded into this value, -1 if none
    bytes 9-16  check_at: event-time (ingest clock, epoch microseconds) at which the expiry timer must
                look at this key again, -1 for never
    rest        LIVE: the MessageState as Confluent-framed Avro (the bytes emitted on the state topic);
                GONE: the last version (int64)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import faust
from faust.sensors.monitor import Monitor
from prometheus_client import CollectorRegistry

from chatpipe.runtime import kafka
from chatpipe.runtime.config import Settings
from chatpipe.runtime.metric_defs import ProcessorMetrics
from chatpipe.runtime.topics import PROCESSOR_APP_ID
from processors.dlqlimit import DlqLimit
from processors.state import StateConfig
from schemas.catalog import CONVERSATIONS, INBOUND, INBOUND_BY_CONVERSATION, MESSAGE_STATE, RECEIPTS
from schemas.codec import Codecs
from schemas.models import MessageState

LIVE = 1
GONE = 2
_HEAD = struct.Struct(">bqq")
_VERSION = struct.Struct(">q")
HEAD_SIZE = _HEAD.size


@dataclass(frozen=True)
class RuntimeConfig:
    """Settings of the Faust shell (not of the pure state machine), built by `runtime_config` from the
    `Settings` fields `processor_*`, `final_retention_hours` and `tombstone_retention_hours` (env
    `CHATPIPE_<NAME>`, docs/configuration.md); the defaults here are the same."""

    batch_size: int = 5000  # receipts per take_events batch (all partitions of this worker)
    batch_within: float = 0.1  # seconds to wait for a batch to fill
    cache_size: int = 200_000  # decoded states kept in memory (all partitions)
    in_flight: int = 4  # batches folded while earlier ones wait for the broker's acks
    expire_interval: float = 30.0  # seconds between expiry timer runs
    final_retention: timedelta = timedelta(days=1)  # a final state stays this long, then becomes GONE
    tombstone_retention: timedelta = timedelta(days=30)  # a GONE marker stays this long, then is deleted
    changelog_one_record_per_batch: bool = False  # Tansu: exact end offsets for table recovery
    # the dead-letter limit of each input (processors/dlqlimit.py; settings `processor_dlq_*`)
    dlq_max_ratio: float = 0.5
    dlq_window: int = 1000
    dlq_min: int = 100

    def dlq_limit(self) -> DlqLimit:
        """A fresh dead-letter limit for one input."""
        return DlqLimit(self.dlq_max_ratio, self.dlq_window, self.dlq_min)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.cache_size < 0 or self.in_flight < 1:
            raise ValueError("batch_size and in_flight must be >= 1 and cache_size >= 0")
        if self.batch_within <= 0 or self.expire_interval <= 0:
            raise ValueError("batch_within and expire_interval must be positive")
        if self.final_retention < timedelta(0) or self.tombstone_retention < timedelta(0):
            raise ValueError("final_retention and tombstone_retention must not be negative")
        self.dlq_limit()  # ValueError on a limit that cannot work


@dataclass(slots=True)
class Stored:
    """One decoded table value (see the module docstring)."""

    kind: int
    offset: int
    check_at: int
    state: MessageState | None = None  # LIVE
    avro: bytes = b""  # LIVE: the Confluent-framed state, as stored and emitted
    version: int = 0  # GONE: the last version emitted


def encode_stored(s: Stored) -> bytes:
    head = _HEAD.pack(s.kind, s.offset, s.check_at)
    if s.kind == GONE:
        return head + _VERSION.pack(s.version)
    return head + s.avro


def stored_header(raw: bytes) -> tuple[int, int, int]:
    """(kind, offset, check_at) without decoding the state; a legacy plain-Avro value is (0, -1, -1)."""
    if raw[0] == 0:
        return 0, -1, -1
    kind, offset, check_at = _HEAD.unpack_from(raw)
    return kind, offset, check_at


def decode_stored(raw: bytes, codecs: Codecs) -> Stored:
    kind, offset, check_at = stored_header(raw)
    if kind == GONE:
        return Stored(GONE, offset, check_at, version=_VERSION.unpack_from(raw, HEAD_SIZE)[0])
    avro = raw if kind == 0 else raw[HEAD_SIZE:]
    state = codecs.state.decode(avro)
    return Stored(LIVE, offset, check_at, state=state, avro=avro, version=state.version)


class QuietMonitor(Monitor):
    """Faust's monitor without its per-event bookkeeping (it costs more than the state machine).

    Keeps the rebalance/commit/assignment hooks (rare) and drops the per-message, per-stream-event and
    per-table-access ones. chatpipe's own metrics are in `chatpipe.runtime.metric_defs`.
    """

    def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
        return None

    def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> dict | None:
        return None

    def on_stream_event_out(
        self, tp: Any, offset: int, stream: Any, event: Any, state: dict | None = None
    ) -> None:
        return None

    def on_message_out(self, tp: Any, offset: int, message: Any) -> None:
        return None

    def on_table_get(self, table: Any, key: Any) -> None:
        return None

    def on_table_set(self, table: Any, key: Any, value: Any) -> None:
        return None

    def on_table_del(self, table: Any, key: Any) -> None:
        return None

    def on_send_initiated(self, producer: Any, topic: str, message: Any, keysize: int, valsize: int) -> Any:
        return None

    def on_send_completed(self, producer: Any, state: Any, metadata: Any) -> None:
        return None


@dataclass
class Processor:
    """Everything the agents need, built once per worker process."""

    app: faust.App
    settings: Settings
    codecs: Codecs
    config: StateConfig
    runtime: RuntimeConfig
    receipts: Any
    states: Any
    table: Any
    inbound: Any
    by_conversation: Any
    conversations: Any
    conversation_table: Any
    metrics: ProcessorMetrics
    metrics_registry: CollectorRegistry
    #: why the worker stopped itself (the dead-letter limit, agents.py `halt`); empty while it runs
    fatal: list[BaseException] = field(default_factory=list)


def runtime_config(settings: Settings) -> RuntimeConfig:
    return RuntimeConfig(
        batch_size=settings.processor_batch_size,
        batch_within=settings.processor_batch_within,
        cache_size=settings.processor_cache_size,
        in_flight=settings.processor_in_flight,
        expire_interval=settings.processor_expire_interval,
        final_retention=timedelta(hours=settings.final_retention_hours),
        tombstone_retention=timedelta(hours=settings.tombstone_retention_hours),
        changelog_one_record_per_batch=settings.embedded_broker,
        dlq_max_ratio=settings.processor_dlq_max_ratio,
        dlq_window=settings.processor_dlq_window,
        dlq_min=settings.processor_dlq_min,
    )


def state_config(settings: Settings) -> StateConfig:
    stale = settings.stale_after_hours
    return StateConfig(
        read_window=timedelta(hours=settings.read_window_hours),
        stale_after=timedelta(hours=stale) if stale > 0 else None,
    )


def faust_settings(settings: Settings) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "broker": f"kafka://{settings.kafka_bootstrap}",
        "store": "rocksdb://",
        "datadir": str(settings.state_dir / "processor"),
        "topic_partitions": settings.partitions,
        "topic_replication_factor": settings.replication_factor,
        "topic_allow_declare": False,
        "consumer_auto_offset_reset": "earliest",
        "processing_guarantee": "at_least_once",
        "web_host": settings.api_host,  # like the sink's and reconciler's /metrics (0.0.0.0 in a container)
        "web_port": settings.worker_web_port,
        "web_in_thread": False,
        "broker_session_timeout": 6.0,
        "broker_heartbeat_interval": 1.0,
        "broker_commit_interval": 1.0,
        "table_cleanup_interval": 60.0,
    }
    credentials = kafka.faust_credentials(settings)
    if credentials is not None:  # Faust's aiokafka clients: the security of chatpipe.runtime.kafka
        conf["broker_credentials"] = credentials
    if settings.embedded_broker:
        # Tansu's ListOffsets answers the base offset of the last batch + 1 as the end offset; with one
        # record per batch that is the true end, so table recovery reads the whole changelog. chatpipe
        # writes the changelog with its own producer, ending each flush with a one-record marker batch per
        # partition (agents.py, `Folder.send`); this keeps Faust's own producer (assignor, anything else)
        # safe too. docs/embedded-broker.md lists every Tansu workaround.
        conf["producer_max_batch_size"] = 1
    return conf


class RawBytes(faust.Schema):
    """Keys and values as the bytes on the wire (chatpipe decodes its Avro itself, schemas/codec.py).
    Same result as the "raw" serializers, without Faust's per-record codec lookup for key and value
    (about 2 us of the worker's main thread per record)."""

    def __init__(self) -> None:
        super().__init__(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    def loads_key(self, app: Any, message: Any, *, loads: Any = None, serializer: Any = None) -> Any:
        return message.key

    def loads_value(self, app: Any, message: Any, *, loads: Any = None, serializer: Any = None) -> Any:
        return message.value


#: RocksDB sizes per partition's database. Faust's defaults (64 MB write buffers x 3, a 2 GB block cache and
#: a 500 MB compressed one, each per partition) let a worker's RSS grow by hundreds of MB under a stream of
#: distinct umids; the shell keeps its hot states decoded in its own cache, so RocksDB needs little.
ROCKSDB_OPTIONS = {
    "write_buffer_size": 16 * 1024**2,
    "max_write_buffer_number": 2,
    "block_cache_size": 32 * 1024**2,
    "block_cache_compressed_size": 8 * 1024**2,
}


def create_processor(settings: Settings, codecs: Codecs | None = None) -> Processor:
    app = faust.App(PROCESSOR_APP_ID, monitor=QuietMonitor(), **faust_settings(settings))
    codecs = codecs or Codecs.connect(settings.schema_registry_url)

    def raw_topic(name: str) -> Any:
        return app.topic(name, schema=RawBytes(), partitions=settings.partitions)

    receipts = raw_topic(RECEIPTS.name)
    states = raw_topic(MESSAGE_STATE.name)
    table = app.Table(
        "message_state",
        partitions=settings.partitions,
        key_type=bytes,  # bytes -> Faust's "raw" serializer: values are `Stored` bytes (see above)
        value_type=bytes,
        options=dict(ROCKSDB_OPTIONS),
    )

    conversation_table = app.Table(
        "conversations", partitions=settings.partitions, key_type=bytes, value_type=bytes
    )
    registry = CollectorRegistry()
    return Processor(
        app=app,
        settings=settings,
        codecs=codecs,
        config=state_config(settings),
        runtime=runtime_config(settings),
        receipts=receipts,
        states=states,
        table=table,
        inbound=raw_topic(INBOUND.name),
        by_conversation=raw_topic(INBOUND_BY_CONVERSATION.name),
        conversations=raw_topic(CONVERSATIONS.name),
        conversation_table=conversation_table,
        metrics=ProcessorMetrics(registry),
        metrics_registry=registry,
    )
