"""ISO 8601 parsing and formatting the way 8x8 writes timestamps. Pure functions.

8x8 sends UTC timestamps with 0 to 7 fractional digits (`2020-12-22T01:24:30.6030893Z`) and, in error
bodies, offsets such as `+00:00`. Python's `fromisoformat` rejects 7 digits, so the fraction is cut to
microseconds before parsing.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

_ISO = re.compile(r"^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}(?::\d{2})?)(?:[.,](\d+))?(Z|z|[+-]\d{2}:?\d{2})?$")


def parse_iso8601(value: str) -> datetime:
    """Parse an ISO 8601 timestamp into an aware UTC datetime.

    A missing offset is taken as UTC (8x8 documents all its timestamps as UTC). Raises ValueError with
    the offending text when the value is not a timestamp.
    """
    m = _ISO.match(value.strip()) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"not an ISO 8601 timestamp: {value!r}")
    date, clock, frac, offset = m.groups()
    text = f"{date}T{clock}"
    if frac:
        text += "." + (frac[:6]).ljust(6, "0")
    if offset and offset not in ("Z", "z"):
        text += offset if ":" in offset else f"{offset[:3]}:{offset[3:]}"
    try:
        parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError) as exc:  # OverflowError: year 1 with a positive offset
        raise ValueError(f"not an ISO 8601 timestamp: {value!r}") from exc


def format_iso8601(value: datetime) -> str:
    """Format as 8x8 does in its APIs: UTC, `Z` suffix, fraction only when non-zero (2 digits min)."""
    value = value.astimezone(UTC)
    # not strftime's %Y: it writes years before 1000 without their zeros (`999-01-01`), not ISO 8601
    base = f"{value.year:04d}-{value.month:02d}-{value.day:02d}T{value:%H:%M:%S}"
    if value.microsecond:
        frac = f"{value.microsecond:06d}".rstrip("0")
        base += "." + frac.ljust(2, "0")
    return base + "Z"
