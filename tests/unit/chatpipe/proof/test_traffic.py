"""chatpipe.proof.traffic: the simulator's traffic is realistic, parses, and is built so that its truth
(chatpipe.proof.truth, tested in test_truth.py) holds by construction too. Pure: no network, no clock."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatpipe.proof.traffic import (
    MALFORMED_KINDS,
    RANKS,
    REPORTS_READ,
    TrafficConfig,
    generate,
)
from chatpipe.proof.truth import (
    dump_lines,
    expected_message,
    step_status,
    truth_of,
)
from ingest.parse import parse_webhook
from schemas.errors import InvalidEvent
from schemas.models import DeliveryReceipt, InboundMessage

START = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
RECEIVED = START + timedelta(hours=1)  # when ingest would receive them: events up to a day later parse


def _traffic(messages: int = 400, seed: int = 7, **kw: object):
    return generate(TrafficConfig(messages=messages, seed=seed, start=START, **kw))  # type: ignore[arg-type]


def test_the_same_seed_gives_the_same_webhooks_and_truth_byte_for_byte() -> None:
    a, b = _traffic(seed=11), _traffic(seed=11)
    assert [w.body for w in a.webhooks] == [w.body for w in b.webhooks]
    assert list(dump_lines(truth_of(a))) == list(dump_lines(truth_of(b)))


def test_another_seed_gives_other_traffic_and_other_subaccounts() -> None:
    a, b = _traffic(seed=1), _traffic(seed=2)
    assert [w.body for w in a.webhooks] != [w.body for w in b.webhooks]
    assert not set(a.sub_accounts) & set(b.sub_accounts)


def test_every_well_formed_webhook_parses_and_every_malformed_one_is_refused() -> None:
    traffic = _traffic(messages=600, malformed_share=0.05)
    kinds = Counter(w.kind for w in traffic.webhooks)
    assert kinds["receipt"] and kinds["inbound"] and kinds["malformed"] >= len(MALFORMED_KINDS)
    for w in traffic.webhooks:
        if w.kind == "malformed":
            with pytest.raises(InvalidEvent):
                parse_webhook(w.body, RECEIVED)
        else:
            event = parse_webhook(w.body, RECEIVED)
            assert isinstance(event, DeliveryReceipt if w.kind == "receipt" else InboundMessage)
            assert event.umid == w.umid
    assert {w.defect for w in traffic.webhooks if w.kind == "malformed"} == set(MALFORMED_KINDS)


def test_malformed_webhooks_carry_umids_of_no_real_message() -> None:
    traffic = _traffic(malformed_share=0.05)
    real = {m.umid for m in traffic.messages} | {i.umid for i in traffic.inbound}
    assert not {w.umid for w in traffic.webhooks if w.kind == "malformed"} & real


def test_the_malformed_share_is_the_share_of_all_webhooks() -> None:
    traffic = _traffic(messages=1000, malformed_share=0.1)
    malformed = sum(w.kind == "malformed" for w in traffic.webhooks)
    assert malformed / len(traffic.webhooks) == pytest.approx(0.1, abs=0.002)
    assert not any(w.kind == "malformed" for w in _traffic(malformed_share=0.0).webhooks)


def test_the_traffic_covers_channels_chains_states_versions_and_disorder() -> None:
    traffic = _traffic(messages=3000)
    channels = {s.channel for m in traffic.messages for s in m.steps}
    assert channels >= {"whatsapp", "viber", "sms", "rcs", "line", "linenotification", "zalonotification"}
    chains = {tuple(s.channel for s in m.steps) for m in traffic.messages}
    assert ("whatsapp", "viber", "sms") in chains and ("whatsapp", "sms") in chains
    finals = Counter(m.steps[-1].events[-1].state for m in traffic.messages)
    assert {"delivered", "read", "undelivered", "sent", "rejected", "failed"} <= set(finals)
    docs = [orjson.loads(w.body) for w in traffic.webhooks if w.kind == "receipt"]
    assert {d.get("version") for d in docs} == {None, 9}
    countries = {m.user.country for m in traffic.messages}
    assert len(countries) >= 6
    assert len({d["payload"]["subAccountId"] for d in docs}) == 5
    assert any(w.duplicate for w in traffic.webhooks)
    inbound_types = Counter(i.type for i in traffic.inbound)
    assert {"Text", "Image", "Location", "button_reply", "list_reply"} <= set(inbound_types)


def test_error_codes_are_the_documented_ones_of_the_channel() -> None:
    traffic = _traffic(messages=3000)
    for m in traffic.messages:
        for s in m.steps:
            for e in s.events:
                if e.state == "undelivered" and s.channel == "whatsapp":
                    assert e.error_code in {15} or 1000 <= e.error_code <= 1054  # type: ignore[operator]
                if e.state == "undelivered" and s.channel == "viber":
                    assert 2001 <= e.error_code <= 2025  # type: ignore[operator]
                if e.state == "undelivered" and s.channel == "sms":
                    assert e.error_code is not None and e.error_code < 100
                if e.state == "sent" and e.error_code is not None:
                    assert (s.channel, e.error_code) == ("viber", 2000)


def test_read_receipts_only_on_channels_that_report_them() -> None:
    traffic = _traffic(messages=3000)
    for m in traffic.messages:
        for s in m.steps:
            states = {e.state for e in s.events}
            if "read" in states:
                assert s.channel in REPORTS_READ
            if s.channel == "line":
                assert "delivered" not in states


def test_every_step_is_built_so_that_its_last_event_is_its_status_and_steps_are_in_chain_order() -> None:
    """By construction (the plan) and by rule (truth.step_status) the truth is the same."""
    for m in _traffic(messages=2000).messages:
        for s in m.steps:
            assert step_status(s.events) == s.events[-1]
            assert [e.at for e in s.events] == sorted({e.at for e in s.events})  # strictly increasing
            ranks = [RANKS[e.state] for e in s.events]
            assert ranks == sorted(ranks)
        firsts = [s.events[0].at for s in m.steps]
        assert firsts == sorted(set(firsts))
        truth = expected_message(m)
        assert [s.channel for s in truth.steps] == [s.channel for s in m.steps]
        assert truth.state == m.steps[-1].events[-1].state


def test_timestamps_are_written_as_8x8_does_and_mean_exactly_the_event_time() -> None:
    traffic = _traffic(messages=1000)
    for m in traffic.messages:
        for s in m.steps:
            for e in s.events:
                assert e.stamp.endswith("Z")
                frac = e.stamp[20:-1] if "." in e.stamp else ""
                assert len(frac) in (0, 2, 3, 7)
                cut = e.stamp[:26] + "Z" if len(frac) == 7 else e.stamp
                assert datetime.fromisoformat(cut) == e.at
    latest = max(e.at for m in traffic.messages for s in m.steps for e in s.events)
    assert latest - START < timedelta(hours=12)  # ingest refuses more than a day ahead of arrival


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), messages=st.integers(0, 40), dup=st.floats(0, 1), shuffle=st.floats(0, 1))
def test_any_seed_gives_parseable_traffic_with_a_consistent_truth(
    seed: int, messages: int, dup: float, shuffle: float
) -> None:
    traffic = generate(
        TrafficConfig(
            messages=messages,
            seed=seed,
            start=START,
            duplicate_share=dup,
            shuffle_share=shuffle,
            malformed_share=0.05,
        )
    )
    assert len(traffic.messages) == messages
    receipts = Counter()
    for w in traffic.webhooks:
        if w.kind == "malformed":
            continue
        event = parse_webhook(w.body, RECEIVED)
        if isinstance(event, DeliveryReceipt):
            receipts[event.umid] += 1
    for m in traffic.messages:
        truth = expected_message(m)
        assert truth.steps and truth.state == truth.steps[-1].state
        distinct = sum(len(s.events) for s in m.steps)
        assert distinct <= receipts[m.umid] <= 2 * distinct  # every receipt sent, some twice


def test_configs_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError):
        TrafficConfig(messages=-1)
    with pytest.raises(ValueError):
        TrafficConfig(messages=1, malformed_share=1.0)
    with pytest.raises(ValueError):
        TrafficConfig(messages=1, start=datetime(2026, 1, 1))
