"""The daemon's run loop: signals, reload, graceful shutdown, --watch, systemd and metrics.

This module owns the life of a running hvbridge process (docs/reference.md, "Reload and
signals"). The supervisor runs routes; this module decides which routes run, on which listening
sockets, and when they stop.

Rules:
1. A reload is all-or-nothing: the file is parsed and validated, and every new listen address
   is bound, before any running route is touched. Anything wrong keeps the running table and
   logs every problem. Connections already open are never cut by a reload: they live in the
   supervisor's connection nursery, which outlives routes.
2. SIGTERM/SIGINT: stop accepting at once (close every listener, so the kernel refuses new
   connections), let open connections finish for up to `shutdown_grace`, cancel the rest,
   return (exit status 0). A second SIGTERM/SIGINT exits at once.
3. Commands (reload, stop) are handled one at a time, in order; only the second stop signal
   acts out of turn.

The Engine (engine.py) runs routes: LocalEngine in this process, or workers.WorkerEngine in N
child processes that share the pool's sockets (`--workers N`); cli.run_daemon() picks it.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Final, Literal, final

import attrs
import trio

from hvbridge import transports
from hvbridge.addresses import Address, TcpAddress
from hvbridge.backend import Backend
from hvbridge.config import listen_conflicts
from hvbridge.engine import Engine, open_local_engine, single_leaf
from hvbridge.errors import ConfigError, EndpointError, HvbridgeError, Problem
from hvbridge.listeners import ListenerPool, Listeners
from hvbridge.logs import event, setup_logging
from hvbridge.metrics import Exposition, open_metrics_listeners, serve_metrics
from hvbridge.routes import RouteTable
from hvbridge.systemd import Notifier
from hvbridge.transports import base, tcp

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager


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
        backend: Opens the metrics listeners (the engine and pool hold the same one).
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
    backend: Backend = attrs.field(factory=Backend)
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
        listeners = await self.pool.acquire(table, self.engine.let_go)
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
        # An EndpointError reaches start() as is.
        listeners = await open_metrics_listeners(address, self.backend.open_listeners)
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
        """Re-read the table and apply it (module rule 1).

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
            listeners = await self.pool.acquire(table, self.engine.let_go)
        except ConfigError as exc:
            for problem in exc.problems:
                event(logging.ERROR, f"reload failed, keeping the running table: {problem}")
            self.notifier.ready(self._status())
            return False
        except HvbridgeError as exc:
            event(logging.ERROR, f"reload failed, keeping the running table: {exc}")
            if self.pool.reopened:  # a released socket was bound again: its route runs on it anyway
                self._listeners = await self.pool.acquire(old, self.engine.let_go)
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
    backend: Backend | None = None,
    engine: Callable[[], AbstractAsyncContextManager[Engine]] | None = None,
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
        backend: Opens, inspects and closes streams (default: a new Backend).
        engine: Makes the Engine (default: this process runs the routes on `backend`).
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

    backend = backend if backend is not None else Backend()
    make_engine = engine if engine is not None else functools.partial(open_local_engine, backend)

    async def run() -> None:
        with trio.open_signal_receiver(*_STOP_SIGNALS, *_RELOAD_SIGNALS) as receiver, trio.CancelScope() as scope:
            async with make_engine() as running_engine, trio.open_nursery() as nursery:
                service = Service(
                    running_engine,
                    pool if pool is not None else ListenerPool(open_listeners=backend.open_listeners),
                    nursery,
                    scope,
                    load=load,
                    notifier=notifier if notifier is not None else Notifier.from_environment(),
                    metrics=metrics,
                    log_level=log_level,
                    log_format=log_format,
                    backend=backend,
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
        leaf = single_leaf(group)
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
