"""Read API authentication: API keys scoped to subaccounts. Pure: no I/O, no clock, no environment.

The key set's grammar and its parser live in `chatpipe.runtime.specs` (the settings check it at start).
A request presents its key as `Authorization: Bearer KEY`.

Keys are kept only as SHA-256 digests: the lookup compares digests (a dictionary lookup on a hash, so it
tells nothing about how much of a wrong key matched), and a dump of the settings shows no key.
`authorize` never raises on hostile input.
"""

from __future__ import annotations

import enum

from chatpipe.runtime.specs import ALL, ApiKeys, key_digest


class Verdict(enum.Enum):
    ALLOWED = "allowed"
    #: no key, a malformed header or a key not in the set: 401
    UNAUTHENTICATED = "unauthenticated"
    #: a known key whose scope does not name this subaccount: 403
    FORBIDDEN = "forbidden"


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
    scope = keys.scopes.get(key_digest(key))
    if scope is None:
        return Verdict.UNAUTHENTICATED
    if ALL in scope or subaccount in scope:
        return Verdict.ALLOWED
    return Verdict.FORBIDDEN
