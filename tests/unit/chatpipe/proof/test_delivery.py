"""chatpipe.proof.delivery: 8x8's retry schedule scaled by the time factor, and the pacer. Pure."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatpipe.proof.delivery import RETRY_DELAYS, Pacer, RetryPolicy, failed


def test_the_schedule_is_8x8s_1_10_30_90_seconds_then_give_up() -> None:
    policy = RetryPolicy()
    assert [policy.next_delay(n) for n in range(1, 6)] == [1.0, 10.0, 30.0, 90.0, None]
    assert policy.max_attempts == 5
    assert policy.offsets() == (0.0, 1.0, 11.0, 41.0, 131.0)


def test_the_time_factor_scales_every_delay() -> None:
    policy = RetryPolicy(time_factor=0.01)
    assert [policy.next_delay(n) for n in range(1, 5)] == pytest.approx([0.01, 0.1, 0.3, 0.9])
    assert policy.next_delay(5) is None
    assert policy.offsets()[-1] == pytest.approx(1.31)


@given(st.floats(0, 100, allow_nan=False))
def test_any_time_factor_keeps_the_schedule_proportional(factor: float) -> None:
    policy = RetryPolicy(time_factor=factor)
    assert [policy.next_delay(n) for n in range(1, 5)] == pytest.approx([d * factor for d in RETRY_DELAYS])


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(time_factor=-1)
    with pytest.raises(ValueError):
        RetryPolicy().next_delay(0)


@pytest.mark.parametrize(
    ("status", "retried"),
    [
        (200, False),
        (202, False),
        (None, True),
        (400, True),
        (401, True),
        (429, True),
        (500, True),
        (503, True),
        (301, True),
    ],
)
def test_8x8_retries_any_answer_but_2xx(status: int | None, retried: bool) -> None:
    assert failed(status) is retried


def test_the_pacer_spaces_sends_one_interval_apart() -> None:
    pacer = Pacer(rate=100)
    slots = [pacer.slot(0.0) for _ in range(5)]
    assert slots == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04])


def test_the_pacer_catches_up_a_short_stall_but_not_a_long_one() -> None:
    pacer = Pacer(rate=100, burst=4)
    pacer.slot(0.0)
    assert pacer.slot(0.03) == pytest.approx(0.01)  # 2 intervals late: those slots are still owed
    fresh = Pacer(rate=100, burst=4)
    fresh.slot(0.0)
    assert fresh.slot(10.0) == 10.0  # a long stall: no flood of owed sends


@given(st.lists(st.floats(0, 0.05), min_size=1, max_size=200), st.floats(1, 1000))
def test_the_pacer_never_exceeds_its_rate_plus_the_burst(gaps: list[float], rate: float) -> None:
    pacer, now, slots = Pacer(rate, burst=8), 0.0, []
    for g in gaps:
        now += g
        slots.append(max(pacer.slot(now), now))
    span = slots[-1] - slots[0]
    assert len(slots) <= span * rate + 8 + 1 + 1e-6
