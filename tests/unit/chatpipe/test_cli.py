"""Production services refuse to start open: `chatpipe ingest` without a webhook token and `chatpipe api`
without keys exit 2 before opening anything, unless --insecure / CHATPIPE_INSECURE=1 says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatpipe import cli


@pytest.fixture()
def started(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which services got past the checks (their servers are replaced by a recorder: no I/O here)."""
    calls: list[str] = []
    import chatpipe.runtime.serve
    import ingest.app
    import sinks.api

    monkeypatch.setattr(ingest.app, "create_app", lambda *a, **k: calls.append("ingest"))
    monkeypatch.setattr(sinks.api, "create_app", lambda *a, **k: calls.append("api"))
    monkeypatch.setattr(chatpipe.runtime.serve, "run", lambda *a, **k: None)
    monkeypatch.setattr(chatpipe.runtime.serve, "serve_until_signal", lambda *a, **k: None)
    return calls


def test_ingest_without_a_token_refuses_to_start(
    started: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["ingest"], env={}) == 2
    assert started == []
    err = capsys.readouterr().err
    assert "CHATPIPE_WEBHOOK_TOKEN" in err and "--insecure" in err


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["ingest"], {"CHATPIPE_WEBHOOK_TOKEN": "t"}),
        (["ingest"], {"CHATPIPE_OAUTH_CLIENT_ID": "c", "CHATPIPE_OAUTH_CLIENT_SECRET": "s"}),
        (["ingest", "--insecure"], {}),
        (["ingest"], {"CHATPIPE_INSECURE": "1"}),
    ],
)
def test_ingest_starts_with_a_token_or_when_told_insecure(
    started: list[str], argv: list[str], env: dict[str, str]
) -> None:
    assert cli.main(argv, env=env) == 0
    assert started == ["ingest"]


def test_api_without_keys_refuses_to_start(started: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["api"], env={"CHATPIPE_WEBHOOK_TOKEN": "t"}) == 2
    assert started == []
    assert "CHATPIPE_API_KEYS" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["api"], {"CHATPIPE_API_KEYS": "k:subA"}),
        (["api", "--insecure"], {}),
        (["api"], {"CHATPIPE_INSECURE": "true"}),
    ],
)
def test_api_starts_with_keys_or_when_told_insecure(
    started: list[str], argv: list[str], env: dict[str, str]
) -> None:
    assert cli.main(argv, env=env) == 0
    assert started == ["api"]


def test_api_keys_file_is_read_and_checked(started: list[str], tmp_path: Path) -> None:
    good = tmp_path / "keys"
    good.write_text("# comment\nk1:subA\n", encoding="utf-8")
    assert cli.main(["api"], env={"CHATPIPE_API_KEYS_FILE": str(good)}) == 0
    bad = tmp_path / "bad"
    bad.write_text("k1 without scope\n", encoding="utf-8")
    assert cli.main(["api"], env={"CHATPIPE_API_KEYS_FILE": str(bad)}) == 2
    assert cli.main(["api"], env={"CHATPIPE_API_KEYS_FILE": str(tmp_path / "missing")}) == 2
    assert started == ["api"]


def test_insecure_flag_is_documented_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("ingest", "api"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"], env={})
        assert "--insecure" in capsys.readouterr().out
