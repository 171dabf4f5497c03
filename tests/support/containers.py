"""The production parts in containers (testcontainers), for the docker tier.

`production_parts()` starts Apache Kafka (Confluent image), Confluent Schema Registry and, on request,
PostgreSQL 15 on one network and yields the CHATPIPE_* settings that point at them. Without a Docker
engine it skips the test cleanly.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import httpx
import pytest

KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"
REGISTRY_IMAGE = "confluentinc/cp-schema-registry:7.6.0"
POSTGRES_IMAGE = "postgres:15"


def require_docker() -> None:
    docker = pytest.importorskip("docker")
    try:
        docker.from_env().ping()
    except Exception as exc:
        pytest.skip(f"no Docker engine: {exc}")


def _wait_for_registry(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/subjects", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{REGISTRY_IMAGE} did not start in {timeout:.0f}s")
        time.sleep(1)


@contextlib.contextmanager
def production_parts(postgres: bool = False) -> Iterator[dict[str, str]]:
    require_docker()
    from testcontainers.community.kafka import KafkaContainer
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.network import Network

    with Network() as network, contextlib.ExitStack() as stack:
        kafka = KafkaContainer(KAFKA_IMAGE).with_network(network).with_network_aliases("kafka")
        registry = (
            DockerContainer(REGISTRY_IMAGE)
            .with_network(network)
            .with_env("SCHEMA_REGISTRY_HOST_NAME", "schema-registry")
            .with_env("SCHEMA_REGISTRY_LISTENERS", "http://0.0.0.0:8081")
            .with_env("SCHEMA_REGISTRY_KAFKASTORE_BOOTSTRAP_SERVERS", "PLAINTEXT://kafka:9092")
            .with_exposed_ports(8081)
        )
        stack.enter_context(kafka)
        stack.enter_context(registry)
        url = f"http://{registry.get_container_host_ip()}:{registry.get_exposed_port(8081)}"
        _wait_for_registry(url)
        parts = {
            "CHATPIPE_KAFKA_BOOTSTRAP": kafka.get_bootstrap_server(),
            "CHATPIPE_SCHEMA_REGISTRY_URL": url,
        }
        if postgres:
            from testcontainers.postgres import PostgresContainer

            db = stack.enter_context(PostgresContainer(POSTGRES_IMAGE, driver=None))
            parts["CHATPIPE_STORE_URL"] = db.get_connection_url()
        yield parts
