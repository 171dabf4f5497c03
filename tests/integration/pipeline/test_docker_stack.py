"""The same end-to-end scenario on the production parts: Apache Kafka, Confluent Schema Registry and
PostgreSQL in containers (testcontainers). Skipped cleanly where no Docker engine runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.pipeline.test_dev_e2e import running_dev, sample_receipt_scenario
from tests.support.containers import production_parts

pytestmark = [pytest.mark.integration, pytest.mark.docker]


@pytest.fixture(scope="module")
def parts() -> Iterator[dict[str, str]]:
    with production_parts(postgres=True) as found:
        yield found


def test_sample_delivery_receipt_flows_through_kafka_registry_and_postgres(
    parts: dict[str, str], tmp_path: Path
) -> None:
    with running_dev(tmp_path, **parts) as running:
        sample_receipt_scenario(*running, tmp_path)
