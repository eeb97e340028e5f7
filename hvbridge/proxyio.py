"""PROXY protocol headers on trio streams: read a client's, send a backend's.

proxyproto.py knows the bytes; this module only moves them. An incoming header is read with
bounded size (proxyproto.MAX_HEADER) and time; bytes a read took past the header are handed
back so the caller forwards them first. An outgoing header goes out in one send of its own,
right after the backend connect, before either stream is relayed (so two socket streams still
take the splice fast path afterwards).
"""

from __future__ import annotations

import trio

from hvbridge import proxyproto
from hvbridge.proxyproto import ProxyHeader, ProxyProtocolError


async def read_header(stream: trio.abc.ReceiveStream, seconds: float) -> tuple[ProxyHeader, bytes]:
    """Read the PROXY header `stream` starts with: (the header, the bytes read after it).

    Raises:
        ProxyProtocolError: No valid header within `seconds` or MAX_HEADER bytes, or
            the client closed first. The message says which.
    """
    data = b""
    with trio.move_on_after(seconds):
        while True:
            try:
                piece = await stream.receive_some(proxyproto.read_size(data))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ProxyProtocolError(f"the client failed before a whole PROXY header ({exc})") from exc
            if not piece:
                raise ProxyProtocolError(f"the client closed after {len(data)} bytes, before a whole PROXY header")
            data += piece
            found = proxyproto.parse(data)
            if found is not None:
                header, size = found
                return header, data[size:]
    raise ProxyProtocolError(f"no whole PROXY header within {seconds:g}s ({len(data)} bytes came)")


def local_address(stream: trio.abc.Stream) -> tuple[int, object] | None:
    """The (family, sockaddr) `stream`'s socket is bound to, or None for other streams."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return None
    try:
        return sock.family, sock.getsockname()
    except OSError:
        return None
