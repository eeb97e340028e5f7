"""Logging: one line per event, as text (`key=value`) or JSON (one object per line).

This module owns the log format. Events carry structured fields (route, peer, target, bytes,
duration, reason); both formats print the same fields. Nothing is logged per byte or per read.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
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


#: A log file is rotated at this size: hvbridge.log -> hvbridge.log.1 -> ... (unattended hosts,
#: Windows in particular, have no logrotate).
LOG_FILE_MAX_BYTES: Final = 10 * 1024 * 1024
#: Rotated files kept besides the current one.
LOG_FILE_BACKUPS: Final = 5


def setup_logging(level: str = "info", fmt: Literal["text", "json"] = "text", file: str | None = None) -> None:
    """Send hvbridge's log to stderr, or to `file`, at `level` in format `fmt` (replaces earlier setup).

    Args:
        level: debug, info, warning or error.
        fmt: text or json.
        file: Append to this file (UTF-8, rotated at LOG_FILE_MAX_BYTES), e.g. under a Windows
            scheduled task or service, which has no console; None for stderr.

    Raises:
        OSError: `file` cannot be opened; the earlier setup is kept.
    """
    handler: logging.Handler
    if file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.handlers.RotatingFileHandler(
            file, maxBytes=LOG_FILE_MAX_BYTES, backupCount=LOG_FILE_BACKUPS, encoding="utf-8"
        )
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for old in LOGGER.handlers:
        old.close()
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level.upper())
    LOGGER.propagate = False
