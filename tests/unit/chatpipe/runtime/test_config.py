"""Settings.from_env: the ingest producer's linger is a setting, parsed and bounded."""

from __future__ import annotations

import pytest

from chatpipe.runtime.config import Settings


def test_ingest_linger_defaults_to_one_millisecond_and_parses_fractions() -> None:
    assert Settings.from_env({}).ingest_linger_ms == 1.0
    assert Settings.from_env({"CHATPIPE_INGEST_LINGER_MS": "0.5"}).ingest_linger_ms == 0.5


@pytest.mark.parametrize("raw", ["-1", "1001", "soon"])
def test_ingest_linger_out_of_range_or_not_a_number_names_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match="CHATPIPE_INGEST_LINGER_MS"):
        Settings.from_env({"CHATPIPE_INGEST_LINGER_MS": raw})


def test_ingest_timeouts_default_to_ten_seconds_and_parse_fractions() -> None:
    settings = Settings.from_env({})
    assert (settings.ingest_header_timeout, settings.ingest_body_timeout) == (10.0, 10.0)
    env = {"CHATPIPE_INGEST_HEADER_TIMEOUT": "2.5", "CHATPIPE_INGEST_BODY_TIMEOUT": "30"}
    settings = Settings.from_env(env)
    assert (settings.ingest_header_timeout, settings.ingest_body_timeout) == (2.5, 30.0)


@pytest.mark.parametrize("name", ["CHATPIPE_INGEST_HEADER_TIMEOUT", "CHATPIPE_INGEST_BODY_TIMEOUT"])
@pytest.mark.parametrize("raw", ["0", "-1", "soon"])
def test_ingest_timeouts_not_positive_name_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: raw})


def test_spool_stall_limits_default_to_five_rounds_and_a_minute_and_parse() -> None:
    settings = Settings.from_env({})
    assert (settings.spool_stall_failures, settings.spool_stall_seconds) == (5, 60.0)
    env = {"CHATPIPE_SPOOL_STALL_FAILURES": "2", "CHATPIPE_SPOOL_STALL_SECONDS": "7.5"}
    settings = Settings.from_env(env)
    assert (settings.spool_stall_failures, settings.spool_stall_seconds) == (2, 7.5)


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("CHATPIPE_SPOOL_STALL_FAILURES", "0"),
        ("CHATPIPE_SPOOL_STALL_FAILURES", "1.5"),
        ("CHATPIPE_SPOOL_STALL_SECONDS", "0"),
        ("CHATPIPE_SPOOL_STALL_SECONDS", "-1"),
    ],
)
def test_spool_stall_limits_that_would_always_stall_name_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: raw})
