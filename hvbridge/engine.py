"""Engines run a table's routes on the listeners the run loop gives them.

LocalEngine runs them in this process with one Supervisor; workers.WorkerEngine runs them in N
child processes, each of which runs the run loop (service.serve) with a LocalEngine.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import TYPE_CHECKING, Protocol, final

import attrs
import trio

from hvbridge.backend import Backend
from hvbridge.errors import HvbridgeError
from hvbridge.logs import event
from hvbridge.routes import Route, RouteTable
from hvbridge.supervisor import Supervisor
from hvbridge.transports import base

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from hvbridge.listeners import Listeners
    from hvbridge.stats import Snapshot


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

    async def let_go(self, listeners: list[base.Listener]) -> None:
        """Stop accepting on `listeners`, which the pool is about to close under running routes."""


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
            if isinstance(single_leaf(exc), trio.ClosedResourceError):
                # The pool closed its listener: a reload moved the route to another spelling of the
                # same address, and the new table's route takes the port over at once.
                event(logging.INFO, "route stopped: its listener was released by a reload", route=running.route.name)
            else:
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
        return await self.supervisor.current_statistics()

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

    async def let_go(self, listeners: list[base.Listener]) -> None:
        """Stop accepting on `listeners` (Supervisor.let_go)."""
        await self.supervisor.let_go(listeners)


def _describe(exc: BaseException) -> str:
    exc = single_leaf(exc)
    return str(exc) if isinstance(exc, HvbridgeError) else repr(exc)


@contextlib.asynccontextmanager
async def open_local_engine(
    backend: Backend | None = None, connect: base.Connect | None = None
) -> AsyncIterator[LocalEngine]:
    """A LocalEngine whose connections and routes end with the `async with` block.

    Args:
        backend: Opens, inspects and closes streams (default: a new Backend).
        connect: Opens a route's backend stream (default: backend.connect).
    """
    backend = backend if backend is not None else Backend()
    async with trio.open_nursery() as connections, trio.open_nursery() as routes:
        try:
            supervisor = Supervisor(connections, backend, connect=connect if connect is not None else backend.connect)
            yield LocalEngine(supervisor, routes)
        finally:
            routes.cancel_scope.cancel()
            connections.cancel_scope.cancel()


def single_leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested one-member exception groups (or `exc` itself)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
