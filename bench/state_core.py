"""Throughput of the pure state machine alone: `processors.state.apply` over a dict of states.

200k synthetic receipts across 50k umids (realistic mix: single-channel deliveries and reads, fallback
chains up to 3 channels, ~8% exact duplicates, arrival = event time + 0-90 s jitter).
No Kafka, no Faust, no serialisation.

    /tmp/venv/bin/python bench/state_core.py [--receipts N] [--umids M] [--seed S]
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from processors.state import StateConfig, apply, apply_many
from schemas.models import DeliveryReceipt, MessageState, Status, User

T0 = datetime(2026, 7, 1, tzinfo=UTC)
CHAINS = [
    (["whatsapp"], 0.45),
    (["sms"], 0.15),
    (["viber", "sms"], 0.15),
    (["whatsapp", "sms"], 0.15),
    (["viber", "whatsapp", "sms"], 0.10),
]


def _receipts_for(umid: str, rng: random.Random, budget: int) -> list[DeliveryReceipt]:
    chains, weights = zip(*CHAINS, strict=True)
    chain = rng.choices(chains, weights)[0]
    t = T0 + timedelta(seconds=rng.randrange(86400))
    user = User(msisdn=f"+6500{rng.randrange(10**6):06d}")
    statuses: list[tuple[str, str, datetime, str | None]] = []
    for i, ch in enumerate(chain):
        last = i == len(chain) - 1
        seq = ["queued", "sent"]
        if not last:
            seq.append("undelivered")
        else:
            seq.append("delivered")
            if ch != "sms":
                seq.append("read")
        for st in seq:
            t += timedelta(milliseconds=rng.randrange(50, 5000))
            detail = "delivered_to_recipient" if st == "delivered" else None
            statuses.append((ch, st, t, detail))
    statuses = statuses[:budget]
    out = [
        DeliveryReceipt(umid, "acme", ch, Status(st, ts, detail), ts, "{}", user=user)
        for ch, st, ts, detail in statuses
    ]
    out += [rng.choice(out) for _ in range(sum(rng.random() < 0.08 for _ in out))]  # 8x8 retries
    return out


def build(n_receipts: int, n_umids: int, seed: int) -> list[DeliveryReceipt]:
    """Receipts in arrival order: event time plus a random webhook delay (0-90 s, retries) across umids."""
    rng = random.Random(seed)
    per = max(1, n_receipts // n_umids)
    receipts: list[DeliveryReceipt] = []
    for u in range(n_umids):
        receipts += _receipts_for(f"umid-{u:08d}", rng, per + rng.randrange(-1, 3))
    arrival = {id(r): r.status.timestamp + timedelta(seconds=rng.random() * 90) for r in receipts}
    receipts.sort(key=lambda r: arrival[id(r)])
    if len(receipts) > n_receipts:  # drop a random excess (lost receipts), not the tail's umids
        drop = set(rng.sample(range(len(receipts)), len(receipts) - n_receipts))
        receipts = [r for i, r in enumerate(receipts) if i not in drop]
    return receipts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--receipts", type=int, default=200_000)
    ap.add_argument("--umids", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    receipts = build(args.receipts, args.umids, args.seed)
    config = StateConfig()
    now = T0 + timedelta(days=1)

    best = 0.0
    for _ in range(3):
        table: dict[str, MessageState] = {}
        changed = 0
        t = time.perf_counter()
        for r in receipts:
            o = apply(table.get(r.umid), r, now=now, config=config)
            table[r.umid] = o.state
            changed += o.changed
        dt = time.perf_counter() - t
        best = max(best, len(receipts) / dt)
    print(
        f"apply():      {len(receipts)} receipts, {len(table)} umids, {changed} changes: {best:,.0f} events/s"
    )

    # per-batch grouping as the agent would do it (batches of 1000 receipts, grouped by umid)
    best = 0.0
    for _ in range(3):
        table = {}
        t = time.perf_counter()
        for i in range(0, len(receipts), 1000):
            groups: dict[str, list[DeliveryReceipt]] = {}
            for r in receipts[i : i + 1000]:
                groups.setdefault(r.umid, []).append(r)
            for umid, rs in groups.items():
                table[umid] = apply_many(table.get(umid), rs, now=now, config=config).state
        dt = time.perf_counter() - t
        best = max(best, len(receipts) / dt)
    print(f"apply_many(): batches of 1000 grouped by umid: {best:,.0f} events/s")

    gc.collect()
    gc.disable()  # what gc.freeze()/thresholds in the worker could win back; the core allocates a lot
    try:
        best = 0.0
        for _ in range(3):
            table = {}
            t = time.perf_counter()
            for r in receipts:
                table[r.umid] = apply(table.get(r.umid), r, now=now, config=config).state
            best = max(best, len(receipts) / (time.perf_counter() - t))
    finally:
        gc.enable()
    print(f"apply() with the cyclic GC off: {best:,.0f} events/s")


if __name__ == "__main__":
    main()
