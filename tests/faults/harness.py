"""Harness of the fault-injection suite: the real hvbridge process, loopback backends, /proc probes.

This module owns how the fault tests (and scripts/soak.py) start, watch and stop hvbridge. It
imports neither pytest nor hvbridge: it only sees the process from outside.

Rules every fault test follows (each test module's docstring repeats them):
- loopback only: 127.0.0.1, ::1 and Unix sockets under tmp_path; nothing leaves the machine;
- port 0 everywhere: hvbridge's bound port comes from its `listening` log line, a backend's from
  its own socket;
- bounded: every test runs under trio.fail_after, every loop here has a maximum count, and every
  hvbridge started here is stopped with SIGTERM (SIGKILL if it does not exit) at teardown;
- measured from outside: file descriptors from /proc/PID/fd, memory from VmRSS in
  /proc/PID/status; times are never asserted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import resource
import signal
import socket
import struct
import subprocess
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, Literal

import attrs
import trio
from support.processes import START_TIMEOUT, STOP_TIMEOUT, KiB, LineReader, hvbridge_argv

CHUNK: Final = 64 * KiB
#: Upper bound of any read loop (each read returns at least one byte or ends the loop).
MAX_READS: Final = 1_000_000
#: How often the /proc probes poll, and how many polls before they give up.
POLL_INTERVAL: Final = 0.02
MAX_POLLS: Final = 500
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
_LISTENING: Final = re.compile(r" listening route=(\S+) listen=(\S+)")


# ------------------------------------------------------------------------------- /proc probes


def fd_count(pid: int) -> int:
    """How many file descriptors process `pid` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@attrs.frozen
class Fds:
    """A census of a process's open file descriptors by kind (`socket`, `pipe`, `eventpoll`, ...).

    hvbridge's splice fast path (hvbridge/relay/splice.py) lazily opens one epoll per process and
    keeps up to 16 free pipes (32 fds) for reuse; so "back to baseline" means: every kind
    exactly as before, except pipes and epolls, which may exceed it by that cache.
    """

    kinds: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        """All open fds."""
        return sum(n for _, n in self.kinds)

    def __getitem__(self, kind: str) -> int:
        return dict(self.kinds).get(kind, 0)

    def __str__(self) -> str:
        return ", ".join(f"{kind}={n}" for kind, n in self.kinds)

    def settled_at(self, baseline: Fds) -> bool:
        """True if nothing but the splice cache differs from `baseline`."""
        cached = {"pipe": 2 * CACHED_PIPES, "eventpoll": CACHED_EPOLLS, "eventfd": CACHED_EVENTFDS}
        for kind in {k for k, _ in self.kinds} | {k for k, _ in baseline.kinds}:
            if not baseline[kind] <= self[kind] <= baseline[kind] + cached.get(kind, 0):
                return False
        return True


#: What hvbridge/relay/splice.py keeps open between connections (see Fds).
CACHED_PIPES: Final = 16
CACHED_EPOLLS: Final = 1
CACHED_EVENTFDS: Final = 1  # the reactor thread's wake-up


def _fd_kind(target: str) -> str:
    for prefix in ("socket:", "pipe:"):
        if target.startswith(prefix):
            return prefix[:-1]
    if target.startswith("anon_inode:"):
        return target[len("anon_inode:") :].strip("[]")
    return target


def fd_census(pid: int) -> Fds:
    """The open file descriptors of `pid`, counted by kind."""
    counts: dict[str, int] = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            kind = _fd_kind(os.readlink(f"/proc/{pid}/fd/{name}"))
            counts[kind] = counts.get(kind, 0) + 1
    return Fds(tuple(sorted(counts.items())))


def fd_targets(pid: int) -> list[str]:
    """What each open file descriptor of `pid` points at (for failure messages)."""
    targets = []
    for name in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        with contextlib.suppress(OSError):
            targets.append(f"{name} -> {os.readlink(f'/proc/{pid}/fd/{name}')}")
    return targets


def rss_bytes(pid: int) -> int:
    """The resident set size of process `pid` (VmRSS), in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def raise_nofile(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `needed` (at most the hard limit).

    Children started afterwards inherit it. Returns the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def set_nofile(pid: int, soft: int) -> None:
    """Set the soft RLIMIT_NOFILE of a running process (what `prlimit --pid` does)."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))


# ------------------------------------------------------------------------------------ hvbridge


@attrs.define(eq=False)
class Hvbridge:
    """A running hvbridge process; its stderr is collected line by line as it arrives."""

    argv: list[str]
    process: trio.Process
    output: LineReader
    stopped: bool = False

    @property
    def pid(self) -> int:
        """The process id (hvbridge itself, not a wrapper)."""
        return self.process.pid

    @property
    def lines(self) -> list[str]:
        """Its stderr lines so far."""
        return self.output.lines

    @property
    def text(self) -> str:
        """Its stderr so far."""
        return self.output.text

    def fd_count(self) -> int:
        """Its open file descriptors, now."""
        return fd_count(self.pid)

    def fds(self) -> Fds:
        """Its open file descriptors by kind, now."""
        return fd_census(self.pid)

    def rss(self) -> int:
        """Its resident memory in bytes, now."""
        return rss_bytes(self.pid)

    def matching(self, pattern: str) -> list[str]:
        """The stderr lines so far that match the regex `pattern`."""
        regex = re.compile(pattern)
        return [line for line in self.lines if regex.search(line)]

    async def wait_for(self, pattern: str, *, count: int = 1) -> list[str]:
        """Wait until `count` stderr lines match `pattern`; the matching lines (the caller bounds the time)."""
        return await self.output.wait_for(pattern, count=count)

    def listening(self, route: str = "forward") -> str:
        """The bound listen endpoint of `route`, from its `listening` log line."""
        for line in self.lines:
            match = _LISTENING.search(line)
            if match is not None and match.group(1) == route:
                return match.group(2)
        raise AssertionError(f"no `listening` line for route {route!r}:\n{self.text}")

    async def wait_fds(self, baseline: Fds) -> None:
        """Poll (bounded) until hvbridge's fds are back to `baseline` (see Fds.settled_at)."""
        now = self.fds()
        for _ in range(MAX_POLLS):
            if now.settled_at(baseline):
                return
            await trio.sleep(POLL_INTERVAL)
            now = self.fds()
        listing = "\n".join(fd_targets(self.pid))
        raise AssertionError(f"hvbridge has fds {now}; expected {baseline} (+ the splice cache):\n{listing}")

    async def stop(self) -> int:
        """SIGTERM, then wait (bounded) for the exit; SIGKILL if it does not come. The status."""
        self.stopped = True
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            with trio.fail_after(STOP_TIMEOUT):
                await self.process.wait()
            raise AssertionError(f"hvbridge ignored SIGTERM for {STOP_TIMEOUT:g}s; killed it:\n{self.text}")
        return self.process.returncode


@attrs.define(eq=False)
class Launcher:
    """Starts hvbridge processes for one test and stops them all at its end."""

    nursery: trio.Nursery
    tmp_path: Path
    started: list[Hvbridge] = attrs.Factory(list)

    async def start(self, *args: str, listeners: int = 1) -> Hvbridge:
        """Start `hvbridge ARGS...` and wait until it logged `listeners` `listening` lines."""
        argv = [*hvbridge_argv(), *args]
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        assert process.stderr is not None
        hv = Hvbridge(argv, process, LineReader(" ".join(argv)))
        self.started.append(hv)
        self.nursery.start_soon(hv.output.pump, process.stderr)
        with trio.fail_after(START_TIMEOUT):
            await hv.wait_for(r" listening route=", count=listeners)
        return hv

    async def forward(self, listen: str, connect: str, *options: str) -> Hvbridge:
        """`hvbridge forward LISTEN CONNECT OPTIONS...`, once it listens."""
        return await self.start("forward", listen, connect, *options)

    async def run_table(self, table: str, *options: str, listeners: int = 1) -> Hvbridge:
        """Write `table` (TOML) to a file and run `hvbridge -c FILE OPTIONS...` on it."""
        path = self.tmp_path / f"routes-{len(self.started)}.toml"
        path.write_text(table, encoding="utf-8")
        return await self.start("-c", str(path), *options, listeners=listeners)

    async def close(self) -> None:
        """Stop every hvbridge still running; each must exit 0 after SIGTERM."""
        problems = []
        for hv in self.started:
            if hv.stopped:
                continue
            exited_early = hv.process.returncode is not None
            try:
                status = await hv.stop()
            except AssertionError as exc:
                problems.append(str(exc))
                continue
            if exited_early:
                problems.append(f"hvbridge exited by itself with status {status}:\n{hv.text}")
            elif status != 0:
                problems.append(f"hvbridge exited with status {status} after SIGTERM:\n{hv.text}")
            elif "Traceback" in hv.text:
                problems.append(f"hvbridge printed a traceback:\n{hv.text}")
        for hv in self.started:  # pytest shows this when the test fails
            print(f"--- {' '.join(hv.argv)} (status {hv.process.returncode}) ---\n{hv.text}")
        if problems:
            raise AssertionError("\n\n".join(problems))


# ------------------------------------------------------------------------------------ backends


async def echo(stream: trio.SocketStream) -> None:
    """Send back every byte read; EOF after EOF."""
    for _ in range(MAX_READS):
        data = await stream.receive_some(CHUNK)
        if not data:
            break
        await stream.send_all(data)
    await stream.send_eof()


@attrs.define(eq=False)
class Backend:
    """A loopback server whose connections get queued handlers (then the default, echo).

    Handlers run in the order connections are accepted; tests open one connection at a time
    when the order matters. Stream errors in a handler end that connection only.
    """

    endpoint: str
    default: Callable[[trio.SocketStream], Awaitable[None]] = echo
    handlers: deque[Callable[[trio.SocketStream], Awaitable[None]]] = attrs.Factory(deque)
    accepted: int = 0
    finished: int = 0
    errors: list[str] = attrs.Factory(list)
    _changed: trio.Event = attrs.Factory(trio.Event)

    def then(self, handler: Callable[[trio.SocketStream], Awaitable[None]]) -> None:
        """Serve the next connection not yet given a handler with `handler`."""
        self.handlers.append(handler)

    async def serve(self, stream: trio.SocketStream) -> None:
        """Serve one accepted connection (trio.serve_listeners calls this)."""
        self.accepted += 1
        self._notify()
        handler = self.handlers.popleft() if self.handlers else self.default
        try:
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.errors.append(repr(exc))
        finally:
            await trio.aclose_forcefully(stream)
            self.finished += 1
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_finished(self, count: int) -> None:
        """Wait until `count` connections in all have been served to their end (bounded in count)."""
        for _ in range(MAX_READS):
            if self.finished >= count:
                return
            await self._changed.wait()
        raise AssertionError("gave up waiting for connections to end")  # pragma: no cover

    async def wait_accepted(self, count: int) -> None:
        """Wait until `count` connections in all have been accepted (bounded in count)."""
        for _ in range(MAX_READS):
            if self.accepted >= count:
                return
            await self._changed.wait()
        raise AssertionError("gave up waiting for connections")  # pragma: no cover


async def start_backend(
    nursery: trio.Nursery,
    where: Literal["tcp", "tcp6"] | Path,
    default: Callable[[trio.SocketStream], Awaitable[None]] = echo,
) -> Backend:
    """A Backend on 127.0.0.1:0, [::1]:0 or a Unix socket path; runs until the nursery ends."""
    listener: trio.SocketListener
    if isinstance(where, str):
        host = "127.0.0.1" if where == "tcp" else "::1"
        [listener] = await trio.open_tcp_listeners(0, host=host)
        port = listener.socket.getsockname()[1]
        endpoint = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
    else:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(where))
        sock.listen(4096)
        listener = trio.SocketListener(sock)
        endpoint = f"unix://{where}"
    backend = Backend(endpoint, default)
    await nursery.start(trio.serve_listeners, backend.serve, [listener])
    return backend


@attrs.define(eq=False)
class Blackhole:
    """A loopback TCP port whose SYNs are dropped, so a connect() to it neither succeeds nor fails.

    A listener with backlog 0 that never accepts. Linux drops a SYN while the listener's accept
    queue is full (tcp_conn_request: sk_acceptq_is_full -> drop, even with syncookies), so once
    `fillers` have completed their handshakes into the queue, later connects stay in SYN-SENT
    and only retransmit. Nothing is ever accepted, so the queue never drains.
    """

    listener: socket.socket
    fillers: list[trio.socket.SocketType]
    port: int

    def close(self) -> None:
        """Close the fillers and the listener."""
        for sock in self.fillers:
            sock.close()
        self.listener.close()


async def open_blackhole(*, probe_timeout: float = 0.5, max_fillers: int = 16) -> Blackhole:
    """Fill a backlog-0 listener until a probe connect hangs; see Blackhole."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: list[trio.socket.SocketType] = []
    for _ in range(max_fillers):
        probe = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with trio.move_on_after(probe_timeout):
            await probe.connect(("127.0.0.1", port))
            fillers.append(probe)  # its handshake completed: it sits in the accept queue
            continue
        probe.close()  # hung in SYN-SENT: the port blackholes from now on
        return Blackhole(listener, fillers, port)
    for sock in fillers:
        sock.close()
    listener.close()
    raise AssertionError(f"could not fill a backlog-0 listener with {max_fillers} connections")


# ------------------------------------------------------------------------------------- clients


async def open_client(endpoint: str, *, source: str | None = None) -> trio.SocketStream:
    """Connect to `tcp://HOST:PORT` or `unix:///path` (the forms hvbridge logs), from `source`."""
    if endpoint.startswith("unix://"):
        return await trio.open_unix_socket(endpoint[len("unix://") :])
    assert endpoint.startswith("tcp://"), endpoint
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        if source is not None:
            await sock.bind((source, 0))
        await sock.connect((host, int(port)))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def probe_closed(endpoint: str, *, send: bytes = b"", source: str | None = None) -> Received:
    """Connect, send `send`, and read until hvbridge ends the connection.

    hvbridge may accept and reset a connection (refused backend, allow list) before this
    side's connect() has returned; a connect that fails with ECONNRESET is that reset.
    """
    try:
        stream = await open_client(endpoint, source=source)
    except ConnectionResetError:
        return Received(0, hashlib.sha256().digest(), "reset")
    async with stream:
        if send:
            try:
                await stream.send_all(send)
            except trio.BrokenResourceError as exc:  # already reset
                return Received(0, hashlib.sha256().digest(), describe_broken(exc))
        return await read_to_end(stream, limit=1 << 30)


def tcp_endpoint(host: str, port: int) -> str:
    """`tcp://HOST:PORT` with brackets for IPv6."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


async def reset(stream: trio.SocketStream) -> None:
    """Close `stream` with SO_LINGER 0, so that its peer sees a reset (RST), not EOF."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    await stream.aclose()


@attrs.frozen
class Received:
    """What a reader got from a stream before it ended, and how it ended.

    Attributes:
        size: Bytes read.
        sha256: Their hash.
        ending: `eof` (clean end), `reset` (ECONNRESET) or `error: ...` (anything else).
    """

    size: int
    sha256: bytes
    ending: str


def describe_broken(exc: trio.BrokenResourceError) -> str:
    """`reset` when a broken stream was caused by ECONNRESET, else `error: ...`."""
    cause = exc.__cause__
    if isinstance(cause, ConnectionResetError):
        return "reset"
    return f"error: {cause!r}" if cause is not None else f"error: {exc!r}"


async def read_to_end(stream: trio.abc.ReceiveStream, *, limit: int, chunk: int = CHUNK) -> Received:
    """Read until EOF or a reset, `chunk` bytes at most at a time, hashing.

    Fails if more than `limit` bytes arrive.
    """
    digest = hashlib.sha256()
    size = 0
    ending = "eof"
    try:
        for _ in range(MAX_READS):
            data = await stream.receive_some(chunk)
            if not data:
                break
            digest.update(data)
            size += len(data)
            if size > limit:
                raise AssertionError(f"received over {limit} bytes")
        else:
            raise AssertionError("too many reads")  # pragma: no cover
    except trio.BrokenResourceError as exc:
        ending = describe_broken(exc)
    return Received(size, digest.digest(), ending)


async def roundtrip(endpoint: str, size: int = 100 * KiB, *, source: str | None = None) -> None:
    """A fresh connection through hvbridge to an echo backend carries `size` bytes both ways."""
    data = os.urandom(size)
    stream = await open_client(endpoint, source=source)
    async with stream, trio.open_nursery() as nursery:

        async def send() -> None:
            await stream.send_all(data)
            await stream.send_eof()

        nursery.start_soon(send)
        got = await read_to_end(stream, limit=size)
    assert got == Received(size, hashlib.sha256(data).digest(), "eof"), got
