"""One typed settings object, built once from the environment by the CLI and passed down.

No other module reads `os.environ`. Secrets are masked in `repr`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from chatpipe.runtime.specs import (
    parse_api_keys_spec,
    parse_channel_ids,
    parse_kafka_properties,
    parse_networks,
)

_SECRET = "***"
#: what the HTTP services (ingest, api, registry, reconciler) can run on
EVENT_LOOPS = ("asyncio", "uvloop")
#: where `chatpipe dev`'s embedded broker keeps its data (CHATPIPE_DEV_BROKER_STORAGE)
DEV_BROKER_STORAGES = ("memory", "disk")
#: how every Kafka client talks to the brokers (librdkafka's security.protocol, sasl.mechanism)
KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def _secret_field(default: str | None = None) -> str | None:
    return field(default=default, repr=False)


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap: str = "127.0.0.1:9092"
    schema_registry_url: str = "http://127.0.0.1:8085"
    store_url: str = "sqlite:///.chatpipe/chatpipe.db"
    ingest_host: str = "127.0.0.1"
    ingest_port: int = 8080
    api_host: str = "127.0.0.1"
    api_port: int = 8081
    webhook_token: str | None = _secret_field()
    # the read API's keys, scoped to subaccounts (sinks/auth.py): `KEY:SUB1,SUB2;KEY2:*`, and/or a file of
    # one `KEY:SCOPE` per line; insecure: `chatpipe ingest` may start without a webhook token and
    # `chatpipe api` without keys (`chatpipe dev` runs its children so unless tokens/keys are set)
    api_keys: str | None = _secret_field()
    api_keys_file: Path | None = None
    insecure: bool = False
    read_api_key: str | None = _secret_field()
    api_8x8_url: str = "https://chatapps.8x8.com"
    api_8x8_key: str | None = _secret_field()
    reconcile_after: float = 900.0
    # the reconciler (chatpipe.reconciler): seconds added to 8x8's 1 s between an answer and the next request
    # of one subaccount (0.05 measured: bench/reconciler.py), seconds between the starts of two passes
    reconcile_margin: float = 0.05
    reconcile_interval: float = 30.0
    # operator-supplied channelIds (as in 8x8's portal) for the read API, when neither 8x8's details API nor
    # inbound messages told them: comma-separated `subAccountId:channel=channelId`
    channel_ids: str = ""
    # beyond docs/interface.md
    state_dir: Path = Path(".chatpipe")
    partitions: int = 6
    replication_factor: int = 1
    max_body_bytes: int = 256 * 1024
    # slow clients (ingest): a connection that has not sent a whole request head this many seconds after it
    # opened or after its previous answer is closed (aiohttp's keepalive_timeout: one timer for idle
    # keep-alive connections and for headers still trickling in) ...
    ingest_header_timeout: float = 10.0
    # ... and a request whose body has not fully arrived this many seconds after its head is answered 408
    # and closed. 8x8 sends each webhook at once and retries on errors, so either limit only cuts off
    # clients that hold a connection without using it.
    ingest_body_timeout: float = 10.0
    oauth_client_id: str | None = None
    oauth_client_secret: str | None = _secret_field()
    oauth_token_ttl: int = 3600
    allowed_ips: str = ""
    trusted_proxies: str = ""
    spool_max_bytes: int = 1 << 30
    produce_timeout: float = 3.0
    # the spool is "stalled" (/readyz 503 naming why, chatpipe_ingest_spool_stalled 1, an ERROR log) when it
    # holds records, the broker answers metadata requests, and either this many drain rounds in a row failed
    # without draining one, or none was drained for spool_stall_seconds. A broker that does not answer is an
    # outage the spool absorbs: never a stall (chatpipe_ingest_spool_drain_age_seconds shows its length)
    spool_stall_failures: int = 5
    spool_stall_seconds: float = 60.0
    ingest_workers: int = 1
    ingest_linger_ms: float = 1.0
    dev_downstream_nice: int = 19
    dev_downstream_idle: bool = True
    # where `chatpipe dev`'s embedded broker (Tansu) keeps records, topics and committed offsets: "memory"
    # (fastest; all gone when the broker or dev stops) or "disk" (an S3-compatible object store of dev's own,
    # chatpipe.objectstore, under STATE_DIR/broker/: kept across a restart of dev and a kill -9 of the
    # broker or of the store (see chatpipe/dev.py for Tansu's caveat); a few percent of memory's produce
    # rate, bench/broker_storage.py); dev_broker_fsync: disk writes are fsynced before they are acknowledged
    # (off: they survive a crash of the processes, not of the machine)
    dev_broker_storage: str = "memory"
    dev_broker_fsync: bool = True
    # idempotent producers (librdkafka's enable.idempotence) for every chatpipe producer: no duplicates from
    # librdkafka's own retries. `chatpipe dev` turns it off on its disk broker, unless set: Tansu 0.6.0
    # stores a producer's sequence before the batch, so a broker killed in between answers the retry as a
    # duplicate and the record is lost (measured,
    # tests/integration/pipeline/test_dev_persistent_broker.py); without idempotence a retry may write a
    # record twice, which every consumer of chatpipe's topics absorbs
    kafka_idempotence: bool = True
    # how every Kafka client (ingest, processor and Faust's own clients, sink, reconciler, replay, topic
    # creation) reaches a production cluster: chatpipe.runtime.kafka builds each client's configuration
    # from these. The SASL password may come from a file (a mounted secret), read once by `from_env`;
    # kafka_client_config: extra librdkafka properties `name=value,name=value` for every librdkafka client
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = _secret_field()
    kafka_sasl_password_file: Path | None = None
    kafka_ssl_ca_location: Path | None = None
    kafka_client_config: str = ""
    read_window_hours: float = 48.0
    stale_after_hours: float = 240.0
    final_retention_hours: float = 24.0
    tombstone_retention_hours: float = 720.0
    processor_batch_size: int = 5000
    processor_batch_within: float = 0.1
    processor_cache_size: int = 200_000
    processor_in_flight: int = 4
    processor_expire_interval: float = 30.0
    # the dead-letter limit (processors/dlqlimit.py): stop when more than this share of the last
    # `window` records of one input were dead-lettered, once at least `min` were
    processor_dlq_max_ratio: float = 0.5
    processor_dlq_window: int = 1000
    processor_dlq_min: int = 100
    emit_steps_and_events: bool = True
    pii_clear: bool = False
    pii_hash_key: str | None = _secret_field()
    embedded_broker: bool = False
    worker_web_port: int = 6066
    metrics_port: int = 0
    log_level: str = "INFO"
    log_format: str = "text"
    event_loop: str = "asyncio"

    def __repr__(self) -> str:
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not f.repr and value is not None:
                value = _SECRET
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: object) -> Settings:
        """Build from `CHATPIPE_*` variables (see docs/interface.md); `overrides` (CLI flags) win.

        Raises ValueError naming the variable when a value does not parse.
        """
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            name = env_name(f.name)
            if name not in env or env[name] == "":
                continue
            raw = env[name]
            try:
                values[f.name] = _convert(f.type, raw)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        _read_password_file(values)
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.partitions < 1:
            raise ValueError("CHATPIPE_PARTITIONS must be >= 1")
        if not (
            self.store_url.startswith("sqlite:///")
            or self.store_url.startswith("postgresql://")
            or self.store_url.startswith("postgres://")
        ):
            raise ValueError(f"CHATPIPE_STORE_URL: unsupported store URL {self.store_url!r}")
        if self.max_body_bytes < 1024:
            raise ValueError("CHATPIPE_MAX_BODY_BYTES must be >= 1024")
        if bool(self.oauth_client_id) != bool(self.oauth_client_secret):
            raise ValueError("CHATPIPE_OAUTH_CLIENT_ID and CHATPIPE_OAUTH_CLIENT_SECRET go together")
        if self.ingest_workers < 1:
            raise ValueError("CHATPIPE_INGEST_WORKERS must be >= 1")
        if not 0 <= self.dev_downstream_nice <= 19:
            raise ValueError("CHATPIPE_DEV_DOWNSTREAM_NICE must be between 0 and 19")
        if self.dev_broker_storage not in DEV_BROKER_STORAGES:
            raise ValueError(f"CHATPIPE_DEV_BROKER_STORAGE must be one of {', '.join(DEV_BROKER_STORAGES)}")
        if self.event_loop not in EVENT_LOOPS:
            raise ValueError(f"CHATPIPE_EVENT_LOOP must be one of {', '.join(EVENT_LOOPS)}")
        if not self.ingest_header_timeout > 0:
            raise ValueError("CHATPIPE_INGEST_HEADER_TIMEOUT must be > 0 seconds")
        if not self.ingest_body_timeout > 0:
            raise ValueError("CHATPIPE_INGEST_BODY_TIMEOUT must be > 0 seconds")
        if not 0 <= self.ingest_linger_ms <= 1000:
            raise ValueError("CHATPIPE_INGEST_LINGER_MS must be between 0 and 1000")
        if not 0 <= self.processor_dlq_max_ratio <= 1:
            raise ValueError("CHATPIPE_PROCESSOR_DLQ_MAX_RATIO must be between 0 and 1")
        if not 1 <= self.processor_dlq_min <= self.processor_dlq_window:
            raise ValueError("CHATPIPE_PROCESSOR_DLQ_MIN must be between 1 and CHATPIPE_PROCESSOR_DLQ_WINDOW")
        if self.spool_stall_failures < 1:
            raise ValueError("CHATPIPE_SPOOL_STALL_FAILURES must be >= 1")
        if not self.spool_stall_seconds > 0:
            raise ValueError("CHATPIPE_SPOOL_STALL_SECONDS must be > 0")
        if self.api_keys:
            try:
                parse_api_keys_spec(self.api_keys)
            except ValueError as exc:
                raise ValueError(f"CHATPIPE_API_KEYS: {exc}") from None
        if not self.reconcile_margin >= 0:
            raise ValueError("CHATPIPE_RECONCILE_MARGIN must be >= 0 seconds")
        if not self.reconcile_interval > 0:
            raise ValueError("CHATPIPE_RECONCILE_INTERVAL must be > 0 seconds")
        try:
            parse_channel_ids(self.channel_ids)
        except ValueError as exc:
            raise ValueError(f"CHATPIPE_CHANNEL_IDS: {exc}") from None
        self._validate_kafka()
        for name, spec in (
            ("CHATPIPE_ALLOWED_IPS", self.allowed_ips),
            ("CHATPIPE_TRUSTED_PROXIES", self.trusted_proxies),
        ):
            try:
                parse_networks(spec)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None

    def _validate_kafka(self) -> None:
        protocol = self.kafka_security_protocol
        if protocol not in KAFKA_SECURITY_PROTOCOLS:
            choices = ", ".join(KAFKA_SECURITY_PROTOCOLS)
            raise ValueError(f"CHATPIPE_KAFKA_SECURITY_PROTOCOL must be one of {choices}")
        if self.kafka_sasl_mechanism not in KAFKA_SASL_MECHANISMS:
            choices = ", ".join(KAFKA_SASL_MECHANISMS)
            raise ValueError(f"CHATPIPE_KAFKA_SASL_MECHANISM must be one of {choices}")
        sasl = protocol.startswith("SASL_")
        if sasl and not (self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError(
                f"CHATPIPE_KAFKA_SECURITY_PROTOCOL={protocol} needs CHATPIPE_KAFKA_SASL_USERNAME and "
                "CHATPIPE_KAFKA_SASL_PASSWORD (or CHATPIPE_KAFKA_SASL_PASSWORD_FILE)"
            )
        if not sasl and (self.kafka_sasl_username or self.kafka_sasl_password):
            raise ValueError(
                "CHATPIPE_KAFKA_SASL_USERNAME/PASSWORD need CHATPIPE_KAFKA_SECURITY_PROTOCOL SASL_SSL or "
                f"SASL_PLAINTEXT, not {protocol}"
            )
        if self.kafka_ssl_ca_location is not None and not protocol.endswith("SSL"):
            raise ValueError(
                "CHATPIPE_KAFKA_SSL_CA_LOCATION needs CHATPIPE_KAFKA_SECURITY_PROTOCOL SSL or SASL_SSL, "
                f"not {protocol}"
            )
        try:
            parse_kafka_properties(self.kafka_client_config)
        except ValueError as exc:
            raise ValueError(f"CHATPIPE_KAFKA_CLIENT_CONFIG: {exc}") from None

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


_ENV_NAMES = {
    "api_8x8_url": "CHATPIPE_8X8_API_URL",
    "api_8x8_key": "CHATPIPE_8X8_API_KEY",
}


def env_name(field_name: str) -> str:
    """The environment variable of a `Settings` field (`CHATPIPE_` + its name, but for the 8x8 ones)."""
    return _ENV_NAMES.get(field_name, "CHATPIPE_" + field_name.upper())


def _read_password_file(values: dict[str, object]) -> None:
    """CHATPIPE_KAFKA_SASL_PASSWORD_FILE: the password is the file's text without its trailing newline.

    Raises ValueError naming the variable when the file cannot be read or is empty, or when
    CHATPIPE_KAFKA_SASL_PASSWORD is set as well."""
    path = values.get("kafka_sasl_password_file")
    if path is None:
        return
    if values.get("kafka_sasl_password"):
        raise ValueError("CHATPIPE_KAFKA_SASL_PASSWORD and CHATPIPE_KAFKA_SASL_PASSWORD_FILE: set one")
    try:
        password = Path(str(path)).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"CHATPIPE_KAFKA_SASL_PASSWORD_FILE {path}: {exc.strerror}") from None
    if not password:
        raise ValueError(f"CHATPIPE_KAFKA_SASL_PASSWORD_FILE {path}: empty")
    values["kafka_sasl_password"] = password


def _convert(kind: object, raw: str) -> object:
    text = str(kind)
    if "bool" in text:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    if "int" in text:
        return int(raw)
    if "float" in text:
        return float(raw)
    if "Path" in text:
        return Path(raw)
    return raw
