"""Shared fixtures: the real embedded broker (Tansu), the embedded schema registry, PostgreSQL.

Nothing here is a mock: integration tests talk to real processes on loopback ports.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from chatpipe.broker import free_port, start_tansu, wait_for_port

# Hypothesis's per-example deadline (200 ms) is a timed assertion: on a shared, loaded 2-core machine a
# correct example can take longer, and the test fails for the machine, not the code. No test here asserts
# time; performance is measured by bench/.
hypothesis_settings.register_profile("chatpipe", deadline=None)
hypothesis_settings.load_profile("chatpipe")

pytest_plugins = ["tests.support.postgres"]


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Tansu broker for the whole session with chatpipe's topics created; yields the bootstrap."""
    from chatpipe.runtime.topics import ensure_topics
    from tests.support.kafka import discard_broker

    port = free_port()
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    proc = start_tansu("127.0.0.1", port, log)
    bootstrap = f"127.0.0.1:{port}"
    try:
        ensure_topics(bootstrap, partitions=4)
        yield bootstrap
    finally:
        discard_broker(proc)


@pytest.fixture(scope="session")
def registry_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The embedded schema registry, served from a thread on a free port."""
    from chatpipe.runtime.serve import serve_in_thread
    from schemas.registry import create_registry_app

    storage = tmp_path_factory.mktemp("registry") / "registry.json"
    port = free_port()
    serve_in_thread(create_registry_app(storage), "127.0.0.1", port)
    wait_for_port("127.0.0.1", port)
    yield f"http://127.0.0.1:{port}"


@pytest.fixture()
def state_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / ".chatpipe"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`scripts/test` runs two workers), chaos tests share one worker: each measures
    the pipeline under a steady load and must not compete with another."""
    for item in items:
        if item.get_closest_marker("chaos") is not None:
            item.add_marker(pytest.mark.xdist_group("chaos"))
