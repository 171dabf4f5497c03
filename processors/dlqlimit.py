"""The dead-letter limit (arroyo's `DlqLimit`): a bad deploy must not dead-letter everything. Pure.

Parking a poison record and going on is right for the odd bad record; it is wrong when every record is
"poison" because the worker itself is broken (a codec or core bug, a wrong schema): the DLQ would then
swallow the whole stream. `DlqLimit` watches the outcome of the last `window` records of one input
(receipts, inbound messages) and says when more than `max_ratio` of them were dead-lettered, once at
least `min_count` were. The shell then stops the worker without acknowledging the batch that tripped it,
so those records stay uncommitted and come again after the fix.

No I/O, no clock: the window counts records, not seconds. Within one `record(valid, dead)` call the dead
letters count as the most recent records (the conservative order: a batch that ends the window never hides
its dead letters). Memory is O(calls in the window): runs of equal outcomes, not one entry per record.
"""

from __future__ import annotations

from collections import deque

from schemas.errors import ChatpipeError


class DlqLimitExceeded(ChatpipeError):
    """Too many records of one input were dead-lettered: not the records' fault, the worker must stop."""


class DlqLimit:
    """Trips when, among the last `window` records, `dead >= min_count` and `dead > max_ratio * seen`.

    `max_ratio` 1.0 never trips (the limit is off). Raises ValueError on settings that cannot work:
    a ratio outside [0, 1], a window or minimum below 1, or a minimum larger than the window (it could
    never be reached).
    """

    def __init__(self, max_ratio: float, window: int, min_count: int) -> None:
        if not 0.0 <= max_ratio <= 1.0:
            raise ValueError(f"the dead-letter ratio limit must be between 0 and 1, not {max_ratio}")
        if window < 1 or min_count < 1:
            raise ValueError(f"the dead-letter window ({window}) and minimum ({min_count}) must be >= 1")
        if min_count > window:
            raise ValueError(f"the dead-letter minimum ({min_count}) cannot exceed the window ({window})")
        self.max_ratio = max_ratio
        self.window = window
        self.min_count = min_count
        self._runs: deque[list[int]] = deque()  # [count, dead 0/1], oldest first
        self.seen = 0  # records in the window
        self.dead = 0  # dead letters in the window

    def _push(self, n: int, dead: int) -> None:
        if n <= 0:
            return
        runs = self._runs
        if runs and runs[-1][1] == dead:
            runs[-1][0] += n
        else:
            runs.append([n, dead])
        self.seen += n
        self.dead += n * dead

    def record(self, valid: int, dead: int) -> None:
        """`valid` records went through and then `dead` were dead-lettered (counts >= 0)."""
        self._push(valid, 0)
        self._push(dead, 1)
        extra = self.seen - self.window
        runs = self._runs
        while extra > 0:
            run = runs[0]
            n = min(run[0], extra)
            run[0] -= n
            self.seen -= n
            self.dead -= n * run[1]
            extra -= n
            if run[0] == 0:
                runs.popleft()

    @property
    def ratio(self) -> float:
        return self.dead / self.seen if self.seen else 0.0

    @property
    def exceeded(self) -> bool:
        return self.dead >= self.min_count and self.dead > self.max_ratio * self.seen

    def describe(self) -> str:
        """The window's figures, for the ERROR that stops the worker."""
        return (
            f"{self.dead} of the last {self.seen} records dead-lettered ({self.ratio:.0%}), "
            f"above the limit of {self.max_ratio:.0%} "
            f"(at least {self.min_count} in a window of {self.window})"
        )
