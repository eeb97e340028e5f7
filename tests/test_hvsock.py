"""Tests for transports.hvsock and threadstream: AF_HYPERV availability, the thread pump, the probe, listen/connect.

Rules for this module: no Windows exists here, so
- the thread pump (ThreadSocketStream / ThreadSocketListener) runs over real blocking sockets:
  TCP on 127.0.0.1:0 and AF_UNIX socketpairs, in real worker threads;
- listen/connect, the I/O-model probe and the VM-name re-resolve run against TcpApi, an
  HvSocketApi whose "service GUID" is a TCP port on 127.0.0.1 (the vsock-template port);
- the real AF_HYPERV path is only checked for its "unavailable" error on this platform.
Worker threads make these tests run on the real clock: every test is bounded with
trio.fail_after(LIMIT), and waits for threads poll every millisecond at most.
"""

from __future__ import annotations

import errno
import functools
import gc
import hashlib
import logging
import random
import socket
import struct
import sys
import uuid
from typing import TYPE_CHECKING, Final

import attrs
import pytest
import trio
import trio.testing

from hvbridge import transports
from hvbridge.addresses import HyperVAddress, parse_address
from hvbridge.backend import Backend
from hvbridge.config import table_from_mapping
from hvbridge.errors import AddressFamilyUnavailable, BackendUnavailable, EndpointError
from hvbridge.hyperv.guids import HV_GUID_ZERO, port_for_service_id, service_id_for_port
from hvbridge.hyperv.vms import SubprocessVmLookup, VmInfo, VmResolver
from hvbridge.listeners import ListenerPool
from hvbridge.relay import relay
from hvbridge.routes import RouteOptions
from hvbridge.transports import base, hvsock, threadstream
from hvbridge.transports.hvsock import HyperVSockets
from hvbridge.transports.threadstream import ThreadSocketListener, ThreadSocketStream

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator
    from pathlib import Path

    from hvbridge.relay.ends import Transfer

#: Bound for one test (real clock: threads do not run on the autojump clock).
LIMIT: Final = 10.0
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
MiB: Final = 1024 * 1024

ON_WINDOWS_312 = sys.platform == "win32" and sys.version_info >= (3, 12)


# ------------------------------------------------------------------------------------ helpers


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    return a, b


def unix_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected AF_UNIX stream sockets."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


PAIRS = [pytest.param(tcp_pair, id="tcp"), pytest.param(unix_pair, id="unix")]


def trio_stream(sock: socket.socket) -> trio.SocketStream:
    """A stdlib socket as an ordinary (readiness-based) trio stream."""
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything until EOF."""
    chunks = []
    while chunk := await stream.receive_some():
        chunks.append(chunk)
    return b"".join(chunks)


async def send_then_eof(stream: trio.abc.HalfCloseableStream, data: bytes) -> None:
    """Send `data` in odd-sized pieces, then EOF."""
    view = memoryview(data)
    for start in range(0, len(data), 100_003):
        await stream.send_all(view[start : start + 100_003])
    await stream.send_eof()


async def wait_idle(limiter: trio.CapacityLimiter) -> None:
    """Wait until every worker thread has given its token back (threads finish on their own)."""
    while limiter.borrowed_tokens:  # noqa: ASYNC110 - a limiter has no "all released" event
        await trio.sleep(0.001)


async def cancel_once_blocked(call: Callable[[], Awaitable[object]]) -> None:
    """Start `call`, cancel it once every task waits (its thread started, or a token awaited)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


async def accept_into(
    listener: trio.abc.Listener[trio.abc.HalfCloseableStream], streams: list[trio.abc.HalfCloseableStream]
) -> None:
    """Accept one connection into `streams`."""
    streams.append(await listener.accept())


@pytest.fixture
def limiter() -> trio.CapacityLimiter:
    """A limiter for the streams of one test."""
    return trio.CapacityLimiter(16)


@pytest.fixture
def pump_pair(limiter: trio.CapacityLimiter) -> Iterator[tuple[ThreadSocketStream, trio.SocketStream]]:
    """A pumped TCP stream and its peer as an ordinary trio stream; both closed afterwards."""
    a, b = tcp_pair()
    pumped, peer = ThreadSocketStream(a, limiter), trio_stream(b)
    yield pumped, peer
    a.close()  # usually already closed by the test; closing twice is harmless
    b.close()


# ------------------------------------------------------------------------------ availability


@pytest.mark.skipif(ON_WINDOWS_312, reason="AF_HYPERV exists here")
async def test_hyperv_unavailable_here() -> None:
    hvs = HyperVSockets()  # this interpreter's API: none
    version = ".".join(str(p) for p in sys.version_info[:3])
    system = {"linux": "Linux", "darwin": "macOS", "win32": "Windows"}.get(sys.platform, sys.platform)
    reason = f"Hyper-V sockets (AF_HYPERV) need Windows and Python >= 3.12; this is {system} with Python {version}"
    assert hvsock.platform_api() is None
    assert hvsock.unavailable_reason() == reason
    address = parse_address("hvsock://my-vm/22")
    assert isinstance(address, HyperVAddress)
    message = f"open hvsock://my-vm/00000016-facb-11e6-bd58-64006a7986d3: {reason}"
    with trio.fail_after(LIMIT):
        for attempt in (
            hvsock.open_hvsock_listener(address, RouteOptions(), hvs),
            hvsock.connect_hvsock(address, RouteOptions(), hvs),
            transports.open_listeners(address, RouteOptions(), hvs),
            transports.connect(address, RouteOptions(), hvs),
        ):
            with pytest.raises(AddressFamilyUnavailable) as info:
                await attempt
            assert str(info.value) == message


# ------------------------------------------------------------------------------ thread pump


@pytest.mark.parametrize("make_pair", PAIRS)
async def test_pump_stream_basics(make_pair: Callable[[], tuple[socket.socket, socket.socket]]) -> None:
    limiter = trio.CapacityLimiter(4)
    a, b = make_pair()
    pumped, peer = ThreadSocketStream(a, limiter), trio_stream(b)
    assert base.peer_address(pumped) == (a.family, a.getpeername())
    with trio.fail_after(LIMIT):
        await pumped.send_all(b"ping")
        assert await peer.receive_some() == b"ping"
        await peer.send_all(b"pong")
        assert await pumped.receive_some(2) == b"po"  # a smaller read keeps the rest
        assert await pumped.receive_some() == b"ng"
        await pumped.send_all(b"")
        await pumped.wait_send_all_might_not_block()
        await pumped.send_eof()
        await pumped.send_eof()  # idempotent
        assert await peer.receive_some() == b""
        await peer.send_all(b"still flowing")  # half-close: the other way keeps going
        await peer.send_eof()
        assert await receive_all(pumped) == b"still flowing"
        assert await pumped.receive_some() == b""  # EOF stays EOF, without a thread
        await pumped.aclose()
        await pumped.aclose()  # idempotent
        await peer.aclose()
        await wait_idle(limiter)
    assert a.fileno() == -1


async def test_pump_closed_and_busy_errors(pump_pair: tuple[ThreadSocketStream, trio.SocketStream]) -> None:
    pumped, peer = pump_pair
    with trio.fail_after(LIMIT):
        with pytest.raises(ValueError, match=r"^max_bytes must be >= 1$"):
            await pumped.receive_some(0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pumped.receive_some)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await pumped.receive_some()
            await peer.send_all(b"x")
        await pumped.aclose()
        for op in (
            pumped.receive_some(),
            pumped.send_all(b"x"),
            pumped.send_eof(),
            pumped.wait_send_all_might_not_block(),
        ):
            with pytest.raises(trio.ClosedResourceError):
                await op
        await peer.aclose()


async def test_pump_send_after_eof_is_broken(pump_pair: tuple[ThreadSocketStream, trio.SocketStream]) -> None:
    pumped, peer = pump_pair
    with trio.fail_after(LIMIT):
        await pumped.send_eof()
        with pytest.raises(trio.BrokenResourceError) as info:
            await pumped.send_all(b"late")
        assert isinstance(info.value.__cause__, BrokenPipeError)
        await pumped.aclose()
        await peer.aclose()


@pytest.mark.parametrize("make_pair", PAIRS)
@pytest.mark.parametrize("pumped_side", ["client", "backend", "both"])
async def test_relay_through_pump_hash_verified(
    make_pair: Callable[[], tuple[socket.socket, socket.socket]], pumped_side: str
) -> None:
    """4 MiB each way through hvbridge.relay with the pump on one or both relay sides."""
    rng = random.Random(2761)
    up, down = rng.randbytes(4 * MiB), rng.randbytes(4 * MiB)
    limiter = trio.CapacityLimiter(8)
    c_app, c_relay = make_pair()
    b_relay, b_app = make_pair()
    client: trio.abc.HalfCloseableStream = (
        ThreadSocketStream(c_relay, limiter) if pumped_side in ("client", "both") else trio_stream(c_relay)
    )
    backend: trio.abc.HalfCloseableStream = (
        ThreadSocketStream(b_relay, limiter) if pumped_side in ("backend", "both") else trio_stream(b_relay)
    )
    app_client, app_backend = trio_stream(c_app), trio_stream(b_app)
    got: dict[str, bytes] = {}
    transfers: list[Transfer] = []

    async def run_relay() -> None:
        transfers.append(await relay(client, backend))

    async def side(name: str, stream: trio.SocketStream, data: bytes) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_then_eof, stream, data)
            got[name] = await receive_all(stream)

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay)
            nursery.start_soon(side, "client", app_client, up)
            nursery.start_soon(side, "backend", app_backend, down)
        await app_client.aclose()
        await app_backend.aclose()
        await wait_idle(limiter)
    assert hashlib.sha256(got["backend"]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got["client"]).digest() == hashlib.sha256(down).digest()
    [transfer] = transfers
    assert (transfer.client_to_backend, transfer.backend_to_client, transfer.reason) == (4 * MiB, 4 * MiB, "closed")


async def test_relay_half_close_through_pump(limiter: trio.CapacityLimiter) -> None:
    """The pumped backend says EOF first; the client keeps sending afterwards."""
    c_app, c_relay = tcp_pair()
    b_relay, b_app = tcp_pair()
    app_client, app_backend = trio_stream(c_app), trio_stream(b_app)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay, trio_stream(c_relay), ThreadSocketStream(b_relay, limiter))
            await app_backend.send_all(b"banner\n")
            await app_backend.send_eof()
            assert await receive_all(app_client) == b"banner\n"
            await app_client.send_all(b"request after the backend's EOF")
            await app_client.send_eof()
            assert await receive_all(app_backend) == b"request after the backend's EOF"
        await app_client.aclose()
        await app_backend.aclose()
        await wait_idle(limiter)


async def test_relay_reset_from_pumped_peer(limiter: trio.CapacityLimiter) -> None:
    """The pumped side's peer resets: the relay reports it and resets the client."""
    c_app, c_relay = tcp_pair()
    b_relay, b_app = tcp_pair()
    app_client = trio_stream(c_app)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            result: list[str] = []

            async def run() -> None:
                result.append((await relay(trio_stream(c_relay), ThreadSocketStream(b_relay, limiter))).reason)

            nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            b_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            b_app.close()
            with pytest.raises(trio.BrokenResourceError) as info:
                await receive_all(app_client)
            assert isinstance(info.value.__cause__, ConnectionResetError)
        assert result == ["reset by backend"]
        await app_client.aclose()
        await wait_idle(limiter)


async def test_pump_close_with_linger_resets_peer(pump_pair: tuple[ThreadSocketStream, trio.SocketStream]) -> None:
    """SO_LINGER 0 on .socket, then aclose(), resets the peer even with a receive blocked."""
    pumped, peer = pump_pair
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await pumped.receive_some()

            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            pumped.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            await pumped.aclose()
        with pytest.raises(trio.BrokenResourceError) as info:
            await receive_all(peer)
        assert isinstance(info.value.__cause__, ConnectionResetError)
        await peer.aclose()


async def test_relay_reset_reaches_pumped_peer(limiter: trio.CapacityLimiter) -> None:
    """The client resets: the peer behind the pumped backend must see a reset, not an EOF."""
    c_app, c_relay = tcp_pair()
    b_relay, b_app = tcp_pair()
    app_backend = trio_stream(b_app)
    try:
        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay, trio_stream(c_relay), ThreadSocketStream(b_relay, limiter))
                await trio.testing.wait_all_tasks_blocked()
                c_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                c_app.close()
                with pytest.raises(trio.BrokenResourceError):
                    await receive_all(app_backend)
    finally:
        # If this test fails, the relay may be cancelled mid-abort; close everything here.
        await app_backend.aclose()
        c_relay.close()
        with trio.fail_after(LIMIT):
            await wait_idle(limiter)
        b_relay.close()


async def test_cancelled_receive_loses_nothing(pump_pair: tuple[ThreadSocketStream, trio.SocketStream]) -> None:
    pumped, peer = pump_pair
    with trio.fail_after(LIMIT):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pumped.receive_some, 3)
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
        assert scope.cancelled_caught
        # The recv started above is still running; its bytes go to the next receive_some.
        await peer.send_all(b"abcdef")
        assert await pumped.receive_some(2) == b"ab"
        assert await pumped.receive_some() == b"c"
        assert await pumped.receive_some() == b"def"
        await pumped.aclose()
        await peer.aclose()


async def test_cancelled_send_does_not_hang_and_breaks_send_side(limiter: trio.CapacityLimiter) -> None:
    a, b = unix_pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    pumped = ThreadSocketStream(a, limiter)
    try:
        with trio.fail_after(LIMIT):
            # Nobody reads b: blocks in sendall, then cancelled.
            await cancel_once_blocked(functools.partial(pumped.send_all, b"x" * (8 * MiB)))
            with pytest.raises(trio.BrokenResourceError, match="cancelled send_all"):
                await pumped.send_all(b"more")
            with pytest.raises(trio.BrokenResourceError, match="cancelled send_all"):
                await pumped.send_eof()
            assert limiter.borrowed_tokens == 1  # the abandoned sendall is still blocked
            await pumped.aclose()  # wakes it (shutdown), and it closes the socket
            await wait_idle(limiter)
        assert a.fileno() == -1
    finally:
        b.close()


async def test_concurrent_sends_are_busy(limiter: trio.CapacityLimiter) -> None:
    a, b = unix_pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    pumped = ThreadSocketStream(a, limiter)
    with trio.fail_after(LIMIT):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pumped.send_all, b"x" * MiB)  # blocks: nobody reads b
                nursery.start_soon(pumped.receive_some)  # blocks: nothing to read
                await trio.testing.wait_all_tasks_blocked()
                for op in (pumped.send_all(b"y"), pumped.send_eof(), pumped.wait_send_all_might_not_block()):
                    with pytest.raises(trio.BusyResourceError):
                        await op
                assert limiter.borrowed_tokens == 2
                scope.cancel()
        # Both calls are still blocked; aclose() wakes both and the last one closes the socket.
        await pumped.aclose()
        await wait_idle(limiter)
    assert a.fileno() == -1
    b.close()


async def test_cancel_before_a_thread_starts_breaks_nothing(limiter: trio.CapacityLimiter) -> None:
    a, b = unix_pair()
    pumped = ThreadSocketStream(a, limiter)
    with trio.fail_after(LIMIT):
        small = trio.CapacityLimiter(1)
        blocked = ThreadSocketStream(socket.socket(socket.AF_UNIX), small)
        async with small:
            await cancel_once_blocked(blocked.send_eof)  # cancelled while waiting for a token: nothing started
        await blocked.aclose()
        await pumped.send_eof()
        await pumped.send_all(b"")
        assert b.recv(1) == b""
        await pumped.aclose()
        await wait_idle(limiter)
    b.close()


async def test_close_wakes_blocked_receive_in_other_task(
    pump_pair: tuple[ThreadSocketStream, trio.SocketStream], limiter: trio.CapacityLimiter
) -> None:
    pumped, peer = pump_pair
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                with pytest.raises(trio.ClosedResourceError, match="closed by another task"):
                    await pumped.receive_some()

            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            assert limiter.borrowed_tokens == 1
            await pumped.aclose()
        await wait_idle(limiter)
        assert await peer.receive_some() == b""  # a clean close: FIN, not RST
        await peer.aclose()
    assert pumped.socket.fileno() == -1


async def test_receive_error_is_broken(pump_pair: tuple[ThreadSocketStream, trio.SocketStream]) -> None:
    pumped, peer = pump_pair
    with trio.fail_after(LIMIT):
        peer.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        await peer.aclose()
        with pytest.raises(trio.BrokenResourceError, match=r"^socket error: ") as info:
            await pumped.receive_some()
        assert isinstance(info.value.__cause__, ConnectionResetError)
        await pumped.aclose()


async def test_relay_cancelled_does_not_hang(limiter: trio.CapacityLimiter) -> None:
    """Cancel a relay whose pumped sides are both blocked receiving: it returns at once."""
    c_app, c_relay = tcp_pair()
    b_relay, b_app = tcp_pair()
    client, backend = ThreadSocketStream(c_relay, limiter), ThreadSocketStream(b_relay, limiter)
    with trio.fail_after(LIMIT):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay, client, backend)
                await trio.testing.wait_all_tasks_blocked()
                assert limiter.borrowed_tokens == 2
                scope.cancel()
        await wait_idle(limiter)  # relay() closed both; that woke both threads
    assert c_relay.fileno() == b_relay.fileno() == -1
    c_app.close()
    b_app.close()


async def test_limiter_bounds_threads() -> None:
    """With one token, a second stream's receive waits until the first one's thread is done."""
    limiter = trio.CapacityLimiter(1)
    a1, b1 = unix_pair()
    a2, b2 = unix_pair()
    s1, s2 = ThreadSocketStream(a1, limiter), ThreadSocketStream(a2, limiter)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def receive(stream: ThreadSocketStream) -> None:
                got.append(await stream.receive_some())

            nursery.start_soon(receive, s1)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(receive, s2)
            await trio.testing.wait_all_tasks_blocked()
            assert limiter.statistics().tasks_waiting == 1
            b2.sendall(b"two")  # s2 has no thread yet, so this waits in the socket
            b1.sendall(b"one")
        assert got == [b"one", b"two"]
        await s1.aclose()
        await s2.aclose()
        await wait_idle(limiter)
    b1.close()
    b2.close()


# -------------------------------------------------------------------------- thread listener


async def test_thread_listener_accepts_and_closes(limiter: trio.CapacityLimiter) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    listener = ThreadSocketListener(server, limiter)
    port = listener.socket.getsockname()[1]
    with trio.fail_after(LIMIT):
        # A cancelled accept leaves its thread running; the next accept() takes its connection.
        await cancel_once_blocked(listener.accept)
        client = await trio.open_tcp_stream("127.0.0.1", port)
        accepted = await listener.accept()
        assert isinstance(accepted, ThreadSocketStream)
        await client.send_all(b"hi")
        assert await accepted.receive_some() == b"hi"
        await accepted.aclose()
        await client.aclose()

        async with trio.open_nursery() as nursery:

            async def accept() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await listener.accept()

            nursery.start_soon(accept)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await listener.accept()
            await listener.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await listener.accept()
        await wait_idle(limiter)
    assert server.fileno() == -1


class UnwokenSocket(socket.socket):
    """A listening socket whose shutdown() does not wake a blocked accept() (a late wake-up)."""

    def shutdown(self, how: int) -> None:
        pass


async def test_thread_listener_discards_late_connection(limiter: trio.CapacityLimiter) -> None:
    """A connection accepted by the thread after aclose() is closed, not leaked."""
    server = UnwokenSocket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    listener = ThreadSocketListener(server, limiter)
    with trio.fail_after(LIMIT):
        await cancel_once_blocked(listener.accept)  # leaves an accept() running in its thread
        await listener.aclose()  # closed, but the thread has not been woken yet
        client = socket.create_connection(server.getsockname(), timeout=LIMIT)  # a leak fails, not hangs
        await wait_idle(limiter)  # the thread accepts, sees the listener closed, closes both
        assert server.fileno() == -1
        assert client.recv(1) == b""
    client.close()


async def test_thread_listener_accept_error(limiter: trio.CapacityLimiter) -> None:
    """accept() errors other than closing reach the caller as OSError (serve_listeners handles EMFILE)."""
    server = socket.create_server(("127.0.0.1", 0))
    listener = ThreadSocketListener(server, limiter)
    with trio.fail_after(LIMIT):
        server.shutdown(socket.SHUT_RDWR)  # accept() now fails with EINVAL
        with pytest.raises(OSError, match="Invalid argument") as info:
            await listener.accept()
        assert info.value.errno == errno.EINVAL
        await listener.aclose()


class FlakyAcceptSocket(socket.socket):
    """A listening socket whose first accept() calls fail with the errnos in `failures`."""

    failures: list[int]

    def accept(self) -> tuple[socket.socket, object]:
        if self.failures:
            code = self.failures.pop(0)
            raise OSError(code, f"accept failed with {code}")
        return super().accept()


@pytest.mark.parametrize(
    "code",
    [
        pytest.param(10054, id="WSAECONNRESET"),
        pytest.param(10053, id="WSAECONNABORTED"),
        pytest.param(errno.ECONNABORTED, id="ECONNABORTED"),
        pytest.param(errno.EPERM, id="EPERM"),
    ],
)
async def test_thread_listener_retries_transient_accept_errors(limiter: trio.CapacityLimiter, code: int) -> None:
    """A peer that aborts before accept() costs that connection only, as with trio.SocketListener."""
    server = FlakyAcceptSocket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.failures = [code, code]
    listener = ThreadSocketListener(server, limiter)
    with trio.fail_after(LIMIT):
        client = await trio.open_tcp_stream(*server.getsockname())
        accepted = await listener.accept()
        assert server.failures == []
        await client.send_all(b"after two failures")
        assert await accepted.receive_some() == b"after two failures"
        await accepted.aclose()
        await client.aclose()
        await listener.aclose()
        await wait_idle(limiter)
    assert code in threadstream.ACCEPT_TRANSIENT_ERRNOS


def test_threads_for() -> None:
    assert hvsock.threads_for(1024) == 2048
    assert hvsock.threads_for(1) == 2
    assert hvsock.threads_for(0) == 2


async def test_route_limiter_per_route_object() -> None:
    hvs = HyperVSockets()
    first, second = RouteOptions(max_connections=3), RouteOptions(max_connections=3)
    limiter = hvs.route_limiter(first)
    assert limiter.total_tokens == 6
    assert hvs.route_limiter(first) is limiter
    assert hvs.route_limiter(second) is not limiter  # equal options, another route
    assert hvs.limiters() == 2
    del first
    gc.collect()
    assert hvs.limiters() == 1


# ------------------------------------------------------------------------------ I/O model


async def test_probe_readiness_on_tcp_and_unix(tmp_path: Path) -> None:
    with trio.fail_after(LIMIT):
        probe = await hvsock.probe_readiness(socket.AF_INET, 0, ("127.0.0.1", 0))
        assert probe == hvsock.IoProbe("readiness", "trio readiness waiting works (loopback probe)")
        path = str(tmp_path / "probe.sock")
        assert (await hvsock.probe_readiness(socket.AF_UNIX, 0, path)).model == "readiness"


async def test_probe_failures_choose_threads() -> None:
    with trio.fail_after(LIMIT):
        probe = await hvsock.probe_readiness(socket.AF_INET, 0, ("127.0.0.1", 0), time_limit=0)
        assert probe == hvsock.IoProbe("threads", "readiness probe timed out after 0 s")
        probe = await hvsock.probe_readiness(socket.AF_INET, 0, ("192.0.2.1", 0))
        assert probe.model == "threads"
        assert probe.reason == "readiness probe failed: OSError: Cannot assign requested address"
        probe = await hvsock.probe_readiness(12345, 0, ("127.0.0.1", 0))
        assert probe.model == "threads"
        assert probe.reason.startswith("readiness probe failed: OSError: ")


async def test_probe_detects_wrong_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A transport that mangles bytes is no good for readiness either."""
    original = trio.SocketStream.receive_some

    async def mangled(self: trio.SocketStream, max_bytes: int | None = None) -> bytes:
        data = await original(self, max_bytes)
        return data.upper()

    monkeypatch.setattr(trio.SocketStream, "receive_some", mangled)
    with trio.fail_after(LIMIT):
        probe = await hvsock.probe_readiness(socket.AF_INET, 0, ("127.0.0.1", 0))
    assert probe == hvsock.IoProbe("threads", "readiness probe received b'HVBRIDGE READINESS PROBE'")


async def test_probe_survives_close_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """A close() that raises neither escapes the probe nor leaks the other sockets, and means threads."""
    with trio.socket.socket() as sample:
        socket_type = type(sample)
    original = socket_type.close
    closed: list[int] = []

    def failing_close(self: trio.socket.SocketType) -> None:
        closed.append(self.fileno())
        original(self)
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(socket_type, "close", failing_close)
    with trio.fail_after(LIMIT):
        probe = await hvsock.probe_readiness(socket.AF_INET, 0, ("127.0.0.1", 0))
        assert probe == hvsock.IoProbe(
            "threads", "readiness probe could not close its sockets: OSError: Bad file descriptor"
        )
        assert len(closed) == 3  # listener, client and accepted socket: each closed despite the others
        closed.clear()
        # A probe that failed anyway keeps its own reason.
        probe = await hvsock.probe_readiness(socket.AF_INET, 0, ("192.0.2.1", 0))
        assert probe.reason == "readiness probe failed: OSError: Cannot assign requested address"
        assert len(closed) == 1


def test_describe_exception_groups() -> None:
    group = ExceptionGroup("x", [ValueError("inner")])
    assert hvsock._describe(group) == "ValueError: inner"
    assert hvsock._describe(RuntimeError()) == "RuntimeError"


# ---------------------------------------------------------------------- listen and connect


@attrs.define
class TcpApi:
    """An HvSocketApi over TCP on 127.0.0.1: a service GUID's vsock port is the TCP port.

    VmIds in `gone` map to a bound but not listening port, so connecting to them is refused.
    """

    refused_port: int = 0
    gone: set[uuid.UUID] = attrs.field(factory=set)
    hosts: dict[uuid.UUID, str] = attrs.field(factory=dict)  # VmId -> loopback address it binds
    family: int = socket.AF_INET
    proto: int = 0
    timeouts: list[int] = attrs.field(factory=list)
    suspended: int = 0
    fail_timeout: bool = False
    fail_suspend: bool = False

    def sockaddr(self, vm_id: uuid.UUID, service_id: uuid.UUID) -> tuple[str, int]:
        if vm_id in self.gone:
            return ("127.0.0.1", self.refused_port)
        port = port_for_service_id(service_id)
        return (self.hosts.get(vm_id, "127.0.0.1"), port if port is not None and port < 65536 else 0)

    def set_connect_timeout(self, sock: socket.socket, milliseconds: int) -> None:
        if self.fail_timeout:
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")
        self.timeouts.append(milliseconds)

    def set_connected_suspend(self, sock: socket.socket | trio.socket.SocketType) -> None:
        if self.fail_suspend:
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")
        self.suspended += 1


VM_A = uuid.UUID("3f2504e0-4f89-41d3-9a0c-0305e82c3301")
VM_B = uuid.UUID("8c0f6c57-2f1e-4d8b-9f53-1b7e6d8a9a10")


@attrs.define
class MutableLookup:
    """A VmLookup whose answers the test changes (a VM recreated with a new VmId)."""

    vms: dict[str, uuid.UUID]
    asked: int = 0

    def list_vms(self) -> list[VmInfo]:
        self.asked += 1
        return [VmInfo(name, vm_id, "Running") for name, vm_id in self.vms.items()]

    def wsl_vm_id(self) -> uuid.UUID:
        self.asked += 1
        return self.vms["wsl"]


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A TCP port on 127.0.0.1 that refuses connections (bound, not listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def api(refused_port: int) -> TcpApi:
    """TcpApi, standing in for the platform's AF_HYPERV API."""
    return TcpApi(refused_port)


@pytest.fixture
def lookup() -> MutableLookup:
    """A fake VM lookup for hvsock's name resolution."""
    return MutableLookup({"my-vm": VM_A, "wsl": VM_B})


@pytest.fixture(params=["readiness", "threads"])
def model(request: pytest.FixtureRequest) -> hvsock.IoModel:
    """Run the test under both I/O models (as if the probe had chosen it)."""
    chosen: hvsock.IoModel = "readiness" if request.param == "readiness" else "threads"
    return chosen


@pytest.fixture
def hvs(request: pytest.FixtureRequest, api: TcpApi, lookup: MutableLookup) -> HyperVSockets:
    """The Hyper-V socket state over the fakes; the test's I/O model if it asks for one."""
    model: hvsock.IoModel | None = request.getfixturevalue("model") if "model" in request.fixturenames else None
    return HyperVSockets(VmResolver(lookup, min_refresh=0), io_model=model, api=api)


def hv(text: str) -> HyperVAddress:
    """Parse an hvsock address."""
    address = parse_address(text)
    assert isinstance(address, HyperVAddress)
    return address


@pytest.mark.parametrize("suspend", [True, False])
async def test_listen_connect_relay(
    hvs: HyperVSockets, api: TcpApi, lookup: MutableLookup, model: hvsock.IoModel, suspend: bool
) -> None:
    options = RouteOptions(connect_timeout=2.5, connected_suspend=suspend, max_connections=4)
    with trio.fail_after(LIMIT):
        listener = await hvsock.open_hvsock_listener(hv("hvsock://any/0"), options, hvs)
        assert listener.model == model
        assert listener.vm_id == HV_GUID_ZERO
        assert isinstance(listener.inner, trio.SocketListener if model == "readiness" else ThreadSocketListener)
        port = listener.socket.getsockname()[1]
        assert base.listener_address(listener) == f"tcp://127.0.0.1:{port}"
        async with trio.open_nursery() as nursery:
            accepted: list[trio.abc.HalfCloseableStream] = []

            async def accept() -> None:
                accepted.append(await listener.accept())

            nursery.start_soon(accept)
            connected = await hvsock.connect_hvsock(hv(f"hvsock://my-vm/{port}"), options, hvs)
        assert isinstance(connected, trio.SocketStream if model == "readiness" else ThreadSocketStream)
        server = accepted[0]
        assert base.peer_address(server) is not None
        await connected.send_all(b"hello")
        await connected.send_eof()
        assert await receive_all(server) == b"hello"
        await server.send_all(b"world")
        await server.aclose()
        assert await receive_all(connected) == b"world"
        await connected.aclose()
        await listener.aclose()
    assert api.timeouts == [2500]
    assert api.suspended == (3 if suspend else 0)  # the listening socket, the accepted one, the connecting one
    assert lookup.asked == 1


@pytest.mark.parametrize(("seconds", "milliseconds"), [(0.0001, 1), (1000.0, 300_000), (0.0, None), (-1.0, None)])
async def test_connect_timeout_option(
    hvs: HyperVSockets, api: TcpApi, model: hvsock.IoModel, seconds: float, milliseconds: int | None
) -> None:
    with trio.fail_after(LIMIT):
        with socket.create_server(("127.0.0.1", 0)) as server:
            port = server.getsockname()[1]
            stream = await hvsock.connect_hvsock(
                hv(f"hvsock://{VM_A}/{port}"), RouteOptions(connect_timeout=seconds), hvs
            )
            await stream.aclose()
    assert api.timeouts == ([] if milliseconds is None else [milliseconds])


async def test_connect_re_resolves_a_recreated_vm(
    hvs: HyperVSockets, api: TcpApi, lookup: MutableLookup, model: hvsock.IoModel
) -> None:
    with trio.fail_after(LIMIT):
        with socket.create_server(("127.0.0.1", 0)) as server:
            port = server.getsockname()[1]
            address = hv(f"hvsock://my-vm/{port}")
            stream = await hvsock.connect_hvsock(address, RouteOptions(), hvs)
            await stream.aclose()
            assert lookup.asked == 1
            # The VM is recreated: the cached VmId now refuses, the name has a new one.
            api.gone.add(VM_A)
            lookup.vms["my-vm"] = uuid.UUID("0b1e2f3a-0000-4000-8000-000000000001")
            stream = await hvsock.connect_hvsock(address, RouteOptions(), hvs)
            await stream.aclose()
            assert lookup.asked == 2
            assert api.timeouts == [5000, 5000, 5000]  # two sockets for the second connect


async def test_connect_unavailable_without_new_vm_id(
    hvs: HyperVSockets, api: TcpApi, lookup: MutableLookup, model: hvsock.IoModel
) -> None:
    api.gone.update({VM_A, VM_B})
    with trio.fail_after(LIMIT):
        with pytest.raises(BackendUnavailable, match=r"^connect hvsock://my-vm/00000016-.*: backend unavailable \("):
            await hvsock.connect_hvsock(hv("hvsock://my-vm/22"), RouteOptions(), hvs)
        assert lookup.asked == 2  # resolved again, still the same VmId: no second connect
        with pytest.raises(BackendUnavailable):
            await hvsock.connect_hvsock(hv(f"hvsock://{VM_B}/22"), RouteOptions(), hvs)
        assert lookup.asked == 2  # a GUID is never resolved


async def test_unknown_vm_name(hvs: HyperVSockets, api: TcpApi, lookup: MutableLookup, model: hvsock.IoModel) -> None:
    with trio.fail_after(LIMIT):
        with pytest.raises(EndpointError) as info:
            await hvsock.connect_hvsock(hv("hvsock://db/22"), RouteOptions(), hvs)
        assert str(info.value).startswith(
            "connect hvsock://db/00000016-facb-11e6-bd58-64006a7986d3: no Hyper-V VM is named 'db'"
        )
        with pytest.raises(EndpointError, match=r"^listen hvsock://db/.*: no Hyper-V VM is named 'db'"):
            await hvsock.open_hvsock_listener(hv("hvsock://db/22"), RouteOptions(), hvs)


async def test_listen_on_wsl_vm(hvs: HyperVSockets, api: TcpApi, lookup: MutableLookup, model: hvsock.IoModel) -> None:
    with trio.fail_after(LIMIT):
        listener = await hvsock.open_hvsock_listener(hv("hvsock://wsl/0"), RouteOptions(), hvs)
        assert listener.vm_id == VM_B
        await listener.aclose()


async def test_listen_errors(hvs: HyperVSockets, api: TcpApi, model: hvsock.IoModel) -> None:
    with trio.fail_after(LIMIT):
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            with pytest.raises(EndpointError) as info:
                await hvsock.open_hvsock_listener(hv(f"hvsock://any/{port}"), RouteOptions(), hvs)
        assert str(info.value) == (
            f"listen hvsock://00000000-0000-0000-0000-000000000000/{service_id_for_port(port)}:"
            " address already in use; another process listens on this VmId and service GUID"
        )
        api.fail_suspend = True
        with pytest.raises(EndpointError, match=r": Protocol not available$"):
            await hvsock.open_hvsock_listener(hv("hvsock://any/0"), RouteOptions(connected_suspend=True), hvs)


def test_listen_messages() -> None:
    assert hvsock._listen_message(OSError(10013, "An attempt was made to access a socket ...")) == (
        "permission denied; only an account allowed to use that VM may bind its VmId: for WSL that is"
        " the user who runs WSL (administrator rights do not help), for a Hyper-V VM a member of"
        " 'Hyper-V Administrators'"
    )
    assert hvsock._listen_message(OSError(errno.EINVAL, "Invalid argument")) == "Invalid argument"


async def test_socket_and_option_errors(hvs: HyperVSockets, api: TcpApi, model: hvsock.IoModel) -> None:
    with trio.fail_after(LIMIT):
        api.fail_timeout = True
        with pytest.raises(EndpointError) as info:
            await hvsock.connect_hvsock(hv(f"hvsock://{VM_A}/22"), RouteOptions(), hvs)
        assert str(info.value).endswith(": cannot set Hyper-V socket options: Protocol not available")
        api.family = 12345
        with pytest.raises(EndpointError) as info:
            await hvsock.connect_hvsock(hv(f"hvsock://{VM_A}/22"), RouteOptions(), hvs)
        assert "cannot create a Hyper-V socket (" in str(info.value)
        assert str(info.value).endswith(
            "); Hyper-V sockets need Windows 10 / Server 2016 or later with Hyper-V enabled"
        )


async def test_accepted_suspend_failure_is_not_fatal(
    hvs: HyperVSockets, api: TcpApi, model: hvsock.IoModel, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(LIMIT):
        listener = await hvsock.open_hvsock_listener(hv("hvsock://any/0"), RouteOptions(connected_suspend=True), hvs)
        api.fail_suspend = True
        streams: list[trio.abc.HalfCloseableStream] = []
        port = listener.socket.getsockname()[1]
        with caplog.at_level(logging.DEBUG, logger="hvbridge.hvsock"):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(accept_into, listener, streams)
                streams.append(await hvsock.connect_hvsock(hv(f"hvsock://{VM_A}/{port}"), RouteOptions(), hvs))
        for stream in streams:
            await stream.aclose()
        await listener.aclose()
    assert "HVSOCKET_CONNECTED_SUSPEND on an accepted socket: [Errno 92] Protocol not available" in caplog.text


async def test_connect_cancelled_in_thread_mode(api: TcpApi, monkeypatch: pytest.MonkeyPatch) -> None:
    hvs = HyperVSockets(io_model="threads", api=api)
    started: list[ThreadSocketStream] = []
    scope = trio.CancelScope()

    async def slow_connect(self: ThreadSocketStream, address: hvsock.HvSockaddr) -> None:
        started.append(self)
        scope.cancel()  # cancelled while connecting
        await trio.sleep_forever()

    monkeypatch.setattr(ThreadSocketStream, "connect", slow_connect)
    with trio.fail_after(LIMIT):
        with scope:
            await hvsock.connect_hvsock(hv(f"hvsock://{VM_A}/22"), RouteOptions(), hvs)
    assert scope.cancelled_caught
    assert started[0].socket.fileno() == -1


async def test_connect_cancelled_in_readiness_mode(api: TcpApi, monkeypatch: pytest.MonkeyPatch) -> None:
    hvs = HyperVSockets(io_model="readiness", api=api)
    made: list[trio.socket.SocketType] = []
    scope = trio.CancelScope()
    original = trio.socket.from_stdlib_socket

    def remember(sock: socket.socket) -> trio.socket.SocketType:
        made.append(original(sock))
        return made[-1]

    async def never(self: trio.socket.SocketType, address: object) -> None:
        scope.cancel()  # cancelled while connecting
        await trio.sleep_forever()

    monkeypatch.setattr(trio.socket, "from_stdlib_socket", remember)
    with trio.socket.socket() as probe:
        monkeypatch.setattr(type(probe), "connect", never)
    with trio.fail_after(LIMIT):
        with scope:
            await hvsock.connect_hvsock(hv(f"hvsock://{VM_A}/22"), RouteOptions(), hvs)
    assert scope.cancelled_caught
    assert made[0].fileno() == -1


async def test_io_model_probed_once_under_concurrency(api: TcpApi, monkeypatch: pytest.MonkeyPatch) -> None:
    hvs = HyperVSockets(api=api)
    monkeypatch.delenv(hvsock.IO_MODEL_ENV, raising=False)
    probes: list[hvsock.IoProbe] = []
    original = hvsock.probe_readiness

    async def counting(family: int, proto: int, bind_address: object) -> hvsock.IoProbe:
        probes.append(await original(family, proto, bind_address))
        return probes[-1]

    monkeypatch.setattr(hvsock, "probe_readiness", counting)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(hvs.io, api)
    assert len(probes) == 1


async def test_io_model_probe_is_cached(
    api: TcpApi, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    hvs = HyperVSockets(api=api)
    monkeypatch.delenv(hvsock.IO_MODEL_ENV, raising=False)
    with trio.fail_after(LIMIT), caplog.at_level(logging.INFO, logger="hvbridge.hvsock"):
        first = await hvs.io(api)
        assert first == hvsock.IoProbe("readiness", "trio readiness waiting works (loopback probe)")
        assert await hvs.io(api) is first
    assert caplog.text.count("hvsock I/O model: readiness") == 1


@pytest.mark.parametrize(("value", "model"), [("threads", "threads"), (" Readiness ", "readiness")])
async def test_io_model_forced(api: TcpApi, monkeypatch: pytest.MonkeyPatch, value: str, model: hvsock.IoModel) -> None:
    monkeypatch.setenv(hvsock.IO_MODEL_ENV, value)
    with trio.fail_after(LIMIT):
        probe = await HyperVSockets(api=api).io(api)
    assert (probe.model, probe.reason) == (model, "set by HVBRIDGE_HVSOCK_IO")


async def test_io_model_given_wins_over_the_environment(api: TcpApi, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hvsock.IO_MODEL_ENV, "readiness")
    with trio.fail_after(LIMIT):
        probe = await HyperVSockets(io_model="threads", api=api).io(api)
    assert (probe.model, probe.reason) == ("threads", "set by the caller")


async def test_io_model_bad_env_probes(
    api: TcpApi, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(hvsock.IO_MODEL_ENV, "fast")
    with trio.fail_after(LIMIT):
        assert (await HyperVSockets(api=api).io(api)).model == "readiness"
    assert "HVBRIDGE_HVSOCK_IO='fast' is not 'readiness' or 'threads'; probing" in caplog.text


# ------------------------------------------------------------------------------ VM names


async def test_peer_vm_allowed(hvs: HyperVSockets, caplog: pytest.LogCaptureFixture) -> None:
    peer = (str(VM_A).upper(), str(service_id_for_port(22)))
    with trio.fail_after(LIMIT):
        assert await hvsock.peer_vm_allowed(hvs, [VM_A], peer)
        assert await hvsock.peer_vm_allowed(hvs, ["my-vm"], peer)
        assert await hvsock.peer_vm_allowed(hvs, [HV_GUID_ZERO], peer)
        assert not await hvsock.peer_vm_allowed(hvs, [VM_B, "wsl"], peer)
        assert not await hvsock.peer_vm_allowed(hvs, [VM_A], ("127.0.0.1", 22))
        assert not await hvsock.peer_vm_allowed(hvs, ["db"], peer)
        assert await hvsock.peer_vm_allowed(hvs, ["db", VM_A], peer)
    assert "allow rule vm:db cannot be resolved: no Hyper-V VM is named 'db'" in caplog.text


async def test_resolver_setup() -> None:
    assert isinstance(HyperVSockets().resolver.lookup, SubprocessVmLookup)
    fake = MutableLookup({"x": VM_A})
    backend = Backend(vm_lookup=fake, hvsock_io="threads", splice=False)
    assert backend.hvsock.resolver.lookup is fake
    assert backend.hvsock.io_model == "threads"
    with trio.fail_after(LIMIT):
        assert await hvsock.resolve_vm_id("x", backend.hvsock.resolver) == VM_A
        assert await hvsock.resolve_vm_id(VM_B, backend.hvsock.resolver) == VM_B


# ------------------------------------------------------------- a listener follows its VM name

VM_C = uuid.UUID("0b1e2f3a-0000-4000-8000-0000000000c3")


@pytest.fixture
def wsl_restarts(api: TcpApi) -> tuple[MutableLookup, VmResolver]:
    """WSL's VM as VM_B on 127.0.0.2; after a restart it is VM_C on 127.0.0.3. The lookup is injected."""
    api.hosts.update({VM_B: "127.0.0.2", VM_C: "127.0.0.3"})
    lookup = MutableLookup({"wsl": VM_B, "my-vm": VM_A})
    return lookup, VmResolver(lookup, min_refresh=0)


async def connect_and_accept(listener: hvsock.HvSocketListener) -> None:
    """One connection to where the listener listens now, accepted and carrying a byte."""
    async with trio.open_nursery() as nursery:
        accepted: list[trio.abc.HalfCloseableStream] = []
        nursery.start_soon(accept_into, listener, accepted)
        client = await trio.open_tcp_stream(*listener.socket.getsockname())
    await client.send_all(b"x")
    assert await accepted[0].receive_some() == b"x"
    await accepted[0].aclose()
    await client.aclose()


def refused(address: tuple[str, int]) -> bool:
    """Whether connecting to a loopback address is refused (nothing listens there any more)."""
    with socket.socket() as sock:
        return sock.connect_ex(address) == errno.ECONNREFUSED


async def test_reload_rebinds_a_listener_whose_vm_changed(
    api: TcpApi, wsl_restarts: tuple[MutableLookup, VmResolver], model: hvsock.IoModel
) -> None:
    """WSL restarted (new VmId): a reload keeps the listener object but binds it to the new VmId."""
    lookup, resolver = wsl_restarts

    async def open_listeners(address: object, options: RouteOptions) -> list[base.Listener]:
        assert isinstance(address, HyperVAddress)
        return [await hvsock.open_hvsock_listener(address, options, HyperVSockets(resolver, io_model=model, api=api))]

    pool = ListenerPool(open_listeners=open_listeners)
    table = table_from_mapping(
        {"routes": {"in": {"listen": "hvsock://wsl/0", "connect": "tcp://127.0.0.1:9"}}}, source="test"
    )
    with trio.fail_after(LIMIT):
        listener = (await pool.acquire(table))["in"][0]
        assert isinstance(listener, hvsock.HvSocketListener)
        old_address = listener.socket.getsockname()
        assert (listener.vm_id, old_address[0]) == (VM_B, "127.0.0.2")
        async with trio.open_nursery() as nursery:
            accepted: list[trio.abc.HalfCloseableStream] = []
            nursery.start_soon(accept_into, listener, accepted)  # an accept() waiting on the old socket
            await trio.testing.wait_all_tasks_blocked()
            lookup.vms["wsl"] = VM_C
            assert (await pool.acquire(table))["in"] == [listener]  # the reload
            assert (listener.vm_id, listener.socket.getsockname()[0]) == (VM_C, "127.0.0.3")
            client = await trio.open_tcp_stream(*listener.socket.getsockname())
        await accepted[0].aclose()
        await client.aclose()
        assert refused(old_address)
        assert await pool.acquire(table)  # unchanged VmId: nothing rebinds
        assert listener.vm_id == VM_C
        await pool.aclose()
    assert lookup.asked == 3


async def test_idle_listener_looks_its_vm_up_again(
    api: TcpApi,
    wsl_restarts: tuple[MutableLookup, VmResolver],
    model: hvsock.IoModel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without any reload, a waiting accept() notices the new VmId and moves to it."""
    lookup, resolver = wsl_restarts
    with trio.fail_after(LIMIT), caplog.at_level(logging.INFO, logger="hvbridge.hvsock"):
        listener = await hvsock.open_hvsock_listener(
            hv("hvsock://wsl/0"),
            RouteOptions(),
            HyperVSockets(resolver, io_model=model, api=api),
            recheck_interval=0.005,
        )
        old_address = listener.socket.getsockname()
        async with trio.open_nursery() as nursery:
            accepted: list[trio.abc.HalfCloseableStream] = []
            nursery.start_soon(accept_into, listener, accepted)
            while lookup.asked < 3:  # noqa: ASYNC110 - the lookup is a plain object, not an event
                await trio.sleep(0.001)
            lookup.vms["wsl"] = VM_C
            while listener.vm_id != VM_C:  # noqa: ASYNC110
                await trio.sleep(0.001)
            client = await trio.open_tcp_stream(*listener.socket.getsockname())
        assert listener.socket.getsockname()[0] == "127.0.0.3"
        assert refused(old_address)
        await accepted[0].aclose()
        await client.aclose()
        await listener.aclose()
    assert f"VM 'wsl' changed VmId from {VM_B} to {VM_C}; listening on the new one" in caplog.text


async def test_listener_keeps_its_socket_when_the_lookup_fails(
    api: TcpApi,
    wsl_restarts: tuple[MutableLookup, VmResolver],
    model: hvsock.IoModel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    lookup, resolver = wsl_restarts
    with trio.fail_after(LIMIT), caplog.at_level(logging.INFO, logger="hvbridge.hvsock"):
        listener = await hvsock.open_hvsock_listener(
            hv("hvsock://my-vm/0"), RouteOptions(), HyperVSockets(resolver, io_model=model, api=api)
        )
        del lookup.vms["my-vm"]  # the VM is gone for now
        assert not await listener.refresh()
        assert listener.vm_id == VM_A
        await connect_and_accept(listener)
        # The VM is back under a new VmId, but no socket can be made for it now.
        lookup.vms["my-vm"] = VM_B
        api.family = 12345
        assert not await listener.refresh()
        api.family = socket.AF_INET
        assert listener.vm_id == VM_A
        await connect_and_accept(listener)
        await listener.aclose()
        lookup.vms["my-vm"] = VM_C
        assert not await listener.refresh()  # closed: nothing is bound any more
    assert "cannot look VM 'my-vm' up again, keeping" in caplog.text
    assert f"VM 'my-vm' has a new VmId {VM_B}, but listen hvsock://my-vm/" in caplog.text
    assert "cannot create a Hyper-V socket" in caplog.text


async def test_accept_error_looks_the_vm_up_again(
    api: TcpApi, wsl_restarts: tuple[MutableLookup, VmResolver], model: hvsock.IoModel
) -> None:
    """An accept() error on a VM name's socket: if the VmId changed, listen on the new one; else raise."""
    lookup, resolver = wsl_restarts
    with trio.fail_after(LIMIT):
        listener = await hvsock.open_hvsock_listener(
            hv("hvsock://wsl/0"), RouteOptions(), HyperVSockets(resolver, io_model=model, api=api)
        )
        lookup.vms["wsl"] = VM_C
        listener.socket.shutdown(socket.SHUT_RDWR)  # accept() now fails with EINVAL
        async with trio.open_nursery() as nursery:
            accepted: list[trio.abc.HalfCloseableStream] = []
            nursery.start_soon(accept_into, listener, accepted)
            while listener.vm_id != VM_C:  # noqa: ASYNC110 - rebinding is the accept task's doing
                await trio.sleep(0.001)
            client = await trio.open_tcp_stream(*listener.socket.getsockname())
        await accepted[0].aclose()
        await client.aclose()
        listener.socket.shutdown(socket.SHUT_RDWR)
        with pytest.raises(OSError, match="Invalid argument"):
            await listener.accept()  # same VmId: the error is the caller's
        await listener.aclose()


async def test_guid_listener_never_looks_up(api: TcpApi, model: hvsock.IoModel) -> None:
    lookup = MutableLookup({})
    resolver = VmResolver(lookup)
    with trio.fail_after(LIMIT):
        listener = await hvsock.open_hvsock_listener(
            hv(f"hvsock://{VM_A}/0"),
            RouteOptions(),
            HyperVSockets(resolver, io_model=model, api=api),
            recheck_interval=0.001,
        )
        assert not await listener.refresh()
        await connect_and_accept(listener)
        listener.socket.shutdown(socket.SHUT_RDWR)
        with pytest.raises(OSError, match="Invalid argument"):
            await listener.accept()
        await listener.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await listener.accept()
    assert lookup.asked == 0
