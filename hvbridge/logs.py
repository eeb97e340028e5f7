"""Logging: one line per event, as text (`key=value`) or JSON (one object per line).

This module owns the log format. Events carry structured fields (route, peer, target, bytes,
duration, reason); both formats print the same fields. Nothing is logged per byte or per read.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Final, Literal

LOGGER: Final = logging.getLogger("hvbridge")
_FIELDS: Final = "hvbridge_fields"
Field = str | int | float | bool | None


def event(level: int, message: str, **fields: Field) -> None:
    """Log `message` with structured `fields` at `level` on the hvbridge logger."""
    if LOGGER.isEnabledFor(level):
        LOGGER.log(level, message, extra={_FIELDS: fields})


def _fields(record: logging.LogRecord) -> dict[str, Field]:
    fields = getattr(record, _FIELDS, None)
    return fields if isinstance(fields, dict) else {}


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _text_value(value: Field) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=') or not text.isprintable():
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """`TIME LEVEL message key=value ...`; values with spaces are quoted."""

    def format(self, record: logging.LogRecord) -> str:
        """Format one record."""
        parts = [_timestamp(record), record.levelname, record.getMessage()]
        parts += [f"{k}={_text_value(v)}" for k, v in _fields(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Format one record."""
        obj: dict[str, Field] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        obj.update(_fields(record))
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj)


def setup_logging(level: str = "info", fmt: Literal["text", "json"] = "text") -> None:
    """Send hvbridge's log to stderr at `level` in format `fmt` (replaces earlier setup)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level.upper())
    LOGGER.propagate = False
