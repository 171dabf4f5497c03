"""chatpipe/runtime/kafka.py: one builder for every Kafka client's configuration.

Each kind of client built from settings with SASL_SSL carries the security settings; with the defaults
every client's configuration is what it was before the builder (behaviour unchanged); overrides beat the
builder's defaults and the operator's extra properties beat both; bad extra properties are refused at
start; and no module but the builder writes "bootstrap.servers" or hands a client a dict of its own.
"""

from __future__ import annotations

import ast
import ssl
from pathlib import Path

import certifi
import pytest
from faust.auth import SASLCredentials, SSLCredentials

from chatpipe.runtime import kafka
from chatpipe.runtime.config import Settings
from ingest.publisher import producer_config
from processors.app import faust_settings
from sinks.worker import consumer_config

ROOT = Path(__file__).resolve().parents[4]
PACKAGES = ("chatpipe", "ingest", "processors", "sinks", "schemas")
SECURITY = {
    "security.protocol": "SASL_SSL",
    "sasl.mechanism": "SCRAM-SHA-512",
    "sasl.username": "chatpipe",
    "sasl.password": "s3cret",
    "ssl.ca.location": certifi.where(),
}


def sasl_ssl(**more: str) -> Settings:
    env = {
        "CHATPIPE_KAFKA_BOOTSTRAP": "b1:9093,b2:9093",
        "CHATPIPE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "CHATPIPE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "CHATPIPE_KAFKA_SASL_USERNAME": "chatpipe",
        "CHATPIPE_KAFKA_SASL_PASSWORD": "s3cret",
        "CHATPIPE_KAFKA_SSL_CA_LOCATION": certifi.where(),
        **more,
    }
    return Settings.from_env(env)


def test_every_kind_of_client_carries_the_security_settings() -> None:
    s = sasl_ssl()
    configs = {
        "producer": kafka.producer(s),
        "consumer": kafka.consumer(s, "g"),
        "admin": kafka.admin(s),
        "ingest/reconciler producer": producer_config(s),
        "sink consumer": consumer_config(s),
    }
    for name, config in configs.items():
        assert config["bootstrap.servers"] == "b1:9093,b2:9093", name
        assert {k: config[k] for k in SECURITY} == SECURITY, name


def test_faust_gets_the_same_security_as_credentials() -> None:
    creds = faust_settings(sasl_ssl())["broker_credentials"]
    assert isinstance(creds, SASLCredentials)
    assert (creds.protocol.value, creds.mechanism.value) == ("SASL_SSL", "SCRAM-SHA-512")
    assert (creds.username, creds.password) == ("chatpipe", "s3cret")
    assert creds.ssl_context is not None and creds.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert creds.ssl_context.get_ca_certs()  # the CA file was loaded

    plain_sasl = kafka.faust_credentials(
        Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="u", kafka_sasl_password="p")
    )
    assert isinstance(plain_sasl, SASLCredentials) and plain_sasl.protocol.value == "SASL_PLAINTEXT"
    assert plain_sasl.ssl_context is None and plain_sasl.mechanism.value == "PLAIN"
    tls = kafka.faust_credentials(Settings(kafka_security_protocol="SSL"))
    assert isinstance(tls, SSLCredentials) and tls.protocol.value == "SSL"
    assert kafka.common(Settings(kafka_security_protocol="SSL"))["security.protocol"] == "SSL"
    assert "sasl.username" not in kafka.common(Settings(kafka_security_protocol="SSL"))


def test_default_settings_build_the_configurations_the_clients_had_before() -> None:
    s = Settings(kafka_bootstrap="127.0.0.1:9092")
    assert "broker_credentials" not in faust_settings(s)
    assert kafka.admin(s) == {"bootstrap.servers": "127.0.0.1:9092"}
    assert producer_config(s) == {
        "bootstrap.servers": "127.0.0.1:9092", "acks": "all", "enable.idempotence": True, "linger.ms": 2,
        "batch.num.messages": 10000, "compression.type": "none", "message.timeout.ms": 10000,
        "queue.buffering.max.messages": 200000, "socket.keepalive.enable": True,
        "reconnect.backoff.max.ms": 1000,
    }  # fmt: skip
    assert consumer_config(s, "chatpipe-sink") == {
        "bootstrap.servers": "127.0.0.1:9092", "group.id": "chatpipe-sink", "enable.auto.commit": False,
        "auto.offset.reset": "earliest", "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000,
        "fetch.wait.max.ms": 50, "partition.assignment.strategy": "cooperative-sticky",
    }  # fmt: skip
    off = s.replace(kafka_idempotence=False)
    assert kafka.producer(off, **{"client.id": "chatpipe-inbound-dlq"}) == {
        "bootstrap.servers": "127.0.0.1:9092", "enable.idempotence": False, "acks": "all",
        "client.id": "chatpipe-inbound-dlq",
    }  # fmt: skip
    # ingest's and the reconciler's producer follow CHATPIPE_KAFKA_IDEMPOTENCE too
    assert producer_config(off)["enable.idempotence"] is False
    assert producer_config(s)["enable.idempotence"] is True


def test_overrides_beat_the_defaults_and_the_extra_properties_beat_both() -> None:
    s = sasl_ssl()
    assert kafka.producer(s, acks="1", **{"linger.ms": 7})["acks"] == "1"
    assert kafka.producer(s, **{"linger.ms": 7})["linger.ms"] == 7
    assert kafka.consumer(s, "g", **{"enable.auto.commit": True})["enable.auto.commit"] is True
    assert producer_config(s, **{"compression.type": "lz4"})["compression.type"] == "lz4"

    extra = sasl_ssl(CHATPIPE_KAFKA_CLIENT_CONFIG="compression.type=zstd, socket.timeout.ms=30000")
    for config in (
        kafka.producer(extra, **{"compression.type": "lz4"}),
        producer_config(extra),
        kafka.consumer(extra, "g"),
        consumer_config(extra),
        kafka.admin(extra),
    ):
        assert config["compression.type"] == "zstd"
        assert config["socket.timeout.ms"] == "30000"
        assert config["security.protocol"] == "SASL_SSL"


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("compression.type", "name=value"),
        ("compression.type=", "name=value"),
        ("Compression.Type=zstd", "property name"),
        ("linger.ms=1,linger.ms=2", "twice"),
        ("bootstrap.servers=evil:9092", "set by chatpipe"),
        ("sasl.password=x", "set by chatpipe"),
        ("group.id=other", "set by chatpipe"),
        ("error_cb=x", "set by chatpipe"),
    ],
)
def test_bad_extra_properties_are_refused_at_start_naming_the_variable(spec: str, says: str) -> None:
    with pytest.raises(ValueError, match=f"CHATPIPE_KAFKA_CLIENT_CONFIG.*{says}"):
        Settings.from_env({"CHATPIPE_KAFKA_CLIENT_CONFIG": spec})


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"CHATPIPE_KAFKA_SECURITY_PROTOCOL": "SASL"}, "SECURITY_PROTOCOL must be one of"),
        ({"CHATPIPE_KAFKA_SASL_MECHANISM": "GSSAPI"}, "SASL_MECHANISM must be one of"),
        ({"CHATPIPE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "needs CHATPIPE_KAFKA_SASL_USERNAME"),
        ({"CHATPIPE_KAFKA_SASL_USERNAME": "u", "CHATPIPE_KAFKA_SASL_PASSWORD": "p"}, "need CHATPIPE_KAFKA"),
        ({"CHATPIPE_KAFKA_SSL_CA_LOCATION": "/ca.pem"}, "SSL_CA_LOCATION needs"),
    ],
)
def test_conflicting_security_settings_are_refused(env: dict[str, str], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Settings.from_env(env)


def test_the_password_comes_from_a_file_and_is_never_printed(tmp_path: Path) -> None:
    secret = tmp_path / "kafka-password"
    secret.write_text("from-a-file\n")
    env = {
        "CHATPIPE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "CHATPIPE_KAFKA_SASL_USERNAME": "u",
        "CHATPIPE_KAFKA_SASL_PASSWORD_FILE": str(secret),
    }
    s = Settings.from_env(env)
    assert kafka.common(s)["sasl.password"] == "from-a-file"
    assert "from-a-file" not in repr(s) and "kafka_sasl_password='***'" in repr(s)
    assert "s3cret" not in repr(sasl_ssl())
    with pytest.raises(ValueError, match="set one"):
        Settings.from_env({**env, "CHATPIPE_KAFKA_SASL_PASSWORD": "p"})
    with pytest.raises(ValueError, match=r"CHATPIPE_KAFKA_SASL_PASSWORD_FILE .*missing: No such file"):
        Settings.from_env({**env, "CHATPIPE_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        Settings.from_env({**env, "CHATPIPE_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "empty")})


# --- no client bypasses the builder -------------------------------------------------------------------

BUILDER = ROOT / "chatpipe" / "runtime" / "kafka.py"
CLIENTS = ("Producer", "Consumer", "AdminClient", "SerializingProducer", "DeserializingConsumer")


def bypasses(tree: ast.AST) -> list[tuple[int, str]]:
    """Where `tree` writes "bootstrap.servers" or hands a confluent-kafka client a dict literal.

    The literal in a set display is a property's name listed, not a client configured: it passes (the
    names `CHATPIPE_KAFKA_CLIENT_CONFIG` may not set, chatpipe/runtime/specs.py)."""
    listed = {id(e) for node in ast.walk(tree) if isinstance(node, ast.Set) for e in node.elts}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value == "bootstrap.servers" and id(node) not in listed:
            found.append((node.lineno, '"bootstrap.servers"'))
        if isinstance(node, ast.Call):
            func = node.func
            name = getattr(func, "id", None) or getattr(func, "attr", "")
            args = [*node.args, *(k.value for k in node.keywords if k.arg == "conf")]
            if name in CLIENTS and any(isinstance(a, ast.Dict) for a in args):
                found.append((node.lineno, f"{name}({{...}})"))
    return found


def test_no_module_but_the_builder_configures_a_kafka_client_by_hand() -> None:
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == BUILDER:
                continue
            for line, what in bypasses(ast.parse(path.read_text(encoding="utf-8"))):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert offenders == [], "configure Kafka clients with chatpipe.runtime.kafka:\n" + "\n".join(offenders)
    # the check itself catches both ways round the builder, and the builder is where the literal lives
    sample = (
        'p = Producer({"acks": "all"})\nc = confluent_kafka.Consumer(conf={"x": 1})\n'
        'config["bootstrap.servers"] = "b:9092"\nreserved = {"bootstrap.servers"}\n'
    )
    assert sorted(what for _, what in bypasses(ast.parse(sample))) == [
        '"bootstrap.servers"',
        "Consumer({...})",
        "Producer({...})",
    ]
    assert bypasses(ast.parse(BUILDER.read_text(encoding="utf-8")))
