"""Pure authentication checks for webhook requests (no I/O)."""

from __future__ import annotations

import base64
import binascii
import hmac


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
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, sep, password = decoded.partition(":")
        return password if sep else None
    return None


def token_matches(authorization: str | None, token: str) -> bool:
    """Constant-time comparison of the presented secret with the configured token."""
    secret = presented_secret(authorization)
    if secret is None:
        return False
    return hmac.compare_digest(secret.encode("utf-8"), token.encode("utf-8"))
