"""chatpipe.proof.truth: the expected outcome of a planned message follows the documented rules (ranks,
the later of equal ranks, steps by first event time, the last step's state), and the truth file round
trips and refuses what is not one. Pure: no network, no clock."""

from __future__ import annotations

from datetime import timedelta

import orjson
import pytest

from chatpipe.proof.traffic import Event, Message, Step, User
from chatpipe.proof.truth import Delivery, ExpectedStep, dump_lines, expected_message, load_lines, truth_of
from tests.unit.chatpipe.proof.test_traffic import START, _traffic


def _ev(state: str, second: int, **kw: object) -> Event:
    at = START + timedelta(seconds=second)
    return Event(state, at, at.strftime("%Y-%m-%dT%H:%M:%SZ"), **kw)  # type: ignore[arg-type]


def _message(*steps: Step) -> Message:
    return Message("u-1", "Sim_Test", User("+6581234567", "SG"), steps, 9)


# hand-checked cases of README's rules: ranks queued < sent < delivered = failed < read, the later time
# between equal ranks, steps ordered by first event time, the message state the last step's
CASES = [
    (
        "plain delivery",
        [("whatsapp", [("sent", 1), ("delivered", 3)])],
        "delivered",
        [("whatsapp", "delivered", 3)],
    ),
    (
        "read wins over a later delivered",
        [("whatsapp", [("sent", 1), ("read", 9), ("delivered", 12)])],
        "read",
        [("whatsapp", "read", 9)],
    ),
    (
        "a late sent never regresses",
        [("viber", [("delivered", 5), ("sent", 7)])],
        "delivered",
        [("viber", "delivered", 5)],
    ),
    (
        "failure after delivered_to_operator: the later of equal ranks",
        [("sms", [("delivered", 5), ("undelivered", 9)])],
        "undelivered",
        [("sms", "undelivered", 9)],
    ),
    (
        "delivered after a failure, later: delivered",
        [("sms", [("undelivered", 5), ("delivered", 9)])],
        "delivered",
        [("sms", "delivered", 9)],
    ),
    (
        "fallback: WhatsApp failed, SMS delivered",
        [("whatsapp", [("sent", 1), ("undelivered", 4)]), ("sms", [("sent", 6), ("delivered", 8)])],
        "delivered",
        [("whatsapp", "undelivered", 4), ("sms", "delivered", 8)],
    ),
    (
        "steps by first event time, whatever the plan's order",
        [("sms", [("sent", 60), ("delivered", 61)]), ("whatsapp", [("sent", 1)])],
        "delivered",
        [("whatsapp", "sent", 1), ("sms", "delivered", 61)],
    ),
]


@pytest.mark.parametrize(("name", "plan", "state", "steps"), CASES, ids=[c[0] for c in CASES])
def test_the_truth_follows_the_documented_rules(name: str, plan, state: str, steps) -> None:
    m = _message(*(Step(ch, tuple(_ev(s, t) for s, t in events)) for ch, events in plan))
    truth = expected_message(m)
    assert truth.state == state
    assert [(s.step, s.channel, s.state, s.timestamp) for s in truth.steps] == [
        (n, ch, st_, (START + timedelta(seconds=t)).strftime("%Y-%m-%dT%H:%M:%SZ"))
        for n, (ch, st_, t) in enumerate(steps, 1)
    ]


def test_the_truth_keeps_the_error_of_the_winning_event() -> None:
    m = _message(
        Step(
            "whatsapp",
            (
                _ev("sent", 1),
                _ev(
                    "undelivered",
                    3,
                    detail="rejected_by_operator",
                    error_code=1018,
                    error_message="Message rejected",
                ),
            ),
        )
    )
    assert expected_message(m).steps == (
        ExpectedStep(
            1, "whatsapp", "undelivered", _ev("x", 3).stamp, "rejected_by_operator", 1018, "Message rejected"
        ),
    )


def test_the_truth_file_round_trips() -> None:
    traffic = _traffic(messages=300, malformed_share=0.05)
    delivery = Delivery(frozenset({traffic.messages[0].umid}), frozenset(), 12, 0, 1, 900, 40, 3.5, 257.1)
    truth = truth_of(traffic, delivery)
    lines = list(dump_lines(truth))
    assert load_lines(lines) == truth
    run = orjson.loads(lines[0])
    assert (
        run["type"] == "run" and run["messages"] == 300 and run["subAccounts"] == list(traffic.sub_accounts)
    )
    assert orjson.loads(lines[-1])["type"] == "delivery"


@pytest.mark.parametrize("bad", ["", "not json", '{"type": "run", "format": "other/9"}', '{"type": "nope"}'])
def test_a_file_that_is_not_a_truth_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        load_lines([bad] if bad else [])
