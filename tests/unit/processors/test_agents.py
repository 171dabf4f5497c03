"""The processor shell's pipeline: `merge` of folded batches and the sender task (no broker: `send` is
replaced, the rest of `Folder` is real)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from chatpipe.runtime.config import Settings
from processors.agents import Folder, _Batch, merge
from processors.app import RuntimeConfig
from schemas.errors import TransientError


def batch(
    values: dict[int, list[tuple[bytes, bytes | None]]], emits: list[tuple[int, bytes, bytes]]
) -> _Batch:
    b = _Batch()
    for p, kvs in values.items():
        for k, v in kvs:
            b.put(p, k, v)
    b.emits.extend(emits)
    b.derived.extend(("steps", p, k, v + b"-step") for p, k, v in emits)
    return b


def test_one_batch_is_sent_as_it_is() -> None:
    only = batch({0: [(b"a", b"1")]}, [(0, b"a", b"s1")])
    assert merge([only]) is only


def test_writes_keep_folding_order_per_partition_and_the_later_value_comes_last() -> None:
    first = batch({0: [(b"a", b"1"), (b"b", b"1")], 1: [(b"c", b"1")]}, [(0, b"a", b"s1"), (1, b"c", b"s1")])
    second = batch({0: [(b"a", b"2")], 2: [(b"d", None)]}, [(0, b"a", b"s2")])
    out = merge([first, second])
    assert out.values == {0: [(b"a", b"1"), (b"b", b"1"), (b"a", b"2")], 1: [(b"c", b"1")], 2: [(b"d", None)]}
    assert out.emits == [(0, b"a", b"s1"), (1, b"c", b"s1"), (0, b"a", b"s2")]
    assert [d[3] for d in out.derived] == [b"s1-step", b"s1-step", b"s2-step"]
    # the batches themselves are untouched: each is still acked with its own events
    assert first.values[0] == [(b"a", b"1"), (b"b", b"1")] and second.emits == [(0, b"a", b"s2")]


# --- the sender: ordering, acks, and a failure that surfaces once ---------------------------------------


class Event:
    def __init__(self, n: int) -> None:
        self.n = n
        self.acked = 0

    def ack(self) -> None:
        self.acked += 1


def make_folder(in_flight: int = 2) -> Any:
    name = SimpleNamespace(get_topic_name=lambda: "t")
    p = SimpleNamespace(
        app=None,
        codecs=None,
        config=None,
        runtime=RuntimeConfig(in_flight=in_flight),
        metrics=None,
        receipts=name,
        states=name,
        settings=Settings(emit_steps_and_events=False, kafka_bootstrap="127.0.0.1:1", kafka_idempotence=True),
        table=SimpleNamespace(changelog_topic=name),
    )
    folder = Folder(p)  # type: ignore[arg-type]
    folder.fold = lambda events, now: _Batch(events=events, emits=[(0, b"k", bytes([e.n])) for e in events])
    return folder


async def settle(condition: Callable[[], bool]) -> None:
    for _ in range(2500):  # up to 5 s on a loaded machine
        if condition():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("condition not reached")


async def test_batches_are_sent_in_folding_order_and_acked_after_their_send() -> None:
    folder = make_folder()
    sent: list[list[bytes]] = []
    gate = asyncio.Event()

    async def send(out: _Batch) -> None:
        await gate.wait()  # the broker is slow: folding goes on meanwhile
        sent.append([v for _, _, v in out.emits])

    folder.send = send
    events = [Event(i) for i in range(5)]
    for e in events[:3]:
        await folder.submit([e])
    assert not any(e.acked for e in events[:3])  # nothing acked before the broker acked it
    gate.set()
    await settle(lambda: all(e.acked for e in events[:3]))
    for e in events[3:]:
        await folder.submit([e])
    await settle(lambda: all(e.acked == 1 for e in events))
    assert [v for group in sent for v in group] == [bytes([i]) for i in range(5)]  # folding order
    assert len(sent) < 5  # batches that waited went out together
    await folder.stop()


async def test_a_failed_send_is_raised_once_then_the_waiting_batches_go_out() -> None:
    folder = make_folder()
    attempts = 0

    async def send(out: _Batch) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise TransientError("broker down")

    folder.send = send
    first, second, third = Event(1), Event(2), Event(3)
    await folder.submit([first])
    await settle(lambda: attempts == 1)
    with pytest.raises(TransientError, match="broker down"):
        await folder.submit([second])  # the agent crashes here (Faust restarts it)
    await folder.submit([third])  # the restarted agent goes on
    await settle(lambda: third.acked == 1)
    assert first.acked == 0 and second.acked == 0  # never acked: they come again from Kafka
    await folder.stop()
