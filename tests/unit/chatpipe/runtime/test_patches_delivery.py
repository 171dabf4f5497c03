"""The worker's fast path for Faust's per-record `wait_first(callback(message), suspend_flow.wait())`."""

from __future__ import annotations

import asyncio

import pytest

from chatpipe.runtime.patches import deliver_first


class FakeConsumer:
    """The attributes mode's `Service.wait_first` and the fast path read."""

    def __init__(self) -> None:
        self.suspend_flow = asyncio.Event()
        self._stopped = asyncio.Event()
        self._crashed = asyncio.Event()
        self.loop = asyncio.get_running_loop()


async def test_a_callback_that_never_suspends_completes_without_a_task() -> None:
    consumer = FakeConsumer()
    before = len(asyncio.all_tasks())
    seen: list[int] = []

    async def callback(n: int) -> int:
        seen.append(n)
        assert len(asyncio.all_tasks()) == before  # ran inline: no task was created for it
        return n * 2

    result = await deliver_first(consumer, callback(21), consumer.suspend_flow.wait())
    assert seen == [21]
    assert result.done and result.results == [42] and not result.stopped


async def test_a_callback_that_suspends_is_finished_with_its_value_and_exceptions() -> None:
    consumer = FakeConsumer()
    queue: asyncio.Queue[int] = asyncio.Queue(maxsize=1)
    queue.put_nowait(0)  # full: put() suspends until a get

    async def callback(n: int) -> str:
        await queue.put(n)
        await asyncio.sleep(0)
        return f"put {n}"

    async def drain() -> None:
        await asyncio.sleep(0.01)
        assert queue.get_nowait() == 0

    drainer = asyncio.create_task(drain())
    result = await deliver_first(consumer, callback(7), consumer.suspend_flow.wait())
    await drainer
    assert result.results == ["put 7"]
    assert queue.get_nowait() == 7

    async def failing() -> None:
        await asyncio.sleep(0)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await deliver_first(consumer, failing(), consumer.suspend_flow.wait())


async def test_a_suspended_callback_is_abandoned_when_the_flow_is_suspended() -> None:
    consumer = FakeConsumer()
    never = asyncio.Event()
    reached: list[str] = []

    async def callback() -> None:
        reached.append("started")
        await never.wait()
        reached.append("finished")

    async def suspend() -> None:
        await asyncio.sleep(0.01)
        consumer.suspend_flow.set()

    suspender = asyncio.create_task(suspend())
    result = await asyncio.wait_for(
        deliver_first(consumer, callback(), consumer.suspend_flow.wait()), timeout=5
    )
    await suspender
    assert reached == ["started"]
    assert len(result.done) == 1 and result.results == [True]  # the flow event won


async def test_while_the_flow_is_suspended_the_original_path_runs() -> None:
    consumer = FakeConsumer()
    consumer.suspend_flow.set()
    ran_in: list[asyncio.Task[object] | None] = []

    async def callback() -> None:
        ran_in.append(asyncio.current_task())

    result = await deliver_first(consumer, callback(), consumer.suspend_flow.wait())
    assert not result.stopped and result.done  # Faust's own wait_first answered (either may win)
    # not run inline but in a task of its own, as Faust's wait_first runs it (its first step runs before
    # either task can finish)
    assert len(ran_in) == 1 and ran_in[0] is not asyncio.current_task()
