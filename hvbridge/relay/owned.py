"""Routes the splice reactor serves whole: accept, allow, connect and splice in its thread.

A route whose listeners and target are TCP or Unix sockets, and that needs nothing from trio
per connection, is handed to the reactor (splice.py) instead of an accept loop: no trio task, no
trio.SocketStream and no hand-off between threads per connection, which were most of a short
connection's cost (docs/performance.md, "Connection rate"). The supervisor decides which routes
qualify (Supervisor.owned_target) and keeps the counters and the log lines (its Sink).

Rules:
1. The reactor accepts where a listener is readable, at most _ACCEPT_BATCH connections per
   event, checks the allow list (a pure function of the peer address), and connects the
   backend without blocking: EINPROGRESS, then writable, then SO_ERROR. From there the
   connection is a splice.Connection, so the relay's rules are splice.py's (its rule 5).
2. A connection refused by the allow list, or whose backend cannot be reached within
   connect_timeout, is closed with a reset, as on the task path; so is one whose relay failed.
3. Trio hears of a connection at each change after the accept (its backend connect under
   way, connected, ended), in batches (Reactor.report); OwnedConnection.wake tells the Sink
   every step it missed, in order, in the trio thread. The connect and idle deadlines are on
   trio's clock, in the reactor's heap of deadlines.
4. max_connections: at the limit the listeners leave the epoll set and the kernel's backlog
   holds the rest; below it they come back.
5. stop() takes the listeners out of the epoll set (the caller closes its own sockets);
   connections already accepted go on. cancel() ends them (CANCELLED).
6. An accept error for lack of resources (transports.base.ACCEPT_CAPACITY_ERRNOS) pauses the
   listeners until resume(); any other ends accepting. Either is passed to Sink.accept_failed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import math
import os
import select
import socket
from typing import TYPE_CHECKING, Final, Protocol, final

import trio

from hvbridge.addresses import TcpAddress, UnixAddress
from hvbridge.relay import splice
from hvbridge.relay.ends import EndReason, Transfer, describe, failure_end
from hvbridge.relay.splice import IN, OUT
from hvbridge.transports.base import ACCEPT_CAPACITY_ERRNOS, reset_on_close, translate_connect_error

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from hvbridge.addresses import Address
    from hvbridge.routes import RouteOptions

#: Connections one readable event of a listener may accept before the reactor serves others.
_ACCEPT_BATCH: Final = 64
#: What a listener is watched for. EPOLLEXCLUSIVE: of the processes whose epoll sets hold one
#: listening socket (`--workers`), a new connection wakes one, not all of them to race for it.
#: It is only ever added and deleted, never modified, as the kernel requires.
_LISTENING: Final = IN | getattr(select, "EPOLLEXCLUSIVE", 0)


class Sink(Protocol):
    """What the route's owner (the supervisor) hears; every method runs in the trio thread."""

    def started(self, conn: OwnedConnection) -> None:
        """A connection was accepted."""

    def connected(self, conn: OwnedConnection) -> None:
        """Its backend connected, conn.connect_seconds after the accept."""

    def ended(self, conn: OwnedConnection) -> None:
        """It ended: conn.counts holds the bytes, the end and its detail; conn.error a bug, if any."""

    def accept_failed(self, exc: OSError) -> None:
        """accept() failed (rule 6)."""


def target_sockaddr(address: Address) -> tuple[int, tuple[str, int] | str] | None:
    """(family, sockaddr) the reactor can connect to without blocking, or None.

    A TCP address must be an IP literal (a name would need a lookup per connection); a Unix
    address is any path or abstract name.
    """
    if isinstance(address, UnixAddress):
        return socket.AF_UNIX, address.sockaddr
    if isinstance(address, TcpAddress):
        try:
            ip = ipaddress.ip_address(address.host)
        except ValueError:
            return None
        return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), (address.host, address.port)
    return None


class _NoBackend:
    """Stands in for the backend socket of a connection that ends before it has one."""

    family = socket.AF_UNSPEC

    def fileno(self) -> int:
        return -1

    def shutdown(self, how: int, /) -> None:
        raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))

    def setsockopt(self, level: int, optname: int, value: int, /) -> None:
        raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))


_NO_BACKEND: Final = _NoBackend()


@final
class OwnedConnection(splice.Connection):
    """A connection the reactor accepted and relays; no task waits on it."""

    __slots__ = (
        "connect_seconds",
        "connecting",
        "heard",
        "over",
        "peer",
        "route",
        "sockets",
        "started",
        "transfer",
    )

    def __init__(
        self, route: OwnedRoute, client: socket.SocketType, peer: tuple[int, object], backend: socket.SocketType | None
    ) -> None:
        options = route.options
        self.transfer = Transfer()
        super().__init__(
            route.reactor,
            client,
            backend if backend is not None else _NO_BACKEND,
            half_close=options.half_close,
            idle_timeout=options.idle_timeout,
            counts=self.transfer,
        )
        self.route = route
        #: The sockets to close at the end: the backend's is missing if refused or none could be made.
        self.sockets: tuple[socket.SocketType, ...] = (client,) if backend is None else (client, backend)
        #: (family, sockaddr) of the client, as accept() gave it.
        self.peer = peer
        self.started = self.last_activity
        self.connecting = True
        #: Seconds from the accept to a connected backend; None until then.
        self.connect_seconds: float | None = None
        self.over = False  # set (reactor thread) once `transfer` says how it ended
        self.heard = 0  # trio thread: 1 once the sink heard of the accept, 2 of the connect

    # ------------------------------------------------------------ called in the trio thread

    def deadline(self) -> float:
        """The connect deadline while connecting, then splice.Connection's (idle timeout)."""
        if self.connecting:
            return self.started + self.route.options.connect_timeout
        return super().deadline()

    def wake(self) -> None:
        """The reactor reported on this connection: tell the sink what it has not heard yet."""
        reactor, route = self.reactor, self.route
        if self.heard == 0:
            self.heard = 1
            reactor.timed += 1
            route.count(+1)
            route.sink.started(self)
            if not self.over and (deadline := self.deadline()) < math.inf:
                reactor.expire_at(deadline, self)
        if self.heard == 1 and self.connect_seconds is not None:
            self.heard = 2
            route.sink.connected(self)
            if self.idle_timeout > 0:  # an idle timeout shorter than the connect timeout
                reactor.expire_at(self.deadline(), self)
        if self.over:
            self.over = False
            reactor.timed -= 1
            route.sink.ended(self)
            route.count(-1)

    # --------------------------------------------------------- called in the reactor thread

    def connect(self, target: tuple[str, int] | str) -> None:
        """Start the backend connect: done at once (Unix), in progress (TCP), or failed."""
        backend = self.sockets[1]
        try:
            backend.connect(target)
        except BlockingIOError as exc:
            if self.route.target_family == socket.AF_UNIX:  # EAGAIN: the backend's listen queue is full
                self.connect_failed(exc)
                return
            self.route.connecting[self.down.src] = self
            self.backend_mask = OUT
            self.reactor.watch(self.down.src, 0, OUT, self.route)
            self.reactor.report(self)  # trio arms the connect deadline
        except OSError as exc:
            self.connect_failed(exc)
        else:
            self._relay()

    def connected(self) -> None:
        """The backend's connect finished, connected or not (SO_ERROR says)."""
        error = self.sockets[1].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self.connect_failed(OSError(error, os.strerror(error)))
        else:
            self._relay()

    def _relay(self) -> None:
        """The backend is connected: start relaying."""
        self.connecting = False
        now = self.reactor.clock.current_time()
        self.connect_seconds = now - self.started
        self.last_activity = now
        if self.backend_mask:
            self.reactor.owners[self.down.src] = self  # the route watched it while connecting
        self.reactor.report(self)
        self._rearm()

    def connect_failed(self, exc: OSError) -> None:
        """End with CONNECT_FAILED and the transports' text for `exc`."""
        self.transfer.detail = translate_connect_error(self.route.target, exc).message
        self.reason = EndReason.CONNECT_FAILED
        self.finish()

    def refuse(self) -> None:
        """The allow list refused the peer."""
        self.reason = EndReason.REFUSED_BY_ALLOW_LIST
        self.finish()

    def _expire(self) -> None:
        if self.done or not self.connecting:
            super()._expire()
        elif self.reactor.clock.current_time() >= self.deadline():
            self.transfer.detail = f"timed out after {self.route.options.connect_timeout:g}s"
            self.reason = EndReason.CONNECT_FAILED
            self.finish()

    def leave_epoll(self) -> None:
        """Forget both sockets: closing them after this round of events (released()) takes
        them out of the epoll set, one system call each fewer than unregistering."""
        owners = self.reactor.owners
        if self.client_mask:
            del owners[self.up.src]
        if self.backend_mask:
            del owners[self.down.src]

    def released(self) -> None:
        """Say how it ended, close both sockets after this batch of events, tell trio."""
        transfer, error, route = self.transfer, self.error, self.route
        if isinstance(error, splice.SideError):
            transfer.end, transfer.detail = failure_end(error.side, error.cause)
        elif error is not None:
            transfer.end, transfer.detail = EndReason.CANCELLED, f"relay bug: {describe(error)}"
        else:
            transfer.end = self.reason if self.reason is not None else EndReason.CANCELLED
        if self.connecting:
            route.connecting.pop(self.down.src, None)
        route.live.discard(self)
        for sock in self.sockets:
            if error is not None or transfer.end.not_relayed:
                reset_on_close(sock)
            self.reactor.closing.append(sock)
        self.over = True
        self.reactor.report(self)
        route.below_limit()


@final
class OwnedRoute:
    """A route's listening sockets in the reactor's epoll set, and the connections they gave.

    Args:
        reactor: This trio run's reactor (splice.reactor()).
        listeners: The route's listening sockets (TCP or Unix); the caller keeps and closes them.
        target: Where connections go (target_sockaddr() must accept it).
        options: The route's options (half_close, idle_timeout, connect_timeout, max_connections).
        allowed: The allow list as a pure check of (family, sockaddr), or None to admit all.
        sink: Who hears of each connection (rule 3).
    """

    def __init__(
        self,
        reactor: splice.Reactor,
        listeners: Sequence[splice.Socket],
        target: TcpAddress | UnixAddress,
        options: RouteOptions,
        allowed: Callable[[tuple[int, object]], bool] | None,
        sink: Sink,
    ) -> None:
        found = target_sockaddr(target)
        assert found is not None
        self.target_family, self.target_sockaddr = found
        self.reactor = reactor
        self.target = target
        self.options = options
        self.allowed = allowed
        self.sink = sink
        # Socket objects over the listeners' own descriptors (no dup, which would keep a port
        # bound that a reload releases to bind it under another spelling): detached, never
        # closed, by stop(). A listener closed before then has left the epoll set by itself.
        self._listeners = {
            sock.fileno(): socket.SocketType(sock.family, socket.SOCK_STREAM, 0, sock.fileno()) for sock in listeners
        }
        for sock in self._listeners.values():
            if sock.family != socket.AF_UNIX:
                with contextlib.suppress(OSError):
                    # Inherited by every socket accept() gives (Linux): one system call per
                    # connection fewer. The task path's streams set it on their own anyway.
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._families = {sock.fileno(): int(sock.family) for sock in listeners}
        # Reactor thread only:
        self.live: set[OwnedConnection] = set()
        self.connecting: dict[int, OwnedConnection] = {}  # by backend fd
        self._watching = False
        self._paused = False  # by an accept error for lack of resources (rule 6)
        self._stopped = False
        # Trio thread only:
        self.active = 0  # connections the sink heard start and not yet end
        self._done = trio.Event()  # stop() has run in the reactor
        self._lot = trio.lowlevel.ParkingLot()

    # ------------------------------------------------------------------------ trio thread

    def start(self) -> None:
        """Start accepting."""
        self.reactor.post(self._resume)

    def resume(self) -> None:
        """Accept again after a pause for lack of resources (rule 6)."""
        self.reactor.post(self._unpause)

    async def stop(self) -> None:
        """Stop accepting and let go of the listening sockets. Returns once the reactor has,
        and trio has heard of every connection accepted before."""
        self.reactor.post(self._stop)
        await self._done.wait()

    async def cancel(self) -> None:
        """End every connection (CANCELLED); returns once trio has heard of every end."""
        self.reactor.post(self._cancel_all)
        while self.active:
            await self._lot.park()

    async def wait_idle(self) -> None:
        """Wait until stop() has run and every connection trio heard of has ended."""
        while not (self._done.is_set() and self.active == 0):
            await self._lot.park()

    def count(self, change: int) -> None:
        """A connection started (+1) or ended (-1), as the sink heard."""
        self.active += change
        if self.active == 0:
            self._lot.unpark_all()

    def _stopped_ack(self) -> None:
        self._done.set()
        self._lot.unpark_all()

    # --------------------------------------------------------------------- reactor thread

    def _watch(self, on: bool) -> None:
        if on != self._watching:
            self._watching = on
            for fd in self._listeners:
                if on:
                    with contextlib.suppress(OSError):  # EBADF: closed by its owner; the route is going
                        self.reactor.watch(fd, 0, _LISTENING, self)
                else:
                    self.reactor.forget(fd, self)

    def _resume(self) -> None:
        if not self._stopped and not self._paused:
            self._watch(len(self.live) < self.options.max_connections)

    def _unpause(self) -> None:
        self._paused = False
        self._resume()

    def below_limit(self) -> None:
        """A connection ended: accept again if the limit had stopped it (rule 4)."""
        if not self._watching:
            self._resume()

    def _stop(self) -> None:
        self._watch(False)
        self._stopped = True
        for sock in self._listeners.values():
            sock.detach()  # the caller's to close
        self._listeners = {}
        self.reactor.tell_trio(self._stopped_ack)

    def _cancel_all(self) -> None:
        for conn in list(self.live):
            conn.cancel()
        self.reactor.flush_reports()  # a shutdown does not wait for REPORT_INTERVAL

    def _accept_failed(self, exc: OSError) -> None:
        self._paused = exc.errno in ACCEPT_CAPACITY_ERRNOS
        self._stopped = not self._paused
        self._watch(False)
        self.reactor.tell_trio(functools.partial(self.sink.accept_failed, exc))

    def on_event(self, fd: int, events: int) -> None:
        """A listener is readable, or a backend connect finished."""
        self.reactor.handled += 1
        conn = self.connecting.pop(fd, None)
        if conn is not None:
            conn.guarded(conn.connected)
            return
        listener = self._listeners.get(fd)
        if listener is None:
            return
        family = self._families[fd]
        for _ in range(_ACCEPT_BATCH):
            if len(self.live) >= self.options.max_connections:
                self._watch(False)  # rule 4: below_limit() turns it back on
                return
            try:
                # socket.accept() without its conversions of the family and type to enums,
                # a tenth of the reactor's Python work per connection. For the same reason the
                # reactor's sockets are socket.SocketType, the C type under socket.socket,
                # which costs a third as much to make and has a plain int family.
                client_fd, sockaddr = listener._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            except OSError as exc:
                self._accept_failed(exc)
                return
            self._take(socket.SocketType(family, socket.SOCK_STREAM, 0, client_fd), (family, sockaddr))

    def _take(self, client: socket.SocketType, peer: tuple[int, object]) -> None:
        """A new connection: check the allow list, make the backend socket, tell trio, connect."""
        backend = error = None
        if self.allowed is None or self.allowed(peer):
            try:
                backend = socket.SocketType(self.target_family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError as exc:  # EMFILE, ENFILE: this connection alone fails
                error = exc
        conn = OwnedConnection(self, client, peer, backend)
        self.live.add(conn)  # trio hears of it at its next change (OwnedConnection.wake)
        if backend is None:
            if error is None:
                conn.refuse()
            else:
                conn.connect_failed(error)
            return
        try:
            client.setblocking(False)
            if backend.family != socket.AF_UNIX:  # the client's came from its listener
                backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            conn._fail("client", exc)
            return
        conn.connect(self.target_sockaddr)
