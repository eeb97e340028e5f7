"""Helpers for the integration tests: the real hvbridge process, backends, clients, log lines.

Rules every integration test follows (each test module's docstring repeats them):
- loopback only: 127.0.0.1, ::1 and Unix sockets under tmp_path; nothing leaves the machine;
- port 0 everywhere: hvbridge's bound port is read from its `listening` log line, a backend's
  from its own socket; the one exception, sshd, which cannot report its port, gets a port found
  free a moment before and is retried on a clash;
- bounded: every test runs under trio.fail_after, every loop has a maximum count, every child
  process is stopped (and for hvbridge: must exit 0) at teardown.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import signal
import socket
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, Protocol

import attrs
import trio
from support.processes import START_TIMEOUT, STOP_TIMEOUT, LineReader, MiB, hvbridge_argv

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

CHUNK: Final = 256 * 1024
#: Upper bound of reads from one stream (each read returns at least one byte or EOF).
MAX_READS: Final = 10_000_000


# ----------------------------------------------------------------------------------- log lines

_TEXT_LINE: Final = re.compile(r"^(\d{4}-\d\d-\d\dT[0-9:.]+Z) (DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)$")
_TEXT_FIELD: Final = r'(\w+)=("(?:[^"\\]|\\.)*"|[^ "]*)'
_TEXT_FIELDS: Final = re.compile(rf"(?: {_TEXT_FIELD})*")
_TEXT_FIELD_AT: Final = re.compile(f" {_TEXT_FIELD}")
_FIELD_START: Final = re.compile(r" \w+=")


@attrs.frozen
class LogLine:
    """One parsed hvbridge log line (text or JSON); field values as text."""

    level: str
    message: str
    fields: dict[str, str]
    raw: str


def _field_text(value: object) -> str:
    return str(value)


def parse_log_line(line: str) -> LogLine | None:
    """Parse `TIME LEVEL message key=value ...` or a JSON object; None if the line is neither."""
    if line.startswith("{"):
        try:
            obj: object = json.loads(line)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        fields = {str(k): _field_text(v) for k, v in obj.items() if k not in ("time", "level", "message")}
        return LogLine(str(obj.get("level", "")).upper(), str(obj.get("message", "")), fields, line)
    match = _TEXT_LINE.match(line)
    if match is None:
        return None
    rest = match.group(3)
    # The message ends where the rest of the line is nothing but key=value fields.
    for start in [m.start() for m in _FIELD_START.finditer(rest)] + [len(rest)]:
        if _TEXT_FIELDS.fullmatch(rest, start) is None:
            continue
        fields = {}
        for field in _TEXT_FIELD_AT.finditer(rest, start):
            key, value = field.group(1), field.group(2)
            decoded: object = json.loads(value) if value.startswith('"') else value
            fields[key] = str(decoded)
        return LogLine(match.group(2), rest[:start], fields, line)
    return None  # pragma: no cover - the empty tail always matches


# ------------------------------------------------------------------------------ child output


@attrs.define(eq=False)
class Daemon:
    """A child process whose stdout or stderr is collected line by line."""

    argv: list[str]
    process: trio.Process
    output: LineReader
    stopped: bool = False

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send `sig`, wait (bounded) for the exit and the end of the output; the exit status."""
        self.stopped = True
        if self.process.returncode is None:
            self.process.send_signal(sig)
        with trio.move_on_after(STOP_TIMEOUT) as scope:
            await self.process.wait()
            await self.output.wait_closed()
        if scope.cancelled_caught:
            self.process.kill()
            with trio.fail_after(STOP_TIMEOUT):
                await self.process.wait()
            raise AssertionError(
                f"{self.argv[0]} did not exit within {STOP_TIMEOUT:g}s of {sig.name}; killed it.\n"
                f"Its output:\n{self.output.text}"
            )
        return await self.wait_exit()

    async def wait_exit(self) -> int:
        """Wait (the caller bounds the time) for the exit and the end of the output; the status."""
        self.stopped = True
        await self.process.wait()
        await self.output.wait_closed()
        status = self.process.returncode
        assert status is not None
        return status


@attrs.define(eq=False)
class Hvbridge(Daemon):
    """A running `hvbridge` (run or forward), its stderr parsed as log lines."""

    def events(self, message: str | None = None, **fields: str) -> list[LogLine]:
        """The log lines so far with this message (any if None) and these field values."""
        found = []
        for line in self.output.lines:
            parsed = parse_log_line(line)
            if parsed is None or (message is not None and parsed.message != message):
                continue
            if all(parsed.fields.get(k) == v for k, v in fields.items()):
                found.append(parsed)
        return found

    async def wait_for_event(self, message: str, *, count: int = 1, **fields: str) -> list[LogLine]:
        """Wait for `count` log lines with this message and these field values."""
        await self.output.wait_until(
            lambda: len(self.events(message, **fields)) >= count,
            f"{count} {message!r} log line(s) with {fields}",
        )
        return self.events(message, **fields)

    def listening(self, route: str = "forward") -> str:
        """The bound listen endpoint of `route`, from its `listening` log line."""
        lines = self.events("listening", route=route)
        assert lines, f"no `listening` line for route {route!r}:\n{self.output.text}"
        return lines[0].fields["listen"]


@attrs.define(eq=False)
class Processes:
    """Starts children for one test and stops them all at its end (the `processes` fixture)."""

    nursery: trio.Nursery
    tmp_path: Path
    children: list[Daemon] = attrs.Factory(list)

    async def _open(
        self,
        argv: list[str],
        read: Literal["stdout", "stderr"],
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> tuple[trio.Process, LineReader]:
        process = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if read == "stdout" else subprocess.DEVNULL,
            stderr=subprocess.PIPE if read == "stderr" else subprocess.DEVNULL,
            env=env,
            pass_fds=tuple(pass_fds),
        )
        stream = process.stdout if read == "stdout" else process.stderr
        assert stream is not None
        reader = LineReader(" ".join(argv))
        self.nursery.start_soon(reader.pump, stream)
        return process, reader

    async def daemon(self, argv: list[str], *, read: Literal["stdout", "stderr"] = "stderr") -> Daemon:
        """Start a helper process (a server); it is sent SIGTERM at teardown."""
        process, reader = await self._open(argv, read)
        child = Daemon(argv, process, reader)
        self.children.append(child)
        return child

    async def hvbridge(
        self,
        *args: str,
        listeners: int = 1,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> Hvbridge:
        """Start `hvbridge ARGS...` (with `env`, `pass_fds`); wait for `listeners` `listening` lines."""
        argv = [*hvbridge_argv(), *args]
        process, reader = await self._open(argv, "stderr", env, pass_fds)
        child = Hvbridge(argv, process, reader)
        self.children.append(child)
        with trio.fail_after(START_TIMEOUT):
            await child.wait_for_event("listening", count=listeners)
        return child

    async def forward(self, listen: str, connect: str, *options: str) -> Hvbridge:
        """`hvbridge forward LISTEN CONNECT OPTIONS...`, once it listens."""
        return await self.hvbridge("forward", listen, connect, *options)

    async def run_table(self, table: str, *options: str, listeners: int = 1) -> Hvbridge:
        """Write `table` to a TOML file and run `hvbridge -c FILE OPTIONS...` on it."""
        path = self.tmp_path / f"routes-{len(self.children)}.toml"
        path.write_text(table)
        return await self.hvbridge("-c", str(path), *options, listeners=listeners)

    async def close(self) -> list[str]:
        """Stop every child still running; the problems found (hvbridge must exit 0)."""
        problems = []
        for child in self.children:
            is_hvbridge = isinstance(child, Hvbridge)
            if child.stopped:
                pass
            elif child.process.returncode is not None and is_hvbridge:
                problems.append(f"{child.argv} exited by itself with status {child.process.returncode}")
            else:
                try:
                    status = await child.stop()
                except AssertionError as exc:
                    problems.append(str(exc))
                else:
                    if is_hvbridge and status != 0:
                        problems.append(f"{child.argv} exited with status {status} after SIGTERM")
            if child.process.returncode is None:  # pragma: no cover - stop() kills on timeout
                child.process.kill()
            await child.process.wait()
            with trio.move_on_after(STOP_TIMEOUT):
                await child.output.wait_closed()
            if not child.output.closed:
                problems.append(f"{child.argv}: its output is still open after its exit (a child of it holds it?)")
                child.output.cancel()
            else:
                for pipe in (child.process.stdin, child.process.stdout, child.process.stderr):
                    if pipe is not None:
                        await pipe.aclose()
            print(f"--- {' '.join(child.argv)} (status {child.process.returncode}) ---\n{child.output.text}")
        return problems


# ------------------------------------------------------------------------------------ backends


@attrs.frozen
class HttpServer:
    """`python -m http.server` on 127.0.0.1, serving `root`."""

    endpoint: str
    root: Path


@attrs.frozen
class Sshd:
    """An OpenSSH server on 127.0.0.1 that lets `user` in with the private key `key`."""

    port: int
    user: str
    key: Path


Mode = Literal["concurrent", "reply_after_eof", "reply_first", "echo"]


@attrs.frozen
class ServerResult:
    """What the backend saw on one connection."""

    received: int
    received_sha256: bytes
    sent: int
    sent_sha256: bytes
    error: str | None


class Digest(Protocol):
    """What the helpers need of a hashlib object."""

    def update(self, data: bytes | bytearray | memoryview, /) -> None:
        """Add `data`."""


_RANDOM: dict[str, bytes] = {}
_SPREAD: Final = 1 * MiB


def random_bytes(size: int, name: str = "client") -> memoryview:
    """`size` random bytes from a pool made once per `name` and test session, at a random offset.

    os.urandom() makes only some 150 MB/s here, so the pool is reused: two calls return
    different bytes (their offsets differ), cheaply.
    """
    need = size + _SPREAD
    blob = _RANDOM.get(name, b"")
    if len(blob) < need:
        blob = _RANDOM[name] = blob + os.urandom(need - len(blob))
    start = secrets.randbelow(_SPREAD)
    return memoryview(blob)[start : start + size]


async def send_random(stream: trio.abc.SendStream, size: int, digest: Digest, name: str = "client") -> None:
    """Send `size` random bytes (see random_bytes), adding them to `digest`."""
    data = random_bytes(size, name)
    for offset in range(0, size, CHUNK):
        piece = data[offset : offset + CHUNK]
        digest.update(piece)
        await stream.send_all(piece)


async def receive_into(stream: trio.abc.ReceiveStream, digest: Digest, limit: int) -> int:
    """Read to EOF, hashing; the byte count. Fails after `limit` bytes plus one read."""
    count = 0
    for _ in range(limit + 2):
        data = await stream.receive_some(CHUNK)
        if not data:
            return count
        digest.update(data)
        count += len(data)
        if count > limit:
            raise AssertionError(f"received over {limit} bytes")
    raise AssertionError("too many reads")  # pragma: no cover - each read returns >= 1 byte


@attrs.define(eq=False)
class HashServer:
    """A loopback backend that hashes all it reads and answers with its own random bytes.

    Modes:
        concurrent: send `reply_size` random bytes while reading everything; after both, send the
            32-byte sha256 of what it read, then EOF. Both directions flow at once.
        reply_after_eof: read to EOF first, then send the reply and the hash, then EOF.
        reply_first: send the reply and EOF (write side closed first), then read to EOF.
        echo: send back every byte it reads; EOF after EOF.
    """

    mode: Mode
    reply_size: int
    endpoint: str = ""
    limit: int = 1 << 31
    results: list[ServerResult] = attrs.Factory(list)
    _changed: trio.Event = attrs.Factory(trio.Event)

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection, then record a ServerResult."""
        received, sent = hashlib.sha256(), hashlib.sha256()
        counts = {"received": 0, "sent": 0}
        error = None

        async def reply() -> None:
            await send_random(stream, self.reply_size, sent, name="server")
            counts["sent"] = self.reply_size

        async def read_all() -> None:
            counts["received"] = await receive_into(stream, received, self.limit)

        try:
            if self.mode == "echo":
                for _ in range(MAX_READS):
                    data = await stream.receive_some(CHUNK)
                    if not data:
                        break
                    received.update(data)
                    counts["received"] += len(data)
                    await stream.send_all(data)
                    sent.update(data)
                    counts["sent"] += len(data)
                await stream.send_eof()
            elif self.mode == "reply_first":
                await reply()
                await stream.send_eof()
                await read_all()
            else:
                if self.mode == "concurrent":
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(reply)
                        nursery.start_soon(read_all)
                else:
                    await read_all()
                    await reply()
                await stream.send_all(received.digest())
                await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, AssertionError) as exc:
            error = repr(exc)
        finally:
            await trio.aclose_forcefully(stream)
            self.results.append(
                ServerResult(counts["received"], received.digest(), counts["sent"], sent.digest(), error)
            )
            self._changed.set()
            self._changed = trio.Event()

    async def result(self, index: int = 0) -> ServerResult:
        """Wait for the result of connection number `index` (0-based)."""
        for _ in range(index + 1_000):
            if len(self.results) > index:
                return self.results[index]
            await self._changed.wait()
        raise AssertionError("no result")  # pragma: no cover


async def start_hash_server(
    nursery: trio.Nursery, where: Literal["tcp", "tcp6"] | Path, mode: Mode, reply_size: int = 0
) -> HashServer:
    """Start a HashServer on 127.0.0.1, ::1 (port 0) or a Unix socket path; runs until cancelled."""
    server = HashServer(mode, reply_size)
    listener: trio.SocketListener
    if isinstance(where, Path):
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(where))
        sock.listen(128)
        listener = trio.SocketListener(sock)
        server.endpoint = f"unix://{where}"
    else:
        host = "127.0.0.1" if where == "tcp" else "::1"
        [listener] = await trio.open_tcp_listeners(0, host=host)
        port = listener.socket.getsockname()[1]
        server.endpoint = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
    await nursery.start(trio.serve_listeners, server.handle, [listener])
    return server


# ------------------------------------------------------------------------------------- clients


async def open_stream(endpoint: str) -> trio.SocketStream:
    """Connect to `tcp://HOST:PORT` or `unix:///path` (the forms hvbridge logs)."""
    if endpoint.startswith("unix://"):
        return await trio.open_unix_socket(endpoint[len("unix://") :])
    assert endpoint.startswith("tcp://"), endpoint
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    return await trio.open_tcp_stream(host.strip("[]"), int(port))


def tcp_port(endpoint: str) -> int:
    """The port of a `tcp://HOST:PORT` endpoint."""
    assert endpoint.startswith("tcp://"), endpoint
    return int(endpoint.rpartition(":")[2])


@attrs.frozen
class Outcome:
    """What a client sent and received on one connection."""

    sent: int
    sent_sha256: bytes
    received: int
    received_sha256: bytes
    trailer: bytes
    elapsed: float


async def exchange(stream: trio.SocketStream, *, send: int, reply: int, trailer: int = 0) -> Outcome:
    """Send `send` random bytes then EOF, while reading `reply` bytes plus a `trailer` to EOF.

    Both directions run at once. The first `reply` bytes are hashed; what follows is the trailer.
    """
    start = trio.current_time()
    sent, received = hashlib.sha256(), hashlib.sha256()
    tail = bytearray()
    count = 0

    async def sender() -> None:
        await send_random(stream, send, sent)
        await stream.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        for _ in range(reply + trailer + 2):
            data = await stream.receive_some(CHUNK)
            if not data:
                break
            take = max(0, min(len(data), reply - count))
            received.update(data[:take])
            count += take
            tail += data[take:]
            if len(tail) > trailer:
                raise AssertionError(f"got more than {reply} + {trailer} bytes")
    return Outcome(send, sent.digest(), count, received.digest(), bytes(tail), trio.current_time() - start)


async def expect_closed(stream: trio.SocketStream) -> str:
    """Read until the peer ends the connection; `eof` or `reset` (fails if data arrives)."""
    try:
        data = await stream.receive_some(CHUNK)
    except trio.BrokenResourceError:
        return "reset"
    assert data == b"", f"expected the connection to be closed, got {len(data)} bytes"
    return "eof"


def _is_reset(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionResetError):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_reset(sub) for sub in exc.exceptions)
    return exc.__cause__ is not None and _is_reset(exc.__cause__)


async def connect_and_expect_closed(endpoint: str) -> str:
    """Connect to `endpoint` and read until the peer ends the connection: `eof` or `reset`.

    A reset can already show as the connect's result: the kernel completes the handshake
    before the relay accepts, and the relay's RST may arrive before the client's connect()
    reads SO_ERROR.
    """
    try:
        stream = await open_stream(endpoint)
    except OSError as exc:
        if _is_reset(exc):
            return "reset"
        raise
    async with stream:
        return await expect_closed(stream)


def bound_port() -> socket.socket:
    """A TCP socket bound to a free loopback port but not listening: connects to it are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    """A loopback port that was free a moment ago (for servers that cannot report theirs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def sha256(data: bytes) -> bytes:
    """The sha256 digest of `data`."""
    return hashlib.sha256(data).digest()


def mib_per_s(nbytes: int, seconds: float) -> float:
    """Throughput in MiB/s (inf for a zero duration)."""
    return nbytes / MiB / seconds if seconds > 0 else math.inf
