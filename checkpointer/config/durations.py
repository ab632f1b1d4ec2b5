"""Durations as operators write them: `30s`, `5m`, `1h30m`, `250ms`, or plain seconds.

Both parsers raise ValueError, never another exception, for any input (pydantic turns only
ValueError into a config error naming the key; anything else became an "internal error").
"""

from __future__ import annotations

import math
import re

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}

DAY = 86400.0
# No duration the daemon uses means anything beyond this, and every one must stay clear of
# the limits of what it ends in: datetime arithmetic (year 1..9999), threading.Timer
# (threading.TIMEOUT_MAX, about 292 years). Fields that end in tighter limits bound themselves
# (see config/types.py).
MAX_DURATION = 100 * 365 * DAY
# Sizes end in int64 fields (file offsets, S3 part sizes, statvfs comparisons).
MAX_BYTES = 2**63 - 1

_DURATION_FORMS = "write e.g. 30s, 5m, 1h30m, 250ms or a number of seconds"


def parse_duration(value: object, max_seconds: float = MAX_DURATION) -> float:
    """Seconds in `value`, finite, > 0 and <= `max_seconds`; ValueError with the accepted
    forms otherwise."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{value!r} is not a duration: {_DURATION_FORMS}")
    if isinstance(value, int | float):
        seconds = float(value) if value < 2**1000 else math.inf  # float(10**400) overflows
    else:
        text = value.strip().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        else:
            pos, seconds = 0, 0.0
            for m in _PART.finditer(text):
                if m.start() != pos:
                    break
                seconds += float(m.group(1)) * _UNIT[m.group(2)]
                pos = m.end()
            if pos != len(text) or not text:
                raise ValueError(f"{value!r} is not a duration: {_DURATION_FORMS}")
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r}: a duration must be a finite number")
    if seconds <= 0:
        raise ValueError(f"{value!r}: a duration must be greater than zero")
    if seconds > max_seconds:
        raise ValueError(f"{value!r}: a duration here must be at most {_plain(max_seconds)}")
    return seconds


def _plain(seconds: float) -> str:
    """A bound as operators would write it: 1d, 366d, 36500d."""
    if seconds % DAY == 0:
        return f"{seconds / DAY:.0f}d"
    return f"{seconds:g}s"


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$")
_SIZE_UNIT = {
    "": 1,
    "b": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "t": 1000**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
}
_SIZE_FORMS = "write e.g. 512MiB, 10GiB, 2GB or a number of bytes"


def parse_bytes(value: object) -> int:
    """Bytes in `value`: 1048576, 512MiB, 10GiB, 2GB (powers of 1000), 4k; > 0, finite."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{value!r} is not a size: {_SIZE_FORMS}")
    if isinstance(value, int):
        n = value
    else:
        if isinstance(value, float):
            amount = value
        else:
            m = _SIZE.match(value)
            if not m:
                raise ValueError(f"{value!r} is not a size: {_SIZE_FORMS}")
            unit = (m.group(2) or "").lower().removesuffix("b")
            amount = float(m.group(1)) * _SIZE_UNIT[unit]
        if not math.isfinite(amount):
            raise ValueError(f"{value!r}: a size must be a finite number")
        n = int(amount)
    if n <= 0:
        raise ValueError(f"{value!r}: a size must be greater than zero")
    if n > MAX_BYTES:
        raise ValueError(f"{value!r}: a size must be at most {MAX_BYTES} bytes (just under 8 EiB)")
    return n
