"""Transports: open listeners on and connect to addresses; the I/O edge of hvbridge.

This package only dispatches: each address family has its own module (tcp, unix, stdio, vsock,
vsock_mux, hvsock) over the toolbox in base.py, and threadstream.py pumps blocking sockets in
worker threads for hvsock. Everything here returns trio streams and listeners; the relay never
learns which family it pumps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, assert_never

from hvbridge.addresses import (
    Address,
    HyperVAddress,
    StdioAddress,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    VsockMuxAddress,
)
from hvbridge.errors import EndpointError
from hvbridge.transports import hvsock, stdio, tcp, unix, vsock, vsock_mux

if TYPE_CHECKING:
    from hvbridge.routes import RouteOptions
    from hvbridge.transports.base import Listener, Stream


async def open_listeners(address: Address, options: RouteOptions, hv: hvsock.HyperVSockets) -> list[Listener]:
    """Bind and listen on `address`; return one listener per bound socket.

    A TCP host name may bind several sockets (IPv4 and IPv6). Port 0 binds an ephemeral port;
    base.listener_address() tells which. `hv` is the process's Hyper-V socket state
    (backend.Backend holds it).

    Raises:
        EndpointError: The address cannot be bound (in use, permission, unsafe file...).
        AddressFamilyUnavailable: This OS cannot listen on the family.
    """
    match address:
        case TcpAddress():
            return await tcp.open_tcp_listeners(address)
        case UnixAddress():
            return [unix.open_unix_listener(address, options)]
        case VsockAddress():
            return [await vsock.open_vsock_listener(address, options)]
        case VsockMuxAddress():
            return [await vsock_mux.open_mux_listener(address, options)]
        case HyperVAddress():
            return [await hvsock.open_hvsock_listener(address, options, hv)]
        case StdioAddress():
            raise EndpointError(str(address), "listen", "stdio cannot listen")
        case _:
            assert_never(address)


async def connect(address: Address, options: RouteOptions, hv: hvsock.HyperVSockets) -> Stream:
    """Open a stream to `address`. The caller bounds the wait (connect_timeout).

    Raises:
        BackendUnavailable: Refused, reset, unreachable, no such socket file: worth a retry.
        EndpointError: Any other failure.
        AddressFamilyUnavailable: This OS cannot connect to the family.
    """
    match address:
        case TcpAddress():
            return await tcp.connect_tcp(address)
        case UnixAddress():
            return await unix.connect_unix(address)
        case VsockAddress():
            return await vsock.connect_vsock(address, options)
        case VsockMuxAddress():
            return await vsock_mux.connect_mux(address, options)
        case HyperVAddress():
            return await hvsock.connect_hvsock(address, options, hv)
        case StdioAddress():
            return stdio.open_stdio_stream()
        case _:
            assert_never(address)


def unavailable_reason(address: Address) -> str | None:
    """Why this OS or Python cannot use `address`'s family, or None if it can."""
    match address:
        case VsockAddress():
            return vsock.unavailable_reason()
        case HyperVAddress():
            return hvsock.unavailable_reason()
        case UnixAddress() | VsockMuxAddress():
            return unix.unavailable_reason()
        case TcpAddress() | StdioAddress():
            return None
        case _:
            assert_never(address)
