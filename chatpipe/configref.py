"""The configuration reference, generated from `chatpipe.runtime.config.Settings`
(`chatpipe config reference`).

`docs/configuration.md` is this module's output; `tests/unit/chatpipe/test_configref.py` fails when the
file, the README's configuration table or `MEANINGS` disagree with the settings object (a field without
a meaning, a meaning without a field, a README default that is not the code's). Regenerate with
`chatpipe config reference --output docs/configuration.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from chatpipe.proof.shell import SubParsers
from chatpipe.runtime.config import Settings, env_name

#: what each setting means, by field name (a new field of Settings needs its line here: the test says so)
MEANINGS: dict[str, str] = {
    "kafka_bootstrap": (
        "Kafka bootstrap servers (`host:port,host:port`). `chatpipe dev`: its embedded broker unless set."
    ),
    "schema_registry_url": (
        "Confluent-compatible Schema Registry URL. `chatpipe dev`: its embedded registry unless set."
    ),
    "store_url": (
        "`sqlite:///path` or `postgresql://user:pass@host:port/db`: the materialized store the sink "
        "writes and the read API, `verify` and `export` read."
    ),
    "ingest_host": "Address `chatpipe ingest` listens on (`0.0.0.0` in a container).",
    "ingest_port": "Port of `chatpipe ingest`.",
    "api_host": (
        "Address `chatpipe api` listens on; also where the worker's web port and the sink's and the "
        "reconciler's `--metrics-port` listen (`0.0.0.0` in a container, for Prometheus)."
    ),
    "api_port": "Port of `chatpipe api`.",
    "webhook_token": (
        "Shared secret every webhook must present (`Authorization: Bearer TOKEN` or the Basic-auth "
        "password). `chatpipe ingest` refuses to start without it (or OAuth2) unless "
        "`CHATPIPE_INSECURE=1`; `chatpipe dev`: open, with a warning."
    ),
    "api_keys": (
        "Read API keys scoped to subaccounts: `KEY:SUB1,SUB2;KEY2:*` (`*`: every subaccount), presented "
        "as `Authorization: Bearer KEY`; 401 without or with a wrong key, 403 for another subaccount. "
        "`chatpipe api` refuses to start without keys unless `CHATPIPE_INSECURE=1`; `chatpipe dev`: open,"
        " with a warning."
    ),
    "api_keys_file": (
        "File of read API keys, one `KEY:SCOPE` per line (`#` comments), added to `CHATPIPE_API_KEYS` (a "
        "mounted secret)."
    ),
    "insecure": (
        "Let `chatpipe ingest` start without a webhook token and `chatpipe api` without keys (same as "
        "their `--insecure` flag). `chatpipe dev` sets it for its children."
    ),
    "read_api_key": "The key `chatpipe verify --api` presents to the read API (`--api-key` overrides).",
    "api_8x8_url": "8x8 API base URL for the reconciler.",
    "api_8x8_key": "8x8 API key for the reconciler (`Authorization: Bearer KEY`); unset: reconciler off.",
    "reconcile_after": (
        "Seconds after its last status change that a message still not in a final state is looked up with"
        " 8x8's Retrieve message details API."
    ),
    "reconcile_margin": (
        "Seconds the reconciler adds to 8x8's 1 s between the answer to one request of a subaccount and its"
        " next request (`bench/reconciler.py`: 0.05 gives 0 429s and 0.94 lookups/s per subaccount)."
    ),
    "reconcile_interval": "Seconds between the starts of two reconcile passes.",
    "channel_ids": (
        "The read API's channelIds when neither 8x8's details API nor inbound messages told them:"
        " comma-separated `subAccountId:channel=channelId` (the ids 8x8's portal shows)."
    ),
    "state_dir": "Local state: processor tables (RocksDB), ingest spool, registry, `chatpipe dev` logs.",
    "partitions": (
        "Partitions of every topic (all co-partitioned by umid) created by `chatpipe topics`; `chatpipe "
        "dev` on its embedded broker makes 2 unless set."
    ),
    "replication_factor": (
        "Replication of every topic created by `chatpipe topics` (3 on a production cluster)."
    ),
    "max_body_bytes": "Largest webhook body accepted (413 beyond).",
    "ingest_header_timeout": (
        "Seconds ingest waits for a whole request head after a connection opens or its previous answer "
        "(also the idle keep-alive limit)."
    ),
    "ingest_body_timeout": "Seconds ingest waits for the rest of a body once the head came (then 408).",
    "oauth_client_id": (
        "OAuth2 client-credentials client id: ingest serves `POST /oauth2/token` and accepts the tokens "
        "it issues (with `CHATPIPE_OAUTH_CLIENT_SECRET`)."
    ),
    "oauth_client_secret": "OAuth2 client secret (rotating it revokes every issued token).",
    "oauth_token_ttl": "Lifetime of an issued OAuth2 token, seconds.",
    "allowed_ips": (
        "Comma-separated addresses/CIDRs allowed to post webhooks (`8x8` = 8x8's published addresses); "
        "empty: any."
    ),
    "trusted_proxies": (
        "Proxies whose `X-Forwarded-For` ingest believes when checking `CHATPIPE_ALLOWED_IPS`."
    ),
    "spool_max_bytes": (
        "Size of ingest's local spool (receipts acknowledged while the broker cannot ack); full: 503 with"
        " Retry-After."
    ),
    "produce_timeout": "Seconds ingest waits for the broker's ack before spooling the record instead.",
    "spool_stall_failures": (
        "Failed drain rounds in a row (while the broker answers) that mark the spool stalled (`/readyz` "
        "503, `chatpipe_ingest_spool_stalled` 1)."
    ),
    "spool_stall_seconds": (
        "Seconds without draining a record (while the broker answers) that mark the spool stalled."
    ),
    "ingest_workers": "Ingest processes sharing the port (SO_REUSEPORT), each with its own spool.",
    "ingest_linger_ms": "How long ingest's producer waits to batch records (each webhook waits for its ack).",
    "dev_downstream_nice": "`chatpipe dev` runs the worker and the sink this much nicer than ingest (0-19).",
    "dev_downstream_idle": "`chatpipe dev` runs the worker and the sink under SCHED_IDLE.",
    "dev_broker_storage": (
        "`chatpipe dev`'s embedded broker keeps records in `memory` or on `disk` (`STATE_DIR/broker/`)."
    ),
    "dev_broker_fsync": "fsync the disk broker's writes before they are acknowledged.",
    "kafka_idempotence": (
        "Idempotent Kafka producers (`chatpipe dev` sets 0 on its disk broker: Tansu's sequence bug)."
    ),
    "kafka_security_protocol": (
        "How every Kafka client reaches the brokers: `PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL` "
        "(librdkafka's `security.protocol`; Faust's `broker_credentials`). `chatpipe dev`'s embedded "
        "broker: `PLAINTEXT` only."
    ),
    "kafka_sasl_mechanism": "SASL mechanism: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.",
    "kafka_sasl_username": "SASL user name (with `SASL_PLAINTEXT` or `SASL_SSL` only).",
    "kafka_sasl_password": "SASL password (or `CHATPIPE_KAFKA_SASL_PASSWORD_FILE`; never printed).",
    "kafka_sasl_password_file": (
        "File holding the SASL password (a mounted secret; a trailing newline is dropped), read at start."
    ),
    "kafka_ssl_ca_location": (
        "CA certificate file (PEM) the brokers' certificates are verified against (`SSL`, `SASL_SSL`); "
        "unset: the system's CAs."
    ),
    "kafka_client_config": (
        "Extra librdkafka properties for every librdkafka client (ingest, the processor's producers, sink, "
        "reconciler, replay, topic creation), comma-separated `name=value` (e.g. "
        "`compression.type=zstd,socket.timeout.ms=30000`), applied last over chatpipe's own values; checked "
        "at start (connection, security, `group.id` and `client.id` have their own settings or are "
        "chatpipe's). Faust's own aiokafka clients do not take them."
    ),
    "read_window_hours": "How long after delivery a read receipt may still come (then the message is final).",
    "stale_after_hours": "A message with no event for this long is final.",
    "final_retention_hours": "How long the processor keeps a final state before replacing it with a marker.",
    "tombstone_retention_hours": "How long the processor keeps the marker that absorbs late receipts.",
    "processor_batch_size": "Receipts the worker folds per batch.",
    "processor_batch_within": "Seconds the worker waits for a batch to fill.",
    "processor_cache_size": "Decoded states a worker keeps in memory (about 2 KB each: the bulk of its RSS).",
    "processor_in_flight": "Batches folded while earlier ones await the broker's acks.",
    "processor_expire_interval": "Seconds between the worker's expiry timer runs (finality by timer).",
    "processor_dlq_max_ratio": (
        "The worker stops when more than this share of the last `CHATPIPE_PROCESSOR_DLQ_WINDOW` records of "
        "one input were dead-lettered (a bad deploy; the records stay uncommitted); 1 turns the limit off."
    ),
    "processor_dlq_window": "Records of one input (receipts, inbound) the dead-letter limit looks back over.",
    "processor_dlq_min": "Dead letters in the window before the dead-letter limit can stop the worker.",
    "emit_steps_and_events": (
        "The worker also writes `chatpipe.messages.steps` and `chatpipe.messages.events`."
    ),
    "pii_clear": "Keep msisdns and inbound text in clear in the store (default: masked like 8x8 does).",
    "pii_hash_key": (
        "HMAC key of the msisdn hashes the store keeps for joins and conversation lookups; set it in "
        "production (compose refuses to start without it) and never change it (hashes would no longer "
        "match)."
    ),
    "embedded_broker": "The broker is Tansu (set by `chatpipe dev`): turns on its workarounds.",
    "worker_web_port": "Port of the worker's `/healthz` and `/metrics` (Faust web).",
    "metrics_port": (
        "Port of `/healthz` and `/metrics` of `chatpipe sink` and `chatpipe reconcile` (0: off; also "
        "`--metrics-port`)."
    ),
    "log_level": "`DEBUG`, `INFO`, `WARNING`, `ERROR`.",
    "log_format": "`text` or `json` (one object a line).",
    "event_loop": "Event loop of the HTTP services: `asyncio` or `uvloop`.",
}


def type_name(field: dataclasses.Field[object]) -> str:
    text = str(field.type).replace("Path", "path").replace(" | None", "")
    kind = {"str": "string", "int": "integer", "float": "number", "bool": "boolean (1/0)", "path": "path"}[
        text
    ]
    return f"{kind}, secret" if not field.repr else kind


def format_default(value: object) -> str:
    """A default as an operator writes it in the environment (`1`/`0`, `900` for 900.0, `unset`)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if value == "":
        return "empty"
    return str(value)


def rows() -> list[tuple[str, str, str, str]]:
    """(variable, type, default, meaning) for every field, in the settings object's order."""
    out = []
    for f in dataclasses.fields(Settings):
        default = format_default(f.default)
        out.append((env_name(f.name), type_name(f), default, MEANINGS[f.name]))
    return out


HEADER = """# Configuration reference

<!-- generated by `chatpipe config reference --output docs/configuration.md` from
chatpipe/runtime/config.py and chatpipe/configref.py; tests/unit/chatpipe/test_configref.py fails when they
disagree. Do not edit by hand. -->

Every `chatpipe` command reads these environment variables (a CLI flag may override: `chatpipe COMMAND
--help`). Empty values count as unset. Values that do not parse stop the command with exit code 2 naming
the variable. Secrets are masked wherever the settings are printed.

| variable | type | default | meaning |
| --- | --- | --- | --- |
"""


def _code(default: str) -> str:
    return default if default in ("unset", "empty") else f"`{default}`"


def render() -> str:
    body = "".join(f"| `{v}` | {t} | {_code(d)} | {m} |\n" for v, t, d, m in rows())
    return HEADER + body


def cmd_config(settings: Settings, args: argparse.Namespace, env: dict[str, str]) -> int:
    text = render()
    if args.check is not None:
        if args.check.read_text(encoding="utf-8") != text:
            print(
                f"{args.check} is out of date: chatpipe config reference --output {args.check}",
                file=sys.stderr,
            )
            return 1
        return 0
    if args.output is not None:
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def add_config_parser(sub: SubParsers) -> argparse.ArgumentParser:
    """Register `config` on `chatpipe`'s sub-command parsers."""
    p = sub.add_parser("config", help="print the configuration reference (every variable) as Markdown")
    p.add_argument("action", choices=["reference"])
    p.add_argument("--output", type=Path, help="write it to this file (docs/configuration.md)")
    p.add_argument("--check", type=Path, help="exit 1 when this file is not the current reference")
    p.set_defaults(func=cmd_config)
    return p
