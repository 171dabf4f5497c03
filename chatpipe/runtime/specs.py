"""The grammar of setting values: pure parsers shared by `Settings.validate` and the services.

A value a service needs parsed (`CHATPIPE_ALLOWED_IPS`, `CHATPIPE_TRUSTED_PROXIES`, `CHATPIPE_API_KEYS`,
`CHATPIPE_CHANNEL_IDS`) is parsed here, once, so that the settings can refuse a bad value at start without
importing a service, and the service reads the same grammar. No I/O, no clock, no environment.

API keys are written `KEY:SCOPE;KEY:SCOPE...` (`CHATPIPE_API_KEYS`, or one `KEY:SCOPE` per line in
`CHATPIPE_API_KEYS_FILE`, `#` comments allowed), SCOPE being `*` (every subaccount) or comma-separated
subaccount ids. Keys are kept only as SHA-256 digests, so a dump of the settings shows no key.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# --- source address allowlists (ingest) -------------------------------------------------------------

#: 8x8's published webhook source addresses for messaging products (ip-address-list.md, 2025-10-13).
EIGHT_BY_EIGHT_WEBHOOK_IPS = (
    "52.220.117.120",
    "52.220.109.9",
    "18.136.13.204",
    "34.101.157.207",
    "34.101.215.77",
    "34.34.217.244",
    "34.101.109.67",
    "34.142.20.188",
    "34.142.64.178",
    "34.39.69.103",
    "34.39.114.155",
    "50.112.250.190",
    "100.21.170.42",
    "52.10.10.63",
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(spec: str) -> tuple[Network, ...]:
    """Comma-separated addresses/CIDRs; the word `8x8` expands to 8x8's published addresses.

    Raises ValueError naming the bad entry.
    """
    nets: list[Network] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item.lower() == "8x8":
            nets.extend(ipaddress.ip_network(ip) for ip in EIGHT_BY_EIGHT_WEBHOOK_IPS)
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"not an IP address or network: {item!r}") from None
    return tuple(nets)


# --- read API keys, scoped to subaccounts (sinks) ---------------------------------------------

ALL = "*"


def key_digest(key: str) -> bytes:
    """The SHA-256 digest a key is kept as: the key itself is never stored."""
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class ApiKeys:
    """Key digests to the subaccounts each may read (`ALL` for any). Build with `parse_api_keys`."""

    scopes: Mapping[bytes, frozenset[str]]

    def __bool__(self) -> bool:
        return bool(self.scopes)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self.scopes)} keys)"


def parse_api_keys(entries: Iterable[str]) -> ApiKeys:
    """Parse `KEY:SCOPE` entries (blank entries and `#` comments skipped).

    Raises ValueError naming the entry's position (never the key) when an entry has no `:`, an empty key
    or scope, or when the same key appears twice.
    """
    scopes: dict[bytes, frozenset[str]] = {}
    for n, raw in enumerate(entries, 1):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        key, sep, scope = entry.partition(":")
        key = key.strip()
        subs = frozenset(s.strip() for s in scope.split(",") if s.strip())
        if not sep or not key or not subs:
            raise ValueError(f"entry {n}: expected KEY:SUBACCOUNT[,SUBACCOUNT...] or KEY:*")
        if ALL in subs and len(subs) > 1:
            raise ValueError(f"entry {n}: '*' stands alone")
        digest = key_digest(key)
        if digest in scopes:
            raise ValueError(f"entry {n}: the same key twice")
        scopes[digest] = subs
    return ApiKeys(scopes)


def parse_api_keys_spec(spec: str) -> ApiKeys:
    """`KEY:SCOPE;KEY:SCOPE` (the environment form); newlines separate entries as well."""
    return parse_api_keys(spec.replace("\n", ";").split(";"))


# --- channel ids the details API cannot infer (sinks) ----------------------------------------------


def parse_channel_ids(spec: str) -> dict[tuple[str, str], str]:
    """`CHATPIPE_CHANNEL_IDS`: comma-separated `subAccountId:channel=channelId` (channel as the read API
    names it: SMS, WhatsApp, RCS, Viber, ...; any case). Raises ValueError naming the bad entry."""
    out: dict[tuple[str, str], str] = {}
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        key, eq, channel_id = entry.partition("=")
        sub, colon, channel = key.strip().rpartition(":")
        if not (eq and colon and sub.strip() and channel.strip() and channel_id.strip()):
            raise ValueError(f"expected subAccountId:channel=channelId, got {entry!r}")
        out[(sub.strip(), channel.strip().lower())] = channel_id.strip()
    return out


# --- extra librdkafka properties (every Kafka client) ----------------------------------------------

#: properties `CHATPIPE_KAFKA_CLIENT_CONFIG` may not set: each has its own setting or is chatpipe's per client
RESERVED_KAFKA_PROPERTIES = frozenset(
    {
        "bootstrap.servers",
        "metadata.broker.list",
        "security.protocol",
        "sasl.mechanism",
        "sasl.mechanisms",
        "sasl.username",
        "sasl.password",
        "ssl.ca.location",
        "group.id",
        "client.id",
    }
)


def parse_kafka_properties(spec: str) -> dict[str, str]:
    """`CHATPIPE_KAFKA_CLIENT_CONFIG`: comma-separated `name=value` librdkafka properties (names as
    librdkafka's CONFIGURATION.md spells them: lower case, dotted). Raises ValueError naming the bad entry:
    not `name=value`, a name that is not a property name, the same name twice, or a reserved name (one of
    `RESERVED_KAFKA_PROPERTIES`, set by its own setting or by chatpipe per client)."""
    out: dict[str, str] = {}
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        name, eq, value = (part.strip() for part in entry.partition("="))
        if not (eq and name and value):
            raise ValueError(f"expected name=value, got {entry!r}")
        if not all(c.islower() or c.isdigit() or c in "._" for c in name) or not name[0].isalpha():
            raise ValueError(f"{name!r} is not a librdkafka property name (lower case, dotted)")
        if name in RESERVED_KAFKA_PROPERTIES or name.endswith("_cb"):
            raise ValueError(f"{name!r} is set by chatpipe (use its own setting, if it has one)")
        if name in out:
            raise ValueError(f"{name!r} twice")
        out[name] = value
    return out
