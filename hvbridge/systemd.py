"""systemd integration: readiness notification (sd_notify) and socket activation (sd_listen_fds).

This module owns the two systemd protocols hvbridge speaks, written with the socket module
alone (no libsystemd, no dependency):

- Notification (`Type=notify`, sd_notify(3)): one datagram of `KEY=VALUE` lines to the
  AF_UNIX socket named by $NOTIFY_SOCKET; a leading `@` means the Linux abstract namespace.
  Without $NOTIFY_SOCKET every call is a no-op, so the daemon runs the same under any manager.
- Socket activation (sd_listen_fds(3)): when $LISTEN_PID is our pid, $LISTEN_FDS sockets start
  at fd 3, named by $LISTEN_FDNAMES (colon-separated). The variables are removed once read so
  that child processes (workers) do not take the sockets for theirs.

Both are plain synchronous calls: a notification is one non-blocking send, and reading the
environment happens once at start.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Final

import attrs

#: The first fd systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START: Final = 3


def encode(**fields: str | int) -> bytes:
    """The datagram for `fields`: `KEY=VALUE` lines, e.g. encode(READY=1) == b"READY=1\\n".

    Raises:
        ValueError: A value contains a newline (it would start another assignment).
    """
    lines = []
    for key, value in fields.items():
        text = str(value)
        if "\n" in text:
            raise ValueError(f"sd_notify value for {key} contains a newline")
        lines.append(f"{key}={text}\n")
    return "".join(lines).encode()


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as `RELOADING=1` wants it in MONOTONIC_USEC."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def notify_address(value: str | None) -> str | None:
    """The AF_UNIX address to send to for a $NOTIFY_SOCKET value, or None if unusable.

    `@name` is the abstract name `\\0name`; an absolute path is used as is. Other forms
    (`vsock:...`, relative paths) are not supported and return None.
    """
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


@attrs.define(eq=False)
class Notifier:
    """Sends sd_notify messages to $NOTIFY_SOCKET; does nothing when it is not set.

    Args:
        address: The socket address (see notify_address()); None disables notification.
    """

    address: str | None = None

    @classmethod
    def from_environment(cls) -> Notifier:
        """A Notifier for this process's $NOTIFY_SOCKET."""
        return cls(notify_address(os.environ.get("NOTIFY_SOCKET")))

    @property
    def enabled(self) -> bool:
        """True when a service manager listens for notifications."""
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one message, e.g. notify(READY=1, STATUS="serving 3 routes").

        A failure to send is ignored: notification is a courtesy to the manager and must
        never stop the relay.

        Returns:
            True if the datagram was sent.
        """
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.connect(self.address)
                sock.send(encode(**fields))
        except OSError:
            return False
        return True

    def ready(self, status: str) -> bool:
        """READY=1: every listener is up (also after a reload)."""
        return self.notify(READY=1, STATUS=status)

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC, as Type=notify-reload requires."""
        return self.notify(RELOADING=1, MONOTONIC_USEC=monotonic_usec(), STATUS="reloading")

    def stopping(self, status: str) -> bool:
        """STOPPING=1: shutdown has begun."""
        return self.notify(STOPPING=1, STATUS=status)


@attrs.frozen
class ActivatedSocket:
    """A socket passed by the service manager: its fd and its name from $LISTEN_FDNAMES."""

    fd: int
    name: str


def listen_fds(*, unset: bool = True) -> list[ActivatedSocket]:
    """The sockets systemd passed to this process (empty when not socket-activated).

    Only honours $LISTEN_FDS when $LISTEN_PID is this process's pid, as sd_listen_fds() does,
    so variables inherited by mistake are ignored. Marks the fds close-on-exec; an fd that is
    not open is left out.

    Args:
        unset: Remove LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES from the environment.

    Returns:
        One ActivatedSocket per fd, in order from fd 3; a socket without a name gets
        "unknown", as systemd names it.
    """
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        pid, count = 0, 0
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return []
    sockets = []
    for index in range(count):
        fd = LISTEN_FDS_START + index
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue
        name = names[index] if index < len(names) and names[index] else "unknown"
        sockets.append(ActivatedSocket(fd, name))
    return sockets
