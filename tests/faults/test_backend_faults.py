"""The fault matrix of one connection (docs/reference.md, "Relay semantics"): backends and clients that misbehave.

Each test runs the real hvbridge process, injects one fault, checks what the peers see and what
hvbridge logs, then checks that hvbridge keeps serving (a fresh connection carries data both
ways) and that its file descriptor count returns to what it was before the first connection.

Rules: loopback only (127.0.0.1 and Unix sockets in tmp_path); port 0 everywhere (hvbridge's
port comes from its `listening` line); every test is bounded by trio.fail_after and every loop
by a count; times are never asserted.
"""

from __future__ import annotations

import hashlib
import os
import socket
from typing import TYPE_CHECKING, Final

import pytest
import trio
from support.processes import KiB, MiB

from .harness import CHUNK, Received, echo, open_client, probe_closed, read_to_end, reset, roundtrip, start_backend

if TYPE_CHECKING:
    from pathlib import Path

    from .harness import Launcher

pytestmark = pytest.mark.slow

TIMEOUT: Final = 60.0
#: A client stops pushing when one send() waits this long (the flow has stopped).
STALL: Final = 0.5
#: More than every socket buffer between the client and the backend together (about 20 MiB).
MAX_PUSH: Final = 256 * MiB


async def receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    """Read exactly `size` bytes (fails on an early EOF)."""
    data = bytearray()
    for _ in range(size + 1):
        if len(data) == size:
            return bytes(data)
        chunk = await stream.receive_some(size - len(data))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    raise AssertionError("too many reads")  # pragma: no cover


async def test_backend_refuses(hvbridge: Launcher, nursery: trio.Nursery) -> None:
    """A refused connect closes the client at once, logs why, and the route serves once the backend is up."""
    with trio.fail_after(TIMEOUT):
        # Bound but not listening: connects are refused, and no one else can take the port.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        hv = await hvbridge.forward("tcp://127.0.0.1:0", f"tcp://127.0.0.1:{port}")
        baseline = hv.fds()
        listen = hv.listening()

        got = await probe_closed(listen)
        assert got.size == 0
        assert got.ending in ("eof", "reset")
        await hv.wait_for(r'connection closed .*reason="connect failed: .*backend unavailable \(Connection refused\)')

        sock.listen(16)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        await nursery.start(trio.serve_listeners, echo, [listener])
        await roundtrip(listen)
        await hv.wait_fds(baseline)


async def test_backend_absent(hvbridge: Launcher, nursery: trio.Nursery, tmp_path: Path) -> None:
    """A missing Unix socket file is "backend unavailable"; once it exists, the same route serves."""
    with trio.fail_after(TIMEOUT):
        path = tmp_path / "backend.sock"
        hv = await hvbridge.forward("tcp://127.0.0.1:0", f"unix://{path}")
        baseline = hv.fds()
        listen = hv.listening()

        for _ in range(3):
            got = await probe_closed(listen)
            assert got.size == 0
            assert got.ending in ("eof", "reset")
        await hv.wait_for(
            r'connection closed .*reason="connect failed: .*backend unavailable \(No such file or directory\)',
            count=3,
        )
        assert not path.exists()

        await start_backend(nursery, path)
        await roundtrip(listen)
        await hv.wait_fds(baseline)


async def test_backend_never_reads(hvbridge: Launcher, nursery: trio.Nursery) -> None:
    """A backend that accepts and never reads stops the client's flow; other connections go on."""
    with trio.fail_after(TIMEOUT):
        backend = await start_backend(nursery, "tcp")
        release = trio.Event()

        async def hold(stream: trio.SocketStream) -> None:
            await release.wait()

        backend.then(hold)
        hv = await hvbridge.forward("tcp://127.0.0.1:0", backend.endpoint)
        baseline = hv.fds()
        listen = hv.listening()

        client = await open_client(listen)
        await backend.wait_accepted(1)
        chunk = os.urandom(CHUNK)
        pushed = 0
        stalled = False
        for _ in range(MAX_PUSH // CHUNK):
            with trio.move_on_after(STALL):
                pushed += await client.socket.send(chunk)
                continue
            stalled = True
            break
        assert stalled, f"pushed {pushed} bytes into a backend that never reads; no backpressure"

        # The stalled connection harms no other: a second one carries data both ways.
        await roundtrip(listen, size=1 * MiB)

        release.set()  # the backend closes with unread data, which resets the relay's socket
        got = await read_to_end(client, limit=0)
        assert got.ending in ("eof", "reset")
        await client.aclose()
        await hv.wait_for(r'connection closed .*bytes_in=\d+ .*reason="reset by backend"')
        await roundtrip(listen)
        await hv.wait_fds(baseline)


async def test_backend_closes_mid_stream(hvbridge: Launcher, nursery: trio.Nursery) -> None:
    """A backend that answers and closes: the client gets every byte sent before, then a clean EOF."""
    with trio.fail_after(TIMEOUT):
        backend = await start_backend(nursery, "tcp")
        request = os.urandom(1000)
        response = os.urandom(3 * MiB + 17)
        seen: list[bytes] = []

        async def answer_then_close(stream: trio.SocketStream) -> None:
            seen.append(await receive_exactly(stream, len(request)))
            await stream.send_all(response)
            # Returning closes the socket: a FIN, since nothing unread is left.

        backend.then(answer_then_close)
        hv = await hvbridge.forward("tcp://127.0.0.1:0", backend.endpoint)
        baseline = hv.fds()
        listen = hv.listening()

        client = await open_client(listen)
        await client.send_all(request)
        got = await read_to_end(client, limit=len(response))
        assert got == Received(len(response), hashlib.sha256(response).digest(), "eof")
        assert seen == [request]
        await client.aclose()
        await hv.wait_for(rf"connection closed .*bytes_in=1000 bytes_out={len(response)} .*reason=closed")

        await roundtrip(listen)
        await hv.wait_fds(baseline)


async def test_backend_resets_mid_stream(hvbridge: Launcher, nursery: trio.Nursery) -> None:
    """A backend reset (SO_LINGER 0) reaches the client as a reset, never as a clean EOF."""
    with trio.fail_after(TIMEOUT):
        backend = await start_backend(nursery, "tcp")
        partial = os.urandom(256 * KiB)

        async def answer_then_reset(stream: trio.SocketStream) -> None:
            await receive_exactly(stream, 1000)
            await stream.send_all(partial)
            await reset(stream)

        backend.then(answer_then_reset)
        hv = await hvbridge.forward("tcp://127.0.0.1:0", backend.endpoint)
        baseline = hv.fds()
        listen = hv.listening()

        client = await open_client(listen)
        await client.send_all(os.urandom(1000))
        got = await read_to_end(client, limit=len(partial))
        assert got.ending == "reset", got
        await client.aclose()
        await hv.wait_for(r'connection closed .*reason="reset by backend"')

        await roundtrip(listen)
        await hv.wait_fds(baseline)


async def test_client_resets(hvbridge: Launcher, nursery: trio.Nursery) -> None:
    """A client reset (SO_LINGER 0) reaches the backend as a reset, never as a clean EOF."""
    with trio.fail_after(TIMEOUT):
        backend = await start_backend(nursery, "tcp")
        outcome: list[Received] = []
        done = trio.Event()

        async def observe(stream: trio.SocketStream) -> None:
            outcome.append(await read_to_end(stream, limit=1 * MiB))
            done.set()

        backend.then(observe)
        hv = await hvbridge.forward("tcp://127.0.0.1:0", backend.endpoint)
        baseline = hv.fds()
        listen = hv.listening()

        client = await open_client(listen)
        await client.send_all(os.urandom(100 * KiB))
        await backend.wait_accepted(1)
        await reset(client)
        await done.wait()
        assert outcome[0].ending == "reset", outcome
        await hv.wait_for(r'connection closed .*reason="reset by client"')

        await roundtrip(listen)
        await hv.wait_fds(baseline)
