"""The transports' toolbox: stream types, connect errors, the listen backlog, addresses as text.

Every family module (tcp, unix, stdio, vsock, vsock_mux, hvsock) imports from here and from
nothing above it; transports/__init__.py dispatches to the family modules. This module turns
OSError into EndpointError with a message that says what to do, keeping the cause, and finds
the socket under a stream or listener for the supervisor (peer_address, listener_address).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Final, TypeAlias

import trio

from hvbridge.addresses import Address, TcpAddress, VsockAddress
from hvbridge.errors import AddressFamilyUnavailable, BackendUnavailable, EndpointError
from hvbridge.routes import RouteOptions

Stream: TypeAlias = trio.abc.HalfCloseableStream
Listener: TypeAlias = trio.abc.Listener[Stream]
OpenListeners: TypeAlias = Callable[[Address, RouteOptions], Awaitable[list[Listener]]]
Connect: TypeAlias = Callable[[Address, RouteOptions], Awaitable[Stream]]

_LINGER_RESET: Final = struct.pack("ii", 1, 0)

#: accept() errors that mean "out of resources for now" (trio's ACCEPT_CAPACITY_ERRNOS): the
#: listener pauses and tries again, rather than the route ending.
ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

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
#: listen() backlog of every listener. At max_connections accepting pauses and the kernel's
#: queue holds the rest (docs/reference.md); a reload also leans on it (docs/operations.md).
#: Linux clamps it to net.core.somaxconn (4096 since Linux 5.4), Windows to SOMAXCONN.
BACKLOG: Final = 4096


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


def oserror_text(exc: OSError) -> str:
    """An OSError's reason, readable on Windows too (the Winsock text before Python's own)."""
    table: dict[int, str] = getattr(socket, "errorTab", {})
    if exc.errno in table:
        return table[exc.errno].rstrip(".")
    return exc.strerror or str(exc)


def _sub_errors(exc: OSError) -> list[BaseException]:
    # trio.open_tcp_stream raises one OSError whose cause is a group of per-address errors.
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        return list(cause.exceptions)
    return []


def listen_hint(exc: OSError) -> str:
    """What to do about a failed bind()/listen() of a TCP or Unix listener."""
    if exc.errno == errno.EADDRINUSE:
        return "address already in use; stop the other process or choose another port/path"
    if exc.errno == errno.EACCES:
        return "permission denied; ports below 1024 need root or CAP_NET_BIND_SERVICE"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "address not available on this machine; use an address of a local interface"
    return oserror_text(exc)


async def abort(stream: trio.abc.AsyncResource) -> None:
    """Close `stream` so that its peer sees a reset (RST) rather than a clean EOF."""
    # Any stream with a socket: trio.SocketStream, and the thread-pumped Hyper-V stream.
    sock = getattr(stream, "socket", None)
    if sock is not None:
        reset_on_close(sock)
    await trio.aclose_forcefully(stream)


def reset_on_close(sock: socket.SocketType | trio.socket.SocketType) -> None:
    """Make the socket's close() send a reset (SO_LINGER 0) where it can."""
    with contextlib.suppress(OSError, TypeError):  # closed; no SO_LINGER; AF_VSOCK takes only ints
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def listener_address(listener: Listener) -> str:
    """The bound address of a listener in its endpoint text form (shows the real port)."""
    bound = listener_sockname(listener)
    return repr(listener) if bound is None else sockaddr_text(*bound)


def listener_sockname(listener: Listener) -> tuple[int, object] | None:
    """The (family, sockaddr) a socket listener is bound to, or None for other listeners."""
    sock = getattr(listener, "socket", None)
    if sock is None:
        return None
    return sock.family, sock.getsockname()


def exposed_tcp(family: int, sockaddr: object) -> bool:
    """Whether a bound socket address is TCP on an address other than loopback."""
    if family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(sockaddr, tuple):
        return False
    try:
        return not ipaddress.ip_address(str(sockaddr[0]).partition("%")[0]).is_loopback
    except ValueError:  # never a name in practice; warn anyway
        return True


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
        from hvbridge.hyperv.guids import sockaddr_text

        return sockaddr_text(sockaddr) or str(sockaddr)
    if family == getattr(socket, "AF_VSOCK", -1) and isinstance(sockaddr, tuple):
        return str(VsockAddress(int(sockaddr[0]), int(sockaddr[1])))
    return str(sockaddr)


def family_unavailable(address: Address, why: str) -> AddressFamilyUnavailable:
    """The error for a family this OS or Python cannot use, for the VM-family modules."""
    return AddressFamilyUnavailable(str(address), "open", why)
