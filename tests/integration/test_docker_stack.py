"""The same end-to-end scenario on the production parts: Apache Kafka, Confluent Schema Registry and
PostgreSQL in containers (testcontainers). Skipped cleanly where no Docker engine runs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.test_dev_e2e import running_dev, sample_receipt_scenario

pytestmark = [pytest.mark.integration, pytest.mark.docker]


@pytest.fixture(scope="module")
def production_parts() -> Iterator[dict[str, str]]:
    docker = pytest.importorskip("docker")
    try:
        docker.from_env().ping()
    except Exception as exc:
        pytest.skip(f"no Docker engine: {exc}")
    from testcontainers.community.kafka import KafkaContainer
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.network import Network
    from testcontainers.postgres import PostgresContainer

    with Network() as network:
        kafka = (
            KafkaContainer("confluentinc/cp-kafka:7.6.0").with_network(network).with_network_aliases("kafka")
        )
        registry = (
            DockerContainer("confluentinc/cp-schema-registry:7.6.0")
            .with_network(network)
            .with_env("SCHEMA_REGISTRY_HOST_NAME", "schema-registry")
            .with_env("SCHEMA_REGISTRY_LISTENERS", "http://0.0.0.0:8081")
            .with_env("SCHEMA_REGISTRY_KAFKASTORE_BOOTSTRAP_SERVERS", "PLAINTEXT://kafka:9092")
            .with_exposed_ports(8081)
        )
        postgres = PostgresContainer("postgres:15", driver=None)
        with kafka, registry, postgres:
            url = f"http://{registry.get_container_host_ip()}:{registry.get_exposed_port(8081)}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{url}/subjects", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("cp-schema-registry did not start")
                time.sleep(1)
            yield {
                "CHATPIPE_KAFKA_BOOTSTRAP": kafka.get_bootstrap_server(),
                "CHATPIPE_SCHEMA_REGISTRY_URL": url,
                "CHATPIPE_STORE_URL": postgres.get_connection_url(),
            }


def test_sample_delivery_receipt_flows_through_kafka_registry_and_postgres(
    production_parts: dict[str, str], tmp_path: Path
) -> None:
    with running_dev(tmp_path, **production_parts) as running:
        sample_receipt_scenario(*running, tmp_path)
