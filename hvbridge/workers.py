"""`--workers N`: N processes accept on the same listening sockets; the main process manages them.

This module owns the worker processes and the control channel to each. The main process
opens every listening socket (listeners.ListenerPool: its own, or systemd's), then starts N
workers with `python -c ...` and passes them the sockets' fds (`pass_fds`), so the kernel
spreads connections over processes that each run their own trio loop. The main process
relays nothing.

Control channel: a socketpair per worker carrying length-prefixed pickles. Both ends are this
program, started by this program, so pickle is safe here and keeps the route table exact.
    main -> worker: ("start", table, {route: [fd, ...]}, log_level, log_format)
                    ("stats", seq)   ("drain", grace)   ("exit",)
    worker -> main: ("ready",)   ("stats", seq, snapshot)   ("final", snapshot)

Rules:
1. Signals reach every worker. The main process forwards SIGTERM/SIGINT as ("drain", grace)
   and a second one as ("exit",); a worker also handles signals sent to it directly (Ctrl-C
   reaches the whole process group), and a ("drain") never counts as a second signal. A
   worker whose main process disappears (EOF on the channel) drains.
2. A reload starts a new generation of N workers on the new table (sockets of unchanged
   listen addresses are the same sockets), waits until each is ready, then asks the old
   generation to drain with no time limit: a reload never cuts a connection.
3. Metrics add up: on each scrape the main process asks every live worker for its counters
   and adds them to what exited workers left (their final snapshot), so counters never go
   backwards. A worker that crashes loses what it counted since the last scrape.
4. A worker of the current generation that exits unasked is logged and replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import struct
import subprocess
import sys
from typing import TYPE_CHECKING, Final, Literal, final

import attrs
import trio

from hvbridge.backend import Backend
from hvbridge.errors import HvbridgeError
from hvbridge.listeners import Inherited, ListenerPool, Listeners, listener_from_fd
from hvbridge.logs import LOGGER, event, setup_logging
from hvbridge.routes import RouteTable
from hvbridge.service import Service, serve
from hvbridge.stats import RouteStatistics, Snapshot, merge_all, retired

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from hvbridge.transports import base

#: How long a new worker may take to start its routes.
READY_TIMEOUT: Final = 30.0
#: How long a scrape waits for one worker's counters before using its last ones.
STATS_TIMEOUT: Final = 2.0
#: After the grace, how long exiting workers get before they are killed.
KILL_DELAY: Final = 5.0
#: A worker that died unasked is replaced after this long (no busy restart loop).
RESPAWN_DELAY: Final = 1.0
_HEADER: Final = struct.Struct(">I")
_MAX_FRAME: Final = 64 * 1024 * 1024
_WORKER_CODE: Final = "import sys; from hvbridge.workers import main; main(int(sys.argv[1]))"
_NOT_FOR_WORKERS: Final = ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class WorkerError(HvbridgeError):
    """A worker process could not be started or did not get ready."""


# ---------------------------------------------------------------------------- the channel


@final
@attrs.define(eq=False)
class Channel:
    """Length-prefixed pickled messages over a stream (see the module docstring)."""

    stream: trio.abc.Stream
    _buffer: bytearray = attrs.field(factory=bytearray, init=False)
    _send_lock: trio.Lock = attrs.field(factory=trio.Lock, init=False)

    async def send(self, message: tuple[object, ...]) -> None:
        """Send one message (callers may send concurrently)."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        async with self._send_lock:
            await self.stream.send_all(_HEADER.pack(len(data)) + data)

    async def receive(self) -> tuple[object, ...] | None:
        """The next message, or None at EOF.

        Raises:
            trio.BrokenResourceError: The frame is malformed (the peer is not ours).
        """
        while True:
            if len(self._buffer) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(self._buffer)
                if size > _MAX_FRAME:
                    raise trio.BrokenResourceError(f"control frame of {size} bytes")
                if len(self._buffer) >= _HEADER.size + size:
                    frame = bytes(self._buffer[_HEADER.size : _HEADER.size + size])
                    del self._buffer[: _HEADER.size + size]
                    try:
                        message: object = pickle.loads(frame)  # our own parent or child: trusted
                    except Exception as exc:  # anything unpickling can raise: not our peer
                        raise trio.BrokenResourceError(f"bad control frame: {exc!r}") from exc
                    if not isinstance(message, tuple) or not message:
                        raise trio.BrokenResourceError(f"bad control message {message!r}")
                    return tuple(message)
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return None
            self._buffer += chunk


def snapshot_from(value: object) -> Snapshot:
    """Narrow an unpickled snapshot; anything else is a bug in the other process.

    Raises:
        trio.BrokenResourceError: `value` is not a dict of route name -> RouteStatistics.
    """
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, RouteStatistics) for k, v in value.items()
    ):
        raise trio.BrokenResourceError(f"bad snapshot {value!r}")
    return {str(k): v for k, v in value.items() if isinstance(v, RouteStatistics)}


# ------------------------------------------------------------------------- the main process


@final
@attrs.define(eq=False)
class Worker:
    """One worker process, seen from the main process."""

    process: trio.Process
    channel: Channel
    generation: int
    ready: trio.Event = attrs.field(factory=trio.Event)
    exited: trio.Event = attrs.field(factory=trio.Event)
    is_ready: bool = False
    asked_to_stop: bool = False
    last: Snapshot = attrs.field(factory=dict)
    final: Snapshot | None = None
    replies: dict[int, trio.Event] = attrs.field(factory=dict)

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self.process.pid

    async def drain(self, grace: float) -> None:
        """Ask the worker to stop accepting and exit once its connections end (or at grace)."""
        self.asked_to_stop = True
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self.channel.send(("drain", float(grace)))

    async def exit_now(self) -> None:
        """Ask the worker to exit at once, closing its connections."""
        self.asked_to_stop = True
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self.channel.send(("exit",))


@final
@attrs.define(eq=False)
class WorkerEngine:
    """The engine.Engine of the main process: generations of N workers.

    Args:
        count: Workers per generation.
        nursery: Where each worker's supervising task runs.
        log_level: The log level workers use.
        log_format: The log format workers use.
    """

    count: int
    nursery: trio.Nursery
    log_level: str
    log_format: Literal["text", "json"]
    workers: list[Worker] = attrs.field(factory=list)
    current: list[Worker] = attrs.field(factory=list)
    generation: int = 0
    table: RouteTable | None = None
    listeners: Listeners = attrs.field(factory=dict)
    retired: dict[str, RouteStatistics] = attrs.field(factory=dict)
    stopping: bool = False
    _seq: int = 0
    _idle: trio.Event = attrs.field(factory=trio.Event)

    async def apply(self, table: RouteTable, listeners: Listeners) -> None:
        """Start a generation on `table`; once it is ready, drain the previous one.

        Raises:
            WorkerError: A new worker exited or was not ready in time; the previous
                generation keeps running.
        """
        generation = self.generation + 1
        new: list[Worker] = []
        try:
            for _ in range(self.count):
                new.append(await self._spawn(table, listeners, generation))
            with trio.move_on_after(READY_TIMEOUT):
                for worker in new:
                    await worker.ready.wait()
            if not all(worker.is_ready for worker in new):
                raise WorkerError(f"a worker did not start its routes within {READY_TIMEOUT:g}s; see its log")
        except BaseException:
            for worker in new:
                with contextlib.suppress(OSError):
                    worker.process.kill()
            raise
        old, self.current = self.current, new
        self.generation, self.table, self.listeners = generation, table, listeners
        for worker in old:
            await worker.drain(float("inf"))

    async def _spawn(self, table: RouteTable, listeners: Listeners, generation: int) -> Worker:
        fds = {name: [_fileno(listener, name) for listener in route] for name, route in listeners.items()}
        mine, theirs = socket.socketpair()
        env = {k: v for k, v in os.environ.items() if k not in _NOT_FOR_WORKERS}
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-c", _WORKER_CODE, str(theirs.fileno())],
                pass_fds=[theirs.fileno(), *(fd for route in fds.values() for fd in route)],
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            mine.close()
            raise WorkerError(f"cannot start a worker process: {exc}") from exc
        finally:
            theirs.close()
        channel = Channel(trio.SocketStream(trio.socket.from_stdlib_socket(mine)))
        worker = Worker(process, channel, generation)
        self.workers.append(worker)
        self._idle = trio.Event()
        await channel.send(("start", table, fds, self.log_level, self.log_format))
        self.nursery.start_soon(self._supervise, worker)
        return worker

    async def _supervise(self, worker: Worker) -> None:
        """Read the worker's messages until EOF, then reap it (and replace it if it died)."""
        try:
            while (message := await worker.channel.receive()) is not None:
                match message:
                    case ("ready",):
                        worker.is_ready = True
                        worker.ready.set()
                    case ("stats", int(seq), snapshot):
                        worker.last = snapshot_from(snapshot)
                        event_ = worker.replies.pop(seq, None)
                        if event_ is not None:
                            event_.set()
                    case ("final", snapshot):
                        # Counted from now on (a scrape during the reaping below sees it too).
                        worker.final = worker.last = snapshot_from(snapshot)
                    case _:
                        raise trio.BrokenResourceError(f"unknown message {message!r}")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            event(logging.ERROR, f"worker control channel failed: {exc}; killing the worker", worker=worker.pid)
            with contextlib.suppress(OSError):
                worker.process.kill()
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(worker.channel.stream)
                with trio.move_on_after(KILL_DELAY):
                    await worker.process.wait()
            self._reap(worker)
        if worker in self.current and not worker.asked_to_stop and not self.stopping:
            event(
                logging.ERROR,
                f"worker exited unasked (status {worker.process.returncode}); starting another",
                worker=worker.pid,
            )
            self.current.remove(worker)
            await trio.sleep(RESPAWN_DELAY)
            if not self.stopping and self.table is not None:
                replacement = await self._spawn(self.table, self.listeners, self.generation)
                self.current.append(replacement)

    def _reap(self, worker: Worker) -> None:
        worker.ready.set()  # a worker that died before it was ready is not waited for
        worker.exited.set()
        if worker in self.workers:
            self.workers.remove(worker)
            self.retired = merge_all([self.retired, retired(worker.final or worker.last)])
        if not self.workers:
            self._idle.set()

    def listening(self) -> dict[str, int]:
        """Listening sockets per route, while the current generation runs."""
        if not any(worker.is_ready for worker in self.current):
            return {}
        return {name: len(route) for name, route in self.listeners.items()}

    async def snapshot(self) -> Snapshot:
        """Every worker's counters, fetched now, plus those of workers gone."""
        async with trio.open_nursery() as nursery:
            for worker in self.workers:
                if worker.is_ready:
                    nursery.start_soon(self._fetch, worker)
        return merge_all([self.retired, *(worker.last for worker in self.workers)])

    async def _fetch(self, worker: Worker) -> None:
        self._seq += 1
        seq = self._seq
        reply = worker.replies[seq] = trio.Event()
        try:
            with trio.move_on_after(STATS_TIMEOUT):
                await worker.channel.send(("stats", seq))
                await reply.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            worker.replies.pop(seq, None)

    def pids(self) -> list[int]:
        """This process and every worker, for pid-labelled process metrics."""
        return [os.getpid(), *(worker.pid for worker in self.workers)]

    async def stop_accepting(self, grace: float) -> None:
        """Ask every worker to drain within `grace` (module rule 1)."""
        self.stopping = True
        for worker in list(self.workers):
            await worker.drain(grace)

    async def wait_idle(self) -> None:
        """Wait until every worker has exited."""
        if self.workers:
            await self._idle.wait()

    async def let_go(self, listeners: list[base.Listener]) -> None:
        """Nothing to do: with workers the pool never closes a listener under a running route
        (ListenerPool.respell is off), as the workers hold copies of it."""

    async def cut(self) -> None:
        """Tell the workers still running to exit now; kill those that do not."""
        self.stopping = True
        for worker in list(self.workers):
            await worker.exit_now()
        with trio.move_on_after(KILL_DELAY):
            await self.wait_idle()
        for worker in list(self.workers):
            with contextlib.suppress(OSError):
                worker.process.kill()


def _fileno(listener: base.Listener, route: str) -> int:
    sock = getattr(listener, "socket", None)
    if sock is None:
        raise WorkerError(
            f"routes.{route}: this listener cannot be shared with worker processes; run without --workers"
        )
    fileno = sock.fileno()
    assert isinstance(fileno, int)
    return fileno


@contextlib.asynccontextmanager
async def open_worker_engine(
    count: int, log_level: str, log_format: Literal["text", "json"]
) -> AsyncIterator[WorkerEngine]:
    """A WorkerEngine whose workers are gone when the `async with` block ends."""
    async with trio.open_nursery() as nursery:
        engine = WorkerEngine(count, nursery, log_level, log_format)
        try:
            yield engine
        finally:
            with trio.CancelScope(shield=True):
                await engine.cut()
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------- the worker


class _PidFilter(logging.Filter):
    """Adds `pid` to every event, so the log shows which worker served what."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the field; never drops a record."""
        fields = getattr(record, "hvbridge_fields", None)
        record.hvbridge_fields = {**(fields if isinstance(fields, dict) else {}), "pid": os.getpid()}
        return True


def main(control_fd: int) -> None:
    """A worker process: run the table the main process sends, on the sockets it passed."""
    trio.run(worker_main, control_fd)


async def worker_main(control_fd: int) -> None:
    """main()'s trio task: a worker on the control socket `control_fd` (it closes it)."""
    channel = Channel(trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=control_fd))))
    try:
        await _work(channel)
    finally:
        await trio.aclose_forcefully(channel.stream)


async def _work(channel: Channel) -> None:
    match await channel.receive():
        case ("start", RouteTable() as table, dict() as fds, str(level), "text" | "json" as fmt):
            pass
        case other:
            raise SystemExit(f"hvbridge worker: expected a start message, got {other!r}")
    setup_logging(level, fmt)
    LOGGER.addFilter(_PidFilter())
    inherited = [
        Inherited(str(name), "", listener_from_fd(int(fd)))
        for name, route_fds in fds.items()
        if isinstance(route_fds, list)
        for fd in route_fds
    ]
    async with trio.open_nursery() as nursery:
        service: Service = await nursery.start(_serve_table, table, inherited, level, fmt, nursery.cancel_scope)
        await channel.send(("ready",))
        nursery.start_soon(_obey, channel, service, table)
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await channel.send(("final", await service.engine.snapshot()))


async def _serve_table(
    table: RouteTable,
    inherited: list[Inherited],
    level: str,
    fmt: Literal["text", "json"],
    done: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[Service],
) -> None:
    backend = Backend()
    pool = ListenerPool(inherited, open_listeners=backend.open_listeners)
    await serve(
        table, backend=backend, pool=pool, metrics=False, log_level=level, log_format=fmt, task_status=task_status
    )
    done.cancel()


async def _obey(channel: Channel, service: Service, table: RouteTable) -> None:
    """Carry out the main process's requests; drain if it goes away."""
    try:
        while (message := await channel.receive()) is not None:
            match message:
                case ("stats", int(seq)):
                    await channel.send(("stats", seq, await service.engine.snapshot()))
                case ("drain", float(grace)):
                    service.request_stop("asked by the main process", grace)
                case ("exit",):
                    service.scope.cancel()
                case _:
                    raise trio.BrokenResourceError(f"unknown message {message!r}")
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    service.request_stop("main process gone", table.bridge.shutdown_grace)
