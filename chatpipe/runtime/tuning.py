"""Process tuning the long-running services apply once they have started."""

from __future__ import annotations

import gc

#: the cyclic collector's thresholds after start-up (young collections every 50k net allocations, not 700)
GC_THRESHOLDS = (50_000, 50, 100)


def tune_gc() -> None:
    """After start-up: move everything alive into the permanent generation and collect young objects
    less often. The services allocate many short-lived tuples (the processors' state machine, the sink's
    rows and analytics contributions); under the default thresholds the cyclic collector cost ~30% of the
    processors' pure core (bench/state_core.py) and a fifth to a quarter of the CPU the analytics
    aggregates add to the sink (bench/sinks.py --only-aggregates: 1.86 s -> 1.34 s for 100k records)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
