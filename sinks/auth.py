"""Read API authentication: API keys scoped to subaccounts. Pure: no I/O, no clock, no environment.

The key set is written `KEY:SCOPE;KEY:SCOPE...` (`CHATPIPE_API_KEYS`, or one `KEY:SCOPE` per line in
`CHATPIPE_API_KEYS_FILE`, `#` comments allowed), SCOPE being `*` (every subaccount) or comma-separated
subaccount ids. A request presents its key as `Authorization: Bearer KEY`.

Keys are kept only as SHA-256 digests: the lookup compares digests (a dictionary lookup on a hash, so it
tells nothing about how much of a wrong key matched), and a dump of the settings shows no key.
`authorize` never raises on hostile input.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ALL = "*"


class Verdict(enum.Enum):
    ALLOWED = "allowed"
    #: no key, a malformed header or a key not in the set: 401
    UNAUTHENTICATED = "unauthenticated"
    #: a known key whose scope does not name this subaccount: 403
    FORBIDDEN = "forbidden"


def _digest(key: str) -> bytes:
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
        digest = _digest(key)
        if digest in scopes:
            raise ValueError(f"entry {n}: the same key twice")
        scopes[digest] = subs
    return ApiKeys(scopes)


def parse_api_keys_spec(spec: str) -> ApiKeys:
    """`KEY:SCOPE;KEY:SCOPE` (the environment form); newlines separate entries as well."""
    return parse_api_keys(spec.replace("\n", ";").split(";"))


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer KEY` header, else None."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


def authorize(keys: ApiKeys, authorization: str | None, subaccount: str) -> Verdict:
    """May the holder of this Authorization header read `subaccount`'s data?"""
    key = bearer_key(authorization)
    if key is None:
        return Verdict.UNAUTHENTICATED
    scope = keys.scopes.get(_digest(key))
    if scope is None:
        return Verdict.UNAUTHENTICATED
    if ALL in scope or subaccount in scope:
        return Verdict.ALLOWED
    return Verdict.FORBIDDEN
