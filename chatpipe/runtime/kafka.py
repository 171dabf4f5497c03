"""Every Kafka client's configuration, built from the settings in one place.

librdkafka clients (confluent-kafka's Producer, Consumer, AdminClient) take `producer`, `consumer` or
`admin`; Faust (and the aiokafka clients it makes) takes `faust_credentials`. Whatever reaches a cluster
(bootstrap servers, security protocol, SASL, the CA file, the operator's extra properties) is set here,
so one setting reaches every client: ingest, the processor (its own producers and Faust's), the sink, the
reconciler, replay, topic creation and `chatpipe dev`. No other module of chatpipe writes
"bootstrap.servers" or hands a client a dict of its own (tests/unit/test_kafka.py checks).

Precedence, lowest first: the connection (`common`), the kind's defaults, the caller's `overrides` (each
client's own values: acks, linger, client ids, ...), then `CHATPIPE_KAFKA_CLIENT_CONFIG` (the operator's
escape hatch; it cannot name the connection, group or client ids: `specs.RESERVED_KAFKA_PROPERTIES`).
With none of the Kafka security settings set, a client's configuration is what it was before this module.

Pure: no I/O, but `faust_credentials`, which reads the CA file into an SSL context.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from chatpipe.runtime.specs import parse_kafka_properties

if TYPE_CHECKING:
    from faust.types.auth import CredentialsT

    from chatpipe.runtime.config import Settings


def common(settings: Settings) -> dict[str, Any]:
    """What every librdkafka client needs to reach the cluster: bootstrap servers and security."""
    config: dict[str, Any] = {"bootstrap.servers": settings.kafka_bootstrap}
    protocol = settings.kafka_security_protocol
    if protocol != "PLAINTEXT":
        config["security.protocol"] = protocol
    if protocol.startswith("SASL_"):
        config["sasl.mechanism"] = settings.kafka_sasl_mechanism
        config["sasl.username"] = settings.kafka_sasl_username
        config["sasl.password"] = settings.kafka_sasl_password
    if settings.kafka_ssl_ca_location is not None:
        config["ssl.ca.location"] = str(settings.kafka_ssl_ca_location)
    return config


def _build(settings: Settings, defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    return {
        **common(settings),
        **defaults,
        **overrides,
        **parse_kafka_properties(settings.kafka_client_config),
    }


def producer(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """A producer: acks from every in-sync replica, idempotent unless CHATPIPE_KAFKA_IDEMPOTENCE=0.

    Dotted librdkafka names go through a dict: `producer(s, **{"linger.ms": 5, "client.id": "x"})`."""
    defaults = {"enable.idempotence": settings.kafka_idempotence, "acks": "all"}
    return _build(settings, defaults, overrides)


def consumer(settings: Settings, group: str, **overrides: Any) -> dict[str, Any]:
    """A consumer of consumer group `group`; chatpipe commits its offsets itself (no auto-commit)."""
    return _build(settings, {"group.id": group, "enable.auto.commit": False}, overrides)


def admin(settings: Settings) -> dict[str, Any]:
    """An admin client (topic creation)."""
    return _build(settings, {}, {})


def faust_credentials(settings: Settings) -> CredentialsT | None:
    """Faust's `broker_credentials` for the same security (Faust hands it to its aiokafka clients); None on
    PLAINTEXT. TLS verifies the brokers against the CA file when set, else the system's CAs.

    The extra librdkafka properties have no aiokafka equivalent: they do not reach Faust's own clients."""
    from faust.auth import SASLCredentials, SSLCredentials

    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = None
    if protocol.endswith("SSL"):
        ca = settings.kafka_ssl_ca_location
        context = ssl.create_default_context(cafile=None if ca is None else str(ca))
    if protocol == "SSL":
        return SSLCredentials(context)
    return SASLCredentials(
        username=settings.kafka_sasl_username,
        password=settings.kafka_sasl_password,
        ssl_context=context,
        mechanism=settings.kafka_sasl_mechanism,
    )
