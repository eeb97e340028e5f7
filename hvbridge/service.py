"""The daemon's run loop: signals, reload, graceful shutdown, --watch, systemd and metrics.

This module owns the life of a running hvbridge process (docs/reference.md, "Reload and
signals"). The supervisor runs routes; this module decides which routes run, on which listening
sockets, and when they stop.

Rules:
1. Listening sockets belong to a ListenerPool keyed by listen address, not to routes. A reload
   reuses the socket of every listen address the new table still has, so unchanged routes (and
   changed routes whose `listen` is unchanged) never refuse a connection: the kernel backlog
   holds connections while a changed route's accept loop is swapped. Sockets from systemd
   socket activation and those a worker inherits are in the pool too. A listen address the
   new table spells otherwise (127.0.0.1:P -> 0.0.0.0:P) cannot be bound beside the old
   socket: that socket is released first, and bound again if the reload fails.
2. A reload is all-or-nothing: the file is parsed and validated, and every new listen address
   is bound, before any running route is touched. Anything wrong keeps the running table and
   logs every problem. Connections already open are never cut by a reload: they live in the
   supervisor's connection nursery, which outlives routes.
3. SIGTERM/SIGINT: stop accepting at once (close every listener, so the kernel refuses new
   connections), let open connections finish for up to `shutdown_grace`, cancel the rest,
   return (exit status 0). A second SIGTERM/SIGINT exits at once.
4. Commands (reload, stop) are handled one at a time, in order; only the second stop signal
   acts out of turn.

The Engine runs routes: LocalEngine in this process, or workers.WorkerEngine in N child
processes that share the pool's sockets (`--workers N`).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import os
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Final, Literal, Protocol, final

import attrs
import trio

from hvbridge import transports
from hvbridge.addresses import VMADDR_PORT_ANY, Address, TcpAddress, UnixAddress, VsockAddress
from hvbridge.config import COMMAND_LINE, ListenBinds, listen_conflicts
from hvbridge.errors import ConfigError, EndpointError, HvbridgeError, Problem
from hvbridge.logs import event, setup_logging
from hvbridge.metrics import Exposition, open_metrics_listeners, serve_metrics
from hvbridge.routes import Route, RouteOptions, RouteTable
from hvbridge.supervisor import Supervisor
from hvbridge.systemd import ActivatedSocket, Notifier, listen_fds
from hvbridge.transports import base, hvsock, tcp

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from hvbridge.stats import Snapshot

Listeners = Mapping[str, list[base.Listener]]
Loader = Callable[[], "RouteTable"]
Command = Literal["reload", "stop"]

#: --watch polls the file this often; a change is acted on once it has held for one interval.
WATCH_INTERVAL: Final = 1.0
#: Windows has SIGBREAK (Ctrl-Break) and no SIGHUP: reload there is --watch.
_STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, *((signal.SIGBREAK,) if hasattr(signal, "SIGBREAK") else ()))
_RELOAD_SIGNALS: Final = (signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()


def check_listen_conflicts(table: RouteTable) -> None:
    """Refuse a table two of whose routes would bind the same address once host names resolve.

    Blocking (resolver lookups) when a listen endpoint is a host name; see _check_listens().

    Raises:
        ConfigError: Naming both routes of each collision.
    """
    problems = listen_conflicts(table, tcp.listen_hosts)
    if problems:
        raise ConfigError(problems)


async def _check_listens(table: RouteTable) -> None:
    """check_families() and check_listen_conflicts(); host names are resolved in a thread."""
    check_families(table)
    if any(isinstance(r.listen, TcpAddress) and not _is_ip_literal(r.listen.host) for r in table.routes):
        await trio.to_thread.run_sync(check_listen_conflicts, table)
    else:
        check_listen_conflicts(table)  # nothing to resolve


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return True


def check_families(table: RouteTable) -> None:
    """Refuse a table with an endpoint family this OS cannot use (docs/reference.md, "Validation").

    Raises:
        ConfigError: Naming every route and endpoint concerned.
    """
    problems = []
    for route in table.routes:
        for key, address in (("listen", route.listen), ("connect", route.connect)):
            why = transports.unavailable_reason(address)
            if why is not None:
                problems.append(Problem(table.source, None, f"routes.{route.name}.{key}", f"{address}: {why}"))
    if problems:
        raise ConfigError(problems)


# ------------------------------------------------------------------------------ listeners


@final
@attrs.define(eq=False)
class Inherited:
    """A listening socket this process did not open: socket activation or a worker's share.

    Attributes:
        name: The $LISTEN_FDNAMES name (or, in a worker, the route's name).
        address: Its bound address as endpoint text, e.g. `tcp://127.0.0.1:22`.
        listener: The listener over the socket (it never removes a Unix socket file).
    """

    name: str
    address: str
    listener: base.Listener


def listener_from_fd(fd: int) -> base.Listener:
    """A trio listener over the listening stream socket `fd` (any family); takes the fd.

    Raises:
        ValueError: `fd` is not a listening SOCK_STREAM socket.
        OSError: `fd` is not a socket.
    """
    sock = socket.socket(fileno=fd)
    try:
        listener: base.Listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    except ValueError:
        sock.detach()  # leave the fd as we found it
        raise
    return listener


def inherit(sockets: list[ActivatedSocket]) -> list[Inherited]:
    """Wrap socket-activated fds as listeners; an fd that is not a listening socket is skipped."""
    inherited = []
    for activated in sockets:
        try:
            listener = listener_from_fd(activated.fd)
        except (ValueError, OSError) as exc:
            event(
                logging.WARNING,
                f"socket-activated fd {activated.fd} is not a listening stream socket; ignored ({exc})",
                name=activated.name,
            )
            continue
        inherited.append(Inherited(activated.name, base.listener_address(listener), listener))
    return inherited


#: What a pool keeps listeners by: the listen address, plus the route name when the address
#: is ephemeral (TCP port 0, vsock port any), where two routes never share a socket.
PoolKey = tuple[Address, str | None]


def pool_key(route: Route) -> PoolKey:
    """The key of `route`'s listeners in a ListenerPool."""
    address = route.listen
    ephemeral = (isinstance(address, TcpAddress) and address.port == 0) or (
        isinstance(address, VsockAddress) and address.port == VMADDR_PORT_ANY
    )
    return address, route.name if ephemeral else None


@final
@attrs.define(eq=False)
class ListenerPool:
    """Listening sockets by listen address; routes borrow them (module rule 1).

    Args:
        inherited: Sockets passed in (socket activation, a worker's share). A route takes the
            ones named like it, else the one bound to its listen address. They are closed
            only by aclose(), never by a reload.
        open_listeners: Opens the listeners of an address nobody passed in.
        respell: Let a reload release a socket whose address the new table spells otherwise.
    """

    inherited: list[Inherited] = attrs.field(factory=list)
    open_listeners: base.OpenListeners = transports.open_listeners
    opened: dict[PoolKey, list[base.Listener]] = attrs.field(factory=dict)
    #: Release a socket to bind another spelling of its address (see _open). Off with workers:
    #: they hold copies of the socket, so closing this process's copy would not free the port.
    respell: bool = True
    #: Set by acquire() when it released a socket to bind another spelling of its address, failed
    #: later and bound the released one again: the routes on it need restarting on the new one.
    reopened: bool = attrs.field(default=False, init=False)
    _unix_options: dict[PoolKey, tuple[int, str | None, str | None]] = attrs.field(factory=dict, init=False)
    _options: dict[PoolKey, RouteOptions] = attrs.field(factory=dict, init=False)

    def _find_inherited(self, route: Route) -> list[base.Listener]:
        named = [i.listener for i in self.inherited if i.name == route.name]
        return named or [i.listener for i in self.inherited if i.address == str(route.listen)]

    async def acquire(self, table: RouteTable) -> dict[str, list[base.Listener]]:
        """Listeners for every route of `table`, opening only addresses the pool lacks.

        All or nothing: if one address cannot be opened, the ones opened by this call are
        closed again and the pool is as before.

        Raises:
            EndpointError: A listen address cannot be opened (or a kept Unix socket file's
                mode/owner cannot be changed).
        """
        result: dict[str, list[base.Listener]] = {}
        new: dict[PoolKey, list[base.Listener]] = {}
        released: list[PoolKey] = []
        self.reopened = False
        try:
            for route in table.routes:
                key = pool_key(route)
                inherited = self._find_inherited(route)
                if inherited:
                    result[route.name] = inherited
                elif key in self.opened:
                    self._refresh_unix_file(route, key)
                    await _follow_vm_names(self.opened[key])
                    result[route.name] = self.opened[key]
                else:
                    wanted = {pool_key(r) for r in table.routes}
                    listeners = await self._open(route, wanted, released, named=table.source != COMMAND_LINE)
                    new[key] = result[route.name] = listeners
                    self._unix_options[key] = _unix_file_options(route)
                    self._options[key] = route.options
        except BaseException:
            for listeners in new.values():
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
            for key in released:
                try:
                    self.opened[key] = await self.open_listeners(key[0], self._options[key])
                except HvbridgeError as exc:
                    event(logging.ERROR, f"cannot bind a released listener again: {exc}", listen=str(key[0]))
                    continue
                self.reopened = True
            raise
        self.opened.update(new)
        for key in released:
            self._unix_options.pop(key, None)
            self._options.pop(key, None)
        return result

    async def _open(
        self, route: Route, wanted: set[PoolKey], released: list[PoolKey], *, named: bool
    ) -> list[base.Listener]:
        """Open a route's listeners; the error names the route (`named`: a table with route names).

        A socket of the running table that binds what this route binds, under another spelling
        (127.0.0.1:P -> 0.0.0.0:P or localhost:P), and that the new table no longer wants, is
        released first: the new route takes the port over.
        """
        binds = ListenBinds(tcp.listen_hosts if isinstance(route.listen, TcpAddress) else None)
        binds.claim(route.name, route.listen)
        stale = [k for k in self.opened if k not in wanted and binds.find(k[0]) is not None] if self.respell else []
        for key in stale:
            event(logging.INFO, "releasing a listener for another spelling of its address", listen=str(key[0]))
            released.append(key)
            for listener in self.opened.pop(key):
                await trio.aclose_forcefully(listener)
        try:
            return await self.open_listeners(route.listen, route.options)
        except EndpointError as exc:
            if not named:
                raise
            raise type(exc)(exc.address, f"routes.{route.name}.listen: {exc.op}", exc.message) from exc

    def _refresh_unix_file(self, route: Route, key: PoolKey) -> None:
        """A kept Unix socket file gets the route's new mode/owner/group (the file stays)."""
        wanted = _unix_file_options(route)
        address = route.listen
        if self._unix_options.get(key, wanted) == wanted or not isinstance(address, UnixAddress):
            return
        mode, owner, group = wanted
        # As transports/unix.py reads them: a name, or a number as digits.
        user_id: str | int | None = int(owner) if owner is not None and owner.isdigit() else owner
        group_id: str | int | None = int(group) if group is not None and group.isdigit() else group
        if not address.abstract:
            try:
                os.chmod(address.path, mode)
                if user_id is not None and group_id is not None:
                    shutil.chown(address.path, user_id, group_id)
                elif user_id is not None:
                    shutil.chown(address.path, user=user_id)
                elif group_id is not None:
                    shutil.chown(address.path, group=group_id)
            except (OSError, LookupError) as exc:
                raise EndpointError(str(address), "listen", f"cannot change mode/owner: {exc}") from exc
        self._unix_options[key] = wanted

    async def release_unused(self, in_use: Listeners) -> list[Address]:
        """Close the opened addresses no route uses any more; return them."""
        used = {id(listener) for listeners in in_use.values() for listener in listeners}
        released = []
        for key, listeners in list(self.opened.items()):
            if not any(id(listener) in used for listener in listeners):
                del self.opened[key]
                self._unix_options.pop(key, None)
                released.append(key[0])
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
        return released

    async def aclose(self) -> None:
        """Close every socket, inherited ones too (new connections are then refused)."""
        for listeners in [*self.opened.values(), [i.listener for i in self.inherited]]:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
        self.opened.clear()
        self.inherited.clear()


async def _follow_vm_names(listeners: list[base.Listener]) -> None:
    """A kept listener on a VM name looks it up again (WSL has a new VmId after each start).

    A rebind is not undone if the reload fails later: the old VmId is gone either way.
    """
    for listener in listeners:
        if isinstance(listener, hvsock.HvSocketListener):
            await listener.refresh()


def _unix_file_options(route: Route) -> tuple[int, str | None, str | None]:
    return route.options.mode, route.options.owner, route.options.group


# --------------------------------------------------------------------------------- engines


class Engine(Protocol):
    """Runs the routes of a table on listeners the service provides."""

    async def apply(self, table: RouteTable, listeners: Listeners) -> None:
        """Run exactly `table`'s routes on `listeners`; connections already open go on."""

    def listening(self) -> dict[str, int]:
        """Listening sockets per running route."""

    async def snapshot(self) -> Snapshot:
        """Route counters (over every process)."""

    def pids(self) -> list[int] | None:
        """The processes for process metrics, or None for this process alone."""

    async def stop_accepting(self, grace: float) -> None:
        """Stop every accept loop; `grace` is what open connections get."""

    async def wait_idle(self) -> None:
        """Wait until no connection is open."""

    async def cut(self) -> None:
        """Close every connection still open."""


@final
@attrs.define(eq=False)
class _Running:
    """A route's serving task: cancel `scope`, then wait for `done`."""

    route: Route
    listeners: list[base.Listener]
    scope: trio.CancelScope
    done: trio.Event


@final
@attrs.define(eq=False)
class LocalEngine:
    """Runs routes in this process: one Supervisor, one serve_route task per route."""

    supervisor: Supervisor
    routes: trio.Nursery
    running: dict[str, _Running] = attrs.field(factory=dict)

    async def apply(self, table: RouteTable, listeners: Listeners) -> None:
        """Stop removed and changed routes, then start new and changed ones."""
        wanted = {route.name: route for route in table.routes}
        for name, running in list(self.running.items()):
            route = wanted.get(name)
            if route != running.route or listeners[name] != running.listeners:
                await self._stop(name)
        for route in table.routes:
            if route.name not in self.running:
                await self._start(route, listeners[route.name])

    async def _start(self, route: Route, listeners: list[base.Listener]) -> None:
        running = _Running(route, listeners, trio.CancelScope(), trio.Event())
        self.running[route.name] = running
        await self.routes.start(self._serve, running)

    async def _serve(self, running: _Running, *, task_status: trio.TaskStatus[None]) -> None:
        started = False
        serve_route = functools.partial(self.supervisor.serve_route, running.route, listeners=running.listeners)
        try:
            with running.scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(serve_route)
                    started = True
                    task_status.started()
        except Exception as exc:
            if not started:
                raise
            # An accept error that is not a lack of resources ends this route only.
            event(logging.ERROR, f"route stopped: {_describe(exc)}", route=running.route.name)
        finally:
            running.done.set()
            if self.running.get(running.route.name) is running:
                del self.running[running.route.name]

    async def _stop(self, name: str) -> None:
        running = self.running.pop(name)
        running.scope.cancel()
        await running.done.wait()

    def listening(self) -> dict[str, int]:
        """Listening sockets per running route."""
        return {name: len(running.listeners) for name, running in self.running.items()}

    async def snapshot(self) -> Snapshot:
        """This process's route counters."""
        return self.supervisor.statistics()

    def pids(self) -> None:
        """Process metrics of this process alone."""
        return None

    async def stop_accepting(self, grace: float) -> None:
        """Stop every route's accept loops; their connections go on."""
        for name in list(self.running):
            await self._stop(name)

    async def wait_idle(self) -> None:
        """Wait until no accepted connection is open."""
        await self.supervisor.wait_idle()

    async def cut(self) -> None:
        """Cancel every connection task (the relay closes both sides)."""
        self.supervisor.connections.cancel_scope.cancel()


def _describe(exc: BaseException) -> str:
    exc = _single_leaf(exc)
    return str(exc) if isinstance(exc, HvbridgeError) else repr(exc)


@contextlib.asynccontextmanager
async def open_local_engine(connect: base.Connect = transports.connect) -> AsyncIterator[LocalEngine]:
    """A LocalEngine whose connections and routes end with the `async with` block."""
    async with trio.open_nursery() as connections, trio.open_nursery() as routes:
        try:
            yield LocalEngine(Supervisor(connections, connect=connect), routes)
        finally:
            routes.cancel_scope.cancel()
            connections.cancel_scope.cancel()


# ---------------------------------------------------------------------------------- service


@final
@attrs.define(eq=False)
class _MetricsServer:
    """The metrics endpoint's task: cancel `scope`, then wait for `done`."""

    scope: trio.CancelScope
    done: trio.Event


@final
@attrs.define(eq=False)
class Service:
    """One running daemon: its table, listeners, engine, metrics server and commands.

    Args:
        engine: Runs the routes.
        pool: The listening sockets.
        nursery: Where the metrics server runs (cancelled when the service ends).
        scope: Cancelled to exit at once (the second stop signal).
        load: Re-reads the route table for a reload (raises ConfigError); None when the
            table did not come from a file (`forward`, `-c -`), so there is nothing to re-read.
        notifier: systemd notification (a no-op without $NOTIFY_SOCKET).
        metrics: Serve [bridge] metrics (the main process does; workers do not).
        log_level: A -v/-q override of [bridge] log_level, or None.
        log_format: A --log-format override of [bridge] log_format, or None.
    """

    engine: Engine
    pool: ListenerPool
    nursery: trio.Nursery
    scope: trio.CancelScope
    load: Loader | None = None
    notifier: Notifier = attrs.field(factory=Notifier)
    metrics: bool = True
    log_level: str | None = None
    log_format: Literal["text", "json"] | None = None
    table: RouteTable | None = None
    exposition: Exposition | None = None
    #: The metrics server's listeners (their bound addresses), while it runs.
    metrics_listeners: list[base.Listener] = attrs.field(factory=list)
    _metrics_address: Address | None = attrs.field(default=None, init=False)
    _metrics_server: _MetricsServer | None = attrs.field(default=None, init=False)
    _commands: tuple[trio.MemorySendChannel[Command], trio.MemoryReceiveChannel[Command]] = attrs.field(
        factory=lambda: trio.open_memory_channel[Command](16), init=False
    )
    _reload_queued: bool = attrs.field(default=False, init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    _drain_scope: trio.CancelScope | None = attrs.field(default=None, init=False)
    _grace: float | None = attrs.field(default=None, init=False)
    _listeners: Listeners = attrs.field(factory=dict, init=False)

    # ----------------------------------------------------------------------------- start

    async def start(self, table: RouteTable) -> None:
        """Open every listener, start every route and the metrics server; then READY=1.

        Raises:
            HvbridgeError: A listener (or the metrics address) cannot be opened.
        """
        await _check_listens(table)
        listeners = await self.pool.acquire(table)
        await self.engine.apply(table, listeners)
        self._listeners = listeners
        self.table = table
        await self._update_metrics(table, at_start=True)
        self.notifier.ready(self._status())

    def _status(self) -> str:
        count = len(self.engine.listening())
        return f"serving {count} route{'s' if count != 1 else ''}"

    # ---------------------------------------------------------------------------- metrics

    async def render_metrics(self) -> bytes:
        """The /metrics text: counters of every process and the listening state of each route."""
        if self.exposition is None:
            group = self.engine.pids() is not None
            self.exposition = Exposition((lambda: self.engine.pids() or []) if group else None)
        routes = await self.engine.snapshot()
        listening = self.engine.listening()
        names = [route.name for route in self.table.routes] if self.table is not None else []
        return self.exposition.render(routes, {name: listening.get(name, 0) for name in names})

    async def _update_metrics(self, table: RouteTable, *, at_start: bool = False) -> None:
        address = table.bridge.metrics if self.metrics else None
        if address == self._metrics_address:
            return
        old = self._metrics_server
        self._metrics_server = None
        if address is not None:
            try:
                self._metrics_server = await self.nursery.start(self._serve_metrics, address)
            except EndpointError as exc:
                if at_start:
                    raise
                event(logging.ERROR, f"metrics not moved: {exc}", metrics=str(address))
                self._metrics_server = old
                return
        if old is not None:
            old.scope.cancel()
            await old.done.wait()  # the old address refuses from now on
        if address is None:
            self.metrics_listeners = []
        self._metrics_address = address

    async def _serve_metrics(self, address: Address, *, task_status: trio.TaskStatus[_MetricsServer]) -> None:
        listeners = await open_metrics_listeners(address)  # an EndpointError reaches start() as is
        server = _MetricsServer(trio.CancelScope(), trio.Event())
        try:
            with server.scope:
                async with trio.open_nursery() as nursery:
                    run = functools.partial(serve_metrics, address, self.render_metrics, listeners=listeners)
                    self.metrics_listeners = await nursery.start(run)
                    task_status.started(server)
        finally:
            server.done.set()

    # ---------------------------------------------------------------------------- commands

    def request_reload(self, why: str) -> None:
        """Queue a reload (coalesced with one already queued); ignored while stopping."""
        if self._stopping:
            event(logging.INFO, f"{why}: ignored, shutting down")
            return
        if self.load is None:
            event(
                logging.WARNING,
                f"{why}: ignored; this process cannot re-read its route table"
                " (it came from the command line or stdin, or this is a worker: signal the main process)",
            )
            return
        if not self._reload_queued:
            self._reload_queued = True
            self._commands[0].send_nowait("reload")

    def request_stop(self, why: str, grace: float | None = None) -> None:
        """Begin a graceful shutdown; a second request exits at once.

        Args:
            why: What asked, for the log (e.g. "SIGTERM").
            grace: How long open connections may take (inf: until they end); None means
                [bridge] shutdown_grace. A later request with a grace only shortens the wait:
                a worker asked to drain by its main process may also get the signal itself.
        """
        if not self._stopping:
            self._stopping = True
            self._grace = grace
            event(logging.INFO, f"{why}: stopping")
            self._commands[0].send_nowait("stop")
        elif grace is not None:
            if self._drain_scope is not None:
                self._drain_scope.deadline = min(self._drain_scope.deadline, trio.current_time() + grace)
            self._grace = grace if self._grace is None else min(self._grace, grace)
        else:
            event(logging.WARNING, f"{why} again: exiting now, closing open connections")
            self.scope.cancel()

    async def run_commands(self) -> None:
        """Handle reloads until a stop; returns when the shutdown is done."""
        async for command in self._commands[1]:
            if command == "reload":
                self._reload_queued = False
                await self.reload()
            else:
                await self.shutdown()
                return

    # ----------------------------------------------------------------------------- reload

    async def reload(self) -> bool:
        """Re-read the table and apply it (module rule 2).

        Returns:
            True if the new table runs; False if the old one was kept.
        """
        assert self.load is not None
        assert self.table is not None
        self.notifier.reloading()
        old = self.table
        try:
            table = self.load()
            await _check_listens(table)
            listeners = await self.pool.acquire(table)
        except ConfigError as exc:
            for problem in exc.problems:
                event(logging.ERROR, f"reload failed, keeping the running table: {problem}")
            self.notifier.ready(self._status())
            return False
        except HvbridgeError as exc:
            event(logging.ERROR, f"reload failed, keeping the running table: {exc}")
            if self.pool.reopened:  # a released socket was bound again: its route runs on it anyway
                self._listeners = await self.pool.acquire(old)
                await self.engine.apply(old, self._listeners)
            self.notifier.ready(self._status())
            return False
        try:
            await self.engine.apply(table, listeners)
        except HvbridgeError as exc:
            event(logging.ERROR, f"reload failed, keeping the running table: {exc}")
            await self.pool.release_unused(self._listeners)
            self.notifier.ready(self._status())
            return False
        await self.pool.release_unused(listeners)
        self._listeners = listeners
        self._update_logging(table)
        self.table = table
        await self._update_metrics(table)
        before = {route.name: route for route in old.routes}
        after = {route.name: route for route in table.routes}
        event(
            logging.INFO,
            "reloaded",
            source=table.source,
            added=",".join(sorted(after.keys() - before.keys())),
            removed=",".join(sorted(before.keys() - after.keys())),
            changed=",".join(sorted(n for n in after.keys() & before.keys() if after[n] != before[n])),
        )
        self.notifier.ready(self._status())
        return True

    def _update_logging(self, table: RouteTable) -> None:
        """Apply a reloaded table's log settings, unless the command line set them."""
        if self.table is None:
            return
        new = self.log_level or table.bridge.log_level, self.log_format or table.bridge.log_format
        old = self.log_level or self.table.bridge.log_level, self.log_format or self.table.bridge.log_format
        if (new, table.bridge.log_file) != (old, self.table.bridge.log_file):
            try:
                setup_logging(*new, table.bridge.log_file)
            except OSError as exc:
                event(logging.ERROR, f"{log_file_problem(table, exc)}; logging as before")

    # --------------------------------------------------------------------------- shutdown

    async def shutdown(self) -> None:
        """Stop accepting, wait up to the grace for open connections, close the rest."""
        grace = self._grace
        if grace is None:
            grace = self.table.bridge.shutdown_grace if self.table is not None else 0.0
        self.notifier.stopping("draining")
        await self.engine.stop_accepting(grace)
        await self.pool.aclose()
        with trio.move_on_after(grace) as scope:
            self._drain_scope = scope
            wait = "until they finish" if grace == float("inf") else f"up to {grace:g}s"
            event(logging.INFO, f"not accepting; waiting {wait} for open connections")
            await self.engine.wait_idle()
        if scope.cancelled_caught:
            event(logging.WARNING, f"shutdown grace of {grace:g}s is over; closing the connections still open")
        await self.engine.cut()
        event(logging.INFO, "stopped")


# ----------------------------------------------------------------------------------- --watch


#: What --watch compares: (device, inode, size, mtime in ns), or None for a missing file.
Signature = tuple[int, int, int, int] | None


def file_signature(path: str) -> Signature:
    """What --watch compares: (device, inode, size, mtime in ns), or None if `path` is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


async def watch_file(
    path: str,
    changed: Callable[[], None],
    *,
    since: Signature | Literal["now"] = "now",
    interval: float = WATCH_INTERVAL,
) -> None:
    """Call `changed()` each time `path` changes and then holds still for one interval.

    Polling works on every platform and file system and needs no dependency. Waiting for
    the file to hold still keeps an editor's half-written file from being loaded.

    Args:
        path: The file to watch.
        changed: Called (from this task) after each change.
        since: The file's signature when it was read, so that a change made between reading
            it and starting to watch is seen; "now" takes it when watching starts.
        interval: Seconds between polls.
    """
    last = file_signature(path) if since == "now" else since
    candidate = last
    while True:
        await trio.sleep(interval)
        current = file_signature(path)
        if current == last:
            candidate = last
        elif current == candidate:
            last = current
            changed()
        else:
            candidate = current


# -------------------------------------------------------------------------------- run loop


async def _handle_signals(service: Service, receiver: AsyncIterator[int]) -> None:
    async for signum in receiver:
        name = signal.Signals(signum).name
        if signum in _RELOAD_SIGNALS:
            service.request_reload(name)
        else:
            service.request_stop(name)


async def serve(
    table: RouteTable,
    *,
    engine: Callable[[], AbstractAsyncContextManager[Engine]] = open_local_engine,
    pool: ListenerPool | None = None,
    load: Loader | None = None,
    watch: str | None = None,
    watch_since: Signature | Literal["now"] = "now",
    notifier: Notifier | None = None,
    metrics: bool = True,
    log_level: str | None = None,
    log_format: Literal["text", "json"] | None = None,
    task_status: trio.TaskStatus[Service] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run `table` until SIGTERM/SIGINT (or Service.request_stop()); return when stopped.

    Args:
        table: The route table to start with.
        engine: Makes the Engine (default: this process runs the routes).
        pool: The listening sockets (default: an empty pool that opens what routes need).
        load: Re-reads the table on SIGHUP and on --watch changes.
        watch: A file to poll for changes (--watch).
        watch_since: The watched file's signature when `table` was read from it.
        notifier: systemd notification (default: from $NOTIFY_SOCKET).
        metrics: Serve [bridge] metrics from this process.
        log_level: A command-line override of [bridge] log_level, kept across reloads.
        log_format: A command-line override of [bridge] log_format, kept across reloads.
        task_status: Receives the Service once every route is up.

    Error handling: a reload's problems are logged, never raised; a route whose accept loop
    fails is logged and stops alone.

    Raises:
        HvbridgeError: At start, a listener or the metrics address cannot be opened (the
            error itself, not wrapped in an exception group).
    """

    async def run() -> None:
        with trio.open_signal_receiver(*_STOP_SIGNALS, *_RELOAD_SIGNALS) as receiver, trio.CancelScope() as scope:
            async with engine() as running_engine, trio.open_nursery() as nursery:
                service = Service(
                    running_engine,
                    pool if pool is not None else ListenerPool(),
                    nursery,
                    scope,
                    load=load,
                    notifier=notifier if notifier is not None else Notifier.from_environment(),
                    metrics=metrics,
                    log_level=log_level,
                    log_format=log_format,
                )
                try:
                    await service.start(table)
                    nursery.start_soon(_handle_signals, service, receiver)
                    if watch is not None and load is not None:
                        reload = functools.partial(service.request_reload, f"{watch} changed")
                        nursery.start_soon(functools.partial(watch_file, watch, reload, since=watch_since))
                    task_status.started(service)
                    await service.run_commands()
                finally:
                    nursery.cancel_scope.cancel()
                    with trio.CancelScope(shield=True):
                        await service.pool.aclose()

    try:
        await run()
    except BaseExceptionGroup as group:
        leaf = _single_leaf(group)
        if isinstance(leaf, HvbridgeError):
            raise leaf from None
        raise


def log_file_problem(table: RouteTable, exc: OSError) -> Problem:
    """Why [bridge] log_file cannot be opened, and what to do."""
    return Problem(
        table.source,
        None,
        "bridge.log_file",
        f"cannot open {table.bridge.log_file!r}: {exc.strerror or exc};"
        " create its directory or give a path the account running hvbridge may write",
    )


def _single_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def run(
    table: RouteTable,
    *,
    load: Loader | None = None,
    watch: str | None = None,
    workers: int = 1,
    log_level: str | None = None,
    log_format: Literal["text", "json"] | None = None,
) -> None:
    """Run the daemon in this process until it is stopped: the `run` and `forward` commands.

    Sets up logging, takes socket-activated sockets ($LISTEN_FDS), and runs serve() with
    `workers` processes (1: this process relays).

    Args:
        table: The route table to start with.
        load: Re-reads the table (SIGHUP, --watch); None when it did not come from a file.
        watch: The file to poll for changes (--watch), or None.
        workers: Processes that relay (--workers).
        log_level: A -v/-q override of [bridge] log_level.
        log_format: A --log-format override of [bridge] log_format.

    Raises:
        HvbridgeError: The table cannot run here (family missing, listener cannot be opened).
    """
    # Taken before anything else, so that an edit made while starting up is seen.
    since = file_signature(watch) if watch is not None else None
    level = log_level or table.bridge.log_level
    fmt = log_format or table.bridge.log_format
    if workers > 1 and table.bridge.log_file is not None:
        raise ConfigError.single(
            table.source,
            "bridge.log_file",
            "cannot be used with --workers (the worker processes log to stderr); remove one of them",
        )
    try:
        setup_logging(level, fmt, table.bridge.log_file)
    except OSError as exc:
        raise ConfigError([log_file_problem(table, exc)]) from exc
    check_families(table)
    engine: Callable[[], AbstractAsyncContextManager[Engine]] = open_local_engine
    if workers > 1:
        from hvbridge.workers import open_worker_engine

        engine = functools.partial(open_worker_engine, workers, level, fmt)
    pool = ListenerPool(inherit(listen_fds()), respell=workers <= 1)
    trio.run(
        functools.partial(
            serve,
            table,
            engine=engine,
            pool=pool,
            load=load,
            watch=watch,
            watch_since=since,
            log_level=log_level,
            log_format=log_format,
        )
    )
