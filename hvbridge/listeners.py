"""Listening sockets and who owns them: the ListenerPool, inherited sockets, pool keys.

The run loop (service.py) asks the pool for every route's listeners on start and on reload; a
worker process builds its pool from the sockets the main process passes it (workers.py).

Rules:
1. Listening sockets belong to a ListenerPool keyed by listen address, not to routes. A reload
   reuses the socket of every listen address the new table still has, so unchanged routes (and
   changed routes whose `listen` is unchanged) never refuse a connection: the kernel backlog
   holds connections while a changed route's accept loop is swapped. Sockets from systemd
   socket activation and those a worker inherits are in the pool too. A listen address the
   new table spells otherwise (127.0.0.1:P -> 0.0.0.0:P) cannot be bound beside the old
   socket: that socket is released first, and bound again if the reload fails.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, final

import attrs
import trio

from hvbridge.addresses import Address, TcpAddress, UnixAddress, is_ephemeral
from hvbridge.backend import Backend
from hvbridge.config import COMMAND_LINE, ListenBinds
from hvbridge.errors import EndpointError, HvbridgeError
from hvbridge.logs import event
from hvbridge.routes import Route, RouteOptions, RouteTable
from hvbridge.transports import base, hvsock, tcp, unix

if TYPE_CHECKING:
    from hvbridge.systemd import ActivatedSocket

#: Each route's listeners, by route name.
Listeners = Mapping[str, list[base.Listener]]
#: What the pool awaits before it closes listeners that running routes still use.
LetGo = Callable[[list[base.Listener]], Awaitable[None]]


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
#: is ephemeral (addresses.is_ephemeral).
PoolKey = tuple[Address, str | None]


def pool_key(route: Route) -> PoolKey:
    """The key of `route`'s listeners in a ListenerPool."""
    return route.listen, route.name if is_ephemeral(route.listen) else None


@final
@attrs.define(eq=False)
class ListenerPool:
    """Listening sockets by listen address; routes borrow them (rule 1).

    Args:
        inherited: Sockets passed in (socket activation, a worker's share). A route takes the
            ones named like it, else the one bound to its listen address. They are closed
            only by aclose(), never by a reload.
        open_listeners: Opens the listeners of an address nobody passed in.
        respell: Let a reload release a socket whose address the new table spells otherwise.
    """

    inherited: list[Inherited] = attrs.field(factory=list)
    open_listeners: base.OpenListeners = attrs.field(factory=lambda: Backend().open_listeners)
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

    async def acquire(self, table: RouteTable, let_go: LetGo | None = None) -> dict[str, list[base.Listener]]:
        """Listeners for every route of `table`, opening only addresses the pool lacks.

        All or nothing: if one address cannot be opened, the ones opened by this call are
        closed again and the pool is as before. `let_go` is awaited with the listeners of
        the running table this call closes (rule 1's other spelling) before it closes them.

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
                    listeners = await self._open(
                        route, wanted, released, named=table.source != COMMAND_LINE, let_go=let_go
                    )
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
        self, route: Route, wanted: set[PoolKey], released: list[PoolKey], *, named: bool, let_go: LetGo | None
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
            listeners = self.opened.pop(key)
            if let_go is not None:
                await let_go(listeners)
            for listener in listeners:
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
        if not address.abstract:
            try:
                unix.apply_file_options(address, route.options)
            except OSError as exc:
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
