"""Endpoints: open listeners on and connect to addresses; the I/O edge of hvbridge.

This module owns socket creation for TCP and Unix and dispatches the VM families to their own
modules (vsock.py, hvsock.py). It turns OSError into EndpointError with a message that says
what to do, keeping the cause. Everything here returns trio streams and listeners; the relay
never learns which family it pumps.

Unix listener files (docs/reference.md, "Who may connect"): created with the route's mode
(default 0600) and owner/group; an existing *socket* file is replaced only when nothing accepts
on it (stale); any other kind of file, or a symlink, is an error and is never deleted or
followed. The file is removed when the listener closes, if it is still ours.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import os
import socket
import stat
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, TypeAlias, TypeVar, assert_never, final

import attrs
import trio

from hvbridge.addresses import (
    Address,
    HyperVAddress,
    StdioAddress,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    VsockMuxAddress,
)
from hvbridge.errors import AddressFamilyUnavailable, BackendUnavailable, EndpointError
from hvbridge.routes import RouteOptions

if TYPE_CHECKING:
    import grp
    import pwd

Stream: TypeAlias = trio.abc.HalfCloseableStream
Listener: TypeAlias = trio.abc.Listener[Stream]
OpenListeners: TypeAlias = Callable[[Address, RouteOptions], Awaitable[list[Listener]]]
Connect: TypeAlias = Callable[[Address, RouteOptions], Awaitable[Stream]]
_T = TypeVar("_T")

#: connect() errors that mean "the backend is not there (yet)": logged as such, retried.
UNAVAILABLE_ERRNOS: Final = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ETIMEDOUT,
        errno.ENOENT,
        errno.ENODEV,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.EHOSTDOWN,
        errno.ECONNABORTED,
        10060,  # WSAETIMEDOUT
        10061,  # WSAECONNREFUSED
    }
)
_BACKLOG: Final = 4096


async def open_listeners(address: Address, options: RouteOptions) -> list[Listener]:
    """Bind and listen on `address`; return one listener per bound socket.

    A TCP host name may bind several sockets (IPv4 and IPv6). Port 0 binds an ephemeral port;
    listener_address() tells which.

    Raises:
        EndpointError: The address cannot be bound (in use, permission, unsafe file...).
        AddressFamilyUnavailable: This OS cannot listen on the family.
    """
    match address:
        case TcpAddress():
            return await _open_tcp_listeners(address)
        case UnixAddress():
            return [open_unix_listener(address, options)]
        case VsockAddress():
            from hvbridge import vsock

            return [await vsock.open_vsock_listener(address, options)]
        case VsockMuxAddress():
            from hvbridge import vsock

            return [await vsock.open_mux_listener(address, options)]
        case HyperVAddress():
            from hvbridge import hvsock

            return [await hvsock.open_hvsock_listener(address, options)]
        case StdioAddress():
            raise EndpointError(str(address), "listen", "stdio cannot listen")
        case _:
            assert_never(address)


async def connect(address: Address, options: RouteOptions) -> Stream:
    """Open a stream to `address`. The caller bounds the wait (connect_timeout).

    Raises:
        BackendUnavailable: Refused, reset, unreachable, no such socket file: worth a retry.
        EndpointError: Any other failure.
        AddressFamilyUnavailable: This OS cannot connect to the family.
    """
    match address:
        case TcpAddress():
            return await _connect_tcp(address)
        case UnixAddress():
            return await _connect_unix(address)
        case VsockAddress():
            from hvbridge import vsock

            return await vsock.connect_vsock(address, options)
        case VsockMuxAddress():
            from hvbridge import vsock

            return await vsock.connect_mux(address, options)
        case HyperVAddress():
            from hvbridge import hvsock

            return await hvsock.connect_hvsock(address, options)
        case StdioAddress():
            return open_stdio_stream()
        case _:
            assert_never(address)


def translate_connect_error(address: Address, exc: OSError) -> EndpointError:
    """The EndpointError for a failed connect: BackendUnavailable when a retry may help."""
    if isinstance(exc, socket.gaierror):
        return BackendUnavailable(str(address), "connect", f"cannot resolve host name: {exc.strerror}")
    errnos = {exc.errno} | {getattr(e, "errno", None) for e in _sub_errors(exc)}
    # trio's "all attempts to connect to HOST:PORT failed" hides why; the per-address errors say it.
    reasons = dict.fromkeys(error_text(e.errno) for e in _sub_errors(exc) if isinstance(e, OSError) and e.errno)
    # trio's socket connect() says "Error connecting to ADDRESS: REASON"; the address is logged anyway.
    message = error_text(exc.errno) if exc.errno else exc.strerror or "; ".join(reasons) or str(exc)
    if errnos & UNAVAILABLE_ERRNOS:
        return BackendUnavailable(str(address), "connect", f"backend unavailable ({message})")
    return EndpointError(str(address), "connect", message)


def error_text(code: int) -> str:
    """The text for an errno, readable on Windows too.

    os.strerror() on Windows knows only the C library's codes and says "Unknown error" for the
    Winsock ones (10061 WSAECONNREFUSED...), which trio puts in its messages; the socket module
    has their text there (socket.errorTab, Windows only).
    """
    table: dict[int, str] = getattr(socket, "errorTab", {})
    return table[code].rstrip(".") if code in table else os.strerror(code)


def _sub_errors(exc: OSError) -> list[BaseException]:
    # trio.open_tcp_stream raises one OSError whose cause is a group of per-address errors.
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        return list(cause.exceptions)
    return []


# ---------------------------------------------------------------------------------------- TCP


async def _open_tcp_listeners(address: TcpAddress) -> list[Listener]:
    try:
        listeners = await trio.open_tcp_listeners(address.port, host=address.host, backlog=_BACKLOG)
    except OSError as exc:
        raise EndpointError(str(address), "listen", _listen_hint(exc)) from exc
    return list(listeners)


@functools.lru_cache(maxsize=64)
def _literal_family(host: str) -> int | None:
    """AF_INET or AF_INET6 for an IP literal, None for a host name (cached: parsed per connect)."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


async def _connect_tcp(address: TcpAddress) -> Stream:
    family = _literal_family(address.host)
    try:
        if family is None:
            # A name: resolve it now (per connection) and try its addresses happy-eyeballs style.
            return await trio.open_tcp_stream(address.host, address.port)
        # An IP literal has one address to try: a plain connect skips open_tcp_stream's
        # nursery and resolver round trip, which is most of a short connection's cost.
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            await sock.connect((address.host, address.port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)
    except OSError as exc:
        raise translate_connect_error(address, exc) from exc


def listen_hosts(host: str) -> list[str]:
    """The addresses a TCP listener on `host` binds (getaddrinfo AI_PASSIVE, as trio binds); [] if unresolved.

    Blocking (a resolver lookup): async code runs it in a thread.
    """
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return []
    return [str(info[4][0]) for info in infos]


def _listen_hint(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use; stop the other process or choose another port/path"
    if exc.errno == errno.EACCES:
        return "permission denied; ports below 1024 need root or CAP_NET_BIND_SERVICE"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "address not available on this machine; use an address of a local interface"
    return exc.strerror or str(exc)


# --------------------------------------------------------------------------------------- Unix


@final
@attrs.define(eq=False)
class UnixListener(trio.abc.Listener[Stream]):
    """A SocketListener on a Unix path that removes its socket file when closed."""

    listener: trio.SocketListener
    path: str | None
    inode: tuple[int, int] | None

    @property
    def socket(self) -> trio.socket.SocketType:
        """The listening socket."""
        return self.listener.socket

    async def accept(self) -> Stream:
        """Accept one connection."""
        return await self.listener.accept()

    async def aclose(self) -> None:
        """Stop listening and remove the socket file if it is still the one we bound."""
        try:
            await self.listener.aclose()
        finally:
            # Also when cancelled: trio.aclose_forcefully() always is, and its checkpoint
            # would otherwise skip the removal and leave the socket file behind.
            self._remove_file()

    def _remove_file(self) -> None:
        if self.path is not None:
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self.inode:
                    os.unlink(self.path)
            except OSError:
                pass


def open_unix_listener(address: UnixAddress, options: RouteOptions) -> UnixListener:
    if (why := unavailable_reason(address)) is not None:
        raise family_unavailable(address, why)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        if not address.abstract:
            _clear_stale_socket(address)
        old_umask = os.umask(0o777 & ~options.mode)
        try:
            sock.bind(address.sockaddr)
            bound = not address.abstract
        finally:
            os.umask(old_umask)
        inode = None
        if not address.abstract:
            st = os.lstat(address.path)
            inode = (st.st_dev, st.st_ino)
            _apply_owner(address, options)
            os.chmod(address.path, options.mode, follow_symlinks=False)
        sock.listen(_BACKLOG)
    except OSError as exc:
        _discard(sock, address, bound)
        parent = os.path.dirname(address.path)
        if exc.errno == errno.ENOENT and not address.abstract and parent and not os.path.isdir(parent):
            message = f"no such directory {parent!r}; create it (systemd: RuntimeDirectory=) or choose another path"
            raise EndpointError(str(address), "listen", message) from exc
        raise EndpointError(str(address), "listen", _listen_hint(exc)) from exc
    except EndpointError:
        _discard(sock, address, bound)
        raise
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    return UnixListener(listener, None if address.abstract else address.path, inode)


def _discard(sock: socket.socket, address: UnixAddress, bound: bool) -> None:
    """Close a listening socket that failed to set up, and remove the file its bind() made."""
    sock.close()
    if bound:
        with contextlib.suppress(OSError):
            os.unlink(address.path)


def _clear_stale_socket(address: UnixAddress) -> None:
    path = address.path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise EndpointError(
            str(address),
            "listen",
            "path is a symlink; refusing to follow or delete it, choose another path",
        )
    if not stat.S_ISSOCK(st.st_mode):
        raise EndpointError(
            str(address),
            "listen",
            "a file that is not a socket is in the way; refusing to delete it, remove it or choose another path",
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Non-blocking: a live listener with a full backlog answers EAGAIN at once, instead of
    # blocking the event loop until a timeout that would then read as "stale".
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: nobody accepts on it
        return
    except BlockingIOError:
        pass  # live, with a full backlog
    except OSError as exc:
        # EACCES and the like: no way to tell whether it is live, so never delete it.
        raise EndpointError(
            str(address),
            "listen",
            f"cannot probe the socket file already there ({exc.strerror}); remove it if it is stale,"
            " or choose another path",
        ) from exc
    finally:
        probe.close()
    raise EndpointError(str(address), "listen", "another process is listening on this socket; stop it first")


def _apply_owner(address: UnixAddress, options: RouteOptions) -> None:
    if options.owner is None and options.group is None:
        return
    import grp  # Unix only, like owner/group themselves: imported here so the module imports on Windows
    import pwd

    uid = _lookup(options.owner, pwd.getpwnam, "owner", address) if options.owner else -1
    gid = _lookup(options.group, grp.getgrnam, "group", address) if options.group else -1
    os.chown(address.path, uid, gid, follow_symlinks=False)


def _lookup(
    name: str,
    getter: Callable[[str], pwd.struct_passwd] | Callable[[str], grp.struct_group],
    what: str,
    address: Address,
) -> int:
    if name.isdigit():
        return int(name)
    try:
        entry = getter(name)
    except KeyError:
        raise EndpointError(
            str(address), "listen", f"unknown {what} {name!r}; expected a user/group name or id"
        ) from None
    return entry[2]


async def _connect_unix(address: UnixAddress) -> Stream:
    if (why := unavailable_reason(address)) is not None:
        raise family_unavailable(address, why)
    try:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:  # EMFILE/ENFILE: fail this connection, never the process
        raise translate_connect_error(address, exc) from exc
    try:
        await sock.connect(address.sockaddr)
    except OSError as exc:
        sock.close()
        raise translate_connect_error(address, exc) from exc
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


# -------------------------------------------------------------------------------------- stdio


def open_stdio_stream() -> Stream:
    """Standard input and output as one half-closeable stream (for `hvbridge connect`).

    send_eof() closes our copy of stdout, so the reader on the other end sees EOF.
    """
    if sys.platform == "win32":  # pragma: no cover - Windows only (trio has no FdStream there)
        return ThreadFdStream(0, 1)
    stdin = trio.lowlevel.FdStream(os.dup(0))
    stdout = trio.lowlevel.FdStream(os.dup(1))
    return trio.StapledStream(stdout, stdin)


@final
class ThreadFdStream(Stream):
    """A reading and a writing file descriptor as one stream, each read and write in a worker thread.

    For `hvbridge connect` on Windows: trio has no FdStream there, and pipes and consoles have
    no readiness to wait on, so each call blocks a thread (in binary mode: Python sets it on the
    standard descriptors). A cancelled call abandons its thread, which ends with the call or with
    the process; a descriptor is closed only once no call is using it. The stream owns both
    descriptors: send_eof() closes the writing one, so the reader on the other end sees EOF.
    """

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._lock = threading.Lock()
        self._fds: dict[str, int | None] = {"read": read_fd, "write": write_fd}
        self._busy: set[str] = set()
        self._closing: set[str] = set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self._call("read", lambda fd: os.read(fd, max_bytes or 65536))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            sent = await self._call("write", functools.partial(_write, view))
            view = view[sent:]

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        self._close("write")
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self._close("read")
        self._close("write")
        await trio.lowlevel.checkpoint()

    async def _call(self, end: str, call: Callable[[int], _T]) -> _T:
        with self._lock:
            fd = self._fds[end]
            if fd is None or end in self._busy:
                raise (
                    trio.ClosedResourceError(f"the {end} end is closed")
                    if fd is None
                    else trio.BusyResourceError(f"another task is using the {end} end")
                )
            self._busy.add(end)

        def run() -> _T:
            try:
                return call(fd)
            finally:
                with self._lock:
                    self._busy.discard(end)
                    if end in self._closing:
                        self._closing.discard(end)
                        os.close(fd)

        try:
            return await trio.to_thread.run_sync(run, abandon_on_cancel=True)
        except OSError as exc:  # EPIPE/EINVAL: the other end went away
            raise trio.BrokenResourceError(f"{end} failed: {exc.strerror or exc}") from exc

    def _close(self, end: str) -> None:
        with self._lock:
            fd, self._fds[end] = self._fds[end], None
            if fd is None:
                return
            if end in self._busy:
                self._closing.add(end)  # the thread still in the call closes it when it returns
                return
        os.close(fd)


def _write(data: memoryview, fd: int) -> int:
    return os.write(fd, data)


# ---------------------------------------------------------------------------------- addresses


def listener_address(listener: Listener) -> str:
    """The bound address of a listener in its endpoint text form (shows the real port)."""
    sock = getattr(listener, "socket", None)
    if sock is None:
        return repr(listener)
    return sockaddr_text(sock.family, sock.getsockname())


def peer_address(stream: trio.abc.Stream) -> tuple[int, object] | None:
    """The (family, sockaddr) of a socket stream's peer, or None for other streams."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return None
    try:
        return sock.family, sock.getpeername()
    except OSError:
        return None


def sockaddr_text(family: int, sockaddr: object) -> str:
    """A socket address as endpoint text: `tcp://127.0.0.1:80`, `unix:///x`, `vsock://3:22`."""
    if family in (socket.AF_INET, socket.AF_INET6) and isinstance(sockaddr, tuple):
        host, port = sockaddr[0], sockaddr[1]
        return str(TcpAddress(str(host).partition("%")[0], int(port)))
    if family == socket.AF_UNIX:
        if isinstance(sockaddr, bytes):
            sockaddr = sockaddr.decode("utf-8", "replace")
        if not sockaddr:
            return "unix:(unnamed)"
        assert isinstance(sockaddr, str)
        return f"unix:@{sockaddr[1:]}" if sockaddr.startswith("\0") else f"unix://{sockaddr}"
    if family == getattr(socket, "AF_HYPERV", -1):  # pragma: no cover - Windows only
        from hvbridge import hyperv

        return hyperv.sockaddr_text(sockaddr) or str(sockaddr)
    if family == getattr(socket, "AF_VSOCK", -1) and isinstance(sockaddr, tuple):
        return str(VsockAddress(int(sockaddr[0]), int(sockaddr[1])))
    return str(sockaddr)


def unavailable_reason(address: Address) -> str | None:
    """Why this OS or Python cannot use `address`'s family, or None if it can."""
    match address:
        case VsockAddress():
            if not hasattr(socket, "AF_VSOCK"):
                return "AF_VSOCK needs Linux"
        case HyperVAddress():
            from hvbridge import hvsock

            return hvsock.unavailable_reason()
        case UnixAddress() | VsockMuxAddress():
            if not hasattr(socket, "AF_UNIX"):
                return "Unix sockets need AF_UNIX, which Python has not here (CPython on Windows); use tcp://127.0.0.1:PORT"
        case TcpAddress() | StdioAddress():
            pass
        case _:
            assert_never(address)
    return None


def family_unavailable(address: Address, why: str) -> AddressFamilyUnavailable:
    """The error for a family this OS or Python cannot use, for the VM-family modules."""
    return AddressFamilyUnavailable(str(address), "open", why)
