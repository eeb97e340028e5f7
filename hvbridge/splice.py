"""The Linux fast path of the relay: splice() socket -> pipe -> socket, driven by one epoll.

This module owns the data path for connections whose two ends are sockets the kernel can
splice (TCP and Unix stream sockets). relay.py picks it when both ends qualify and keeps its
recv_into path for everything else (vsock, Hyper-V sockets, stdio, memory streams).
docs/performance.md has the measurements that justify it (issue 7).

How it works, and why:
1. Bytes never enter Python: splice(src -> pipe) then splice(pipe -> dst) move page
   references inside the kernel (SPLICE_F_MOVE | SPLICE_F_NONBLOCK). Pipes come from a pool
   and are held only while bytes are in flight: a direction takes one when its source is
   readable and gives it back as soon as it is empty, so an idle connection holds none.
2. One reactor per trio run (a system task) owns an epoll instance with every spliced
   connection's sockets in it, and moves bytes from its own loop when they are ready: no task
   switch per read or write. Each event moves at most _ROUNDS pipefuls, then the reactor yields
   to trio, so one busy connection cannot starve the others.
3. A connection costs the caller's task, parked until the connection ends, and its epoll
   registrations: no task per direction, no nursery, no buffer (issue 7: <= 4 KiB per idle
   connection).
4. The relay's rules hold (relay.py rules 1-5): EOF from one side becomes shutdown(SHUT_WR) on
   the other while the other direction keeps flowing; a direction whose destination is full
   keeps its pipe, stops reading and waits for the destination to drain (backpressure, one pipe
   at most); a failure is raised as SideError so that relay.py resets both sides; idle timeout;
   byte counts are updated as bytes move. A pipe that still holds bytes when a connection ends
   is closed, never reused.
5. Interest in a socket is registered only while some direction waits on it (EPOLLIN to read,
   EPOLLOUT to flush); a socket nobody waits on is taken out of the epoll set, so a peer that
   has gone away is noticed by the next write to it, as on the recv_into path.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import os
import select
import socket
import sys
from typing import Final, Literal, Protocol, final

import trio

Side = Literal["client", "backend"]

#: Bytes a pipe holds (F_SETPIPE_SZ); /proc/sys/fs/pipe-max-size caps it, 1 MiB by default.
PIPE_SIZE: Final = 1 << 20
#: Pipefuls one event may move before the reactor yields to other tasks.
_ROUNDS: Final = 4
#: Ended connections' idle deadlines tolerated in the heap beyond the live ones.
_COMPACT_SLACK: Final = 64
#: Free pipes kept for reuse (2 file descriptors each).
_MAX_FREE_PIPES: Final = 16
_SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_SPLICE_FAMILIES: Final = frozenset({socket.AF_INET, socket.AF_INET6, getattr(socket, "AF_UNIX", -1)})
_IN: Final = getattr(select, "EPOLLIN", 1)
_OUT: Final = getattr(select, "EPOLLOUT", 4)
_ERR_HUP: Final = getattr(select, "EPOLLERR", 8) | getattr(select, "EPOLLHUP", 16)

_TCP_NOTSENT_LOWAT: Final = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
#: Off switch for the fast path (benchmarks compare against the recv_into path with it).
enabled = sys.platform == "linux" and hasattr(os, "splice") and hasattr(select, "epoll")


class Counts(Protocol):
    """Where live byte counts go (relay.Transfer)."""

    client_to_backend: int
    backend_to_client: int


class SideError(Exception):
    """A read from or write to one side failed; relay.py resets both sides."""

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
        and client.socket.family in _SPLICE_FAMILIES
        and backend.socket.family in _SPLICE_FAMILIES
    )


@final
class Pipe:
    """A pipe's two ends and how many bytes it holds at most."""

    __slots__ = ("read_fd", "size", "write_fd")

    def __init__(self, size: int) -> None:
        self.read_fd, self.write_fd = os.pipe()
        with contextlib.suppress(OSError):  # EPERM past the user's pipe quota: keep the default
            fcntl.fcntl(self.write_fd, fcntl.F_SETPIPE_SZ, size)
        self.size: int = fcntl.fcntl(self.write_fd, fcntl.F_GETPIPE_SZ)

    def close(self) -> None:
        """Close both ends."""
        os.close(self.read_fd)
        os.close(self.write_fd)


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

    def close(self) -> None:
        """Close every free pipe."""
        while self._free:
            self._free.pop().close()


@final
class _Direction:
    """One way of a connection: bytes from `src` to `dst`."""

    __slots__ = ("dst", "open", "pending", "pipe", "src", "src_side", "upstream")

    def __init__(self, src: int, dst: int, src_side: Side) -> None:
        self.src = src
        self.dst = dst
        self.src_side: Side = src_side
        self.upstream = src_side == "client"
        self.open = True  # no EOF from src yet
        self.pipe: Pipe | None = None
        self.pending = 0  # bytes in the pipe that dst has not taken yet

    @property
    def dst_side(self) -> Side:
        return "backend" if self.upstream else "client"


@final
class Connection:
    """A spliced connection: the reactor moves its bytes; its task parks until it ends.

    Usage (relay.py): create it, `await trio.lowlevel.wait_task_rescheduled(conn.park())`,
    then `finish()` (idempotent; also after a cancellation) and `result()`.
    """

    __slots__ = (
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
        client: trio.abc.Stream,
        backend: trio.abc.Stream,
        *,
        half_close: bool,
        idle_timeout: float,
        counts: Counts,
    ) -> None:
        assert isinstance(client, trio.SocketStream)
        assert isinstance(backend, trio.SocketStream)
        self.reactor = _reactor()
        self.client = client.socket
        self.backend = backend.socket
        client_fd, backend_fd = self.client.fileno(), self.backend.fileno()
        self.up = _Direction(client_fd, backend_fd, "client")
        self.down = _Direction(backend_fd, client_fd, "backend")
        self.half_close = half_close
        self.idle_timeout = idle_timeout
        self.counts = counts
        self.last_activity = trio.current_time()
        self.client_mask = 0
        self.backend_mask = 0
        self.done = False
        self.reason = ""
        self.error: BaseException | None = None
        self.task: trio.lowlevel.Task | None = None
        for sock in (self.client, self.backend):
            with contextlib.suppress(OSError):
                if sock.family == socket.AF_UNIX:
                    # The default (net.core.wmem_default, about 200 KiB) takes a pipeful in
                    # five steps, each a wake-up; a pipe's worth is 1.2-1.4x the throughput
                    # (docs/performance.md). A limit, not an allocation: idle costs nothing.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIPE_SIZE)
                else:
                    # trio.SocketStream sets 16 KiB, which would make a TCP socket report
                    # EPOLLOUT (and take spliced bytes) in 16 KiB steps; -1 = the system default.
                    sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, -1)
        self._rearm()
        if idle_timeout > 0:
            self.reactor.timed += 1
            self.reactor.expire_at(self.last_activity + idle_timeout, self)

    # ------------------------------------------------------------ called by the waiting task

    def park(self) -> Connection:
        """Make the current task the one finish() wakes; return self as its abort function."""
        self.task = trio.lowlevel.current_task()
        return self

    def __call__(self, _: object) -> trio.lowlevel.Abort:
        """Abort function for wait_task_rescheduled(): the object itself, so parking allocates
        no closure (issue 7 counts every byte of an idle connection)."""
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED

    def result(self) -> str:
        """Why the connection ended (`closed`, `closed by client`, `idle timeout`...).

        Raises:
            SideError: A read from or write to one side failed.
        """
        if self.error is not None:
            raise self.error
        return self.reason

    # ---------------------------------------------------------------- called by the reactor

    def on_event(self, fd: int, events: int) -> None:
        """Move what `events` on `fd` allow; any error ends the connection, never the reactor."""
        try:
            failed = bool(events & _ERR_HUP)
            for d in (self.up, self.down):
                if self.done:
                    return
                if d.pending and fd == d.dst and (events & _OUT or failed):
                    self._flush(d)
                elif d.open and not d.pending and fd == d.src and (events & _IN or failed):
                    self._pump(d)
            if not self.done:
                self._rearm()
        except Exception as exc:  # a bug: end this connection and raise it in its task
            self.error = exc
            self.finish()

    def on_deadline(self, now: float) -> float | None:
        """The idle deadline passed: end the connection if idle, else return the next one."""
        deadline = self.last_activity + self.idle_timeout
        if now < deadline:
            return deadline
        self.reason = "idle timeout"
        self.finish()
        return None

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
        self.last_activity = trio.current_time()  # bytes arrived, or dst took some
        while d.pending:
            try:
                n = os.splice(d.pipe.read_fd, d.dst, d.pending, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return False
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
        if not self.half_close:
            self.reason = f"closed by {d.src_side}"
            self.finish()
            return
        try:
            (self.backend if d.upstream else self.client).shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._fail(d.dst_side, exc)
            return
        if not self.up.open and not self.down.open:
            self.reason = "closed"
            self.finish()

    def _fail(self, side: Side, exc: OSError) -> None:
        self.error = SideError(side, exc)
        self.finish()

    def _rearm(self) -> None:
        """Wait on each socket for what its directions need, and on nothing else."""
        up, down = self.up, self.down
        client = (_IN if up.open and not up.pending else 0) | (_OUT if down.pending else 0)
        backend = (_IN if down.open and not down.pending else 0) | (_OUT if up.pending else 0)
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
        if self.idle_timeout > 0:
            self.reactor.forget_deadline()
        self.reactor.watch(self.up.src, self.client_mask, 0, self)
        self.reactor.watch(self.down.src, self.backend_mask, 0, self)
        self.client_mask = self.backend_mask = 0
        for d in (self.up, self.down):
            if d.pipe is not None:
                if d.pending:
                    self.reactor.pipes.discard(d.pipe)  # holds bytes that will never be delivered
                else:
                    self.reactor.pipes.give_back(d.pipe)
                d.pipe = None
        task, self.task = self.task, None
        if task is not None:
            trio.lowlevel.reschedule(task)


@final
class _Reactor:
    """The epoll set of every spliced connection in this trio run, and the task serving it."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.pipes = PipePool()
        self.owners: dict[int, Connection] = {}
        # Idle deadlines: a heap of (when, tie-breaker, connection), one entry per connection
        # with an idle timeout. A connection that moved bytes since is pushed back with its new
        # deadline when its old one comes up; one that ended stays until then, or until the
        # heap is compacted (ended entries outnumber live ones), so it cannot grow unbounded.
        self.deadlines: list[tuple[float, int, Connection]] = []
        self.timed = 0  # live connections with an idle timeout
        self._pushed = 0

    def expire_at(self, when: float, conn: Connection) -> None:
        """Call conn.on_deadline() at `when` (trio time)."""
        self._pushed += 1
        heapq.heappush(self.deadlines, (when, self._pushed, conn))

    def forget_deadline(self) -> None:
        """A connection with an idle timeout ended: compact the heap if mostly ended entries."""
        self.timed -= 1
        if len(self.deadlines) > 2 * self.timed + _COMPACT_SLACK:
            self.deadlines = [entry for entry in self.deadlines if not entry[2].done]
            heapq.heapify(self.deadlines)

    def _expire(self) -> None:
        now = trio.current_time()
        while self.deadlines and self.deadlines[0][0] <= now:
            _, _, conn = heapq.heappop(self.deadlines)
            if not conn.done and (later := conn.on_deadline(now)) is not None:
                self.expire_at(later, conn)

    def watch(self, fd: int, old: int, new: int, conn: Connection) -> None:
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

    async def serve(self) -> None:
        """Dispatch epoll events to their connections until the run ends."""
        try:
            while True:
                if self.deadlines:
                    with trio.move_on_at(self.deadlines[0][0]):
                        await trio.lowlevel.wait_readable(self.epoll.fileno())
                    self._expire()
                else:
                    await trio.lowlevel.wait_readable(self.epoll.fileno())
                for fd, events in self.epoll.poll(0, 256):
                    conn = self.owners.get(fd)
                    if conn is not None:
                        conn.on_event(fd, events)
        finally:
            # System tasks are cancelled after the main task, so no connection is left here.
            self.epoll.close()
            self.pipes.close()


_REACTOR: Final = trio.lowlevel.RunVar[_Reactor]("hvbridge_splice_reactor")


def _reactor() -> _Reactor:
    try:
        return _REACTOR.get()
    except LookupError:
        reactor = _Reactor()
        _REACTOR.set(reactor)
        trio.lowlevel.spawn_system_task(reactor.serve, name="hvbridge.splice.reactor")
        return reactor


def pipe_pool() -> PipePool:
    """This trio run's pipe pool (for tests and statistics)."""
    return _reactor().pipes
