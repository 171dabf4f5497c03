"""`merge`: several folded batches sent as one, in folding order."""

from __future__ import annotations

from processors.agents import _Batch, merge


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
