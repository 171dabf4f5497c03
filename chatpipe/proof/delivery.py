"""How 8x8 delivers webhooks, as `chatpipe simulate` reproduces it. Pure: time is always an argument.

8x8 (delivery-receipts-webhook.txt, inbound-message-webhook.txt): "In case of connection error/timeout or
HTTP response code 4XX or 5XX, there will be multiple retry attempts with progressive intervals: 1, 10,
30, 90 sec." So a webhook is attempted at most five times; after the fifth failure 8x8 gives up on it.
429 and 503 are 4xx/5xx like any other: the same schedule, `Retry-After` is not honoured.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RETRY_DELAYS", "Pacer", "RetryPolicy", "failed"]

RETRY_DELAYS = (1.0, 10.0, 30.0, 90.0)


def failed(status: int | None) -> bool:
    """Whether 8x8 retries an attempt answered `status` (None: a timeout or connection error)."""
    return status is None or not 200 <= status < 300


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """8x8's schedule, every delay multiplied by `time_factor` (0.01 in tests: 10 ms, 100 ms, ...)."""

    delays: tuple[float, ...] = RETRY_DELAYS
    time_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.time_factor < 0:
            raise ValueError(f"time_factor must be >= 0, got {self.time_factor}")
        if any(d < 0 for d in self.delays):
            raise ValueError("retry delays must be >= 0")

    @property
    def max_attempts(self) -> int:
        return len(self.delays) + 1

    def next_delay(self, attempts: int) -> float | None:
        """Seconds to wait after the `attempts`-th attempt failed; None: give up."""
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        if attempts > len(self.delays):
            return None
        return self.delays[attempts - 1] * self.time_factor

    def offsets(self) -> tuple[float, ...]:
        """When each attempt starts, relative to the first, if every attempt fails at once."""
        out, t = [0.0], 0.0
        for d in self.delays:
            t += d * self.time_factor
            out.append(t)
        return tuple(out)


class Pacer:
    """Spaces sends `1 / rate` apart. `slot(now)` is when the next send may go: at most `burst` sends
    fall due at once after a stall (a slow moment is caught up a little, never in one flood)."""

    def __init__(self, rate: float, burst: int = 8) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self.interval = 1.0 / rate
        self.burst = burst
        self._next: float | None = None

    def slot(self, now: float) -> float:
        """Reserve the next send slot; returns its time (<= now: send at once)."""
        if self._next is None or self._next < now - self.burst * self.interval:
            self._next = now
        at = self._next
        self._next = at + self.interval
        return at
