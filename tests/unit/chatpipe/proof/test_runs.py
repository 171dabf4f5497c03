"""chatpipe.proof.runs and `simulate --until/--continue`: a simulation stopped at a time and continued by
later runs sends every webhook exactly once, and its truth after each run is the documented rules applied
to what was sent by then. Pure: no network, no clock."""

from __future__ import annotations

import argparse
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from chatpipe.proof.runs import Part, merge_delivery, part_from_json, part_json, parts_of, simulation
from chatpipe.proof.traffic import FAILURES, TrafficConfig, generate
from chatpipe.proof.truth import Delivery, dump_lines, load_lines, step_status, truth_of
from chatpipe.simulate import add_simulate_parser, plan_run, write_truth

START = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
STOP = START + timedelta(seconds=200)


def _first(messages: int = 1000, seed: int = 15) -> Part:
    return Part(TrafficConfig(messages=messages, seed=seed, start=START), STOP)


def _second(until: datetime | None = None, seed: int = 115) -> Part:
    return Part(TrafficConfig(messages=600, seed=seed, start=STOP), until)


def _bodies(webhooks) -> Counter[bytes]:
    return Counter(w.body for w in webhooks)


def test_a_stopped_run_and_its_continuation_send_every_webhook_once_in_arrival_order() -> None:
    first, second = _first(), _second()
    one, two = simulation([first]), simulation([first, second])
    everything = _bodies(generate(first.config).webhooks) + _bodies(generate(second.config).webhooks)
    assert _bodies(one.webhooks) + _bodies(two.webhooks) == everything
    assert all(w.at is not None and w.at <= STOP for w in one.webhooks)
    assert one.held_back == sum(1 for w in generate(first.config).webhooks if w.at > STOP)  # type: ignore[operator]
    assert one.held_back and two.held_back == 0
    times = [w.at for w in two.webhooks]
    assert times == sorted(times)  # type: ignore[type-var]


def test_after_the_last_run_the_truth_is_that_of_one_uninterrupted_run() -> None:
    first, second = _first(), _second()
    continued = simulation([first, second]).truth
    alone = truth_of(generate(first.config))
    assert continued.messages[: len(alone.messages)] == alone.messages
    assert continued.inbound[: len(alone.inbound)] == alone.inbound
    assert set(continued.run["subAccounts"]) == set(alone.run["subAccounts"]) | set(
        truth_of(generate(second.config)).run["subAccounts"]
    )


def test_the_truth_of_a_stopped_run_is_the_rules_applied_to_the_receipts_it_sent() -> None:
    first = _first()
    sim = simulation([first])
    sent = {(w.umid, w.event) for w in sim.webhooks if w.kind == "receipt"}
    expected = {m.umid: m for m in sim.truth.messages}
    for m in generate(first.config).messages:
        kept = [
            [e for ei, e in enumerate(s.events) if (m.umid, (si, ei)) in sent] for si, s in enumerate(m.steps)
        ]
        if not any(kept):
            assert m.umid not in expected  # nothing of it was sent yet: unknown, not missing
            continue
        truth = expected[m.umid]
        assert [s.channel for s in truth.steps] == [
            s.channel for s, k in zip(m.steps, kept, strict=True) if k
        ]
        for step, events in zip(truth.steps, [k for k in kept if k], strict=True):
            assert step.state == step_status(events).state
            assert step.timestamp == step_status(events).stamp
    assert {i.umid for i in sim.truth.inbound} == {w.umid for w in sim.webhooks if w.kind == "inbound"}
    assert {b.sha256 for b in sim.truth.malformed} == {
        w.sha256 for w in sim.webhooks if w.kind == "malformed"
    }


def test_the_continuation_brings_later_receipts_of_messages_in_flight_and_new_messages() -> None:
    first, second = _first(), _second()
    before = {m.umid: m for m in simulation([first]).truth.messages}
    two = simulation([first, second])
    after = {m.umid: m for m in two.truth.messages}
    moved = Counter()
    for umid, m in before.items():
        later = after[umid]
        if later != m:
            if m.state in FAILURES and len(later.steps) > len(m.steps):
                moved["fallback after a failure"] += 1
            elif (m.state, later.state) == ("delivered", "read"):
                moved["read after delivered"] += 1
            elif m.state == "sent" and later.state != "sent":
                moved["on from sent"] += 1
    assert moved["fallback after a failure"] and moved["read after delivered"] and moved["on from sent"]
    sent_before = {w.body for w in simulation([first]).webhooks}
    assert any(w.duplicate and w.body in sent_before for w in two.webhooks)  # a late duplicate
    new = set(after) - set(before)
    assert new == {m.umid for m in generate(second.config).messages} | {
        m.umid for m in generate(first.config).messages if m.umid not in before
    }


def test_three_runs_each_continuing_the_last() -> None:
    first = _first()
    second = _second(STOP + timedelta(seconds=120))
    third = Part(TrafficConfig(messages=50, seed=9, start=second.until), None)  # type: ignore[arg-type]
    sent = Counter[bytes]()
    for k in (1, 2, 3):
        sent += _bodies(simulation([first, second, third][:k]).webhooks)
    assert sent == sum((_bodies(generate(p.config).webhooks) for p in (first, second, third)), Counter())
    final = simulation([first, second, third]).truth
    assert final.messages[:1000] == truth_of(generate(first.config)).messages[:1000]


def test_parts_must_have_their_own_seeds_and_later_stops() -> None:
    with pytest.raises(ValueError, match="seed of its own"):
        simulation([_first(seed=3), _second(seed=3)])
    with pytest.raises(ValueError, match="stop after"):
        simulation([_first(), _second(until=STOP)])


def test_parts_survive_the_truth_file_and_old_run_lines_read_as_one_default_part() -> None:
    part = Part(
        TrafficConfig(messages=7, seed=4, start=START + timedelta(microseconds=123456), spread=90.5),
        STOP + timedelta(microseconds=5),
    )
    assert part_from_json(part_json(part)) == part
    truth = simulation([part]).truth
    assert parts_of(load_lines(dump_lines(truth)).run) == (part,)
    old = {"type": "run", "seed": 2, "start": "2026-07-01T12:00:00Z", "messages": 30}
    assert parts_of(old) == (Part(TrafficConfig(messages=30, seed=2, start=START)),)


def test_given_up_umids_stay_given_up_across_runs() -> None:
    a = Delivery(frozenset({"m1"}), frozenset({"i1"}), 5, 0, 0, 100, 10, 10.0, 10.0)
    b = Delivery(frozenset({"m2"}), frozenset(), 3, 0, 1, 50, 0, 15.0, 0.0)
    merged = merge_delivery(a, b)
    assert merged.given_up == {"m1", "m2"} and merged.given_up_inbound == {"i1"}
    assert (merged.dlq_records, merged.rejected_valid, merged.attempts, merged.elapsed_seconds) == (
        8,
        1,
        150,
        25,
    )
    assert merge_delivery(None, b) == b


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_simulate_parser(sub)
    return parser.parse_args(["simulate", "--url", "http://h:1", "--rate", "10", *argv])


def test_continue_regenerates_the_earlier_runs_and_refuses_a_truth_they_do_not_give(tmp_path: Path) -> None:
    earlier = tmp_path / "one.jsonl"
    first = _first(messages=100)
    write_truth(earlier, simulation([first]).truth)
    parts, truth = plan_run(_args("--messages", "20", "--continue", str(earlier)))
    assert truth is not None and parts[0] == first
    assert (parts[1].config.seed, parts[1].config.start, parts[1].until) == (16, STOP, None)
    parts, _ = plan_run(_args("--messages", "20", "--until", "30", "--continue", str(earlier)))
    assert parts[1].until == STOP + timedelta(seconds=30)

    lines = earlier.read_text().splitlines()
    edited = [line.replace('"state":"read"', '"state":"delivered"', 1) for line in lines]
    assert edited != lines
    earlier.write_text("\n".join(edited) + "\n")
    with pytest.raises(ValueError, match="cannot be continued"):
        plan_run(_args("--messages", "20", "--continue", str(earlier)))
    with pytest.raises(ValueError, match="cannot read the earlier truth"):
        plan_run(_args("--messages", "20", "--continue", str(tmp_path / "absent.jsonl")))
