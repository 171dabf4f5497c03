"""The `simulate` / `verify` command shells: they plug into `chatpipe`'s sub-command parser the way
`chatpipe.cli` registers its own, and refuse what they cannot use."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from chatpipe.simulate import add_simulate_parser, cmd_simulate, webhook_url
from chatpipe.verify import add_verify_parser, cmd_verify


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatpipe")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_simulate_parser(sub)
    add_verify_parser(sub)
    return parser


def test_both_commands_register_on_a_subparser_with_their_function() -> None:
    args = _parser().parse_args(["simulate", "--url", "http://h:1", "--messages", "5", "--rate", "10"])
    assert args.func is cmd_simulate
    assert (args.messages, args.rate, args.seed, args.time_factor, args.truth) == (5, 10.0, None, 1.0, None)
    assert (args.until, args.earlier) == (None, None)
    args = _parser().parse_args(["verify", "--truth", "t.jsonl", "--api", "http://h:2", "--wait", "30"])
    assert args.func is cmd_verify
    assert (args.truth, args.api, args.wait, args.store) == (Path("t.jsonl"), "http://h:2", 30.0, None)


@pytest.mark.parametrize("argv", [["--malformed-share", "1.5"], ["--rate", "0"], ["--start", "soon"]])
def test_simulate_refuses_values_out_of_range(argv: list[str]) -> None:
    base = ["simulate", "--url", "http://h:1", "--messages", "5", "--rate", "10"]
    with pytest.raises(SystemExit):
        _parser().parse_args(base + argv)


def test_a_bare_base_url_gets_the_webhook_path() -> None:
    assert webhook_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080/v1/webhooks/chatapps"
    assert webhook_url("http://127.0.0.1:8080/") == "http://127.0.0.1:8080/v1/webhooks/chatapps"
    assert webhook_url("http://h/hooks/8x8") == "http://h/hooks/8x8"
