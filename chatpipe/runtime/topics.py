"""Create chatpipe's topics explicitly (partitions, cleanup policy) before any client uses them.

Auto-creation is never relied on: Tansu auto-creates with 4 partitions, which breaks Faust's
co-partitioning, and production clusters usually disable it.
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from chatpipe.runtime import kafka
from chatpipe.runtime.config import Settings
from schemas.catalog import TOPICS

log = logging.getLogger(__name__)

PROCESSOR_APP_ID = "chatpipe-processor"
#: Faust's own topics for the processor app (changelog of the state table, leader assignor).
PROCESSOR_INTERNAL_TOPICS: tuple[tuple[str, bool], ...] = (
    (f"{PROCESSOR_APP_ID}-message_state-changelog", True),
    (f"{PROCESSOR_APP_ID}-conversations-changelog", True),
    (f"{PROCESSOR_APP_ID}-__assignor-__leader", False),
)


def wanted_topics(partitions: int, replication: int) -> list[NewTopic]:
    topics: list[NewTopic] = []
    for spec in TOPICS:
        config = {"cleanup.policy": "compact"} if spec.compacted else {}
        topics.append(NewTopic(spec.name, partitions, replication, config=config))
    for name, compacted in PROCESSOR_INTERNAL_TOPICS:
        n = 1 if name.endswith("__leader") else partitions
        topics.append(
            NewTopic(name, n, replication, config={"cleanup.policy": "compact"} if compacted else {})
        )
    return topics


def ensure_topics(
    settings: Settings | str, partitions: int, replication: int = 1, timeout: float = 30.0
) -> list[str]:
    """Create every missing topic; return the names created. Existing topics are left as they are,
    but a partition count different from `partitions` is an error (co-partitioning would break).

    `settings` says how to reach the cluster (`chatpipe.runtime.kafka.admin`); a bare bootstrap string is
    a PLAINTEXT cluster with no other client setting (tests and benchmarks on the embedded broker)."""
    if isinstance(settings, str):
        settings = Settings(kafka_bootstrap=settings)
    bootstrap = settings.kafka_bootstrap
    admin = AdminClient(kafka.admin(settings))
    deadline = time.monotonic() + timeout
    while True:
        try:
            existing = admin.list_topics(timeout=5).topics
            break
        except KafkaException as exc:
            if time.monotonic() > deadline:
                raise
            log.info("waiting for broker %s: %s", bootstrap, exc)
            time.sleep(0.5)
    created: list[str] = []
    missing = [t for t in wanted_topics(partitions, replication) if t.topic not in existing]
    for t in wanted_topics(partitions, replication):
        meta = existing.get(t.topic)
        if meta is not None and len(meta.partitions) != t.num_partitions:
            raise RuntimeError(
                f"topic {t.topic} has {len(meta.partitions)} partitions, chatpipe expects {t.num_partitions}"
            )
    if missing:
        for name, fut in admin.create_topics(missing, operation_timeout=timeout).items():
            try:
                fut.result()
                created.append(name)
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise
    log.info("topics ready created=%s", ",".join(created) or "-")
    return created
