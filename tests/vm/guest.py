"""Helpers of the in-guest AF_VSOCK suite: the guest guard, the session's hvbridge, backends.

See conftest.py for the rules of this suite.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs
import trio
from integration.support import HashServer, LogLine, parse_log_line

from hvbridge.transports.vsock import AF_VSOCK

if TYPE_CHECKING:
    from integration.support import Mode

GUEST_TOKEN: Final = "microvm_guest"
NOT_IN_GUEST: Final = (
    "AF_VSOCK tests run only inside the micro-VM guest (scripts/vm-tests): /proc/cmdline has no"
    f" {GUEST_TOKEN!r}, and this machine's vsock CID 2 is not ours to connect to"
)
#: Under TCG hvbridge needs ~5 s to import; allow for a loaded CI machine.
START_TIMEOUT: Final = 180.0
STOP_TIMEOUT: Final = 60.0
POLL: Final = 0.05
MAX_POLLS: Final = 20_000
#: The guest's vsock ports for the routes below (nothing else listens in the guest).
PORT_BULK: Final = 5001
PORT_ALLOW_LOCAL: Final = 5002
PORT_ALLOW_OTHER: Final = 5003
PORT_NOBODY: Final = 5999
ROUTES: Final = ("tcp-to-vsock", "vsock-to-tcp", "no-listener", "any-port", "allow-cid-1", "allow-cid-99")
#: Figures measured by the tests, printed in pytest's terminal summary.
FIGURES: list[str] = []


def in_guest() -> bool:
    """True only inside the micro-VM guest (the `microvm_guest` kernel command line token)."""
    try:
        return GUEST_TOKEN in Path("/proc/cmdline").read_text().split()
    except OSError:
        return False


IN_GUEST: Final = in_guest()


def require_guest() -> None:
    """Raise unless inside the guest; call before opening any AF_VSOCK socket."""
    if not in_guest():
        raise RuntimeError(f"refusing to open an AF_VSOCK socket: {NOT_IN_GUEST}")


@attrs.define(eq=False)
class GuestBridge:
    """The session's `hvbridge -c routes.toml`, its stderr log collected by a thread.

    Attributes:
        process: The hvbridge process.
        backends: The TCP port each route connects to, by route name (where it connects to TCP).
        lines: hvbridge's stderr lines so far.
    """

    process: subprocess.Popen[bytes]
    backends: dict[str, int]
    lines: list[str] = attrs.Factory(list)
    _lock: threading.Lock = attrs.Factory(threading.Lock)

    def read_stderr(self) -> None:
        """Collect stderr lines until the process closes it (runs in a thread)."""
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            with self._lock:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    @property
    def text(self) -> str:
        """The log so far, for failure messages."""
        with self._lock:
            return "\n".join(self.lines)

    def events(self, message: str | None = None, **fields: str) -> list[LogLine]:
        """Log lines with this message (any if None) and these field values."""
        with self._lock:
            lines = list(self.lines)
        found = []
        for line in lines:
            parsed = parse_log_line(line)
            if parsed is None or (message is not None and parsed.message != message):
                continue
            if all(parsed.fields.get(key) == value for key, value in fields.items()):
                found.append(parsed)
        return found

    def check_running(self) -> None:
        """Fail if hvbridge has exited."""
        status = self.process.poll()
        assert status is None, f"hvbridge exited with status {status}; its log:\n{self.text}"

    async def wait_for_event(self, message: str, *, count: int = 1, **fields: str) -> list[LogLine]:
        """Wait (bounded in polls; the caller bounds the time) for `count` matching log lines."""
        for _ in range(MAX_POLLS):
            found = self.events(message, **fields)
            if len(found) >= count:
                return found
            self.check_running()
            await trio.sleep(POLL)
        raise AssertionError(f"no {count} {message!r} line(s) with {fields}; log:\n{self.text}")

    def listening(self, route: str) -> str:
        """The bound listen endpoint of `route` from its `listening` log line."""
        lines = self.events("listening", route=route)
        assert lines, f"no `listening` line for route {route!r}; log:\n{self.text}"
        return lines[0].fields["listen"]


def routes_toml(backends: dict[str, int]) -> str:
    """The session's route table: one route per scenario."""
    return f"""\
[bridge]
log_level = "info"
shutdown_grace = "2s"

[defaults]
connect_timeout = "30s"   # TCG is slow; a refused vsock connect still fails at once

# tcp -> vsock (CID 1, this guest) -> tcp: the bulk, half-close and `hvbridge connect` tests.
[routes.tcp-to-vsock]
listen = "tcp://127.0.0.1:0"
connect = "vsock://local:{PORT_BULK}"
vsock_buffer_size = "1MiB"

[routes.vsock-to-tcp]
listen = "vsock://any:{PORT_BULK}"
connect = "tcp://127.0.0.1:{backends["vsock-to-tcp"]}"
vsock_buffer_size = "1MiB"

# Nothing listens on this vsock port.
[routes.no-listener]
listen = "tcp://127.0.0.1:0"
connect = "vsock://local:{PORT_NOBODY}"

# The kernel picks the port; the `listening` line shows it.
[routes.any-port]
listen = "vsock://any:any"
connect = "tcp://127.0.0.1:{backends["any-port"]}"

[routes.allow-cid-1]
listen = "vsock://any:{PORT_ALLOW_LOCAL}"
allow = ["cid:1"]
connect = "tcp://127.0.0.1:{backends["allow-cid-1"]}"

[routes.allow-cid-99]
listen = "vsock://any:{PORT_ALLOW_OTHER}"
allow = ["cid:99"]
connect = "tcp://127.0.0.1:{backends["allow-cid-99"]}"
"""


async def serve_backend(nursery: trio.Nursery, port: int, mode: Mode, reply_size: int = 0) -> HashServer:
    """A HashServer (integration/support.py) on 127.0.0.1:`port` until the test ends."""
    server = HashServer(mode, reply_size, endpoint=f"tcp://127.0.0.1:{port}")
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    await nursery.start(trio.serve_listeners, server.handle, listeners)
    return server


async def vsock_client(cid: int, port: int) -> trio.SocketStream:
    """Connect a plain AF_VSOCK client to (cid, port): only ever inside the guest."""
    require_guest()
    sock = trio.socket.socket(AF_VSOCK, trio.socket.SOCK_STREAM)
    try:
        await sock.connect((cid, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)
