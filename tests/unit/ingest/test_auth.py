"""ingest.auth, the webhook's pure checks: the secret an Authorization header carries, the constant-time
token comparison, the self-contained OAuth2 tokens (issue, verify, expiry, tampering), client credentials,
and the source-address allowlist behind trusted proxies."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatpipe.runtime.specs import EIGHT_BY_EIGHT_WEBHOOK_IPS, parse_networks
from ingest import auth
from ingest.auth import (
    address_allowed,
    client_address,
    client_credentials,
    issue_token,
    presented_secret,
    signing_key,
    token_matches,
    verify_token,
)

KEY = signing_key("client-secret")
NOW = 1_780_000_000.75

# a secret as a header carries it: no surrounding whitespace, not empty
secrets = st.text(min_size=1).map(str.strip).filter(bool)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def signed(payload: bytes, key: bytes = KEY) -> str:
    """A token signed like issue_token signs, around any payload (written here, not with auth's helpers)."""
    p = base64.urlsafe_b64encode(payload).rstrip(b"=").decode("ascii")
    sig = base64.urlsafe_b64encode(hmac.new(key, p.encode(), hashlib.sha256).digest()).rstrip(b"=")
    return f"{p}.{sig.decode('ascii')}"


# --- the presented secret -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "secret"),
    [
        ("Bearer tok-1", "tok-1"),
        ("bearer tok-1", "tok-1"),
        ("  BEARER   tok-1  ", "tok-1"),
        (basic("8x8", "pass word"), "pass word"),
        (basic("8x8", "a:b:c"), "a:b:c"),  # the password is everything after the first colon
        (basic("", "p"), "p"),
        ("basic " + base64.b64encode(b"u:p").decode(), "p"),
    ],
)
def test_the_secret_is_the_bearer_token_or_the_basic_password(header: str, secret: str) -> None:
    assert presented_secret(header) == secret


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "   ",
        "Bearer",
        "Bearer   ",
        "Token tok-1",
        "tok-1",
        "Basic",
        "Basic not*base64",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),  # not UTF-8
    ],
)
def test_no_secret_from_a_missing_or_malformed_header(header: str | None) -> None:
    assert presented_secret(header) is None


@given(secrets)
def test_any_token_matches_itself_as_bearer(token: str) -> None:
    assert token_matches(f"Bearer {token}", token)


@given(
    st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters=":"), max_size=20),
    st.text(min_size=1),
)
def test_any_basic_password_matches_as_the_token_whatever_the_user(user: str, password: str) -> None:
    assert token_matches(basic(user, password), password)


@given(secrets, secrets)
def test_a_different_secret_never_matches(presented: str, token: str) -> None:
    assert token_matches(f"Bearer {presented}", token) == (presented == token)


@pytest.mark.parametrize(
    "header", [None, "", "Bearer tok", "Bearer tok-12", "Bearer TOK-1", basic("tok-1", "x")]
)
def test_prefixes_extensions_case_and_the_user_name_do_not_match(header: str | None) -> None:
    assert not token_matches(header, "tok-1")


def test_the_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """token_matches compares through hmac.compare_digest (never `==`, whose time leaks the prefix)."""
    calls: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert token_matches("Bearer tök-1", "tök-1")
    assert not token_matches("Bearer tok-2", "tök-1")
    assert calls == [("tök-1".encode(), "tök-1".encode()), (b"tok-2", "tök-1".encode())]


def test_a_header_that_is_not_utf8_does_not_match() -> None:
    assert not token_matches("Bearer \udcff", "tok-1")


# --- OAuth2 tokens ------------------------------------------------------------------------------


def test_an_issued_token_names_its_client_until_it_expires() -> None:
    token = issue_token("8x8-webhooks", KEY, NOW, ttl=60)
    assert verify_token(token, KEY, NOW) == "8x8-webhooks"
    exp = int(NOW) + 60  # whole seconds: the claim is an integer
    assert verify_token(token, KEY, exp - 0.001) == "8x8-webhooks"
    assert verify_token(token, KEY, exp) is None
    assert verify_token(token, KEY, exp + 3600) is None


def test_a_token_carries_its_client_and_expiry_in_plain_json() -> None:
    payload, _, _ = issue_token("c-1", KEY, NOW, ttl=10).partition(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims == {"sub": "c-1", "exp": int(NOW) + 10}


@given(st.text(max_size=40), st.integers(min_value=1, max_value=10**7))
def test_any_client_id_round_trips(client_id: str, ttl: int) -> None:
    token = issue_token(client_id, KEY, NOW, ttl)
    assert "=" not in token and token.count(".") == 1  # base64url without padding: header-safe
    assert verify_token(token, KEY, NOW) == client_id


def test_another_key_or_a_rotated_secret_refuses_the_token() -> None:
    token = issue_token("c", KEY, NOW, ttl=60)
    assert signing_key("client-secret") == KEY  # derived, so every ingest process agrees
    assert verify_token(token, signing_key("rotated-secret"), NOW) is None
    assert verify_token(token, b"", NOW) is None


def test_a_tampered_payload_or_signature_is_refused() -> None:
    token = issue_token("c", KEY, NOW, ttl=60)
    payload, _, sig = token.partition(".")
    forged = base64.urlsafe_b64encode(json.dumps({"sub": "admin", "exp": 2**40}).encode()).rstrip(b"=")
    assert verify_token(f"{forged.decode()}.{sig}", KEY, NOW) is None
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    assert verify_token(f"{payload}.{flipped}", KEY, NOW) is None
    assert verify_token(f"{payload}.{sig}x", KEY, NOW) is None
    assert verify_token(f"{payload}.{sig}.{sig}", KEY, NOW) is None


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"[]", b'{"sub": "c"}', b'{"exp": 99999999999}', b'{"sub": "c", "exp": "soon"}', b"\xff"],
)
def test_a_correctly_signed_token_with_unusable_claims_is_refused(payload: bytes) -> None:
    assert verify_token(signed(payload), KEY, NOW) is None


def test_the_test_signer_agrees_with_issue_token() -> None:
    """So the cases above fail on their claims, not on their signature."""
    assert verify_token(signed(b'{"sub": "c", "exp": 99999999999}'), KEY, NOW) == "c"


@given(st.text())
def test_verify_never_raises_on_any_text(token: str) -> None:
    assert verify_token(token, KEY, NOW) is None


# --- client credentials -------------------------------------------------------------------------


def test_client_credentials_from_basic_are_form_url_decoded() -> None:
    """RFC 6749 2.3.1: client id and secret are form-urlencoded before Basic encoding."""
    assert client_credentials(basic("my%3Aclient", "s+e%2Bcret"), {}) == ("my:client", "s e+cret")
    assert client_credentials("  basic " + basic("a", "b")[6:] + " ", {}) == ("a", "b")


def test_basic_wins_over_the_form_and_a_bad_basic_is_not_retried_from_the_form() -> None:
    form = {"client_id": "f", "client_secret": "fs"}
    assert client_credentials(basic("h", "hs"), form) == ("h", "hs")
    assert client_credentials("Basic %%%", form) is None
    assert client_credentials("Basic " + base64.b64encode(b"no-colon").decode(), form) is None


@pytest.mark.parametrize(
    ("authorization", "form", "expected"),
    [
        (None, {"client_id": "f", "client_secret": "fs"}, ("f", "fs")),
        ("Bearer x", {"client_id": "f", "client_secret": "fs"}, ("f", "fs")),
        (None, {"client_id": "f"}, None),
        (None, {"client_id": "", "client_secret": "fs"}, None),
        (None, {}, None),
    ],
)
def test_client_credentials_from_the_form(
    authorization: str | None, form: dict[str, str], expected: tuple[str, str] | None
) -> None:
    assert client_credentials(authorization, form) == expected


# --- source addresses ---------------------------------------------------------------------------


PROXIES = parse_networks("10.0.0.0/8")


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "proxies", "client"),
    [
        ("203.0.113.9", "198.51.100.1", (), "203.0.113.9"),  # no trusted proxies: the peer
        ("203.0.113.9", "198.51.100.1", PROXIES, "203.0.113.9"),  # untrusted peer: XFF is spoofable
        ("10.0.0.2", None, PROXIES, "10.0.0.2"),
        ("10.0.0.2", "198.51.100.1", PROXIES, "198.51.100.1"),
        ("10.0.0.2", "6.6.6.6, 198.51.100.1, 10.0.0.3", PROXIES, "198.51.100.1"),  # rightmost untrusted
        ("10.0.0.2", "10.0.0.4, 10.0.0.3", PROXIES, "10.0.0.4"),  # all hops trusted: the first
        ("10.0.0.2", " , 198.51.100.1 ,", PROXIES, "198.51.100.1"),
        ("10.0.0.2", "junk", PROXIES, "junk"),
        (None, "198.51.100.1", PROXIES, None),
    ],
)
def test_the_client_behind_trusted_proxies(
    peer: str | None, forwarded_for: str | None, proxies: tuple[auth.Network, ...], client: str | None
) -> None:
    assert client_address(peer, forwarded_for, proxies) == client


def test_the_allowlist() -> None:
    allow = parse_networks("8x8, 2001:db8::/32")
    assert address_allowed(EIGHT_BY_EIGHT_WEBHOOK_IPS[0], allow)
    assert address_allowed("2001:db8::1", allow)
    assert not address_allowed("198.51.100.1", allow)
    assert not address_allowed(None, allow)
    assert not address_allowed("junk", allow)
    assert address_allowed(None, ()) and address_allowed("198.51.100.1", ())  # empty: everyone


def test_a_spoofed_forwarded_for_does_not_pass_the_allowlist() -> None:
    allow = parse_networks("8x8")
    spoofed = client_address("198.51.100.1", EIGHT_BY_EIGHT_WEBHOOK_IPS[0], PROXIES)
    assert spoofed == "198.51.100.1" and not address_allowed(spoofed, allow)
    proxied = client_address("10.0.0.2", EIGHT_BY_EIGHT_WEBHOOK_IPS[0], PROXIES)
    assert address_allowed(proxied, allow)
