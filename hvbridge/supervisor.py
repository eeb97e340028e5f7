"""The supervisor: accept loops, per-connection tasks, allow lists, logs and statistics.

This module owns the life of routes and connections. It takes the socket layer as callables
(`open_listeners`, `connect`, defaulting to transports/), so tests inject fakes.

Error handling: a connection's failure is caught in its own task, logged with route and peer,
and never reaches another connection or the listener. An accept that fails for lack of
resources (EMFILE, ENFILE, ENOBUFS, ENOMEM) is logged and retried after 100 ms, as
trio.serve_listeners does, so running out of file descriptors pauses accepting and recovers by
itself. Any other accept error ends that listener's route with a logged error.

Resource handling: connection tasks run in a nursery that outlives the accept loops, so that
stopping a route stops accepting without cutting its open connections. Each route admits at
most `max_connections` at once: at the limit its accept loop waits and the kernel backlog
holds the rest. The relay closes both streams of every connection it was given.

Routes the splice reactor serves whole (relay/owned.py, chosen by Supervisor.owned_target): no
accept loop and no task per connection. The reactor accepts, checks `allow`, connects and
relays; the supervisor hears of each connection in batches (_OwnedSink) and counts and logs it
with the same opened()/closed() as the accept loops. One task per such route in the
connections nursery (_keep) ends its connections when that nursery is cancelled, as a
connection task would, and a drain waits for them like for any other.

PROXY protocol (proxyproto.py, proxyio.py): with `accept_proxy` a connection must start with a
header, read before the allow check, whose source then stands for the peer; with
`proxy_protocol` the backend gets a header right after the connect, before the relay starts.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
import logging
import math
import socket
from typing import TYPE_CHECKING, Final, NoReturn, final

import attrs
import trio

from hvbridge import proxyio, proxyproto
from hvbridge.addresses import TcpAddress, UnixAddress
from hvbridge.backend import Backend
from hvbridge.errors import BackendUnavailable, EndpointError
from hvbridge.logs import LOGGER, event
from hvbridge.proxyproto import ProxyHeader, ProxyProtocolError
from hvbridge.relay import owned, relay, splice
from hvbridge.relay.ends import EndReason, Transfer
from hvbridge.routes import AllowRule, CidRule, Route, RouteOptions, RouteTable, VmRule
from hvbridge.stats import CONNECT_LATENCY_BUCKETS, RouteStatistics
from hvbridge.transports import base, hvsock

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from hvbridge.addresses import Address

ACCEPT_RETRY_DELAY: Final = 0.1
#: connect_retries back off 0.2 s, 0.4 s, 0.8 s, ... but never wait longer than this.
MAX_RETRY_DELAY: Final = 5.0


@final
@attrs.define(eq=False)
class RouteCounters:
    """Live counters of one route; bytes count finished connections plus live transfers."""

    accepted: int = 0
    refused: int = 0
    failed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    closed: dict[str, int] = attrs.field(factory=dict)
    live: set[Transfer] = attrs.field(factory=set)
    connect_buckets: list[int] = attrs.field(factory=lambda: [0] * (len(CONNECT_LATENCY_BUCKETS) + 1))
    connect_seconds: float = 0.0

    def observe_connect(self, seconds: float) -> None:
        """Count one successful backend connect that took `seconds` (retries included)."""
        self.connect_buckets[bisect.bisect_left(CONNECT_LATENCY_BUCKETS, seconds)] += 1
        self.connect_seconds += seconds

    def snapshot(self) -> RouteStatistics:
        """Freeze the counters (live transfers included)."""
        return RouteStatistics(
            accepted=self.accepted,
            active=len(self.live),
            refused=self.refused,
            failed=self.failed,
            bytes_in=self.bytes_in + sum(t.client_to_backend for t in self.live),
            bytes_out=self.bytes_out + sum(t.backend_to_client for t in self.live),
            closed=dict(self.closed),
            connect_buckets=tuple(self.connect_buckets),
            connect_seconds=self.connect_seconds,
        )


def is_allowed(rules: Iterable[AllowRule], peer: tuple[int, object] | None) -> bool:
    """True if the peer `(family, sockaddr)` matches one of `rules`.

    TCP peers match CIDRs (IPv4-mapped IPv6 peers match IPv4 rules), vsock peers `cid:N`.
    `vm:` rules match nothing here: peer_allowed() sends Hyper-V peers to hvsock, which
    resolves VM names. A peer that cannot be identified matches nothing.
    """
    if peer is None:
        return False
    family, sockaddr = peer
    if not isinstance(sockaddr, tuple) or len(sockaddr) < 2:
        return False
    for rule in rules:
        match rule:
            case ipaddress.IPv4Network() | ipaddress.IPv6Network():
                if family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                ip = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
                if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped
                network = _unmapped(rule)
                if ip.version == network.version and ip in network:
                    return True
            case CidRule():
                if family == getattr(socket, "AF_VSOCK", None) and sockaddr[0] == rule.cid:
                    return True
    return False


def _unmapped(rule: ipaddress.IPv4Network | ipaddress.IPv6Network) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A rule in IPv4-mapped form (`::ffff:a.b.c.d/N`, N >= 96) as the IPv4 network it means.

    Peers are compared unmapped, so a mapped rule would otherwise silently admit no one.
    """
    if isinstance(rule, ipaddress.IPv6Network) and rule.prefixlen >= 96:
        mapped = rule.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, rule.prefixlen - 96))
    return rule


async def peer_allowed(rules: Sequence[AllowRule], peer: tuple[int, object] | None, backend: Backend) -> bool:
    """is_allowed(), except that Hyper-V peers go through hvsock, which resolves VM names."""
    if peer is not None and peer[0] == getattr(socket, "AF_HYPERV", None):  # pragma: no cover - Windows only
        return await hvsock.peer_vm_allowed(backend.hvsock, [r.vm for r in rules if isinstance(r, VmRule)], peer[1])
    return is_allowed(rules, peer)


@final
@attrs.define(eq=False)
class Supervisor:
    """Runs routes: listeners, accept loops and connection tasks.

    Args:
        connections: The nursery connection tasks run in; it outlives every route.
        backend: Opens, inspects and closes streams; holds the process's socket state.
        open_listeners: Opens a route's listeners (default backend.open_listeners).
        connect: Opens a route's backend stream (default backend.connect).
    """

    connections: trio.Nursery
    backend: Backend = attrs.field(factory=Backend)
    open_listeners: base.OpenListeners = attrs.field(
        default=attrs.Factory(lambda self: self.backend.open_listeners, takes_self=True)
    )
    connect: base.Connect = attrs.field(default=attrs.Factory(lambda self: self.backend.connect, takes_self=True))
    counters: dict[str, RouteCounters] = attrs.field(factory=dict)
    listeners: dict[str, list[base.Listener]] = attrs.field(factory=dict)
    # Connection tasks started and not yet finished (counted from accept, before the task
    # runs), and where wait_idle() waits for that number to reach 0.
    _open: int = attrs.field(default=0, init=False)
    _idle_lot: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot, init=False)
    # The routes the splice reactor serves, by id() of each of their listeners.
    _owned: dict[int, owned.OwnedRoute] = attrs.field(factory=dict, init=False)

    async def let_go(self, listeners: Iterable[base.Listener]) -> None:
        """Stop accepting on `listeners` before their owner closes them under a running route
        (a reload that binds their address under another spelling). An accept loop sees the
        close itself; the splice reactor must hear of it first, or it could accept on the
        number of a descriptor closed under it."""
        for listener in listeners:
            served = self._owned.get(id(listener))
            if served is not None:
                await served.stop()

    async def wait_idle(self) -> None:
        """Wait until no accepted connection is open (a graceful shutdown's drain), counting
        those the splice reactor accepted and has not reported yet."""
        await splice.flush()
        while self._open:
            await self._idle_lot.park()

    async def current_statistics(self) -> dict[str, RouteStatistics]:
        """statistics(), once trio has heard of every connection the splice reactor has
        reported so far (it hands them over every few milliseconds)."""
        await splice.flush()
        return self.statistics()

    def statistics(self) -> dict[str, RouteStatistics]:
        """Per-route counters, by route name."""
        return {name: c.snapshot() for name, c in self.counters.items()}

    @property
    def active(self) -> int:
        """Connections open right now, over all routes."""
        return sum(len(c.live) for c in self.counters.values())

    async def serve_route(
        self,
        route: Route,
        *,
        listeners: list[base.Listener] | None = None,
        task_status: trio.TaskStatus[list[base.Listener]] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Listen on the route and serve every connection; runs until cancelled.

        Reports the route's listeners with `task_status.started(listeners)`, so callers can
        read the bound addresses (port 0). Cancelling stops accepting; connections already
        accepted go on in the `connections` nursery.

        Args:
            route: The route to serve.
            listeners: Listeners opened by the caller (socket activation, workers, a reload
                that keeps the route's sockets). The caller keeps them: they stay open when
                this returns. When None, the route's listeners are opened here and closed
                on return.
            task_status: Receives the listeners once every accept loop runs.

        Raises:
            EndpointError: The listen endpoint cannot be opened.
        """
        counters = self.counters.setdefault(route.name, RouteCounters())
        owned = listeners is None
        if listeners is None:
            listeners = await self.open_listeners(route.listen, route.options)
        try:
            slots = trio.Semaphore(route.options.max_connections)
            served = self._own(route, listeners, counters) if self.owned_target(route, listeners) else None
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    bound = base.listener_address(listener)
                    event(
                        logging.INFO,
                        "listening",
                        route=route.name,
                        listen=bound,
                        connect=str(route.connect),
                    )
                    sockname = base.listener_sockname(listener)
                    if not route.options.allow and sockname is not None and base.exposed_tcp(*sockname):
                        event(
                            logging.WARNING,
                            "listening on a non-loopback address with no allow list; anyone who can"
                            " reach it can connect, add `allow = [...]` to restrict",
                            route=route.name,
                            listen=bound,
                        )
                    if served is None:
                        nursery.start_soon(self._accept_loop, route, listener, slots, counters)
                if served is not None:
                    served[0].start()  # after the lines above: they come before any connection's
                    nursery.start_soon(self._serve_owned, route, *served)
                task_status.started(listeners)
            raise AssertionError("accept loops never return")  # pragma: no cover
        finally:
            if served is not None:
                for listener in listeners:
                    self._owned.pop(id(listener), None)
                with trio.CancelScope(shield=True):
                    await served[0].stop()
            for listener in listeners if owned else ():
                # Shielded: aclose_forcefully() raises Cancelled after closing when this route
                # is being cancelled, which would leave the other listeners bound.
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(listener)

    async def _accept_loop(
        self,
        route: Route,
        listener: base.Listener,
        slots: trio.Semaphore,
        counters: RouteCounters,
    ) -> None:
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                slots.release()
                if exc.errno in base.ACCEPT_CAPACITY_ERRNOS:
                    await _pause_accepting(route, exc)
                    continue
                # Anything else means the listening socket itself is broken: this route ends
                # (engine.py logs it and keeps every other route running).
                raise
            except BaseException:
                slots.release()
                raise
            transfer = Transfer()
            self.opened(counters, transfer)  # now: a drain must not miss it before its task runs
            self.connections.start_soon(self._handle, route, stream, slots, counters, transfer)

    def owned_target(self, route: Route, listeners: Sequence[base.Listener]) -> bool:
        """Whether the splice reactor can serve `route` whole (relay/owned.py): TCP or Unix
        listeners and target, the target an IP literal or a path, and nothing needed from trio
        per connection (no PROXY header read or sent, no connect retries, the default
        connect). Every other route gets an accept loop and a task per connection."""
        options = route.options
        return (
            self.backend.splice
            and splice.enabled
            and self.connect == self.backend.connect
            and not options.accept_proxy
            and options.proxy_protocol == "none"
            and not options.connect_retries
            and isinstance(route.listen, TcpAddress | UnixAddress)
            and owned.target_sockaddr(route.connect) is not None
            and all(_spliceable_socket(listener) is not None for listener in listeners)
        )

    def _own(
        self, route: Route, listeners: Sequence[base.Listener], counters: RouteCounters
    ) -> tuple[owned.OwnedRoute, trio.MemoryReceiveChannel[OSError]]:
        """Hand the route's listeners to the splice reactor; the caller start()s and stop()s
        it. Also returns where its accept errors arrive."""
        failures, failed = trio.open_memory_channel[OSError](math.inf)
        assert isinstance(route.connect, TcpAddress | UnixAddress)
        served = owned.OwnedRoute(
            splice.reactor(),
            [sock for listener in listeners if (sock := _spliceable_socket(listener)) is not None],
            route.connect,
            route.options,
            functools.partial(is_allowed, route.options.allow) if route.options.allow else None,
            _OwnedSink(self, route, counters, failures),
        )
        self.connections.start_soon(self._keep, served)
        for listener in listeners:
            self._owned[id(listener)] = served
        return served, failed

    @staticmethod
    async def _serve_owned(route: Route, served: owned.OwnedRoute, failed: trio.MemoryReceiveChannel[OSError]) -> None:
        """Pause and resume an owned route after accept errors for lack of resources; raise any other."""
        async for exc in failed:
            if exc.errno not in base.ACCEPT_CAPACITY_ERRNOS:
                raise exc  # the listening socket itself is broken (as in _accept_loop)
            await _pause_accepting(route, exc)
            served.resume()

    @staticmethod
    async def _keep(served: owned.OwnedRoute) -> None:
        """Wait, among the connection tasks, until an owned route has stopped and its last
        connection ended; cancelled, end its connections first (as their tasks would)."""
        try:
            await served.wait_idle()
        except BaseException:
            with trio.CancelScope(shield=True):
                await served.stop()
                await served.cancel()
            raise

    async def _handle(
        self, route: Route, stream: base.Stream, slots: trio.Semaphore, counters: RouteCounters, transfer: Transfer
    ) -> None:
        start = trio.current_time()
        peer_info = self.backend.peer_address(stream)
        via = incoming = None
        surplus = b""
        try:
            try:
                if route.options.accept_proxy:
                    try:
                        incoming, surplus = await proxyio.read_header(stream, route.options.connect_timeout)
                    except ProxyProtocolError as exc:
                        transfer.end, transfer.detail = EndReason.REFUSED, f"bad PROXY header: {exc}"
                        await self.backend.abort(stream)
                        return
                    if incoming.peer() is not None:  # LOCAL and UNKNOWN keep the real peer
                        via, peer_info = peer_info, incoming.peer()
                if route.options.allow and not await peer_allowed(route.options.allow, peer_info, self.backend):
                    transfer.end = EndReason.REFUSED_BY_ALLOW_LIST
                    await self.backend.abort(stream)
                    return
                try:
                    backend = await self.open_backend(route)
                except EndpointError as exc:
                    transfer.end, transfer.detail = EndReason.CONNECT_FAILED, exc.message
                    await self.backend.abort(stream)
                    return
                if route.options.proxy_protocol != "none" or surplus:
                    try:
                        await self._send_first(route, stream, backend, peer_info, incoming, surplus)
                    except BaseException as exc:
                        await self.backend.abort(backend)  # cancelled: the outer handler closes the client
                        if not isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError | OSError):
                            raise
                        transfer.end = EndReason.CONNECT_FAILED
                        transfer.detail = f"cannot send the first bytes to the backend ({exc})"
                        await self.backend.abort(stream)
                        return
            except BaseException:
                # Cancelled while connecting: the stream is still open (relay() and abort()
                # close it on every other path, so it is not closed a second time there).
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
                raise
            await relay(
                stream,
                backend,
                half_close=route.options.half_close,
                idle_timeout=route.options.idle_timeout,
                pool=self.backend.buffer_pool(route.options.buffer_size),
                transfer=transfer,
                splice=self.backend.splice,
            )
        finally:
            slots.release()
            self.closed(route, counters, transfer, peer_info, via, start)

    def opened(self, counters: RouteCounters, transfer: Transfer) -> None:
        """Count a connection in: accepted, and live until closed()."""
        counters.accepted += 1
        counters.live.add(transfer)
        self._open += 1

    def closed(
        self,
        route: Route,
        counters: RouteCounters,
        transfer: Transfer,
        peer_info: tuple[int, object] | None,
        via: tuple[int, object] | None,
        start: float,
    ) -> None:
        """Count a connection out and log how it ended (both paths: tasks and owned routes)."""
        counters.live.discard(transfer)
        counters.bytes_in += transfer.client_to_backend
        counters.bytes_out += transfer.backend_to_client
        if transfer.end is None:
            transfer.end = EndReason.CANCELLED
        end = transfer.end
        if end is EndReason.CONNECT_FAILED:
            counters.failed += 1
        elif end.not_relayed:
            counters.refused += 1
        counters.closed[end.label] = counters.closed.get(end.label, 0) + 1
        level = logging.WARNING if end.not_relayed else logging.INFO
        if LOGGER.isEnabledFor(level):  # skip building the fields when the line is not logged
            event(
                level,
                "connection closed",
                route=route.name,
                peer=base.sockaddr_text(*peer_info) if peer_info else "-",
                **({"via": base.sockaddr_text(*via)} if via else {}),
                target=str(route.connect),
                bytes_in=transfer.client_to_backend,
                bytes_out=transfer.backend_to_client,
                duration=round(trio.current_time() - start, 3),
                reason=transfer.reason,
            )
        self._open -= 1
        if not self._open:
            self._idle_lot.unpark_all()

    @staticmethod
    async def _send_first(
        route: Route,
        client: base.Stream,
        backend: base.Stream,
        peer: tuple[int, object] | None,
        incoming: ProxyHeader | None,
        surplus: bytes,
    ) -> None:
        """Send the backend its PROXY header (one send of its own), then the bytes read past an incoming one."""
        if route.options.proxy_protocol != "none":
            if incoming is not None and incoming.peer() is not None:
                # Behind a load balancer: pass on what it said about the client.
                header = attrs.evolve(incoming, tlvs=((proxyproto.TLV_ROUTE, route.name.encode()),))
            else:
                header = proxyproto.describe(peer, proxyio.local_address(client), route.name)
            await backend.send_all(proxyproto.build(header, route.options.proxy_protocol))
        if surplus:
            await backend.send_all(surplus)

    async def open_backend(self, route: Route) -> base.Stream:
        """Connect to the route's target (connect_with_retries) and record the connect latency.

        Raises:
            EndpointError: The last attempt's failure.
        """
        start = trio.current_time()
        stream = await connect_with_retries(route.connect, route.options, self.connect, name=route.name)
        # The connect latency histogram (metrics): time to a usable backend, retries included.
        counters = self.counters.get(route.name) or self.counters.setdefault(route.name, RouteCounters())
        counters.observe_connect(trio.current_time() - start)
        return stream


def _spliceable_socket(listener: base.Listener) -> trio.socket.SocketType | None:
    """The listening socket of a TCP or Unix listener (trio's, or unix.UnixListener), else None."""
    sock = getattr(listener, "socket", None)
    if isinstance(sock, trio.socket.SocketType) and sock.family in splice.SPLICE_FAMILIES:
        return sock
    return None


async def _pause_accepting(route: Route, exc: OSError) -> None:
    """After an accept error for lack of resources: log it and wait before the next accept."""
    event(
        logging.ERROR,
        f"accept failed: {exc.strerror}; pausing {ACCEPT_RETRY_DELAY * 1000:.0f} ms"
        " (raise the file descriptor limit, `ulimit -n`)",
        route=route.name,
    )
    await trio.sleep(ACCEPT_RETRY_DELAY)


@final
@attrs.define(eq=False)
class _OwnedSink:
    """The supervisor's side of a route the splice reactor serves (owned.Sink)."""

    supervisor: Supervisor
    route: Route
    counters: RouteCounters
    failures: trio.MemorySendChannel[OSError]

    def started(self, conn: owned.OwnedConnection) -> None:
        self.supervisor.opened(self.counters, conn.transfer)

    def connected(self, conn: owned.OwnedConnection) -> None:
        assert conn.connect_seconds is not None
        self.counters.observe_connect(conn.connect_seconds)

    def ended(self, conn: owned.OwnedConnection) -> None:
        if conn.error is not None and not isinstance(conn.error, splice.SideError):
            LOGGER.error("relay bug on route %s", self.route.name, exc_info=conn.error)
        self.supervisor.closed(self.route, self.counters, conn.transfer, conn.peer, None, conn.started)

    def accept_failed(self, exc: OSError) -> None:
        self.failures.send_nowait(exc)


async def connect_with_retries(
    target: Address, options: RouteOptions, connect: base.Connect, *, name: str
) -> base.Stream:
    """Connect to `target` within options.connect_timeout, retrying as options.connect_retries says.

    Retries only failures that say "backend unavailable" (refused, reset, timed out...),
    with capped exponential backoff. The routes and `hvbridge connect` both use it.

    Args:
        target: The endpoint to connect to.
        options: Its connect_timeout and connect_retries (and what `connect` reads).
        connect: Opens one stream (Backend.connect, or a fake in tests).
        name: The route's name, for the retry log lines.

    Raises:
        EndpointError: The last attempt's failure.
    """
    attempt = 0
    while True:
        # trio.fail_after() without its generator-based context manager: it was a few
        # percent of a short connection's CPU time.
        with trio.CancelScope(deadline=trio.current_time() + options.connect_timeout) as deadline:
            try:
                return await connect(target, options)
            except BackendUnavailable as exc:
                error: EndpointError = exc
        if deadline.cancelled_caught:
            error = BackendUnavailable(str(target), "connect", f"timed out after {options.connect_timeout:g}s")
        if attempt >= options.connect_retries:
            raise error
        attempt += 1
        delay = min(0.1 * 2**attempt, MAX_RETRY_DELAY)
        event(
            logging.INFO,
            f"connect failed ({error.message}); retry {attempt}/{options.connect_retries} in {delay:g}s",
            route=name,
            target=str(target),
        )
        await trio.sleep(delay)


async def serve_routes(
    table: RouteTable,
    *,
    backend: Backend | None = None,
    open_listeners: base.OpenListeners | None = None,
    connect: base.Connect | None = None,
    task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve every route of `table` until cancelled.

    Opens every route's listeners first; if any cannot be opened, closes those already open
    and raises. Then reports the Supervisor with `task_status.started(supervisor)`; its
    `listeners` attribute lists each route's bound listeners.

    Error handling: see the module docstring; a failing connection never ends this function.

    Raises:
        EndpointError: A listen endpoint cannot be opened.
    """
    async with trio.open_nursery() as connections:
        backend = backend if backend is not None else Backend()
        supervisor = Supervisor(
            connections,
            backend,
            open_listeners if open_listeners is not None else backend.open_listeners,
            connect if connect is not None else backend.connect,
        )
        async with trio.open_nursery() as routes:
            for route in table.routes:
                supervisor.listeners[route.name] = await routes.start(supervisor.serve_route, route)
            task_status.started(supervisor)
    raise AssertionError("routes never return")  # pragma: no cover
