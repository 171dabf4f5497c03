"""What `chatpipe simulate` and `chatpipe verify` share at the edge: running one alone (`main(argv)`,
`python -m chatpipe.simulate`) the way `chatpipe.cli` runs its commands."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from chatpipe.runtime.config import Settings

Command = Callable[[Settings, argparse.Namespace, dict[str, str]], int]


class SubParsers(Protocol):
    """What `ArgumentParser.add_subparsers()` returns, as a command's `add_*_parser(sub)` uses it
    (argparse names that class only privately)."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


def run_alone(
    prog: str, doc: str, arguments: Callable[[argparse.ArgumentParser], None], command: Command,
    argv: Sequence[str] | None,
) -> int:  # fmt: skip
    """Parse `argv` with `arguments`, build the settings from the environment, run `command`; exit
    status 2 for a configuration error (argparse exits 2 itself for bad arguments)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    arguments(parser)
    args = parser.parse_args(argv)
    env = dict(os.environ)
    try:
        settings = Settings.from_env(env)
    except ValueError as exc:
        print(f"chatpipe: configuration error: {exc}", file=sys.stderr)
        return 2
    return command(settings, args, env)
