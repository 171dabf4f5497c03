"""LoopHistogram exposes what prometheus_client's Histogram exposes for the same observations."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from chatpipe.runtime.metric_defs import _LATENCY_BUCKETS, LoopHistogram


def _exposed(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


@given(
    st.lists(
        st.one_of(
            st.sampled_from(_LATENCY_BUCKETS),  # exactly on a bound: `le` is inclusive
            st.floats(min_value=0, max_value=100, allow_nan=False),
        ),
        max_size=50,
    )
)
def test_same_exposition_as_prometheus_histogram(values: list[float]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop = LoopHistogram("x_seconds", "doc", _LATENCY_BUCKETS, registry=ours)
    reference = Histogram("x_seconds", "doc", buckets=_LATENCY_BUCKETS, registry=theirs)
    for v in values:
        loop.observe(v)
        reference.observe(v)
    assert _exposed(ours) == _exposed(theirs)


def test_buckets_must_increase() -> None:
    with pytest.raises(ValueError, match="increasing"):
        LoopHistogram("y_seconds", "doc", (0.1, 0.1, 1))
