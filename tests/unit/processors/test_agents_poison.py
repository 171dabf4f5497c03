"""The processor shell's poison records (`Folder.fold`): a receipt that cannot be folded is parked in the
processor DLQ with its reason and record bytes, and costs no other receipt (not even of its umid).

The codecs are chatpipe's real ones over an in-process registry; RocksDB is a dict (`_write_local` is
left out: `out.values` is what it would write). The pure core is wrapped where a test needs a receipt
it cannot fold: none is known since `processors.state` saturates its due times.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from chatpipe.runtime.config import Settings
from chatpipe.runtime.metric_defs import ProcessorMetrics
from processors import agents
from processors.agents import Folder, _Batch
from processors.app import GONE, RuntimeConfig, Stored, decode_stored, encode_stored
from processors.state import StateConfig, apply_many
from schemas.codec import Codecs, Registry
from schemas.errors import TransientError
from schemas.models import DeadLetter, DeliveryReceipt, MessageState, Status, User
from tests.unit.schemas.test_codec import InMemoryClient

T0 = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)
TOPIC = "chatpipe.receipts.raw"


def rc(umid: str, state: str, seconds: int, channel: str = "whatsapp") -> DeliveryReceipt:
    t = T0 + timedelta(seconds=seconds)
    return DeliveryReceipt(umid, "acme", channel, Status(state, t), t, "{}", user=User(msisdn="+6590000000"))


class Event:
    def __init__(self, partition: int, offset: int, key: bytes, value: bytes) -> None:
        self.message = SimpleNamespace(topic=TOPIC, partition=partition, offset=offset, key=key)
        self.value = value


def make_folder(runtime: RuntimeConfig | None = None) -> tuple[Folder, Codecs, dict[bytes, bytes]]:
    codecs = Codecs(Registry("memory://", client=InMemoryClient()))  # type: ignore[arg-type]
    name = SimpleNamespace(get_topic_name=lambda: TOPIC)
    p = SimpleNamespace(
        app=None,
        codecs=codecs,
        config=StateConfig(),
        runtime=runtime or RuntimeConfig(),
        metrics=ProcessorMetrics(CollectorRegistry()),
        receipts=name,
        states=SimpleNamespace(get_topic_name=lambda: "chatpipe.messages.state"),
        settings=Settings(emit_steps_and_events=True, kafka_bootstrap="127.0.0.1:1", kafka_idempotence=True),
        table=SimpleNamespace(changelog_topic=name),
    )
    folder = Folder(p)  # type: ignore[arg-type]
    db: dict[bytes, bytes] = {}
    folder.owned = lambda: {0, 1}  # type: ignore[method-assign]
    folder._db = lambda partition: db  # type: ignore[method-assign]
    folder._write_local = lambda out: None  # type: ignore[method-assign]
    return folder, codecs, db


def events_of(codecs: Codecs, receipts: list[tuple[int, DeliveryReceipt | bytes]]) -> list[Event]:
    out, offsets = [], {0: 100, 1: 200}
    for partition, r in receipts:
        offsets[partition] += 1
        if isinstance(r, bytes):
            out.append(Event(partition, offsets[partition], b"garbled", r))
        else:
            out.append(Event(partition, offsets[partition], r.umid.encode(), codecs.receipts.encode(r)))
    return out


def emitted(codecs: Codecs, out: _Batch) -> dict[str, MessageState]:
    return {key.decode(): codecs.state.decode(avro) for _, key, avro in out.emits}


def letters(codecs: Codecs, out: _Batch) -> list[DeadLetter]:
    return [codecs.processor_dlq.decode(value) for _, _, value in out.dead_letters]


def same(state: MessageState, receipts: list[DeliveryReceipt]) -> bool:
    want = apply_many(None, receipts, now=NOW).state
    return [(s.channel, s.state, s.history) for s in state.steps] == [
        (s.channel, s.state, s.history) for s in want.steps
    ]


def fail_on(monkeypatch: pytest.MonkeyPatch, bad: DeliveryReceipt) -> None:
    """The core raises for any batch holding `bad` (an unknown bug, for the shell's sake)."""

    def core(prev: Any, receipts: Any, **kwargs: Any) -> Any:
        receipts = list(receipts)
        if bad in receipts:
            raise OverflowError("date value out of range")
        return apply_many(prev, receipts, **kwargs)

    monkeypatch.setattr(agents, "apply_many", core)


def test_only_the_receipt_that_fails_is_parked_and_its_umid_and_batch_are_folded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder, codecs, db = make_folder()
    bad = rc("u-bad", "delivered", 20)
    good_of_bad = [rc("u-bad", "sent", 10), rc("u-bad", "read", 30)]
    others = {f"u-{i}": [rc(f"u-{i}", "sent", i), rc(f"u-{i}", "delivered", 40 + i)] for i in range(5)}
    fail_on(monkeypatch, bad)
    batch = [(0, good_of_bad[0]), (0, bad), (0, good_of_bad[1])]
    batch += [(i % 2, r) for i, rs in enumerate(others.values()) for r in rs]
    events = events_of(codecs, batch)

    out = folder.fold(events, NOW)

    states = emitted(codecs, out)
    assert set(states) == {"u-bad", *others}
    assert same(states["u-bad"], good_of_bad)
    for umid, rs in others.items():
        assert same(states[umid], rs)
    stored = decode_stored(db.get(b"u-bad") or next(v for k, v in out.values[0] if k == b"u-bad"), codecs)
    assert stored.offset == 103  # the highest offset folded into it; the poison's (102) is parked
    [letter] = letters(codecs, out)
    assert letter.source == "processor" and letter.body == events[1].value
    assert dict(letter.headers) == {
        "topic": TOPIC, "partition": "0", "offset": "102", "umid": "u-bad", "stage": "fold",
    }  # fmt: skip
    assert "OverflowError: date value out of range" in letter.reason and "u-bad" in letter.reason
    assert folder.metrics.events.labels("poison")._value.get() == 1
    assert folder.metrics.events.labels("applied")._value.get() == len(batch) - 1
    assert out.events is events  # every event is acked once the batch (with its dead letter) is sent


def test_a_failure_while_deriving_the_outputs_leaves_no_partial_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder, codecs, _ = make_folder()
    derive = folder._derive

    def failing(out: _Batch, partition: int, key: bytes, *args: Any, **kwargs: Any) -> None:
        derive(out, partition, key, *args, **kwargs)  # writes its records, then fails
        if key == b"u-bad":
            raise ValueError("step record does not encode")

    folder._derive = failing  # type: ignore[method-assign]
    events = events_of(codecs, [(0, rc("u-bad", "sent", 1)), (0, rc("u-ok", "sent", 2))])
    out = folder.fold(events, NOW)
    assert set(emitted(codecs, out)) == {"u-ok"}
    assert all(k != b"u-bad" for kvs in out.values.values() for k, _ in kvs)
    assert all(d[2] == b"u-ok" for d in out.derived)
    [letter] = letters(codecs, out)
    assert "ValueError: step record does not encode" in letter.reason
    assert folder.parts[0].cache.get(b"u-bad") is None  # nothing cached for it either


def test_an_undecodable_stored_value_parks_the_receipts_of_its_umid_only() -> None:
    folder, codecs, db = make_folder()
    db[b"u-bad"] = encode_stored(Stored(1, 5, -1, avro=b"\x00\x00\x00\x00\x01garbage"))
    events = events_of(
        codecs, [(0, rc("u-bad", "sent", 1)), (0, rc("u-bad", "read", 2)), (0, rc("u-ok", "sent", 3))]
    )
    out = folder.fold(events, NOW)
    assert set(emitted(codecs, out)) == {"u-ok"}
    assert [dict(x.headers)["offset"] for x in letters(codecs, out)] == ["101", "102"]


def test_an_undecodable_record_is_parked_whole_and_the_batch_goes_on() -> None:
    folder, codecs, _ = make_folder()
    garbage = b"\x00\x00\x00\x00\x01\xff\xff\xff"
    events = events_of(codecs, [(1, garbage), (1, rc("u-ok", "sent", 3))])
    out = folder.fold(events, NOW)
    assert set(emitted(codecs, out)) == {"u-ok"}
    [letter] = letters(codecs, out)
    assert letter.body == garbage and letter.source == "processor"
    assert dict(letter.headers)["stage"] == "decode" and dict(letter.headers)["offset"] == "201"
    assert folder.metrics.events.labels("invalid")._value.get() == 1


def test_happy_batches_have_no_dead_letters_and_gone_umids_stay_absorbed() -> None:
    folder, codecs, db = make_folder()
    db[b"u-gone"] = encode_stored(Stored(GONE, 7, -1, version=3))
    out = folder.fold(events_of(codecs, [(0, rc("u-gone", "sent", 1)), (0, rc("u-ok", "sent", 2))]), NOW)
    assert out.dead_letters == [] and set(emitted(codecs, out)) == {"u-ok"}
    assert folder.metrics.events.labels("late")._value.get() == 1


def test_a_due_time_before_the_epoch_is_checked_at_once() -> None:
    assert agents._check_at(None) == -1
    assert agents._check_at(datetime(1969, 1, 1, tzinfo=UTC)) == 0
    assert agents._check_at(datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)) == 1_000_000


def test_a_retriable_error_is_not_the_records_fault_it_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    folder, codecs, _ = make_folder()
    events = events_of(codecs, [(0, rc("u-1", "sent", 1))])

    def registry_down(*args: Any, **kwargs: Any) -> Any:
        raise TransientError("schema registry unreachable")

    monkeypatch.setattr(agents, "apply_many", registry_down)
    with pytest.raises(TransientError):
        folder.fold(events, NOW)
    monkeypatch.setattr(codecs.receipts, "decode", registry_down)
    with pytest.raises(TransientError):
        folder.fold(events, NOW)


def test_the_dead_letter_limit_stops_the_fold_before_it_writes_anything() -> None:
    """A bad deploy: most records of the last ten dead-lettered. `fold` refuses the batch that trips the
    limit (nothing written, nothing to send: its receipts stay unacked), naming the ratio and the reason."""
    from processors.dlqlimit import DlqLimitExceeded

    folder, codecs, _ = make_folder(RuntimeConfig(dlq_max_ratio=0.5, dlq_window=10, dlq_min=3))
    written: list[_Batch] = []
    folder._write_local = written.append  # type: ignore[method-assign]
    ok = folder.fold(events_of(codecs, [(0, rc("u-1", "sent", 1)), (0, b"garbage1")]), NOW)
    assert len(ok.dead_letters) == 1 and written == [ok]  # 1 of 2: under the minimum
    batch = [(0, rc("u-2", "sent", 1)), (1, b"garbage2"), (1, b"garbage3")]
    with pytest.raises(DlqLimitExceeded) as caught:
        folder.fold(events_of(codecs, batch), NOW)
    assert "3 of the last 5 records dead-lettered (60%)" in str(caught.value)
    assert "not Confluent-framed Avro" in str(caught.value)
    assert written == [ok]


def test_an_odd_poison_receipt_never_trips_the_dead_letter_limit() -> None:
    folder, codecs, _ = make_folder(RuntimeConfig(dlq_max_ratio=0.5, dlq_window=10, dlq_min=3))
    for i in range(20):
        batch = [(0, rc(f"u-{i}", "sent", 1)), (1, rc(f"v-{i}", "sent", 1)), (0, b"bad")]
        assert len(folder.fold(events_of(codecs, batch), NOW).dead_letters) == 1


class FakeProducer:
    def __init__(self, config: dict[str, Any]) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Any) -> None:
        self.sent.append((topic, key, value))

    def flush(self, timeout: float) -> int:
        return 0


async def test_a_poison_inbound_message_is_parked_and_the_limit_stops_the_worker(monkeypatch: Any) -> None:
    """`InboundPoison`: each poison message is sent to the DLQ (acked) and counted; a retriable error is
    raised, never parked; the dead-letter limit calls `halt` once the window is mostly poison."""
    folder, codecs, _ = make_folder()
    halted: list[Exception] = []

    async def halt(p: Any, exc: Exception) -> None:
        halted.append(exc)

    monkeypatch.setattr(agents, "Producer", FakeProducer)
    monkeypatch.setattr(agents, "halt", halt)
    p = SimpleNamespace(
        codecs=codecs,
        metrics=folder.metrics,
        settings=Settings(kafka_bootstrap="127.0.0.1:1", kafka_idempotence=True),
        runtime=RuntimeConfig(dlq_max_ratio=0.5, dlq_window=10, dlq_min=3),
    )
    poison = agents.InboundPoison(p)  # type: ignore[arg-type]
    event = Event(2, 7, b"i-1", b"garbage")
    event.message.topic = "chatpipe.inbound.raw"
    with pytest.raises(TransientError):
        await poison.park(event, "inbound_decode", "i-1", TransientError("registry down"))
    for _ in range(2):
        poison.passed()
    await poison.park(event, "inbound_decode", "i-1", ValueError("boom"))
    await poison.park(event, "inbound_fold", "i-1", ValueError("boom"))
    assert not halted  # 2 of 4: under the minimum
    await poison.park(event, "inbound_fold", "i-1", ValueError("last straw"))
    assert len(halted) == 1 and "3 of the last 5" in str(halted[0]) and "last straw" in str(halted[0])
    assert poison._producer is not None
    letters = [codecs.processor_dlq.decode(v) for _, _, v in poison._producer.sent]  # type: ignore[attr-defined]
    assert [dict(x.headers)["stage"] for x in letters] == ["inbound_decode", "inbound_fold", "inbound_fold"]
    assert {(x.body, dict(x.headers)["offset"], dict(x.headers)["topic"]) for x in letters} == {
        (b"garbage", "7", "chatpipe.inbound.raw")
    }
    counted = folder.metrics.dead_letters.labels
    assert (counted("inbound_decode")._value.get(), counted("inbound_fold")._value.get()) == (1.0, 2.0)
