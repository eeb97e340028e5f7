"""Hyper-V sockets (AF_HYPERV, Windows host, Python >= 3.12): listen, connect, and the I/O model.

This module owns every AF_HYPERV socket and how its bytes move. transports/__init__.py dispatches
`hvsock://VM/SERVICE` here; what comes back is a trio listener or HalfCloseableStream, so the
relay never learns which family it pumps.

Rules:
1. Availability: AF_HYPERV exists only in Windows builds of Python >= 3.12. Anywhere else every
   call raises AddressFamilyUnavailable saying "needs Windows and Python >= 3.12";
   unavailable_reason() lets `check` say so without opening anything.
2. Addresses: `(str(vm_id), str(service_id))`, protocol HV_PROTOCOL_RAW, option level
   HV_PROTOCOL_RAW. GUIDs are compared as uuid.UUID. A VM name is resolved to its VmId
   through VmResolver (cached, run in a worker thread); after a connect fails the
   name is resolved again (at most every min_refresh seconds), and if the VmId changed (VM
   recreated, WSL restarted) the connect is tried once more. A listener on a VM name looks
   the name up again on reload, every VM_RECHECK_INTERVAL while idle and after an accept()
   error, and rebinds to a new VmId (HvSocketListener.refresh).
3. Options: HVSOCKET_CONNECT_TIMEOUT (ms, at most HVSOCKET_CONNECT_TIMEOUT_MAX) from the route's
   connect_timeout; HVSOCKET_CONNECTED_SUSPEND when connected_suspend is set (on the listening
   socket and again on each accepted one, since inheritance is undocumented).
4. I/O model: whether trio's readiness waiting works on AF_HYPERV sockets is
   unproven. The first hvsock endpoint probes it once per process (a listener and a
   connection on HV_GUID_LOOPBACK exchanging bytes both ways and an EOF, under PROBE_TIMEOUT).
   If it works, hvsock sockets are ordinary trio sockets (trio.SocketStream, the relay's fast
   path). If not, or if HVBRIDGE_HVSOCK_IO=threads, they are *blocking* sockets pumped by
   worker threads: ThreadSocketStream / ThreadSocketListener below, which work on any
   blocking socket and are tested on Linux with TCP and Unix sockets.
5. Threads: the thread pump (threadstream.py) takes its tokens from a dedicated
   trio.CapacityLimiter per route, 2 per connection sized from max_connections (threads_for),
   never trio's default limiter, whose 40 threads would stall the 21st connection.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import socket
import sys
import uuid
import weakref
from typing import TYPE_CHECKING, Final, Literal, Protocol, TypeAlias, TypeVar, final

import attrs
import trio

from hvbridge.errors import EndpointError
from hvbridge.hyperv.guids import HV_GUID_LOOPBACK, service_id_for_port, sockaddr_vm_id, vm_id_matches
from hvbridge.hyperv.vms import SubprocessVmLookup, VmLookupError, VmResolver
from hvbridge.transports.base import BACKLOG, Stream, family_unavailable, oserror_text, translate_connect_error
from hvbridge.transports.threadstream import ThreadSocketListener, ThreadSocketStream

if TYPE_CHECKING:
    from collections.abc import Sequence

    from hvbridge.addresses import HyperVAddress
    from hvbridge.routes import RouteOptions

logger = logging.getLogger("hvbridge.hvsock")

T = TypeVar("T")
IoModel = Literal["readiness", "threads"]
HvSockaddr: TypeAlias = tuple[str, str] | tuple[str, int]

#: Longest HVSOCKET_CONNECT_TIMEOUT Windows accepts, in milliseconds (hvsocket.h).
HVSOCKET_CONNECT_TIMEOUT_MAX: Final = 300_000
#: How long the readiness probe may take before the thread pump is chosen.
PROBE_TIMEOUT: Final = 2.0
#: Environment variable that skips the probe: `readiness` or `threads`.
IO_MODEL_ENV: Final = "HVBRIDGE_HVSOCK_IO"
_PROBE_PAYLOAD: Final = b"hvbridge readiness probe"

# ------------------------------------------------------------------------- the platform


class HvSocketApi(Protocol):
    """The AF_HYPERV specifics: family, protocol, address form and socket options.

    The real one exists only on Windows; tests substitute one backed by TCP on 127.0.0.1 to
    run listen/connect, the probe and the re-resolve logic on Linux.
    """

    @property
    def family(self) -> int:
        """The address family (AF_HYPERV)."""
        ...

    @property
    def proto(self) -> int:
        """The protocol (HV_PROTOCOL_RAW)."""
        ...

    def sockaddr(self, vm_id: uuid.UUID, service_id: uuid.UUID) -> HvSockaddr:
        """The socket address for bind()/connect()."""
        ...

    def set_connect_timeout(self, sock: socket.socket, milliseconds: int) -> None:
        """Set HVSOCKET_CONNECT_TIMEOUT."""
        ...

    def set_connected_suspend(self, sock: socket.socket | trio.socket.SocketType) -> None:
        """Set HVSOCKET_CONNECTED_SUSPEND (keep the connection while the VM is paused)."""
        ...


@final
@attrs.frozen
class _WindowsApi:  # pragma: no cover - Windows only
    family: int
    proto: int
    connect_timeout_option: int
    connected_suspend_option: int

    def sockaddr(self, vm_id: uuid.UUID, service_id: uuid.UUID) -> HvSockaddr:
        return (str(vm_id), str(service_id))

    def set_connect_timeout(self, sock: socket.socket, milliseconds: int) -> None:
        sock.setsockopt(self.proto, self.connect_timeout_option, milliseconds)

    def set_connected_suspend(self, sock: socket.socket | trio.socket.SocketType) -> None:
        sock.setsockopt(self.proto, self.connected_suspend_option, 1)


def platform_api() -> HvSocketApi | None:
    """The AF_HYPERV API of this interpreter, or None when it has none (not Windows, or < 3.12)."""
    api: HvSocketApi | None = None
    if sys.platform == "win32" and sys.version_info >= (3, 12):  # pragma: no cover - Windows only
        api = _WindowsApi(
            family=socket.AF_HYPERV,
            proto=socket.HV_PROTOCOL_RAW,
            connect_timeout_option=socket.HVSOCKET_CONNECT_TIMEOUT,
            connected_suspend_option=socket.HVSOCKET_CONNECTED_SUSPEND,
        )
    return api


def unavailable_reason() -> str | None:
    """Why hvsock endpoints cannot work here, or None if they can (for `check` and at start)."""
    if platform_api() is not None:
        return None
    system = {"win32": "Windows", "linux": "Linux", "darwin": "macOS"}.get(sys.platform, sys.platform)
    version = ".".join(str(part) for part in sys.version_info[:3])
    return f"Hyper-V sockets (AF_HYPERV) need Windows and Python >= 3.12; this is {system} with Python {version}"


def _require_api(hv: HyperVSockets, address: HyperVAddress) -> HvSocketApi:
    api = hv.api
    if api is None:
        raise family_unavailable(address, unavailable_reason() or "AF_HYPERV is not available")
    return api


# ------------------------------------------------------------------------- VM names


async def resolve_vm_id(vm: uuid.UUID | str, resolver: VmResolver, *, refresh: bool = False) -> uuid.UUID:
    """The VmId of `vm` (a GUID passes through), resolved in a worker thread.

    Args:
        vm: A VmId or a VM name.
        resolver: Where names are resolved (HyperVSockets.resolver).
        refresh: Ask again instead of using the cache (see VmResolver.resolve).

    Raises:
        VmLookupError: The name cannot be resolved.
    """
    if isinstance(vm, uuid.UUID):
        await trio.lowlevel.checkpoint()
        return vm
    resolve = functools.partial(resolver.resolve, vm, refresh=refresh)
    return await trio.to_thread.run_sync(resolve, abandon_on_cancel=True)


async def _resolve_for(address: HyperVAddress, op: str, resolver: VmResolver, *, refresh: bool = False) -> uuid.UUID:
    try:
        return await resolve_vm_id(address.vm, resolver, refresh=refresh)
    except VmLookupError as exc:
        raise EndpointError(str(address), op, str(exc)) from exc


async def peer_vm_allowed(hv: HyperVSockets, rules: Sequence[uuid.UUID | str], sockaddr: object) -> bool:
    """Whether an accepted hvsock peer passes `allow = ["vm:..."]` rules (docs/reference.md, "Who may connect").

    Args:
        hv: Where VM names are resolved.
        rules: The VmRule values: VmIds (HV_GUID_ZERO admits all) or VM names.
        sockaddr: The peer address, as getpeername() returns it: `(vm_id, service_id)`.

    Returns:
        True if a rule admits the peer's VmId. A name that cannot be resolved admits nobody
        (logged as a warning).
    """
    peer = sockaddr_vm_id(sockaddr)
    if peer is None:
        return False
    for rule in rules:
        try:
            vm_id = await resolve_vm_id(rule, hv.resolver)
        except VmLookupError as exc:
            logger.warning("allow rule vm:%s cannot be resolved: %s", rule, exc)
            continue
        if vm_id_matches(vm_id, peer):
            return True
    return False


# ------------------------------------------------------------------------- I/O model


@attrs.frozen
class IoProbe:
    """The I/O model hvsock sockets use in this process, and why."""

    model: IoModel
    reason: str


async def probe_readiness(
    family: int,
    proto: int,
    bind_address: object,
    *,
    time_limit: float = PROBE_TIMEOUT,
) -> IoProbe:
    """Find out whether trio's readiness waiting works for sockets of `family`.

    Binds a listener at `bind_address`, connects to its getsockname() with a non-blocking
    trio socket, and exchanges bytes and an EOF both ways, all under `time_limit` seconds.

    Returns:
        IoProbe("readiness") if all of it worked, else IoProbe("threads") with the failure.
        Any exception counts as a failure, closing a probe socket included: finding unknown
        failures is the probe's purpose.
    """
    sockets: list[trio.socket.SocketType] = []
    try:
        probe = await _exchange(family, proto, bind_address, time_limit, sockets)
    finally:
        cleanup = _close_each(sockets)
    if cleanup is not None and probe.model == "readiness":
        return IoProbe("threads", f"readiness probe could not close its sockets: {cleanup}")
    return probe


def _close_each(sockets: Sequence[trio.socket.SocketType]) -> str | None:
    """Close every socket, each under its own guard; describe the first failure, if any.

    A provider that misbehaves under readiness waiting may well fail in close() too, and that
    must neither leak the other sockets nor escape the probe.
    """
    failure = None
    for sock in sockets:
        try:
            sock.close()
        except Exception as exc:
            logger.debug("closing a readiness probe socket failed", exc_info=True)
            failure = failure or _describe(exc)
    return failure


async def _exchange(
    family: int, proto: int, bind_address: object, time_limit: float, sockets: list[trio.socket.SocketType]
) -> IoProbe:
    """The probe itself; every socket it opens is appended to `sockets` for the caller to close."""
    try:
        with trio.fail_after(time_limit):
            listener = trio.socket.socket(family, socket.SOCK_STREAM, proto)
            sockets.append(listener)
            await listener.bind(bind_address)
            listener.listen(1)
            client_sock = trio.socket.socket(family, socket.SOCK_STREAM, proto)
            sockets.append(client_sock)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client_sock.connect, listener.getsockname())
                server_sock, _ = await listener.accept()
                sockets.append(server_sock)
            client, server = trio.SocketStream(client_sock), trio.SocketStream(server_sock)
            for sender, receiver in ((client, server), (server, client)):
                await sender.send_all(_PROBE_PAYLOAD)
                await sender.send_eof()
                received = b""
                while chunk := await receiver.receive_some():
                    received += chunk
                if received != _PROBE_PAYLOAD:
                    return IoProbe("threads", f"readiness probe received {received!r}")
    except trio.TooSlowError:
        return IoProbe("threads", f"readiness probe timed out after {time_limit:g} s")
    except Exception as exc:
        logger.debug("readiness probe failed", exc_info=True)
        return IoProbe("threads", f"readiness probe failed: {_describe(exc)}")
    return IoProbe("readiness", "trio readiness waiting works (loopback probe)")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return _describe(exc.exceptions[0])
    if isinstance(exc, OSError) and (exc.strerror or exc.errno):
        return f"{type(exc).__name__}: {oserror_text(exc)}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _choose_io_model(api: HvSocketApi, io_model: IoModel | None) -> IoProbe:
    forced = os.environ.get(IO_MODEL_ENV, "").strip().lower()
    if io_model is not None:
        probe = IoProbe(io_model, "set by the caller")
    elif forced in ("readiness", "threads"):
        probe = IoProbe("readiness" if forced == "readiness" else "threads", f"set by {IO_MODEL_ENV}")
    else:
        if forced:
            logger.warning("%s=%r is not 'readiness' or 'threads'; probing", IO_MODEL_ENV, forced)
        # A random vsock-template service on the loopback VmId, as go-winio's tests do.
        service_id = service_id_for_port(random.randrange(0x10000000, 0x7FFFFFFF))
        address = api.sockaddr(HV_GUID_LOOPBACK, service_id)
        probe = await probe_readiness(api.family, api.proto, address)
    logger.info("hvsock I/O model: %s (%s)", probe.model, probe.reason)
    return probe


def threads_for(max_connections: int) -> int:
    """Worker threads a route's hvsock side may need: one per direction per connection."""
    return 2 * max(1, max_connections)


# One limiter per route for connected streams, keyed by the identity of the route's
# RouteOptions (each route has its own object).
_LimiterTable: TypeAlias = dict[int, tuple["weakref.ref[RouteOptions]", trio.CapacityLimiter]]


def _default_resolver() -> VmResolver:
    return VmResolver(SubprocessVmLookup())


@final
@attrs.define(eq=False)
class HyperVSockets:
    """What hvsock endpoints keep between calls; one per process, held by backend.Backend.

    Args:
        resolver: Where VM names are resolved (default: the PowerShell/WSL tools).
        io_model: Force the I/O model; None: HVBRIDGE_HVSOCK_IO, else probe once (rule 4).
        api: The AF_HYPERV API (default: this interpreter's, None where it has none).
    """

    resolver: VmResolver = attrs.field(factory=_default_resolver)
    io_model: IoModel | None = None
    api: HvSocketApi | None = attrs.field(factory=platform_api)
    _probe: IoProbe | None = attrs.field(default=None, init=False)
    _probe_lock: trio.Lock = attrs.field(factory=trio.Lock, init=False)
    _limiters: _LimiterTable = attrs.field(factory=dict, init=False)

    async def io(self, api: HvSocketApi) -> IoProbe:
        """The I/O model for hvsock sockets: chosen once (forced, or probed), then kept."""
        async with self._probe_lock:
            if self._probe is None:
                self._probe = await _choose_io_model(api, self.io_model)
            chosen = self._probe
        return chosen

    def route_limiter(self, options: RouteOptions) -> trio.CapacityLimiter:
        """The thread limiter for connections a route opens (threads_for(max_connections) tokens)."""
        table = self._limiters
        # An entry lives exactly as long as its RouteOptions: the weakref callback runs while the
        # object is freed, before its id can be reused.
        key = id(options)
        entry = table.get(key)
        if entry is not None:
            return entry[1]

        def forget(_ref: weakref.ref[RouteOptions]) -> None:
            table.pop(key, None)

        limiter = trio.CapacityLimiter(threads_for(options.max_connections))
        table[key] = (weakref.ref(options, forget), limiter)
        return limiter

    def limiters(self) -> int:
        """How many routes have a connect limiter (entries leave with their RouteOptions)."""
        return len(self._limiters)


# ------------------------------------------------------------------------- listen / connect


#: How often a listener on a VM *name* looks the name up again while it waits for connections.
#: WSL gives its VM a new VmId each time it starts, and a recreated Hyper-V VM has a new one:
#: a socket bound to the old VmId then silently receives nothing. Each look-up is a PowerShell
#: or wsl.exe process, and the resolver's min_refresh bounds how often one really runs.
VM_RECHECK_INTERVAL: Final = 60.0


@final
class HvSocketListener(trio.abc.Listener[Stream]):
    """An hvsock listener: trio's SocketListener or a ThreadSocketListener, per the I/O model.

    Sets HVSOCKET_CONNECTED_SUSPEND on each accepted socket when the route asks for it.

    A listener on a VM name (`hvsock://wsl/PORT`, `hvsock://my-vm/PORT`) follows the name's
    VmId: refresh() looks the name up again and, if the VmId changed, binds a new socket to
    the new VmId and closes the old one. accept() calls it every `recheck_interval` seconds
    while no connection comes, and after an accept() error; the service calls it on reload.

    Attributes:
        socket: The listening socket (base.listener_address() reads it).
        address: The route's listen address.
        vm_id: The VmId it is bound to (a VM name resolved).
        model: The I/O model in use.
    """

    def __init__(
        self,
        inner: trio.SocketListener | ThreadSocketListener,
        *,
        api: HvSocketApi,
        address: HyperVAddress,
        vm_id: uuid.UUID,
        model: IoModel,
        options: RouteOptions,
        resolver: VmResolver,
        recheck_interval: float = VM_RECHECK_INTERVAL,
    ) -> None:
        self.inner = inner
        self.socket = inner.socket
        self.address = address
        self.vm_id = vm_id
        self.model = model
        self._api = api
        self._options = options
        self._resolver = resolver
        self._recheck_interval = recheck_interval
        self._refresh_lock = trio.Lock()
        self._closed = False

    async def accept(self) -> Stream:
        """Accept one connection; see trio.abc.Listener."""
        follows_name = isinstance(self.address.vm, str)
        while True:
            inner = self.inner
            try:
                with trio.move_on_after(self._recheck_interval if follows_name else math.inf) as recheck:
                    stream = await inner.accept()
            except trio.ClosedResourceError:
                if self._closed or self.inner is inner:
                    raise
                continue  # refresh() swapped the socket under this accept()
            except OSError:
                if not follows_name or not await self.refresh():
                    raise
                continue  # the VM's VmId changed: the error was the old socket's
            if recheck.cancelled_caught:
                await self.refresh()
                continue
            break
        if self._options.connected_suspend:
            try:
                self._api.set_connected_suspend(stream.socket)
            except OSError as exc:  # the listening socket has it; this is belt and braces
                logger.debug("HVSOCKET_CONNECTED_SUSPEND on an accepted socket: %s", exc)
        return stream

    async def refresh(self) -> bool:
        """Look a VM name up again and rebind if its VmId changed (a GUID never changes).

        Failures are logged and keep the socket as it is: a VM that is down for a moment must
        not cost the listener.

        Returns:
            True if the listener now listens on a new VmId.
        """
        if not isinstance(self.address.vm, str):
            await trio.lowlevel.checkpoint()
            return False
        async with self._refresh_lock:
            try:
                fresh = await resolve_vm_id(self.address.vm, self._resolver, refresh=True)
            except VmLookupError as exc:
                logger.info(
                    "listen %s: cannot look VM %r up again, keeping %s: %s",
                    self.address,
                    self.address.vm,
                    self.vm_id,
                    exc,
                )
                return False
            if fresh == self.vm_id or self._closed:
                return False
            try:
                inner = _bind(self._api, self.address, fresh, self.model, self._options)
            except EndpointError as exc:
                logger.error("listen %s: VM %r has a new VmId %s, but %s", self.address, self.address.vm, fresh, exc)
                return False
            old, self.inner, self.socket = self.inner, inner, inner.socket
            logger.warning(
                "listen %s: VM %r changed VmId from %s to %s; listening on the new one",
                self.address,
                self.address.vm,
                self.vm_id,
                fresh,
            )
            self.vm_id = fresh
        await trio.aclose_forcefully(old)
        return True

    async def aclose(self) -> None:
        """Stop listening."""
        self._closed = True
        await self.inner.aclose()


def _timeout_ms(seconds: float) -> int | None:
    if seconds <= 0:
        return None
    return max(1, min(HVSOCKET_CONNECT_TIMEOUT_MAX, round(seconds * 1000)))


def _new_socket(api: HvSocketApi, address: HyperVAddress, op: str) -> socket.socket:
    try:
        return socket.socket(api.family, socket.SOCK_STREAM, api.proto)
    except OSError as exc:
        raise EndpointError(
            str(address),
            op,
            f"cannot create a Hyper-V socket ({oserror_text(exc)}); Hyper-V sockets need Windows 10 /"
            " Server 2016 or later with Hyper-V enabled",
        ) from exc


def _listen_message(exc: OSError) -> str:
    if exc.errno in (10048, 98):  # WSAEADDRINUSE, EADDRINUSE
        return "address already in use; another process listens on this VmId and service GUID"
    if exc.errno in (10013, 13):  # WSAEACCES, EACCES
        # Reported for WSL (nbdd0121/wsld#8): an elevated administrator gets WSAEACCES on the WSL
        # VM's VmId, while the (standard) user who started WSL can bind it.
        return (
            "permission denied; only an account allowed to use that VM may bind its VmId: for WSL that is"
            " the user who runs WSL (administrator rights do not help), for a Hyper-V VM a member of"
            " 'Hyper-V Administrators'"
        )
    return oserror_text(exc)


def _bind(
    api: HvSocketApi, address: HyperVAddress, vm_id: uuid.UUID, model: IoModel, options: RouteOptions
) -> trio.SocketListener | ThreadSocketListener:
    """A socket bound to (vm_id, address.service_id) and listening, wrapped for the I/O model.

    Raises:
        EndpointError: socket, bind or listen failed.
    """
    sock = _new_socket(api, address, "listen")
    try:
        if options.connected_suspend:
            api.set_connected_suspend(sock)
        sock.bind(api.sockaddr(vm_id, address.service_id))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise EndpointError(str(address), "listen", _listen_message(exc)) from exc
    if model == "readiness":
        return trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    # One more token than the connections need: the accept thread.
    return ThreadSocketListener(sock, trio.CapacityLimiter(threads_for(options.max_connections) + 1))


async def open_hvsock_listener(
    address: HyperVAddress,
    options: RouteOptions,
    hv: HyperVSockets,
    *,
    recheck_interval: float = VM_RECHECK_INTERVAL,
) -> HvSocketListener:
    """Bind and listen on `address` (a VM name is resolved to its VmId first).

    Args:
        address: Where to listen.
        options: The route's options (connected_suspend, max_connections).
        hv: The process's Hyper-V socket state (VM names, I/O model).
        recheck_interval: Seconds between look-ups of a VM name while idle (HvSocketListener).

    Raises:
        AddressFamilyUnavailable: Not Windows, or Python < 3.12.
        EndpointError: The VM name cannot be resolved, or bind/listen failed.
    """
    api = _require_api(hv, address)
    probe = await hv.io(api)
    vm_id = await _resolve_for(address, "listen", hv.resolver)
    return HvSocketListener(
        _bind(api, address, vm_id, probe.model, options),
        api=api,
        address=address,
        vm_id=vm_id,
        model=probe.model,
        options=options,
        resolver=hv.resolver,
        recheck_interval=recheck_interval,
    )


async def connect_hvsock(address: HyperVAddress, options: RouteOptions, hv: HyperVSockets) -> Stream:
    """Open a stream to `address`. The caller bounds the wait (connect_timeout).

    A VM name is resolved (cached); if the connect then fails, the name is resolved again
    (at most every VmResolver.min_refresh seconds) and, if the VmId changed, the connect is
    tried once more.

    Raises:
        AddressFamilyUnavailable: Not Windows, or Python < 3.12.
        BackendUnavailable: Refused, timed out, VM not running: worth a retry.
        EndpointError: The VM name cannot be resolved, or another failure.
    """
    api = _require_api(hv, address)
    probe = await hv.io(api)
    vm_id = await _resolve_for(address, "connect", hv.resolver)
    try:
        return await _connect(api, probe.model, vm_id, address, options, hv)
    except EndpointError:
        # Whatever Windows says for a VmId that no longer exists, look the name up again.
        if not isinstance(address.vm, str):
            raise
        fresh = await _resolve_for(address, "connect", hv.resolver, refresh=True)
        if fresh == vm_id:
            raise
        logger.info("VM %r changed VmId from %s to %s; connecting again", address.vm, vm_id, fresh)
        return await _connect(api, probe.model, fresh, address, options, hv)


async def _connect(
    api: HvSocketApi, model: IoModel, vm_id: uuid.UUID, address: HyperVAddress, options: RouteOptions, hv: HyperVSockets
) -> Stream:
    sock = _new_socket(api, address, "connect")
    try:
        milliseconds = _timeout_ms(options.connect_timeout)
        if milliseconds is not None:
            api.set_connect_timeout(sock, milliseconds)
        if options.connected_suspend:
            api.set_connected_suspend(sock)
    except OSError as exc:
        sock.close()
        raise EndpointError(str(address), "connect", f"cannot set Hyper-V socket options: {oserror_text(exc)}") from exc
    target = api.sockaddr(vm_id, address.service_id)
    # Close on any failure, cancellation included, without awaiting in an except block
    # (under an outer cancellation a second await there would raise before the close).
    connected = False
    if model == "readiness":
        trio_sock = trio.socket.from_stdlib_socket(sock)
        try:
            await trio_sock.connect(target)
            connected = True
        except OSError as exc:
            raise translate_connect_error(address, exc) from exc
        finally:
            if not connected:
                trio_sock.close()
        return trio.SocketStream(trio_sock)
    stream = ThreadSocketStream(sock, hv.route_limiter(options))
    try:
        await stream.connect(target)
        connected = True
    except OSError as exc:
        raise translate_connect_error(address, exc) from exc
    finally:
        if not connected:
            stream.close_now()
    return stream
