"""Pure authentication checks for webhook requests (no I/O)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
from urllib.parse import unquote_plus

from chatpipe.runtime.specs import Network


def presented_secret(authorization: str | None) -> str | None:
    """The secret carried by an Authorization header: a Bearer token or the Basic-auth password."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    if scheme == "bearer" and value:
        return value
    if scheme == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except ValueError:  # binascii.Error, UnicodeDecodeError, and non-ASCII text (surrogate escapes)
            return None
        _, sep, password = decoded.partition(":")
        return password if sep else None
    return None


def token_matches(authorization: str | None, token: str) -> bool:
    """Constant-time comparison of the presented secret with the configured token.

    aiohttp hands over header bytes that are not UTF-8 as surrogate escapes (`\\xff` -> `\\udcff`): they
    are encoded back to those bytes, which match no UTF-8 token (a 401, never an exception)."""
    secret = presented_secret(authorization)
    if secret is None:
        return False
    return hmac.compare_digest(secret.encode("utf-8", "surrogateescape"), token.encode("utf-8"))


# --- OAuth2 client credentials ---------------------------------------------------------------------
#
# 8x8 can fetch a bearer token from a token endpoint we provide (client-credentials grant) and present it
# on each webhook. Tokens are self-contained and HMAC-signed (`<payload>.<signature>`, base64url), so any
# number of ingest processes or hosts validate them without shared state.


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signing_key(client_secret: str) -> bytes:
    """The HMAC key tokens are signed with, derived from the client secret (rotating it revokes them)."""
    return hmac.new(client_secret.encode("utf-8"), b"chatpipe-oauth2-token-v1", hashlib.sha256).digest()


def issue_token(client_id: str, key: bytes, now: float, ttl: int) -> str:
    payload = _b64(json.dumps({"sub": client_id, "exp": int(now) + ttl}, separators=(",", ":")).encode())
    sig = _b64(hmac.new(key, payload.encode("ascii"), hashlib.sha256).digest())
    return f"{payload}.{sig}"


def verify_token(token: str, key: bytes, now: float) -> str | None:
    """The client id of a valid, unexpired token, else None (never raises on malformed input)."""
    payload, sep, sig = token.partition(".")
    if not sep or not payload or not sig:
        return None
    expected = _b64(hmac.new(key, payload.encode("ascii", "replace"), hashlib.sha256).digest())
    if not hmac.compare_digest(expected.encode("ascii"), sig.encode("ascii", "replace")):
        return None
    try:
        claims = json.loads(_unb64(payload))
        exp, sub = int(claims["exp"]), str(claims["sub"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
    return sub if now < exp else None


def client_credentials(authorization: str | None, form: dict[str, str]) -> tuple[str, str] | None:
    """client_id and client_secret from HTTP Basic (RFC 6749 2.3.1) or from the form body."""
    if authorization and authorization.strip().lower().startswith("basic "):
        try:
            decoded = base64.b64decode(authorization.strip()[6:].strip(), validate=True).decode("utf-8")
        except ValueError:  # binascii.Error, UnicodeDecodeError, and non-ASCII text (surrogate escapes)
            return None
        cid, sep, secret = decoded.partition(":")
        return (unquote_plus(cid), unquote_plus(secret)) if sep else None
    form_id, form_secret = form.get("client_id"), form.get("client_secret")
    return (form_id, form_secret) if form_id and form_secret else None


# --- source address allowlist ------------------------------------------------------------------------


def _in(addr: str, nets: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(addr.strip())
    except ValueError:
        return False
    return any(ip in n for n in nets)


def client_address(
    peer: str | None, forwarded_for: str | None, trusted_proxies: tuple[Network, ...]
) -> str | None:
    """The real client: walk X-Forwarded-For right to left while the hop is a trusted proxy.

    X-Forwarded-For is only honoured when the direct peer is itself a trusted proxy.
    """
    if peer is None or not trusted_proxies or not forwarded_for or not _in(peer, trusted_proxies):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    addr = peer
    while hops and _in(addr, trusted_proxies):
        addr = hops.pop()
    return addr


def address_allowed(addr: str | None, allowlist: tuple[Network, ...]) -> bool:
    return not allowlist or (addr is not None and _in(addr, allowlist))
