"""Durations and sizes in route tables, read and written.

Rule: format_duration()/format_size() write the shortest text that parse_duration()/
parse_size() read back as exactly the same value.
"""

from __future__ import annotations

import decimal
import math
import re
from typing import Final

from hvbridge.config.problems import describe

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)?")


_SIZE = re.compile(r"([0-9]{1,20})(B|KiB|MiB|GiB)?")


KIB: Final = 1024


MIB: Final = 1024 * 1024


GIB: Final = 1024 * 1024 * 1024


_SIZE_UNITS: Final = {"B": 1, "KiB": KIB, "MiB": MIB, "GiB": GIB}


DURATION_FORMS: Final = "seconds, or a number with a unit ms, s, m or h"


def parse_duration(value: object) -> float:
    """Read a duration: a non-negative number of seconds, or a string such as "250ms", "1.5s", "10m", "1h".

    Args:
        value: An int or float (not a bool), or a string of a number with an optional unit ms, s, m or h.

    Returns:
        The duration in seconds.

    Raises:
        ValueError: The value is not a finite, non-negative duration.
    """
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = None
    elif isinstance(value, str) and len(value) <= 400:  # longer is no float anyway
        match = _DURATION.fullmatch(value)
        if match is not None:
            number = float(match[1])
            unit = match[2]
            # Dividing (not multiplying by 0.001) keeps "250ms" exactly equal to 0.25.
            seconds = number / 1000 if unit == "ms" else number * {None: 1, "s": 1, "m": 60, "h": 3600}[unit]
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"got {describe(value)}; expected a duration ({DURATION_FORMS}, such as '5s')")
    return seconds


def parse_size(value: object) -> int:
    """Read a size in bytes: an int, or a string of digits with an optional unit B, KiB, MiB or GiB.

    Args:
        value: e.g. 65536, "65536", "64KiB", "1MiB".

    Returns:
        The size in bytes.

    Raises:
        ValueError: The value is not a non-negative size.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match is not None:
            return int(match[1]) * _SIZE_UNITS[match[2] or "B"]
    raise ValueError(f"got {describe(value)}; expected a size (bytes, or a number with a unit B, KiB, MiB or GiB)")


def format_duration(seconds: float) -> str:
    """The shortest duration text that parse_duration() reads back as exactly `seconds`."""
    seconds = float(seconds)
    if seconds.is_integer() and seconds < 2**53:
        whole = int(seconds)
        for unit, size in (("h", 3600), ("m", 60)):
            if whole and whole % size == 0:
                return f"{whole // size}{unit}"
        return f"{whole}s"
    millis = seconds * 1000
    if millis.is_integer() and millis < 2**53:
        text = f"{int(millis)}ms"
        if parse_duration(text) == seconds:
            return text
    # repr() is the shortest text that reads back exactly; write it without an exponent.
    return f"{decimal.Decimal(repr(seconds)):f}s"


def format_size(size: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if size and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)
