"""TCP: `tcp://HOST:PORT` listeners and connects.

A host name may bind several sockets (IPv4 and IPv6); port 0 binds an ephemeral port, which
base.listener_address() shows. A connect to an IP literal skips the resolver (connect_tcp).
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from typing import TYPE_CHECKING

import trio

from hvbridge.errors import EndpointError
from hvbridge.transports.base import BACKLOG, Listener, Stream, error_text, listen_hint, translate_connect_error

if TYPE_CHECKING:
    from hvbridge.addresses import TcpAddress


async def open_tcp_listeners(address: TcpAddress) -> list[Listener]:
    try:
        listeners = await trio.open_tcp_listeners(address.port, host=address.host, backlog=BACKLOG)
    except OSError as exc:
        raise EndpointError(str(address), "listen", listen_hint(exc)) from exc
    return list(listeners)


@functools.lru_cache(maxsize=64)
def _literal_family(host: str) -> int | None:
    """AF_INET or AF_INET6 for an IP literal, None for a host name (cached: parsed per connect)."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


async def connect_tcp(address: TcpAddress) -> Stream:
    family = _literal_family(address.host)
    try:
        if family is None:
            # A name: resolve it now (per connection) and try its addresses happy-eyeballs style.
            return await trio.open_tcp_stream(address.host, address.port)
        # An IP literal has one address to try: a plain non-blocking connect skips
        # open_tcp_stream's nursery and resolver round trip, and trio's socket.connect()'s
        # address check (a getaddrinfo call), which were most of a short connection's cost.
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            try:
                sock.connect((address.host, address.port))
            except BlockingIOError:  # EINPROGRESS here, WSAEWOULDBLOCK on Windows
                await trio.lowlevel.wait_writable(sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, error_text(error)) from None
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
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
