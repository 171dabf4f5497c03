"""compose.yaml: the services, their healthchecks and start order, no literal secret (each one a
`${VAR:?message}` the stack refuses to start without), the three-broker `cluster` profile, and every
chatpipe service's environment a valid `Settings`. Compose's interpolation is reproduced here (no Docker
engine needed); `docker compose config` does the same on a machine with Docker."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from chatpipe.runtime.config import Settings, env_name

ROOT = Path(__file__).resolve().parents[3]
RAW = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
SERVICES: dict[str, Any] = RAW["services"]
CHATPIPE = {"ingest", "worker", "sink", "api", "reconcile"}
BROKERS = {"kafka", "kafka-1", "kafka-2", "kafka-3"}
SECRETS = {"POSTGRES_PASSWORD", "CHATPIPE_WEBHOOK_TOKEN", "CHATPIPE_API_KEYS", "CHATPIPE_PII_HASH_KEY",
           "CHATPIPE_8X8_API_KEY"}  # fmt: skip
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|_KEY$|_KEYS$")
REQUIRED = re.compile(r"^\$\{([A-Z0-9_]+):\?[^}]+\}$")


class MissingVariable(Exception):
    pass


_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}."""

    def one(m: re.Match[str]) -> str:
        if m.group() == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":?", "?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        if op in (":-", "-") and unset:
            return arg
        return value or ""

    return _VAR.sub(one, text)


def resolved(env: dict[str, str]) -> Any:
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return interpolate(node, env) if isinstance(node, str) else node

    return walk(RAW)


def env_example() -> dict[str, str]:
    values = {}
    for line in (ROOT / ".env.example").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


FILLED = {**env_example(), **{s: f"value-of-{s.lower().replace('_', '-')}" for s in SECRETS}}
FILLED["CHATPIPE_API_KEYS"] = "k1:subA;k2:*"


def test_services() -> None:
    assert set(SERVICES) == {*BROKERS, "schema-registry", "postgres", "setup", *CHATPIPE, "kafka-exporter",
                             "prometheus"}  # fmt: skip


def test_every_long_running_service_has_a_healthcheck() -> None:
    for name, service in SERVICES.items():
        if name in ("setup", "kafka-exporter"):  # one-shot; scratch image without a shell or client
            continue
        check = service.get("healthcheck")
        assert check and check.get("test"), f"{name} has no healthcheck"


@pytest.mark.parametrize("name", sorted(CHATPIPE))
def test_chatpipe_healthchecks_ask_the_port_the_service_serves(name: str) -> None:
    from tests.unit.repo.test_ops_prometheus import metrics_port

    service = SERVICES[name]
    test = " ".join(service["healthcheck"]["test"])
    assert f"http://127.0.0.1:{metrics_port(service)}/healthz" in test


def test_depends_on_conditions() -> None:
    for name, service in SERVICES.items():
        for dep, how in (service.get("depends_on") or {}).items():
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
            assert how["condition"] in ("service_healthy", "service_completed_successfully"), (name, dep)
            if how["condition"] == "service_healthy" and dep != "kafka-exporter":
                assert SERVICES[dep].get("healthcheck"), f"{name} waits for {dep}'s health: it has no check"
    for name in CHATPIPE:
        assert SERVICES[name]["depends_on"]["setup"]["condition"] == "service_completed_successfully"
    setup = SERVICES["setup"]["depends_on"]
    assert setup["postgres"]["condition"] == setup["schema-registry"]["condition"] == "service_healthy"
    for broker in BROKERS:  # whichever profile runs: the others are not required
        for name in ("setup", "schema-registry"):
            dep = SERVICES[name]["depends_on"][broker]
            assert dep == {"condition": "service_healthy", "required": False}


def _environments() -> list[tuple[str, str, Any]]:
    return [(n, k, v) for n, s in SERVICES.items() for k, v in (s.get("environment") or {}).items()]


def test_no_literal_secret() -> None:
    checked = set()
    for name, key, value in _environments():
        text = str(value)
        if SECRET_NAME.search(key):
            m = REQUIRED.match(text)
            assert m, f"{name}.{key} must be ${{VAR:?message}}, not {text!r}"
            checked.add(m.group(1))
        if "://" in text:
            password = urlsplit(text.replace("${", "{")).password
            assert password is None or REQUIRED.match("$" + password), f"{name}.{key}: literal password"
    assert checked == SECRETS


def test_no_secret_has_a_default_anywhere() -> None:
    text = (ROOT / "compose.yaml").read_text(encoding="utf-8")
    for secret in SECRETS:
        uses = re.findall(r"\$\{" + secret + r"([^A-Z0-9_][^}]*)?\}", text)
        assert uses and all(u.startswith(":?") for u in uses), f"{secret}: {uses}"


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_the_stack_refuses_to_start_without_each_secret(secret: str) -> None:
    env = {k: v for k, v in FILLED.items() if k != secret}
    with pytest.raises(MissingVariable, match=secret):
        resolved(env)
    with pytest.raises(MissingVariable, match=secret):
        resolved({**env, secret: ""})  # empty counts as missing (:?)


def test_env_example_names_every_secret_empty_and_git_ignores_env() -> None:
    example = env_example()
    for secret in SECRETS:
        assert example.get(secret) == "", f".env.example must list {secret}= (empty)"
    assert ".env" in (ROOT / ".gitignore").read_text(encoding="utf-8").split()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", (ROOT / "compose.yaml").read_text(encoding="utf-8")))
    assert required <= set(example), f"not in .env.example: {required - set(example)}"


@pytest.mark.parametrize("name", sorted(CHATPIPE | {"setup"}))
def test_every_chatpipe_service_environment_is_valid_settings(name: str) -> None:
    env = resolved(FILLED)["services"][name]["environment"]
    known = {env_name(f) for f in Settings.__dataclass_fields__}
    unknown = {k for k in env if k.startswith("CHATPIPE_")} - known
    assert not unknown, f"{name}: not settings: {unknown}"
    settings = Settings.from_env({k: str(v) for k, v in env.items()})
    assert settings.kafka_bootstrap == "kafka-bootstrap:9092"
    assert settings.store_url.startswith("postgresql://chatpipe:value-of-postgres-password@postgres:5432/")
    assert settings.pii_hash_key and settings.ingest_host == settings.api_host == "0.0.0.0"


def test_each_secret_goes_only_where_it_is_needed() -> None:
    env = resolved(FILLED)["services"]
    assert env["ingest"]["environment"]["CHATPIPE_WEBHOOK_TOKEN"] == FILLED["CHATPIPE_WEBHOOK_TOKEN"]
    assert env["api"]["environment"]["CHATPIPE_API_KEYS"] == FILLED["CHATPIPE_API_KEYS"]
    assert env["reconcile"]["environment"]["CHATPIPE_8X8_API_KEY"] == FILLED["CHATPIPE_8X8_API_KEY"]
    for name in CHATPIPE - {"ingest"}:
        assert "CHATPIPE_WEBHOOK_TOKEN" not in env[name]["environment"], name
    for name in CHATPIPE - {"reconcile"}:
        assert "CHATPIPE_8X8_API_KEY" not in env[name]["environment"], name


def test_cluster_profile_three_brokers_replication_3_min_isr_2() -> None:
    cluster = {n: s for n, s in SERVICES.items() if s.get("profiles") == ["cluster"]}
    assert set(cluster) == {"kafka-1", "kafka-2", "kafka-3"}
    ids = set()
    for name, broker in cluster.items():
        e = broker["environment"]
        ids.add(int(e["KAFKA_NODE_ID"]))
        voters = e["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
        assert sorted(voters) == ["1@kafka-1:9093", "2@kafka-2:9093", "3@kafka-3:9093"]
        assert e["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{name}:9092"
        assert int(e["KAFKA_DEFAULT_REPLICATION_FACTOR"]) == 3
        assert int(e["KAFKA_MIN_INSYNC_REPLICAS"]) == 2
        assert int(e["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == 3
        assert int(e["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"]) == 3
        assert int(e["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"]) == 2
        assert e["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"] == "false"
        assert broker["healthcheck"]["test"]
        assert any(name in v for v in broker["volumes"]), f"{name} needs its own volume"
    assert ids == {1, 2, 3}
    single = SERVICES["kafka"]
    assert single["profiles"] == ["single"]
    for name in BROKERS:
        assert SERVICES[name]["networks"]["default"]["aliases"] == ["kafka-bootstrap"]


def test_cluster_replication_setting_reaches_topics_and_registry() -> None:
    env = resolved({**FILLED, "COMPOSE_PROFILES": "cluster", "CHATPIPE_REPLICATION_FACTOR": "3"})
    services = env["services"]
    assert Settings.from_env(services["setup"]["environment"]).replication_factor == 3
    assert (
        services["schema-registry"]["environment"]["SCHEMA_REGISTRY_KAFKASTORE_TOPIC_REPLICATION_FACTOR"]
        == "3"
    )
    with pytest.raises(MissingVariable, match="CHATPIPE_REPLICATION_FACTOR"):
        resolved({k: v for k, v in FILLED.items() if k != "CHATPIPE_REPLICATION_FACTOR"})


def test_interpolation_follows_compose() -> None:
    env = {"A": "x", "E": ""}
    assert interpolate("$$A ${A} $A ${B:-d} ${E:-d} ${E-d} ${B-d}", env) == "$A x x d d  d"
    with pytest.raises(MissingVariable, match="E: no"):
        interpolate("${E:?no}", env)
    assert interpolate("${E?no}", env) == ""
