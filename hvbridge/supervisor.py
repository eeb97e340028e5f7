"""The supervisor: accept loops, per-connection tasks, allow lists, logs and statistics.

This module owns the life of routes and connections. It takes the socket layer as callables
(`open_listeners`, `connect`, defaulting to endpoints.py), so tests inject fakes.

Error handling: a connection's failure is caught in its own task, logged with route and peer,
and never reaches another connection or the listener. An accept that fails for lack of
resources (EMFILE, ENFILE, ENOBUFS, ENOMEM) is logged and retried after 100 ms, as
trio.serve_listeners does, so running out of file descriptors pauses accepting and recovers by
itself. Any other accept error ends that listener's route with a logged error.

Resource handling: connection tasks run in a nursery that outlives the accept loops, so that
stopping a route stops accepting without cutting its open connections. Each route admits at
most `max_connections` at once: at the limit its accept loop waits and the kernel backlog
holds the rest. The relay closes both streams of every connection it was given.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import uuid
from typing import TYPE_CHECKING, Final, NoReturn, final

import attrs
import trio

from hvbridge import endpoints
from hvbridge.config import AllowRule, CidRule, Route, RouteTable, VmRule
from hvbridge.errors import BackendUnavailable, EndpointError
from hvbridge.logs import event
from hvbridge.relay import Transfer, abort, buffer_pool, relay

if TYPE_CHECKING:
    from collections.abc import Iterable

#: accept() errors that mean "out of resources for now" (trio's ACCEPT_CAPACITY_ERRNOS).
ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_DELAY: Final = 0.1
#: connect_retries back off 0.2 s, 0.4 s, 0.8 s, ... but never wait longer than this.
MAX_RETRY_DELAY: Final = 5.0


@attrs.frozen
class RouteStatistics:
    """A snapshot of one route's counters."""

    accepted: int
    active: int
    refused: int
    failed: int
    bytes_in: int
    bytes_out: int
    closed: dict[str, int]


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
        )


def is_allowed(rules: Iterable[AllowRule], peer: tuple[int, object] | None) -> bool:
    """True if the peer `(family, sockaddr)` matches one of `rules`.

    TCP peers match CIDRs (IPv4-mapped IPv6 peers match IPv4 rules), vsock peers `cid:N`,
    Hyper-V peers `vm:GUID`. A peer that cannot be identified matches nothing.
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
                if ip.version == rule.version and ip in rule:
                    return True
            case CidRule():
                if family == getattr(socket, "AF_VSOCK", None) and sockaddr[0] == rule.cid:
                    return True
            case VmRule():
                if family == getattr(socket, "AF_HYPERV", None) and _same_vm(rule.vm, sockaddr[0]):
                    return True
    return False


def _same_vm(vm: uuid.UUID | str, peer_vm: object) -> bool:
    try:
        return isinstance(vm, uuid.UUID) and uuid.UUID(str(peer_vm)) == vm
    except ValueError:
        return False


@final
@attrs.define(eq=False)
class Supervisor:
    """Runs routes: listeners, accept loops and connection tasks.

    Args:
        connections: The nursery connection tasks run in; it outlives every route.
        open_listeners: Opens a route's listeners (default endpoints.open_listeners).
        connect: Opens a route's backend stream (default endpoints.connect).
    """

    connections: trio.Nursery
    open_listeners: endpoints.OpenListeners = endpoints.open_listeners
    connect: endpoints.Connect = endpoints.connect
    counters: dict[str, RouteCounters] = attrs.field(factory=dict)
    listeners: dict[str, list[endpoints.Listener]] = attrs.field(factory=dict)

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
        task_status: trio.TaskStatus[list[endpoints.Listener]] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Listen on the route and serve every connection; runs until cancelled.

        Reports the route's listeners with `task_status.started(listeners)`, so callers can
        read the bound addresses (port 0).

        Raises:
            EndpointError: The listen endpoint cannot be opened.
        """
        counters = self.counters.setdefault(route.name, RouteCounters())
        listeners = await self.open_listeners(route.listen, route.options)
        try:
            slots = trio.Semaphore(route.options.max_connections)
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    bound = endpoints.listener_address(listener)
                    event(
                        logging.INFO,
                        "listening",
                        route=route.name,
                        listen=bound,
                        connect=str(route.connect),
                    )
                    if not route.options.allow and bound.startswith("tcp://") and not _is_loopback_text(bound):
                        event(
                            logging.WARNING,
                            "listening on a non-loopback address with no allow list; anyone who can"
                            " reach it can connect, add `allow = [...]` to restrict",
                            route=route.name,
                            listen=bound,
                        )
                    nursery.start_soon(self._accept_loop, route, listener, slots, counters)
                task_status.started(listeners)
            raise AssertionError("accept loops never return")  # pragma: no cover
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def _accept_loop(
        self,
        route: Route,
        listener: endpoints.Listener,
        slots: trio.Semaphore,
        counters: RouteCounters,
    ) -> None:
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                slots.release()
                if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                    event(
                        logging.ERROR,
                        f"accept failed: {exc.strerror}; pausing {ACCEPT_RETRY_DELAY * 1000:.0f} ms"
                        " (raise the file descriptor limit, `ulimit -n`)",
                        route=route.name,
                    )
                    await trio.sleep(ACCEPT_RETRY_DELAY)
                    continue
                raise
            except BaseException:
                slots.release()
                raise
            counters.accepted += 1
            self.connections.start_soon(self._handle, route, stream, slots, counters)

    async def _handle(
        self, route: Route, stream: endpoints.Stream, slots: trio.Semaphore, counters: RouteCounters
    ) -> None:
        start = trio.current_time()
        peer_info = endpoints.peer_address(stream)
        peer = endpoints.sockaddr_text(*peer_info) if peer_info else "-"
        transfer = Transfer()
        counters.live.add(transfer)
        try:
            if route.options.allow and not is_allowed(route.options.allow, peer_info):
                counters.refused += 1
                transfer.reason = "refused by allow list"
                await abort(stream)
                return
            try:
                backend = await self.open_backend(route)
            except EndpointError as exc:
                counters.failed += 1
                transfer.reason = f"connect failed: {exc.message}"
                await abort(stream)
                return
            await relay(
                stream,
                backend,
                half_close=route.options.half_close,
                idle_timeout=route.options.idle_timeout,
                pool=buffer_pool(route.options.buffer_size),
                transfer=transfer,
            )
        finally:
            slots.release()
            counters.live.discard(transfer)
            counters.bytes_in += transfer.client_to_backend
            counters.bytes_out += transfer.backend_to_client
            if not transfer.reason:
                transfer.reason = "cancelled"
            kind = transfer.reason.split(":")[0]
            counters.closed[kind] = counters.closed.get(kind, 0) + 1
            level = logging.WARNING if transfer.reason.startswith(("connect failed", "refused")) else logging.INFO
            event(
                level,
                "connection closed",
                route=route.name,
                peer=peer,
                target=str(route.connect),
                bytes_in=transfer.client_to_backend,
                bytes_out=transfer.backend_to_client,
                duration=round(trio.current_time() - start, 3),
                reason=transfer.reason,
            )

    async def open_backend(self, route: Route) -> endpoints.Stream:
        """Connect to the route's target within connect_timeout, retrying as configured.

        Retries only failures that say "backend unavailable" (refused, reset, timed out...),
        with capped exponential backoff.

        Raises:
            EndpointError: The last attempt's failure.
        """
        options = route.options
        attempt = 0
        while True:
            try:
                with trio.fail_after(options.connect_timeout):
                    return await self.connect(route.connect, options)
            except trio.TooSlowError:
                error: EndpointError = BackendUnavailable(
                    str(route.connect), "connect", f"timed out after {options.connect_timeout:g}s"
                )
            except BackendUnavailable as exc:
                error = exc
            if attempt >= options.connect_retries:
                raise error
            attempt += 1
            delay = min(0.1 * 2**attempt, MAX_RETRY_DELAY)
            event(
                logging.INFO,
                f"connect failed ({error.message}); retry {attempt}/{options.connect_retries} in {delay:g}s",
                route=route.name,
                target=str(route.connect),
            )
            await trio.sleep(delay)


def _is_loopback_text(bound: str) -> bool:
    host = bound[len("tcp://") :].rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve_routes(
    table: RouteTable,
    *,
    open_listeners: endpoints.OpenListeners = endpoints.open_listeners,
    connect: endpoints.Connect = endpoints.connect,
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
        supervisor = Supervisor(connections, open_listeners, connect)
        async with trio.open_nursery() as routes:
            for route in table.routes:
                supervisor.listeners[route.name] = await routes.start(supervisor.serve_route, route)
            task_status.started(supervisor)
    raise AssertionError("routes never return")  # pragma: no cover
