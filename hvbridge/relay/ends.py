"""How a connection ends: the EndReason values and the rules that pick one.

Both data paths call these rules, the recv_into path (pump.py) and the splice reactor
(splice.py), and the supervisor adds the ends of connections that never reached a relay
(refused, connect failed). A reason travels as a value from here to the log line and the
metrics label; nothing parses it back out of text.

Rules:
1. EOF from one side: with half_close the other side gets send_eof() and the relay goes on
   until both directions saw EOF (CLOSED); without it the first EOF ends the connection
   (CLOSED_BY_CLIENT / CLOSED_BY_BACKEND). See eof_end().
2. A failure of one side is a reset (RESET_BY_...) when its cause is a connection reset, a
   broken pipe or a trio stream broken without an errno; anything else is an error
   (CLIENT_ERROR / BACKEND_ERROR) whose detail names the cause. See failure_end().
3. A relay that ends with no reason was cancelled (CANCELLED).
"""

from __future__ import annotations

import enum
import errno
from typing import Final, Literal

import attrs
import trio

Side = Literal["client", "backend"]

# ENOTCONN: shutdown() or send() on a socket whose peer has already reset the connection.
_RESET_ERRNOS: Final = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ENOTCONN})


@enum.unique
class EndReason(enum.Enum):
    """Why a connection ended. The value is its text in logs; `label` its metrics label."""

    CLOSED = "closed"
    CLOSED_BY_CLIENT = "closed by client"
    CLOSED_BY_BACKEND = "closed by backend"
    IDLE_TIMEOUT = "idle timeout"
    RESET_BY_CLIENT = "reset by client"
    RESET_BY_BACKEND = "reset by backend"
    CLIENT_ERROR = "client error"
    BACKEND_ERROR = "backend error"
    CANCELLED = "cancelled"
    #: Never relayed: a bad PROXY header.
    REFUSED = "refused"
    #: Never relayed: the peer is outside the route's allow list.
    REFUSED_BY_ALLOW_LIST = "refused by allow list"
    #: Never relayed: the backend could not be reached, or took no first bytes.
    CONNECT_FAILED = "connect failed"

    #: The metrics label and statistics key: `closed_by_client`, `connect_failed`...
    label: str

    def __init__(self, text: str) -> None:
        self.label = text.replace(" ", "_")  # once per member, not per connection

    @property
    def not_relayed(self) -> bool:
        """The connection was refused or its backend never reached (logged as a warning)."""
        return self in _NOT_RELAYED


_NOT_RELAYED: Final = frozenset({EndReason.REFUSED, EndReason.REFUSED_BY_ALLOW_LIST, EndReason.CONNECT_FAILED})
_CLOSED_BY: Final = {"client": EndReason.CLOSED_BY_CLIENT, "backend": EndReason.CLOSED_BY_BACKEND}
_RESET_BY: Final = {"client": EndReason.RESET_BY_CLIENT, "backend": EndReason.RESET_BY_BACKEND}
_ERROR: Final = {"client": EndReason.CLIENT_ERROR, "backend": EndReason.BACKEND_ERROR}


@attrs.define(eq=False)  # hashable by identity: the supervisor keeps live ones in a set
class Transfer:
    """What a relay moved, updated live while it runs (metrics read it) and final after.

    Attributes:
        client_to_backend: Bytes written to the backend.
        backend_to_client: Bytes written to the client.
        end: Why the connection ended; None while running.
        detail: What went wrong, for the ends that say (errors, connect failed, refused).
    """

    client_to_backend: int = 0
    backend_to_client: int = 0
    end: EndReason | None = None
    detail: str = ""

    @property
    def reason(self) -> str:
        """The end as log text: `closed`, `backend error: ECONNREFUSED ...`; empty while running."""
        if self.end is None:
            return ""
        return f"{self.end.value}: {self.detail}" if self.detail else self.end.value


def eof_end(src_side: Side, *, half_close: bool, directions_open: int) -> EndReason | None:
    """The end after EOF from `src_side` (rule 1), or None while the relay goes on.

    Args:
        src_side: The side that sent EOF.
        half_close: The route's half_close.
        directions_open: Directions still open once this one is done (half_close only).
    """
    if not half_close:
        return _CLOSED_BY[src_side]
    return EndReason.CLOSED if directions_open == 0 else None


def failure_end(side: Side, cause: BaseException) -> tuple[EndReason, str]:
    """The end and its detail when a read from or write to `side` failed with `cause` (rule 2)."""
    if is_reset(cause):
        return _RESET_BY[side], ""
    return _ERROR[side], describe(cause)


def is_reset(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is the peer resetting or breaking the connection."""
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, OSError) and current.errno in _RESET_ERRNOS:
            return True
        if isinstance(current, trio.BrokenResourceError) and current.__cause__ is None:
            # trio's own streams (memory streams, pipes) say "broken" without an errno.
            return True
        current = current.__cause__ or current.__context__
    return False


def describe(exc: BaseException) -> str:
    """A failure's cause in a few words: `ECONNREFUSED Connection refused`, `OSError: text`."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, OSError) and cause.errno is not None:
        return f"{errno.errorcode.get(cause.errno, cause.errno)} {cause.strerror}"
    return f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
