"""DrainWatch: when a spool that holds records counts as stalled (pure; time is an argument)."""

from __future__ import annotations

import pytest

from ingest.app import DrainWatch

AT = "topic=chatpipe.receipts.raw seq=7: KafkaError{code=PRODUCER_FENCED}"


def test_failed_rounds_that_drain_nothing_stall_it_at_the_limit_naming_where_and_why() -> None:
    w = DrainWatch(max_failures=3, max_seconds=60, now=0)
    for t in (1, 2):
        w.round(t, sent=0, error=AT)
        assert w.stalled is None
    w.round(3, sent=0, error=AT)
    assert w.stalled == f"spool drain failed 3 times in a row while the broker answers, at {AT}"


def test_rounds_failed_while_the_broker_is_away_are_an_outage_and_never_a_stall() -> None:
    w = DrainWatch(max_failures=1, max_seconds=60, now=0)
    for t in range(1, 1000, 10):
        w.round(t, sent=0, error=AT, broker_answers=False)
        assert (w.stalled, w.failures, w.wants_probe(t)) == (None, 0, t >= 60)
    assert w.age(991) == 991  # but the age shows how long nothing was drained


@pytest.mark.parametrize("recover", ["a record drained", "the spool empty"])
def test_a_drained_record_or_an_empty_spool_clears_a_stall_and_the_count(recover: str) -> None:
    w = DrainWatch(max_failures=1, max_seconds=60, now=0)
    w.round(1, sent=0, error=AT)
    assert w.stalled is not None
    if recover == "a record drained":
        w.round(2, sent=1, error=None)
    else:
        w.empty(2)
    assert (w.stalled, w.failures, w.age(2)) == (None, 0, 0)


def test_a_round_that_drains_some_records_then_fails_is_progress_not_a_failure() -> None:
    w = DrainWatch(max_failures=1, max_seconds=60, now=0)
    w.round(5, sent=10, error=AT)
    assert (w.stalled, w.failures, w.age(5), w.last_error) == (None, 0, 0, AT)


def test_no_progress_for_max_seconds_stalls_it_only_once_the_broker_answered() -> None:
    w = DrainWatch(max_failures=100, max_seconds=30, now=0)
    w.round(10, sent=0, error=AT)
    assert not w.wants_probe(29.9)
    w.broker_answered(29.9)  # too early: nothing changes
    assert w.stalled is None
    assert w.wants_probe(30)
    assert w.stalled is None  # a broker still away is an outage, not a stall
    w.broker_answered(31)
    assert w.stalled == f"no spooled record drained for 31 s while the broker answers; last failure at {AT}"
    assert not w.wants_probe(32)  # stalled already: no more probes


def test_settings_that_could_never_stall_or_always_would_are_refused() -> None:
    for failures, seconds in ((0, 60), (3, 0)):
        with pytest.raises(ValueError):
            DrainWatch(failures, seconds, now=0)
