"""Contract tests: the embedded registry driven through confluent-kafka's own client and serdes.

The server runs on a real loopback port in a background thread (the official client is synchronous), so
every request goes through httpx exactly as it would against a Confluent registry.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient, SchemaRegistryError
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.schema_registry_client import ConfigCompatibilityLevel, ServerConfig
from confluent_kafka.serialization import MessageField, SerializationContext

from schemas.registry import create_registry_app

pytestmark = pytest.mark.integration

V1 = {
    "type": "record",
    "name": "MessageState",
    "namespace": "chatpipe",
    "fields": [
        {"name": "umid", "type": "string"},
        {"name": "state", "type": {"type": "enum", "name": "State", "symbols": ["QUEUED", "SENT"]}},
    ],
}
V2 = {**V1, "fields": [*V1["fields"], {"name": "errorCode", "type": ["null", "int"], "default": None}]}
V2_REQUIRED = {**V1, "fields": [*V1["fields"], {"name": "errorCode", "type": "int"}]}


def avro(schema: dict, **kwargs: object) -> Schema:
    return Schema(json.dumps(schema, **kwargs), "AVRO")


class RegistryServer:
    """The registry app on 127.0.0.1:<free port> in its own thread and event loop."""

    def __init__(self, storage: Path) -> None:
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(create_registry_app(storage))
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("registry did not start")
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", 0).start())
        started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


@pytest.fixture
def start_registry(tmp_path: Path) -> Iterator[Callable[[], RegistryServer]]:
    servers: list[RegistryServer] = []

    def start() -> RegistryServer:
        server = RegistryServer(tmp_path / "registry" / "state.json")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start_registry: Callable[[], RegistryServer]) -> RegistryServer:
    return start_registry()


@pytest.fixture
def client(server: RegistryServer) -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": server.url})


def fresh(server: RegistryServer) -> SchemaRegistryClient:
    """A client with empty caches, so that the next call really reaches the server."""
    return SchemaRegistryClient({"url": server.url})


def sr_error(call: Callable[[], object]) -> SchemaRegistryError:
    with pytest.raises(SchemaRegistryError) as info:
        call()
    return info.value


def test_register_is_idempotent_by_canonical_form(
    server: RegistryServer, client: SchemaRegistryClient
) -> None:
    schema_id = client.register_schema("chat-value", avro(V1))
    reformatted = avro(dict(reversed(list(V1.items()))), indent=4)  # other attribute order and whitespace
    assert fresh(server).register_schema("chat-value", reformatted) == schema_id
    assert fresh(server).get_versions("chat-value") == [1]
    fetched = fresh(server).get_schema(schema_id)
    assert json.loads(fetched.schema_str) == V1
    assert fetched.schema_type == "AVRO"


def test_same_schema_in_two_subjects_shares_one_id(client: SchemaRegistryClient) -> None:
    first = client.register_schema("a-value", avro(V1))
    second = client.register_schema("b-value", avro(V2))
    assert client.register_schema("c-value", avro(V1)) == first != second
    assert sorted(client.get_subjects()) == ["a-value", "b-value", "c-value"]
    pairs = {(v.subject, v.version) for v in client.get_schema_versions(first)}
    assert pairs == {("a-value", 1), ("c-value", 1)}


def test_lookup_schema(server: RegistryServer, client: SchemaRegistryClient) -> None:
    schema_id = client.register_schema("chat-value", avro(V1))
    found = fresh(server).lookup_schema("chat-value", avro(V1, indent=2))
    assert (found.subject, found.version, found.schema_id) == ("chat-value", 1, schema_id)

    err = sr_error(lambda: fresh(server).lookup_schema("chat-value", avro(V2)))
    assert (err.http_status_code, err.error_code) == (404, 40403)
    err = sr_error(lambda: fresh(server).lookup_schema("nobody-value", avro(V1)))
    assert (err.http_status_code, err.error_code) == (404, 40401)


def test_versions_latest_and_explicit(server: RegistryServer, client: SchemaRegistryClient) -> None:
    id1 = client.register_schema("chat-value", avro(V1))
    id2 = client.register_schema("chat-value", avro(V2))
    assert id2 != id1
    latest = fresh(server).get_latest_version("chat-value")
    assert (latest.version, latest.schema_id) == (2, id2)
    assert json.loads(latest.schema.schema_str) == V2
    first = fresh(server).get_version("chat-value", 1)
    assert (first.version, first.schema_id, first.subject) == (1, id1, "chat-value")

    err = sr_error(lambda: fresh(server).get_version("chat-value", 7))
    assert (err.http_status_code, err.error_code) == (404, 40402)
    err = sr_error(lambda: fresh(server).get_latest_version("nobody-value"))
    assert (err.http_status_code, err.error_code) == (404, 40401)
    err = sr_error(lambda: fresh(server).get_version("chat-value", 0))
    assert (err.http_status_code, err.error_code) == (422, 42202)

    raw = httpx.get(f"{server.url}/subjects/chat-value/versions/1/schema")
    assert raw.status_code == 200 and raw.json() == V1


def test_incompatible_registration_is_409_naming_the_field(client: SchemaRegistryClient) -> None:
    client.register_schema("chat-value", avro(V1))
    err = sr_error(lambda: client.register_schema("chat-value", avro(V2_REQUIRED)))
    assert (err.http_status_code, err.error_code) == (409, 409)
    assert "errorCode" in err.error_message
    assert client.get_versions("chat-value") == [1]


def test_test_compatibility(server: RegistryServer, client: SchemaRegistryClient) -> None:
    client.register_schema("chat-value", avro(V1))
    assert client.test_compatibility("chat-value", avro(V2)) is True
    assert client.test_compatibility("chat-value", avro(V2_REQUIRED)) is False
    assert client.test_compatibility("chat-value", avro(V2_REQUIRED), version=1) is False

    verbose = httpx.post(
        f"{server.url}/compatibility/subjects/chat-value/versions/latest?verbose=true",
        json={"schema": json.dumps(V2_REQUIRED)},
    )
    assert verbose.status_code == 200
    body = verbose.json()
    assert body["is_compatible"] is False
    assert any("errorCode" in message for message in body["messages"])

    err = sr_error(lambda: client.test_compatibility("chat-value", avro(V2), version=5))
    assert err.error_code == 40402
    # nothing registered yet: anything is compatible with "latest"
    assert client.test_compatibility("empty-value", avro(V2_REQUIRED)) is True


def test_config_global_and_per_subject(client: SchemaRegistryClient) -> None:
    assert client.get_config().compatibility_level == ConfigCompatibilityLevel.BACKWARD
    err = sr_error(lambda: client.get_config("chat-value"))
    assert (err.http_status_code, err.error_code) == (404, 40408)

    client.register_schema("chat-value", avro(V1))
    client.set_config("chat-value", ServerConfig(compatibility=ConfigCompatibilityLevel.FORWARD))
    assert client.get_config("chat-value").compatibility_level == ConfigCompatibilityLevel.FORWARD
    assert client.get_compatibility() == "BACKWARD"
    # FORWARD: the old schema must read the new one; adding a required field is fine, dropping one is not
    assert client.register_schema("chat-value", avro(V2_REQUIRED)) > 0
    err = sr_error(lambda: client.register_schema("chat-value", avro({**V1, "fields": V1["fields"][:1]})))
    assert err.http_status_code == 409 and "state" in err.error_message

    client.set_config(config=ServerConfig(compatibility=ConfigCompatibilityLevel.NONE))
    assert client.get_config().compatibility_level == ConfigCompatibilityLevel.NONE
    assert client.delete_config("chat-value").compatibility_level == ConfigCompatibilityLevel.FORWARD
    # the subject now follows the global NONE
    assert client.register_schema("chat-value", avro({**V1, "fields": V1["fields"][:1]})) > 0

    err = sr_error(lambda: client.set_compatibility("chat-value", "SIDEWAYS"))
    assert (err.http_status_code, err.error_code) == (422, 42203)


def test_delete_subject_soft_then_permanent(server: RegistryServer, client: SchemaRegistryClient) -> None:
    id1 = client.register_schema("chat-value", avro(V1))
    client.register_schema("chat-value", avro(V2))
    assert client.delete_subject("chat-value") == [1, 2]
    assert "chat-value" not in client.get_subjects()
    assert "chat-value" in client.get_subjects(deleted=True)
    err = sr_error(lambda: fresh(server).get_latest_version("chat-value"))
    assert err.error_code == 40401
    assert json.loads(fresh(server).get_schema(id1).schema_str) == V1  # soft-deleted ids still resolve
    err = sr_error(lambda: client.delete_subject("chat-value"))
    assert err.error_code == 40404

    assert client.delete_subject("chat-value", permanent=True) == [1, 2]
    assert "chat-value" not in client.get_subjects(deleted=True)
    err = sr_error(lambda: fresh(server).get_schema(id1))
    assert (err.http_status_code, err.error_code) == (404, 40403)
    # registering again starts the subject over, with the same id for the same schema
    again = fresh(server).register_schema_full_response("chat-value", avro(V1))
    assert again.schema_id == id1
    assert fresh(server).get_latest_version("chat-value").version == 1


def test_delete_version(server: RegistryServer, client: SchemaRegistryClient) -> None:
    client.register_schema("chat-value", avro(V1))
    id2 = client.register_schema("chat-value", avro(V2))
    err = sr_error(lambda: client.delete_version("chat-value", 2, permanent=True))
    assert err.error_code == 40407
    assert client.delete_version("chat-value", 1) == 1
    assert fresh(server).get_versions("chat-value") == [2]
    assert fresh(server).get_versions("chat-value", deleted=True) == [1, 2]
    err = sr_error(lambda: client.delete_version("chat-value", 1))
    assert err.error_code == 40406
    assert fresh(server).get_latest_version("chat-value").schema_id == id2


def test_invalid_and_unsupported_schemas_are_422(
    server: RegistryServer, client: SchemaRegistryClient
) -> None:
    bad = [
        Schema('{"type": "record", "name": "X", "fields": [{"name": "a", "type": "nope"}]}', "AVRO"),
        Schema("{not json", "AVRO"),
        Schema('{"type": "enum", "name": "E"}', "AVRO"),
        Schema('syntax = "proto3";', "PROTOBUF"),
    ]
    for schema in bad:
        err = sr_error(lambda schema=schema: fresh(server).register_schema("chat-value", schema))
        assert (err.http_status_code, err.error_code) == (422, 42201), schema
    with_refs = httpx.post(
        f"{server.url}/subjects/chat-value/versions",
        json={"schema": json.dumps(V1), "references": [{"name": "x", "subject": "y", "version": 1}]},
    )
    assert with_refs.status_code == 422 and with_refs.json()["error_code"] == 42201
    assert client.get_subjects() == []


def test_schema_lookups_by_id(server: RegistryServer, client: SchemaRegistryClient) -> None:
    assert client.get_schema_types() == ["AVRO"]
    err = sr_error(lambda: client.get_schema(999))
    assert (err.http_status_code, err.error_code) == (404, 40403)
    schema_id = client.register_schema("chat-value", avro(V1))
    assert client.get_subjects_by_schema_id(schema_id) == ["chat-value"]
    root = httpx.get(f"{server.url}/")
    assert root.status_code == 200 and root.json() == {}
    assert root.headers["content-type"].startswith("application/vnd.schemaregistry.v1+json")


def test_avro_serde_round_trip(client: SchemaRegistryClient) -> None:
    serializer = AvroSerializer(client, json.dumps(V1))
    deserializer = AvroDeserializer(client)
    ctx = SerializationContext("chat", MessageField.VALUE)
    record = {"umid": "6c1a9e2e-0000-4000-8000-000000000001", "state": "SENT"}

    data = serializer(record, ctx)

    registered = client.get_latest_version("chat-value")
    assert data[0] == 0 and int.from_bytes(data[1:5], "big") == registered.schema_id
    assert deserializer(data, ctx) == record


def test_state_survives_restart(start_registry: Callable[[], RegistryServer], tmp_path: Path) -> None:
    first = start_registry()
    client = fresh(first)
    id1 = client.register_schema("chat-value", avro(V1))
    id2 = client.register_schema("chat-value", avro(V2))
    client.set_config("chat-value", ServerConfig(compatibility=ConfigCompatibilityLevel.FULL))
    first.stop()

    second = start_registry()
    client = fresh(second)
    assert json.loads(client.get_schema(id1).schema_str) == V1
    latest = client.get_latest_version("chat-value")
    assert (latest.version, latest.schema_id) == (2, id2)
    assert client.register_schema("chat-value", avro(V2)) == id2
    assert client.get_config("chat-value").compatibility_level == ConfigCompatibilityLevel.FULL
    id3 = client.register_schema("other-value", avro({**V1, "name": "Other"}))
    assert id3 not in (id1, id2)
    assert [p.name for p in (tmp_path / "registry").iterdir()] == ["state.json"]  # no temp files left
