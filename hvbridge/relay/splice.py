"""The Linux fast path of the relay: splice() socket -> pipe -> socket, driven by one epoll.

This module owns the data path for connections whose two ends are sockets the kernel can
splice (TCP and Unix stream sockets). relay/pump.py picks it when both ends qualify and keeps
its recv_into path for everything else (vsock, Hyper-V sockets, stdio, memory streams).
docs/performance.md has the measurements that justify it.

How it works, and why:
1. Bytes never enter Python: splice(src -> pipe) then splice(pipe -> dst) move page
   references inside the kernel (SPLICE_F_MOVE | SPLICE_F_NONBLOCK). Pipes come from a pool
   and are held only while bytes are in flight: a direction takes one when its source is
   readable and gives it back as soon as it is empty, so an idle connection holds none.
2. One reactor per trio run owns an epoll instance with every spliced connection's sockets in
   it, and moves bytes in its own thread, blocked in epoll_wait() when nothing is ready. That
   thread, not a trio task, is what cuts a 1-byte round trip to socat's (docs/performance.md):
   with a trio task woken per event it took twice as long. Each event moves at most _ROUNDS
   pipefuls, so one busy connection cannot starve the others.
3. The two threads share nothing but two queues. Only the reactor thread touches a started
   connection's state, its epoll registrations and the pipe pool; the trio side asks it to
   start, cancel or time out a connection (a deque and an eventfd). The other way, the
   reactor reports connections (ended, or for owned.py's connections started and connected)
   once per round of epoll events, in one hand-off through the trio token, which then wakes
   each ended connection's task (Connection.wake). A socket is closed only after its task
   wakes, or by the reactor itself after the round of events (owned.py), so the reactor
   never sees a file descriptor number reused under it.
4. A connection costs the caller's task, parked until the connection ends, and its epoll
   registrations: no task per direction, no nursery, no buffer (<= 4 KiB of memory per idle
   connection); one that owned.py accepted has no task at all. Deadlines (idle, and owned.py's
   connect) live on the trio side (one system task, a heap), on trio's clock; the reactor
   stamps activity with that clock.
5. The relay's rules hold (pump.py rules 1-5; ends.py picks the end on both paths): EOF from
   one side becomes shutdown(SHUT_WR) on the other while the other direction keeps flowing; a
   direction whose destination is full keeps its pipe, stops reading and waits for the
   destination to drain (backpressure, one pipe at most); a failure is raised as SideError so
   that pump.py resets both sides; idle timeout; byte counts are updated as bytes move. A pipe
   that still holds bytes when a connection ends is closed, never reused.
6. Interest in a socket is registered only while some direction waits on it (EPOLLIN to read,
   EPOLLOUT to flush); a socket nobody waits on is taken out of the epoll set, so a peer that
   has gone away is noticed by the next write to it, as on the recv_into path.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import heapq
import math
import os
import select
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Final, Protocol, final

import attrs
import trio

from hvbridge.relay.ends import EndReason, Side, eof_end

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

#: Bytes a pipe holds (F_SETPIPE_SZ); /proc/sys/fs/pipe-max-size caps it, 1 MiB by default.
PIPE_SIZE: Final = 1 << 20
#: Pipefuls one event may move before the reactor serves other connections.
_ROUNDS: Final = 4
#: Ended connections' idle deadlines tolerated in the heap beyond the live ones.
_COMPACT_SLACK: Final = 64
#: The least time between two hand-offs of reports to trio (seconds, real time): trio wakes for
#: the reactor at most this often, however many connections start and end. Each wake-up costs
#: the reactor its GIL at every system call while trio runs (docs/performance.md).
REPORT_INTERVAL: Final = 0.002
#: Free pipes kept for reuse (2 file descriptors each).
_MAX_FREE_PIPES: Final = 16
_SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
SPLICE_FAMILIES: Final = frozenset({socket.AF_INET, socket.AF_INET6, getattr(socket, "AF_UNIX", -1)})
IN: Final = getattr(select, "EPOLLIN", 1)
OUT: Final = getattr(select, "EPOLLOUT", 4)
_ERR_HUP: Final = getattr(select, "EPOLLERR", 8) | getattr(select, "EPOLLHUP", 16)

_TCP_NOTSENT_LOWAT: Final = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
#: Off switch for the fast path (benchmarks compare against the recv_into path with it).
enabled = sys.platform == "linux" and hasattr(os, "splice") and hasattr(select, "epoll") and hasattr(os, "eventfd")


class Counts(Protocol):
    """Where live byte counts go (relay.Transfer)."""

    client_to_backend: int
    backend_to_client: int


class Socket(Protocol):
    """What the reactor uses of a socket: a stdlib socket, or the one in a trio.SocketStream."""

    @property
    def family(self) -> int: ...

    def fileno(self) -> int: ...

    def shutdown(self, how: int, /) -> None: ...

    def setsockopt(self, level: int, optname: int, value: int, /) -> None: ...


class Owner(Protocol):
    """What the reactor hands a ready file descriptor of its epoll set to."""

    def on_event(self, fd: int, events: int, /) -> None: ...


class SideError(Exception):
    """A read from or write to one side failed; pump.py resets both sides."""

    def __init__(self, side: Side, cause: OSError) -> None:
        self.side: Side = side
        self.cause = cause
        super().__init__(side, cause)


def spliceable(client: trio.abc.Stream, backend: trio.abc.Stream) -> bool:
    """True if both streams are TCP or Unix socket streams and splicing is on."""
    return (
        enabled
        and isinstance(client, trio.SocketStream)
        and isinstance(backend, trio.SocketStream)
        and client.socket.family in SPLICE_FAMILIES
        and backend.socket.family in SPLICE_FAMILIES
    )


def tune_unix(sock: Socket) -> None:
    """Give a spliced Unix socket a pipe's worth of send buffer (the first time it is full).

    The default (net.core.wmem_default, about 200 KiB) takes a pipeful in five steps, each a
    wake-up; a pipe's worth is 1.2-1.4x the throughput (docs/performance.md). A limit, not an
    allocation: idle costs nothing.

    Raises:
        OSError: The socket refused the option.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIPE_SIZE)


def _queued(fd: int) -> int:
    """Bytes waiting to be read from the pipe end `fd` (FIONREAD)."""
    import fcntl  # Unix only, as in Pipe
    import struct
    import termios

    count: int = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    return count


@final
class Pipe:
    """A pipe's two ends and how many bytes it holds at most."""

    __slots__ = ("read_fd", "size", "write_fd")

    def __init__(self, size: int) -> None:
        import fcntl  # Unix only: imported here so the module imports on Windows (splice is off there)

        self.read_fd, self.write_fd = os.pipe()
        with contextlib.suppress(OSError):  # EPERM past the user's pipe quota: keep the default
            fcntl.fcntl(self.write_fd, fcntl.F_SETPIPE_SZ, size)
        self.size: int = fcntl.fcntl(self.write_fd, fcntl.F_GETPIPE_SZ)

    def close(self) -> None:
        """Close both ends."""
        os.close(self.read_fd)
        os.close(self.write_fd)


@attrs.frozen
class PipePoolStatistics:
    """A read-only view of a PipePool (PipePool.statistics())."""

    #: Pipes taken and neither given back nor discarded.
    in_use: int
    #: Pipes waiting for reuse.
    idle: int
    #: Bytes in the pipes waiting for reuse: 0, as a pipe is given back only when empty.
    idle_queued: int


@attrs.frozen
class ReactorStatistics:
    """A read-only view of this trio run's splice reactor (statistics())."""

    #: Socket file descriptors in the epoll set (an idle connection's, and busy ones' waits).
    watched: frozenset[int]
    #: Bytes the live connections count as held in their pipes.
    pending: int
    #: Bytes the kernel holds in those pipes (equal to `pending`).
    queued: int
    #: Live connections with an idle timeout.
    timed: int
    #: Entries in the heap of idle deadlines (ended connections' included until compacted).
    deadlines: int
    #: The reactor's pipe pool.
    pipes: PipePoolStatistics


@final
class PipePool:
    """Empty pipes for directions with bytes in flight; at most `max_free` kept when free.

    Args:
        size: Capacity asked for each pipe (F_SETPIPE_SZ).
        max_free: Free pipes kept for reuse; beyond that, returned pipes are closed.
    """

    __slots__ = ("_free", "in_use", "max_free", "size")

    def __init__(self, size: int = PIPE_SIZE, *, max_free: int = _MAX_FREE_PIPES) -> None:
        self.size = size
        self.max_free = max_free
        self._free: list[Pipe] = []
        #: Pipes taken and neither given back nor discarded (0 when every connection is idle).
        self.in_use = 0

    def take(self) -> Pipe:
        """An empty pipe.

        Raises:
            OSError: A new pipe was needed and none could be made (EMFILE, ENFILE).
        """
        pipe = self._free.pop() if self._free else Pipe(self.size)
        self.in_use += 1
        return pipe

    def give_back(self, pipe: Pipe) -> None:
        """Return an *empty* pipe taken with take()."""
        self.in_use -= 1
        if len(self._free) < self.max_free:
            self._free.append(pipe)
        else:
            pipe.close()

    def discard(self, pipe: Pipe) -> None:
        """Close a pipe taken with take() that still holds bytes nobody will read."""
        self.in_use -= 1
        pipe.close()

    @property
    def free(self) -> int:
        """How many pipes wait for reuse."""
        return len(self._free)

    def statistics(self) -> PipePoolStatistics:
        """What the pool holds now (call it in the thread that uses the pool)."""
        return PipePoolStatistics(
            in_use=self.in_use, idle=len(self._free), idle_queued=sum(_queued(pipe.read_fd) for pipe in self._free)
        )

    def close(self) -> None:
        """Close every free pipe."""
        while self._free:
            self._free.pop().close()


@final
class _Direction:
    """One way of a connection: bytes from `src` to `dst`."""

    __slots__ = ("dst", "grow", "open", "pending", "pipe", "src", "src_side", "upstream")

    def __init__(self, src: int, dst: int, src_side: Side, dst_socket: Socket) -> None:
        self.src = src
        self.dst = dst
        #: A Unix dst whose send buffer is still the default: tune_unix() once it fills.
        self.grow: Socket | None = dst_socket if dst_socket.family == getattr(socket, "AF_UNIX", -1) else None
        self.src_side: Side = src_side
        self.upstream = src_side == "client"
        self.open = True  # no EOF from src yet
        self.pipe: Pipe | None = None
        self.pending = 0  # bytes in the pipe that dst has not taken yet

    @property
    def dst_side(self) -> Side:
        return "backend" if self.upstream else "client"


class Connection:
    """A spliced connection: the reactor thread moves its bytes; its task parks until it ends.

    Usage (pump.py): create it, `await trio.lowlevel.wait_task_rescheduled(conn.park())`,
    then `result()`, and if `aborted`, let the pending cancellation through. The task is woken
    only once the reactor has let go of both sockets, so closing them is then safe.
    """

    __slots__ = (
        "aborted",
        "backend",
        "backend_mask",
        "client",
        "client_mask",
        "counts",
        "done",
        "down",
        "error",
        "half_close",
        "idle_timeout",
        "last_activity",
        "reactor",
        "reason",
        "task",
        "up",
    )

    def __init__(
        self,
        reactor: Reactor,
        client: Socket,
        backend: Socket,
        *,
        half_close: bool,
        idle_timeout: float,
        counts: Counts,
    ) -> None:
        self.reactor = reactor
        self.client = client
        self.backend = backend
        client_fd, backend_fd = client.fileno(), backend.fileno()
        self.up = _Direction(client_fd, backend_fd, "client", backend)
        self.down = _Direction(backend_fd, client_fd, "backend", client)
        self.half_close = half_close
        self.idle_timeout = idle_timeout
        self.counts = counts
        self.last_activity = reactor.clock.current_time()  # trio's clock; the reactor stamps it too
        self.client_mask = 0
        self.backend_mask = 0
        self.done = False  # set by the reactor thread when the connection ends
        self.aborted = False  # the task was cancelled while parked
        self.reason: EndReason | None = None
        self.error: BaseException | None = None
        self.task: trio.lowlevel.Task | None = None

    @classmethod
    def of_streams(
        cls, client: trio.abc.Stream, backend: trio.abc.Stream, *, half_close: bool, idle_timeout: float, counts: Counts
    ) -> Connection:
        """A connection over two spliceable trio socket streams (spliceable()), for a task to park on."""
        assert isinstance(client, trio.SocketStream)
        assert isinstance(backend, trio.SocketStream)
        conn = cls(
            reactor(), client.socket, backend.socket, half_close=half_close, idle_timeout=idle_timeout, counts=counts
        )
        for sock in (conn.client, conn.backend):
            if sock.family != socket.AF_UNIX:
                with contextlib.suppress(OSError):
                    # trio.SocketStream sets 16 KiB, which would make a TCP socket report
                    # EPOLLOUT (and take spliced bytes) in 16 KiB steps; -1 = the system default.
                    sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, -1)
        return conn

    # ------------------------------------------------------------ called in the trio thread

    def park(self) -> Connection:
        """Hand the connection to the reactor; the current task is the one it wakes at the end.

        Returns self, the abort function for wait_task_rescheduled().
        """
        self.task = trio.lowlevel.current_task()
        if self.idle_timeout > 0:
            self.reactor.timed += 1
            self.reactor.expire_at(self.last_activity + self.idle_timeout, self)
        self.reactor.post(self.start)
        return self

    def deadline(self) -> float:
        """When the trio side should next ask the reactor to look at this connection (trio time)."""
        return self.last_activity + self.idle_timeout if self.idle_timeout > 0 else math.inf

    def wake(self) -> None:
        """The reactor reported this connection ended (trio thread): wake its task."""
        if self.idle_timeout > 0:
            self.reactor.timed -= 1
        task, self.task = self.task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def __call__(self, _: object) -> trio.lowlevel.Abort:
        """Abort function: ask the reactor to end the connection, and stay parked until it has
        (the task must not close a socket the reactor may be splicing). The object itself, so
        parking allocates no closure (every byte an idle connection holds counts, times thousands)."""
        self.aborted = True
        self.reactor.post(self.cancel)
        return trio.lowlevel.Abort.FAILED

    def result(self) -> EndReason | None:
        """Why the connection ended (CLOSED, CLOSED_BY_CLIENT, IDLE_TIMEOUT...; None if
        cancelled).

        Raises:
            SideError: A read from or write to one side failed.
        """
        if self.error is not None:
            raise self.error
        return self.reason

    # --------------------------------------------------------- called in the reactor thread

    def start(self) -> None:
        """Register the sockets: from here on the reactor moves this connection's bytes."""
        self.guarded(self._rearm)

    def cancel(self) -> None:
        """The task was cancelled: end the connection (no reason; pump.py says CANCELLED)."""
        self.guarded(self.finish)

    def expire(self) -> None:
        """The idle deadline came up on the trio side: end the connection if still idle."""
        self.guarded(self._expire)

    def _expire(self) -> None:
        if not self.done and self.idle_timeout > 0 and self.reactor.clock.current_time() >= self.deadline():
            self.reason = EndReason.IDLE_TIMEOUT
            self.finish()

    def guarded(self, action: Callable[[], None]) -> None:
        """Run `action` (reactor thread); if it raises, end this connection with the error."""
        try:
            action()
        except Exception as exc:  # a bug: end this connection and raise it in its task (or log it)
            self.error = exc
            self.finish()

    def on_event(self, fd: int, events: int) -> None:
        """Move what `events` on `fd` allow; any error ends this connection, never the reactor.

        The hot path: guarded() inlined, to save a call per event."""
        self.reactor.handled += 1
        try:
            failed = bool(events & _ERR_HUP)
            for d in (self.up, self.down):
                if self.done:
                    return
                if d.pending and fd == d.dst and (events & OUT or failed):
                    self._flush(d)
                elif d.open and not d.pending and fd == d.src and (events & IN or failed):
                    self._pump(d)
            if not self.done:
                self._rearm()
        except Exception as exc:
            self.error = exc
            self.finish()

    def _pump(self, d: _Direction) -> None:
        """src is readable and the pipe is empty: move up to _ROUNDS pipefuls to dst."""
        try:
            pipe = d.pipe = self.reactor.pipes.take()
        except OSError as exc:  # EMFILE/ENFILE: no fds for a new pipe; this connection alone fails
            self._fail(d.src_side, exc)
            return
        for _ in range(_ROUNDS):
            try:
                n = os.splice(d.src, pipe.write_fd, pipe.size, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                break
            except OSError as exc:
                self._fail(d.src_side, exc)
                return
            if n == 0:
                self._eof(d)
                break
            d.pending = n
            if not self._write(d) or n < pipe.size:
                break  # dst is full, or src is drained for now
        if not d.pending and d.pipe is not None:
            d.pipe = None
            self.reactor.pipes.give_back(pipe)

    def _flush(self, d: _Direction) -> None:
        """dst is writable again: move the bytes left in the pipe."""
        if self._write(d) and d.pipe is not None:
            self.reactor.pipes.give_back(d.pipe)
            d.pipe = None

    def _write(self, d: _Direction) -> bool:
        """Splice the pipe's pending bytes into dst; False if dst is full (or failed)."""
        assert d.pipe is not None
        self.last_activity = self.reactor.now  # bytes arrived, or dst took some
        while d.pending:
            try:
                n = os.splice(d.pipe.read_fd, d.dst, d.pending, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                if d.grow is None:
                    return False
                sock, d.grow = d.grow, None  # the first time a Unix dst is full: a bigger buffer
                with contextlib.suppress(OSError):
                    tune_unix(sock)
                continue
            except OSError as exc:
                self._fail(d.dst_side, exc)
                return False
            d.pending -= n
            if d.upstream:
                self.counts.client_to_backend += n
            else:
                self.counts.backend_to_client += n
        return True

    def _eof(self, d: _Direction) -> None:
        d.open = False
        # With the other way ended too, the connection ends now and closing dst sends its FIN:
        # no shutdown() first.
        if self.half_close and (self.down.open if d.upstream else self.up.open):
            try:
                (self.backend if d.upstream else self.client).shutdown(socket.SHUT_WR)
            except OSError as exc:
                self._fail(d.dst_side, exc)
                return
        end = eof_end(d.src_side, half_close=self.half_close, directions_open=self.up.open + self.down.open)
        if end is not None:
            self.reason = end
            self.finish()

    def _fail(self, side: Side, exc: OSError) -> None:
        self.error = SideError(side, exc)
        self.finish()

    def _rearm(self) -> None:
        """Wait on each socket for what its directions need, and on nothing else."""
        up, down = self.up, self.down
        client = (IN if up.open and not up.pending else 0) | (OUT if down.pending else 0)
        backend = (IN if down.open and not down.pending else 0) | (OUT if up.pending else 0)
        if client != self.client_mask:
            self.reactor.watch(self.up.src, self.client_mask, client, self)
            self.client_mask = client
        if backend != self.backend_mask:
            self.reactor.watch(self.down.src, self.backend_mask, backend, self)
            self.backend_mask = backend

    def finish(self) -> None:
        """End the connection: leave the epoll set, release pipes, wake the task (idempotent)."""
        if self.done:
            return
        self.done = True
        self.leave_epoll()
        self.client_mask = self.backend_mask = 0
        for d in (self.up, self.down):
            if d.pipe is not None:
                if d.pending:
                    self.reactor.pipes.discard(d.pipe)  # holds bytes that will never be delivered
                else:
                    self.reactor.pipes.give_back(d.pipe)
                d.pipe = None
        self.released()

    def leave_epoll(self) -> None:
        """Take both sockets out of the epoll set: their task closes them later."""
        self.reactor.watch(self.up.src, self.client_mask, 0, self)
        self.reactor.watch(self.down.src, self.backend_mask, 0, self)

    def released(self) -> None:
        """The reactor has let go of both sockets: have trio wake the task (owned.py: close them)."""
        self.reactor.report(self)


@final
class Reactor:
    """The epoll set of every spliced connection in this trio run, and the thread serving it.

    Each attribute belongs to one thread: `epoll`, `owners`, `pipes` and `now` to the reactor
    thread; `deadlines`, `timed` and the idle timer to the trio thread. The two queues between
    them (`_commands` one way, `_reports` the other) are deques, safe to append to and pop from
    in different threads; a flag per queue saves a wake-up when one is already on its way.
    """

    def __init__(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.clock = trio.lowlevel.current_clock()
        self.epoll = select.epoll()
        self.pipes = PipePool()
        self.now = self.clock.current_time()  # when the last epoll_wait() returned
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.epoll.register(self._wake_fd, IN)
        self.owners: dict[int, Owner] = {self._wake_fd: self}
        self._commands: collections.deque[Callable[[], None]] = collections.deque()
        self._commands_signalled = False
        self._reports: collections.deque[Connection] = collections.deque()
        self._reports_signalled = False
        self._flushed = 0.0  # time.monotonic() of the last hand-off of reports
        #: Sockets an owned connection let go of in this batch of events, closed after it, so
        #: that no later event of the batch finds a reused fd number.
        self.closing: list[socket.SocketType] = []
        self._running = True
        self.dead: RuntimeError | None = None  # the reactor thread died of a bug
        self.handled = 0  # socket events handled (settle() tells progress by it)
        # Idle deadlines: a heap of (when, tie-breaker, connection), one entry per connection
        # with an idle timeout. A connection that moved bytes since is pushed back with its new
        # deadline when its old one comes up; one that ended stays until then, or until the
        # heap is compacted (ended entries outnumber live ones), so it cannot grow unbounded.
        self.deadlines: list[tuple[float, int, Connection]] = []
        self.timed = 0  # live connections with an idle timeout
        self._pushed = 0
        self._sleep: trio.CancelScope | None = None
        self._thread = threading.Thread(target=self._loop, name="hvbridge-splice", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------- trio thread

    def post(self, command: Callable[[], None]) -> None:
        """Have the reactor thread run `command`, which must not raise."""
        if self.dead is not None:
            self._fail_all([getattr(command, "__self__", None)])
            return
        self._commands.append(command)
        if not self._commands_signalled:
            self._commands_signalled = True
            os.eventfd_write(self._wake_fd, 1)

    def expire_at(self, when: float, conn: Connection) -> None:
        """Look at conn's idle deadline at `when` (trio time)."""
        self._pushed += 1
        heapq.heappush(self.deadlines, (when, self._pushed, conn))
        if self._sleep is not None and when < self._sleep.deadline:
            self._sleep.deadline = when

    def _take_reports(self) -> None:
        """Act on what the reactor reported: connections ended, or owned ones started (run by
        trio, from the token)."""
        self._reports_signalled = False
        while self._reports:
            self._reports.popleft().wake()
        if len(self.deadlines) > 2 * self.timed + _COMPACT_SLACK:
            self.deadlines = [entry for entry in self.deadlines if not entry[2].done]
            heapq.heapify(self.deadlines)

    def _expire(self) -> None:
        now = trio.current_time()
        while self.deadlines and self.deadlines[0][0] <= now:
            _, _, conn = heapq.heappop(self.deadlines)
            if conn.done:
                continue
            deadline = conn.deadline()
            if now >= deadline:
                self.post(conn.expire)  # which checks again, in case bytes moved
                deadline = now + conn.idle_timeout if conn.idle_timeout > 0 else math.inf
            if deadline < math.inf:
                self.expire_at(deadline, conn)

    async def serve(self) -> None:
        """The idle timer, until the run ends; then stop the reactor thread."""
        try:
            while True:
                with trio.CancelScope(deadline=self.deadlines[0][0] if self.deadlines else math.inf) as self._sleep:
                    await trio.sleep_forever()
                self._sleep = None
                self._expire()
        finally:
            # System tasks are cancelled after the main task, so no connection is left here.
            self._sleep = None
            self._running = False
            os.eventfd_write(self._wake_fd, 1)
            self._thread.join()
            self.epoll.close()
            self.pipes.close()
            os.close(self._wake_fd)

    # -------------------------------------------------------------------- reactor thread

    def _loop(self) -> None:
        try:
            poll, owners, clock = self.epoll.poll, self.owners, self.clock
            closing, reports, monotonic = self.closing, self._reports, time.monotonic
            timeout = -1.0
            while self._running:
                events = poll(timeout, 256)
                self.now = clock.current_time()
                for fd, mask in events:
                    owner = owners.get(fd)  # None: ended earlier in this batch
                    if owner is not None:
                        owner.on_event(fd, mask)
                while closing:
                    closing.pop().close()
                timeout = -1.0
                if reports and not self._reports_signalled:
                    wait = self._flushed + REPORT_INTERVAL - monotonic()
                    if wait > 0:
                        timeout = wait
                    else:
                        self.flush_reports()
        except BaseException as exc:
            # A bug outside any one connection (those end just that connection). Nothing
            # would move bytes or end a connection any more: fail every connection, so that
            # no task waits forever, and crash the run loudly (a token callback that raises
            # ends trio.run() with TrioInternalError) rather than hang.
            self.dead = RuntimeError("the splice reactor thread died")
            self.dead.__cause__ = exc
            live = {owner for owner in self.owners.values() if isinstance(owner, Connection)}
            live.update(getattr(command, "__self__", None) for command in self._commands)  # type: ignore[misc]
            self._fail_all(live)
            with contextlib.suppress(trio.RunFinishedError):
                self.token.run_sync_soon(_raise, self.dead)
            raise

    def _fail_all(self, conns: Iterable[object]) -> None:
        """After the reactor died (any thread): end `conns` with that error, wake their tasks."""
        for conn in conns:
            if isinstance(conn, Connection) and not conn.done:
                conn.done = True
                conn.error = self.dead
                self.report(conn)
        self.flush_reports()

    def on_event(self, fd: int, events: int) -> None:
        """The eventfd: run the commands the trio thread posted."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake_fd)
        self._commands_signalled = False  # before draining: a later post signals again
        while self._commands:
            self._commands.popleft()()

    def report(self, conn: Connection) -> None:
        """Have trio call conn.wake() once this batch of events is done (flush_reports()): conn
        has let go of its sockets, or an owned one changed state."""
        self._reports.append(conn)

    def flush_reports(self) -> None:
        """Hand trio the reports so far, in one wake-up."""
        if self._reports and not self._reports_signalled:
            self._reports_signalled = True
            self._flushed = time.monotonic()
            with contextlib.suppress(trio.RunFinishedError):
                self.token.run_sync_soon(self._take_reports)

    def tell_trio(self, function: Callable[[], object]) -> None:
        """Have trio run `function()` after the reports so far (reactor thread)."""
        self.flush_reports()
        self.token.run_sync_soon(function)

    def forget(self, fd: int, owner: Owner) -> None:
        """Take `fd` out of the epoll set if `owner` still has it there. Its owner may have
        closed it already (which took it out), and its number may be another's by now."""
        if self.owners.get(fd) is owner:
            del self.owners[fd]
            with contextlib.suppress(OSError):  # EBADF, ENOENT: closed already
                self.epoll.unregister(fd)

    def watch(self, fd: int, old: int, new: int, conn: Owner) -> None:
        """Change what the epoll set waits for on `fd` from `old` to `new` (0: nothing)."""
        if new == old:
            return
        if not new:
            self.epoll.unregister(fd)
            del self.owners[fd]
        elif not old:
            self.epoll.register(fd, new)
            self.owners[fd] = conn
        else:
            self.epoll.modify(fd, new)

    async def statistics(self) -> ReactorStatistics:
        """A snapshot: each thread reads the attributes it owns."""
        seen: list[tuple[frozenset[int], int, int, PipePoolStatistics]] = []
        done = trio.Event()

        def take() -> None:
            conns = {owner for owner in self.owners.values() if isinstance(owner, Connection)}
            directions = [d for conn in conns for d in (conn.up, conn.down)]
            watched = frozenset(fd for fd in self.owners if fd != self._wake_fd)
            pending = sum(d.pending for d in directions)
            queued = sum(_queued(d.pipe.read_fd) for d in directions if d.pipe is not None)
            seen.append((watched, pending, queued, self.pipes.statistics()))
            self.tell_trio(done.set)

        self.post(take)
        await done.wait()
        watched, pending, queued, pipes = seen[0]
        return ReactorStatistics(
            watched=watched,
            pending=pending,
            queued=queued,
            timed=self.timed,
            deadlines=len(self.deadlines),
            pipes=pipes,
        )

    async def flush(self) -> None:
        """Wait until trio has acted on the reports made so far (flush())."""
        if self.dead is not None:
            return
        done = trio.Event()
        self.post(functools.partial(self.tell_trio, done.set))
        await done.wait()

    async def settle(self) -> int | None:
        """Wait for the reactor thread to run a command. If, when it did, no socket of its
        epoll set was ready (a fresh look, not the batch the command came in: the thread may
        have polled before the trio thread posted), the socket events handled so far; else None.
        """
        handled: int | None = None
        done = trio.Event()

        def barrier() -> None:
            nonlocal handled
            if all(fd == self._wake_fd for fd, _ in self.epoll.poll(0)):
                handled = self.handled
            self.tell_trio(done.set)

        self.post(barrier)
        await done.wait()
        return handled


def _raise(exc: BaseException) -> None:
    raise exc


_REACTOR: Final = trio.lowlevel.RunVar[Reactor]("hvbridge_splice_reactor")


def reactor() -> Reactor:
    """This trio run's reactor, started on first use."""
    try:
        return _REACTOR.get()
    except LookupError:
        made = Reactor()
        _REACTOR.set(made)
        trio.lowlevel.spawn_system_task(made.serve, name="hvbridge.splice.reactor")
        return made


async def flush() -> None:
    """Wait until trio has acted on every report this run's reactor has made so far (the
    reports wait up to REPORT_INTERVAL otherwise). No reactor in this run: at once."""
    try:
        running = _REACTOR.get()
    except LookupError:
        return
    await running.flush()


async def settle() -> int | None:
    """Wait until the reactor thread has run everything posted so far. If it then had nothing
    ready to handle, the number of socket events it has handled (a progress mark), else None.
    trio.testing.wait_all_tasks_blocked() for the reactor thread: tests call both until
    neither moves. Without a reactor in this run (no connection spliced yet), 0 at once."""
    try:
        reactor = _REACTOR.get()
    except LookupError:
        return 0
    return await reactor.settle()


def pipe_pool() -> PipePool:
    """This trio run's pipe pool (for tests and statistics)."""
    return reactor().pipes


async def statistics() -> ReactorStatistics:
    """A read-only snapshot of this trio run's reactor (made if this run has none yet)."""
    return await reactor().statistics()
