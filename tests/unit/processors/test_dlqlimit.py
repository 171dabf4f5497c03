"""The dead-letter limit (`processors.dlqlimit.DlqLimit`): a pure rule over the last N records."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.dlqlimit import DlqLimit

calls = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=40)
limits = st.tuples(st.floats(0, 1), st.integers(1, 120)).flatmap(
    lambda rw: st.tuples(st.just(rw[0]), st.just(rw[1]), st.integers(1, rw[1]))
)


@settings(max_examples=400, deadline=None)
@given(limits, calls)
def test_the_window_is_exactly_the_last_n_records_and_trips_by_the_rule(
    limit: tuple[float, int, int], seq: list[tuple[int, int]]
) -> None:
    """Against a model that keeps every outcome: the same counts and the same verdict after every call."""
    ratio, window, minimum = limit
    rule = DlqLimit(ratio, window, minimum)
    outcomes: list[bool] = []
    for valid, dead in seq:
        rule.record(valid, dead)
        outcomes += [False] * valid + [True] * dead
        last = outcomes[-window:]
        assert (rule.seen, rule.dead) == (len(last), sum(last))
        assert rule.exceeded == (sum(last) >= minimum and sum(last) > ratio * len(last))


@given(limits, calls)
def test_a_ratio_of_one_never_trips(limit: tuple[float, int, int], seq: list[tuple[int, int]]) -> None:
    rule = DlqLimit(1.0, limit[1], limit[2])
    for valid, dead in seq:
        rule.record(valid, dead)
        assert not rule.exceeded


def test_a_bad_deploy_trips_it_and_the_odd_poison_record_does_not() -> None:
    rule = DlqLimit(0.5, 1000, 100)
    for _ in range(100):
        rule.record(495, 5)  # 1% poison, for ever
        assert not rule.exceeded
    rule.record(0, 99)
    assert not rule.exceeded  # 99 + 5 + 5 of 1000: 10.9%
    for _ in range(6):
        rule.record(0, 99)
    assert rule.exceeded  # 603 of the last 1000
    assert "of the last 1000 records dead-lettered" in rule.describe()


def test_the_minimum_keeps_a_fresh_worker_from_stopping_on_its_first_poison_record() -> None:
    rule = DlqLimit(0.5, 1000, 100)
    rule.record(0, 99)
    assert rule.ratio == 1.0 and not rule.exceeded
    rule.record(0, 1)
    assert rule.exceeded


@pytest.mark.parametrize(
    ("ratio", "window", "minimum"), [(-0.1, 10, 1), (1.5, 10, 1), (0.5, 0, 1), (0.5, 10, 0), (0.5, 10, 11)]
)
def test_settings_that_cannot_work_are_refused(ratio: float, window: int, minimum: int) -> None:
    with pytest.raises(ValueError):
        DlqLimit(ratio, window, minimum)
