"""Avro in the Confluent wire format: magic byte 0, 4-byte big-endian schema id, schemaless Avro body.

A `TopicCodec` registers its topic's value schema once (TopicNameStrategy subject `<topic>-value`),
then encodes and decodes with fastavro's schemaless writer/reader on parsed schemas. Writer schemas
of incoming records are fetched by id once and cached, so any registered version of a subject can be
read with the current reader schema (schema resolution). One HTTP call per schema, never per record.

Fast path (`schemas.fastpath`): the codec's own schema is also compiled once into a writer and a reader
that produce fastavro's exact bytes and values several times faster. Encoding tries the compiled writer
first and hands anything it does not take (a missing field to default, an int timestamp, a naive datetime,
a bad value) to fastavro, which encodes it or raises its own error; records written with the codec's own
schema are read by the compiled reader, malformed ones and every other writer schema (resolution) by
fastavro. `fast=False` uses fastavro alone.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import threading
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import fastavro
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from schemas import fastpath, mapping
from schemas.catalog import (
    CONVERSATIONS,
    INBOUND,
    INBOUND_BY_CONVERSATION,
    INGEST_DLQ,
    MESSAGE_STATE,
    MESSAGE_STEPS,
    PROCESSOR_DLQ,
    RECEIPTS,
    SINK_DLQ,
    STATUS_EVENTS,
    TopicSpec,
    load_schema,
)
from schemas.errors import InvalidEvent, SchemaError, TransientError

log = logging.getLogger(__name__)

MAGIC = 0
_HEADER = struct.Struct(">bI")

T = TypeVar("T")


class Registry:
    """A cached view of a Confluent-compatible Schema Registry.

    Thread-safe; every schema is registered or fetched at most once per process.
    """

    def __init__(self, url: str, client: SchemaRegistryClient | None = None) -> None:
        self.url = url
        self._client = client or SchemaRegistryClient({"url": url})
        self._by_id: dict[int, Any] = {}
        self._ids: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def register(self, subject: str, schema_text: str) -> int:
        key = (subject, schema_text)
        if key in self._ids:
            return self._ids[key]
        with self._lock:
            if key not in self._ids:
                try:
                    schema_id = self._client.register_schema(subject, Schema(schema_text, "AVRO"))
                except SchemaRegistryError as exc:
                    if exc.http_status_code == 409:
                        message = f"{subject}: incompatible with the registered schema: {exc}"
                        raise SchemaError(message) from exc
                    raise TransientError(f"schema registry {self.url}: {exc}") from exc
                except Exception as exc:  # connection errors come as httpx exceptions
                    raise TransientError(f"schema registry {self.url} unreachable: {exc}") from exc
                self._ids[key] = schema_id
                self._by_id.setdefault(schema_id, fastavro.parse_schema(json.loads(schema_text)))
                log.info("registered schema subject=%s id=%d", subject, schema_id)
        return self._ids[key]

    def writer_schema(self, schema_id: int) -> Any:
        parsed = self._by_id.get(schema_id)
        if parsed is not None:
            return parsed
        with self._lock:
            if schema_id not in self._by_id:
                try:
                    schema = self._client.get_schema(schema_id)
                except SchemaRegistryError as exc:
                    if exc.http_status_code == 404:
                        raise InvalidEvent(f"unknown schema id {schema_id}", code=40403) from exc
                    raise TransientError(f"schema registry {self.url}: {exc}") from exc
                except Exception as exc:
                    raise TransientError(f"schema registry {self.url} unreachable: {exc}") from exc
                self._by_id[schema_id] = fastavro.parse_schema(json.loads(schema.schema_str))
        return self._by_id[schema_id]


class TopicCodec(Generic[T]):
    """Encode/decode one topic's values between core dataclasses and Confluent-framed Avro."""

    def __init__(
        self,
        registry: Registry,
        spec: TopicSpec,
        to_dict: Callable[[T], dict[str, Any]],
        from_dict: Callable[[dict[str, Any]], T],
        *,
        fast: bool = True,
        build: Mapping[str, fastpath.Build] | None = None,
    ) -> None:
        """`build`: objects straight from the compiled reader for `decode` (see `fastpath.compile_reader`);
        must give what `from_dict` gives for the same record (the codec tests check it per topic)."""
        self.spec = spec
        self._registry = registry
        self._to_dict = to_dict
        self._from_dict = from_dict
        self._schema_text = load_schema(spec.schema_file)
        schema = json.loads(self._schema_text)
        self.schema: dict[str, Any] = schema  # the parsed .avsc this codec writes
        self._reader = fastavro.parse_schema(schema)
        self._schema_id: int | None = None
        self._header = b""
        # schema id -> (writer schema, reader schema or None when the writer is this very schema,
        #               compiled reader when the writer is this very schema and it compiled)
        self._resolutions: dict[int, tuple[Any, Any, fastpath.Reader | None]] = {}
        self._fast_write: fastpath.Writer | None = None
        self._fast_read: fastpath.Reader | None = None
        self._fast_build: fastpath.Reader | None = None
        self._fast_write_obj: fastpath.Writer | None = None
        if fast:
            try:
                self._fast_write = fastpath.compile_writer(schema)
                self._fast_read = fastpath.compile_reader(schema)
            except fastpath.Unsupported as exc:
                log.info("%s: fastavro only (%s)", spec.name, exc)
                self._fast_write = self._fast_read = None
            if build and self._fast_read is not None:
                try:
                    self._fast_build = fastpath.compile_reader(schema, build=build)
                    self._fast_write_obj = fastpath.compile_writer(schema, build=build)
                except fastpath.Unsupported as exc:
                    log.warning("%s: objects via dicts (%s)", spec.name, exc)
                    self._fast_build = self._fast_write_obj = None

    @property
    def schema_id(self) -> int:
        if self._schema_id is None:
            self._schema_id = self._registry.register(self.spec.subject, self._schema_text)
            self._header = _HEADER.pack(MAGIC, self._schema_id)
        return self._schema_id

    @property
    def header(self) -> bytes:
        """The Confluent framing (magic byte, schema id) that starts every value `encode` returns."""
        if self._schema_id is None:
            _ = self.schema_id
        return self._header

    def encode(self, value: T) -> bytes:
        write = self._fast_write_obj
        if write is not None:  # straight from the object's attributes: no dict built
            if self._schema_id is None:
                _ = self.schema_id
            out = bytearray(self._header)
            try:
                write(value, out)
            except Exception:  # the dict path below encodes it (fastavro) or raises its error
                pass
            else:
                return bytes(out)
        return self.encode_dict(self._to_dict(value))

    def encode_dict(self, record: dict[str, Any]) -> bytes:
        if self._schema_id is None:
            _ = self.schema_id
        write = self._fast_write
        if write is not None:
            out = bytearray(self._header)
            try:
                write(record, out)
            except Exception:  # fastavro below encodes it or raises its own error
                pass
            else:
                return bytes(out)
        buf = io.BytesIO()
        buf.write(self._header)
        fastavro.schemaless_writer(buf, self._reader, record)
        return buf.getvalue()

    def decode_dict(self, data: bytes) -> dict[str, Any]:
        if len(data) < 5 or data[0] != MAGIC:
            raise InvalidEvent(f"{self.spec.name}: not Confluent-framed Avro (magic byte)", raw=data)
        _, schema_id = _HEADER.unpack_from(data)
        resolution = self._resolutions.get(schema_id)
        if resolution is None:
            resolution = self._resolution(schema_id)
        writer, reader, fast = resolution
        if fast is not None:
            try:
                decoded, _ = fast(data if data.__class__ is bytes else bytes(data), 5)
            except Exception:  # malformed: fastavro below raises its own error
                pass
            else:
                return decoded
        try:
            record = fastavro.schemaless_reader(io.BytesIO(data[5:]), writer, reader)
        except Exception as exc:
            raise InvalidEvent(f"{self.spec.name}: undecodable Avro body: {exc}", raw=data) from exc
        return record  # type: ignore[return-value]

    def _resolution(self, schema_id: int) -> tuple[Any, Any, fastpath.Reader | None]:
        # fastavro skips schema resolution when writer == reader, but it compares the two (deep dict
        # equality, about as costly as decoding a record) on every call: compare once per schema id instead.
        writer = self._registry.writer_schema(schema_id)
        same = writer == self._reader
        resolution = (writer, None if same else self._reader, self._fast_read if same else None)
        self._resolutions[schema_id] = resolution
        return resolution

    def decode(self, data: bytes) -> T:
        fast = self._fast_build
        if fast is not None and len(data) >= 5 and data[0] == MAGIC:
            _, schema_id = _HEADER.unpack_from(data)
            if (self._resolutions.get(schema_id) or self._resolution(schema_id))[2] is not None:
                try:  # written with this very schema: objects straight from the bytes
                    value, _ = fast(data if data.__class__ is bytes else bytes(data), 5)
                except Exception:  # malformed: the dict path below raises InvalidEvent
                    pass
                else:
                    return value  # type: ignore[no-any-return]
        return self._from_dict(self.decode_dict(data))


class Codecs:
    """All of chatpipe's topic codecs over one registry."""

    def __init__(self, registry: Registry, *, fast: bool = True) -> None:
        """`fast=False`: fastavro alone, without the compiled fast path (same bytes and values, slower)."""
        self.registry = registry
        m = mapping

        def codec(spec: TopicSpec, to_dict: Any, from_dict: Any, build: Any = None) -> TopicCodec[Any]:
            return TopicCodec(registry, spec, to_dict, from_dict, fast=fast, build=build)

        self.receipts = codec(RECEIPTS, m.receipt_to_dict, m.receipt_from_dict, m.RECEIPT_BUILD)
        self.inbound = codec(INBOUND, m.inbound_to_dict, m.inbound_from_dict)
        self.ingest_dlq = codec(INGEST_DLQ, m.dead_letter_to_dict, m.dead_letter_from_dict)
        self.sink_dlq = codec(SINK_DLQ, m.dead_letter_to_dict, m.dead_letter_from_dict)
        self.processor_dlq = codec(PROCESSOR_DLQ, m.dead_letter_to_dict, m.dead_letter_from_dict)
        self.state = codec(MESSAGE_STATE, m.state_to_dict, m.state_from_dict, m.STATE_BUILD)
        self.steps = codec(
            MESSAGE_STEPS, m.message_step_to_dict, m.message_step_from_dict, m.MESSAGE_STEP_BUILD
        )
        self.events = codec(
            STATUS_EVENTS,
            m.status_event_record_to_dict,
            m.status_event_record_from_dict,
            m.STATUS_EVENT_RECORD_BUILD,
        )
        self.inbound_by_conversation = codec(INBOUND_BY_CONVERSATION, m.inbound_to_dict, m.inbound_from_dict)
        self.conversations = codec(CONVERSATIONS, m.conversation_to_dict, m.conversation_from_dict)

    def all(self) -> tuple[TopicCodec[Any], ...]:
        return (
            self.receipts,
            self.inbound,
            self.ingest_dlq,
            self.sink_dlq,
            self.processor_dlq,
            self.state,
            self.steps,
            self.events,
            self.inbound_by_conversation,
            self.conversations,
        )

    def register_all(self) -> dict[str, int]:
        """Register every subject now (fail fast at start-up rather than on the first record)."""
        return {c.spec.subject: c.schema_id for c in self.all()}

    @classmethod
    def connect(cls, url: str, *, fast: bool = True) -> Codecs:
        return cls(Registry(url), fast=fast)
