"""The HTTP services run on the event loop CHATPIPE_EVENT_LOOP names (the standard one by default)."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from chatpipe.runtime.config import Settings
from chatpipe.runtime.serve import run


async def _loop_type() -> type:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop())


def test_run_uses_the_standard_loop_by_default_and_uvloop_when_asked() -> None:
    default = Settings.from_env({}).event_loop
    assert default == "asyncio"
    loop_type = run(_loop_type(), default)
    assert not issubclass(loop_type, uvloop.Loop)
    assert issubclass(loop_type, asyncio.BaseEventLoop)
    chosen = Settings.from_env({"CHATPIPE_EVENT_LOOP": "uvloop"}).event_loop
    assert run(_loop_type(), chosen) is uvloop.Loop


def test_run_returns_the_result_and_closes_its_loop() -> None:
    seen: list[asyncio.AbstractEventLoop] = []

    async def main() -> int:
        seen.append(asyncio.get_running_loop())
        return 42

    assert run(main()) == 42
    assert seen[0].is_closed()


def test_unknown_event_loop_is_refused_naming_the_variable() -> None:
    with pytest.raises(ValueError, match="CHATPIPE_EVENT_LOOP"):
        Settings.from_env({"CHATPIPE_EVENT_LOOP": "trio"})
