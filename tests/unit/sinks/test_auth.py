"""sinks/auth.py: the read API's keys scoped to subaccounts (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatpipe.runtime.config import Settings
from chatpipe.runtime.specs import ApiKeys, parse_api_keys, parse_api_keys_spec
from sinks.auth import Verdict, authorize, bearer_key

KEYS = parse_api_keys_spec("k-one:subA,subB; k-all:*")


@pytest.mark.parametrize(
    ("header", "sub", "verdict"),
    [
        ("Bearer k-one", "subA", Verdict.ALLOWED),
        ("Bearer k-one", "subB", Verdict.ALLOWED),
        ("bearer   k-one  ", "subB", Verdict.ALLOWED),
        ("Bearer k-one", "subC", Verdict.FORBIDDEN),
        ("Bearer k-all", "anything", Verdict.ALLOWED),
        (None, "subA", Verdict.UNAUTHENTICATED),
        ("", "subA", Verdict.UNAUTHENTICATED),
        ("Bearer", "subA", Verdict.UNAUTHENTICATED),
        ("Bearer k-on", "subA", Verdict.UNAUTHENTICATED),
        ("Bearer k-one2", "subA", Verdict.UNAUTHENTICATED),
        ("Basic azpvbmU6", "subA", Verdict.UNAUTHENTICATED),
        ("k-one", "subA", Verdict.UNAUTHENTICATED),
    ],
)
def test_authorize(header: str | None, sub: str, verdict: Verdict) -> None:
    assert authorize(KEYS, header, sub) is verdict


def test_a_scope_naming_a_subaccount_is_not_a_prefix_match() -> None:
    keys = parse_api_keys_spec("k:sub")
    assert authorize(keys, "Bearer k", "sub") is Verdict.ALLOWED
    assert authorize(keys, "Bearer k", "sub2") is Verdict.FORBIDDEN
    assert authorize(keys, "Bearer k", "su") is Verdict.FORBIDDEN


def test_file_form_takes_comments_and_blank_lines() -> None:
    keys = parse_api_keys(["# ops keys", "", "  alpha : s1 , s2 ", "beta:*"])
    assert authorize(keys, "Bearer alpha", "s2") is Verdict.ALLOWED
    assert authorize(keys, "Bearer beta", "zzz") is Verdict.ALLOWED
    assert len(keys.scopes) == 2


def test_newlines_separate_entries_like_semicolons() -> None:
    assert parse_api_keys_spec("a:s1\nb:s2") == parse_api_keys_spec("a:s1;b:s2")


@pytest.mark.parametrize("spec", ["nokey", "k:", ":sub", "k: , ", "k:*,sub", "k:a;k:b"])
def test_malformed_entries_are_refused_without_echoing_the_key(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_api_keys_spec(spec)
    assert "entry" in str(info.value)
    if spec.startswith("k"):
        assert "k:" not in str(info.value)


def test_no_key_in_repr_or_in_the_settings_repr() -> None:
    keys = parse_api_keys_spec("supersecret:subA")
    assert "supersecret" not in repr(keys)
    settings = Settings.from_env(
        {"CHATPIPE_API_KEYS": "supersecret:subA", "CHATPIPE_READ_API_KEY": "rk-secret"}
    )
    assert "supersecret" not in repr(settings) and "rk-secret" not in repr(settings)


def test_settings_refuse_malformed_keys_naming_the_variable() -> None:
    with pytest.raises(ValueError, match="CHATPIPE_API_KEYS"):
        Settings.from_env({"CHATPIPE_API_KEYS": "just-a-key"})


def test_an_empty_key_set_is_falsy() -> None:
    assert not parse_api_keys_spec("")
    assert not ApiKeys({})
    assert KEYS


@given(
    st.dictionaries(
        st.text(
            st.characters(blacklist_characters=":;#", blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc")),
            min_size=1,
        ),
        st.frozensets(st.from_regex(r"[A-Za-z0-9._&-]{3,12}", fullmatch=True), min_size=1, max_size=3),
        min_size=1,
        max_size=5,
    ),
    st.from_regex(r"[A-Za-z0-9._&-]{3,12}", fullmatch=True),
)
def test_a_key_reads_exactly_the_subaccounts_its_scope_names(
    scopes: dict[str, frozenset[str]], sub: str
) -> None:
    spec = ";".join(f"{key}:{','.join(sorted(subs))}" for key, subs in scopes.items())
    keys = parse_api_keys_spec(spec)
    for key, subs in scopes.items():
        expected = Verdict.ALLOWED if sub in subs else Verdict.FORBIDDEN
        assert authorize(keys, f"Bearer {key}", sub) is expected
        if key + "x" not in scopes:
            assert authorize(keys, f"Bearer {key}x", sub) is Verdict.UNAUTHENTICATED


@given(st.text())
def test_bearer_key_never_raises(header: str) -> None:
    key = bearer_key(header)
    assert key is None or (key and key == key.strip())
