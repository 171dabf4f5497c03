"""The Faust application: topics, the message-state table, and the worker settings.

Processing guarantee: at-least-once. Tansu (the embedded broker) has no working exactly-once, so every
output is idempotent and monotonic instead: a state record carries a version that grows on each change and
sinks refuse versions they have already passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import faust
from prometheus_client import CollectorRegistry

from chatpipe.config import Settings
from chatpipe.metric_defs import ProcessorMetrics
from chatpipe.topics import PROCESSOR_APP_ID
from processors.state import StateConfig
from schemas.catalog import MESSAGE_STATE, RECEIPTS
from schemas.codec import Codecs


@dataclass
class Processor:
    """Everything the agents need, built once per worker process."""

    app: faust.App
    codecs: Codecs
    config: StateConfig
    receipts: Any
    states: Any
    table: Any
    metrics: ProcessorMetrics
    metrics_registry: CollectorRegistry


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
        "web_host": "127.0.0.1",
        "web_port": settings.worker_web_port,
        "web_in_thread": False,
        "broker_session_timeout": 6.0,
        "broker_heartbeat_interval": 1.0,
        "broker_commit_interval": 1.0,
        "table_cleanup_interval": 60.0,
    }
    if settings.embedded_broker:
        # Tansu's ListOffsets answers the base offset of the last batch + 1 as the end offset; with one
        # record per batch that is the true end, so table recovery reads the whole changelog.
        conf["producer_max_batch_size"] = 1
    return conf


def create_processor(settings: Settings, codecs: Codecs | None = None) -> Processor:
    app = faust.App(PROCESSOR_APP_ID, **faust_settings(settings))
    codecs = codecs or Codecs.connect(settings.schema_registry_url)
    receipts = app.topic(
        RECEIPTS.name, key_serializer="raw", value_serializer="raw", partitions=settings.partitions
    )
    states = app.topic(
        MESSAGE_STATE.name, key_serializer="raw", value_serializer="raw", partitions=settings.partitions
    )
    table = app.Table(
        "message_state",
        partitions=settings.partitions,
        key_type=bytes,  # bytes -> Faust's "raw" serializer: values are Confluent-framed Avro
        value_type=bytes,
    )
    registry = CollectorRegistry()
    return Processor(
        app=app,
        codecs=codecs,
        config=StateConfig(read_window=timedelta(hours=settings.read_window_hours)),
        receipts=receipts,
        states=states,
        table=table,
        metrics=ProcessorMetrics(registry),
        metrics_registry=registry,
    )
