"""Tests for hvbridge.relay: the byte relay between two half-closeable streams.

Rules for this module: memory streams (trio.testing) for the core semantics, real loopback
socket pairs (AF_UNIX socketpair, TCP on 127.0.0.1:0) for the recv_into fast path and for
resets. Timeouts run on the autojump clock; there are no real sleeps. Every test is bounded
with trio.fail_after so a hang fails instead of stalling the suite.
"""

from __future__ import annotations

import errno
import fcntl
import random
import socket
import struct
import termios
from typing import TYPE_CHECKING, Final, final

import pytest
import trio
import trio.testing
from support.settle import settled
from trio.testing import MemoryReceiveStream, MemorySendStream, memory_stream_pump

from hvbridge.backend import Backend
from hvbridge.relay import relay, splice
from hvbridge.relay.ends import EndReason, Side, Transfer, eof_end, failure_end
from hvbridge.relay.pump import DEFAULT_BUFFER_SIZE, BufferPool
from hvbridge.transports.base import abort

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

MemoryStream = trio.StapledStream[MemorySendStream, MemoryReceiveStream]
Stream = trio.abc.HalfCloseableStream

#: Generous bound for one test; real deadlines come from the autojump clock.
LIMIT: Final = 10.0
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


# ------------------------------------------------------------------------------------ helpers


def use_path(path: str) -> bool:
    """relay()'s `splice` for two socket streams on the recv_into path, or the splice path (Linux)."""
    if path == "splice" and not splice.enabled:  # pragma: no cover - Linux only
        pytest.skip("splice() and epoll are Linux only")
    return path == "splice"


@pytest.fixture(params=["recv_into", "splice"])
def spliced(request: pytest.FixtureRequest) -> bool:
    """Run a test with two socket streams on each relay path: recv_into, and splice (Linux).

    Streams that are not both TCP/Unix sockets always take the recv_into path.
    """
    return use_path(request.param)


def random_chunk_pair(rng: random.Random) -> tuple[MemoryStream, MemoryStream]:
    """A memory_stream_pair whose bytes arrive in random chunks of 1..64 bytes."""

    def one_way() -> tuple[MemorySendStream, MemoryReceiveStream]:
        send = MemorySendStream()
        receive = MemoryReceiveStream()

        def pump() -> None:
            memory_stream_pump(send, receive, max_bytes=rng.randint(1, 64))

        async def async_pump() -> None:
            pump()
            await trio.lowlevel.checkpoint()

        # The writer pushes one chunk per send_all; the reader pulls one more per receive_some,
        # so whatever is left behind (and finally the EOF) still arrives.
        send.send_all_hook = async_pump
        send.close_hook = pump
        receive.receive_some_hook = async_pump
        return send, receive

    left_send, right_receive = one_way()
    right_send, left_receive = one_way()
    return trio.StapledStream(left_send, left_receive), trio.StapledStream(right_send, right_receive)


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected pair of TCP socket streams on 127.0.0.1."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    try:
        connected = await trio.testing.open_stream_to_socket_listener(listener)
        accepted = await listener.accept()
    finally:
        await listener.aclose()
    assert isinstance(accepted, trio.SocketStream)
    return connected, accepted


def unix_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected pair of AF_UNIX socket streams."""
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything `stream` delivers up to EOF."""
    received = bytearray()
    while data := await stream.receive_some():
        received += data
    return bytes(received)


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    """Exactly `size` bytes (fails on an early EOF)."""
    received = bytearray()
    while len(received) < size:
        data = await stream.receive_some(size - len(received))
        assert data, f"EOF after {len(received)} of {size} bytes"
        received += data
    return bytes(received)


async def send_in_chunks(stream: trio.abc.HalfCloseableStream, payload: bytes, rng: random.Random) -> None:
    """Send `payload` in random-sized writes, then EOF."""
    offset = 0
    while offset < len(payload):
        size = rng.randint(1, 3000)
        await stream.send_all(payload[offset : offset + size])
        offset += size
    await stream.send_eof()


async def assert_closed(stream: Stream) -> None:
    """`stream` was closed by the relay: both halves refuse to work."""
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some(1)


def reset(stream: trio.SocketStream) -> None:
    """Make the next close of `stream` send RST instead of FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def unread_bytes(sock: socket.socket | trio.socket.SocketType) -> int:
    """Bytes waiting in the socket's receive queue (FIONREAD)."""
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    value: int = struct.unpack("i", raw)[0]
    return value


def outcome(transfer: Transfer) -> tuple[int, int, str]:
    """A Transfer's counts and reason (Transfer compares by identity)."""
    return transfer.client_to_backend, transfer.backend_to_client, transfer.reason


def prefilled_pool(size: int, count: int) -> BufferPool:
    """A pool holding `count` free buffers: while it has one free, it never allocates.

    So `pool.free == count` proves nothing is outstanding, and `count - 1` that one is.
    """
    pool = BufferPool(size, max_free=count * 2)
    buffers = [pool.take() for _ in range(count)]
    for buffer in buffers:
        pool.give_back(buffer)
    assert pool.free == count
    return pool


@final
class CountingStream(trio.abc.HalfCloseableStream):
    """Wraps a stream and counts the bytes read from it."""

    def __init__(self, inner: Stream) -> None:
        self.inner = inner
        self.received = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        self.received += len(data)
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


async def run_relay(
    nursery: trio.Nursery,
    client: Stream,
    backend: Stream,
    *,
    half_close: bool = True,
    idle_timeout: float = 0.0,
    pool: BufferPool | None = None,
    spliced: bool = True,
) -> tuple[Transfer, trio.Event]:
    """Start relay() in `nursery`; return its live Transfer and an Event set when it returns."""
    transfer = Transfer()
    done = trio.Event()

    async def run() -> None:
        result = await relay(
            client,
            backend,
            half_close=half_close,
            idle_timeout=idle_timeout,
            pool=pool,
            transfer=transfer,
            splice=spliced,
        )
        assert result is transfer
        done.set()

    nursery.start_soon(run)
    await settled()
    return transfer, done


# ------------------------------------------------------------------------- bytes and ordering


@pytest.mark.parametrize("seed", range(6))
async def test_bytes_complete_and_in_order_both_ways_in_random_chunks(seed: int) -> None:
    rng = random.Random(seed)
    client, client_relay_end = random_chunk_pair(rng)
    backend_relay_end, backend = random_chunk_pair(rng)
    upload = rng.randbytes(rng.randint(0, 20_000))
    download = rng.randbytes(rng.randint(0, 20_000))
    received: dict[str, bytes] = {}

    async def collect(name: str, stream: Stream) -> None:
        received[name] = await receive_all(stream)

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            transfer, done = await run_relay(nursery, client_relay_end, backend_relay_end)
            nursery.start_soon(send_in_chunks, client, upload, random.Random(seed + 100))
            nursery.start_soon(send_in_chunks, backend, download, random.Random(seed + 200))
            nursery.start_soon(collect, "backend", backend)
            nursery.start_soon(collect, "client", client)
            await done.wait()

    assert received == {"backend": upload, "client": download}
    assert outcome(transfer) == (len(upload), len(download), "closed")
    await assert_closed(client_relay_end)
    await assert_closed(backend_relay_end)


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("unix", "recv_into"),
        ("unix", "splice"),
        ("tcp", "recv_into"),
        ("tcp", "splice"),
        # One socket side: always the recv_into path, one direction through pooled buffers.
        ("socket-to-memory", "recv_into"),
        ("memory-to-socket", "recv_into"),
    ],
)
async def test_bytes_complete_and_in_order_over_sockets(kind: str, path: str) -> None:
    spliced = use_path(path)
    rng = random.Random(kind)
    client: Stream
    client_relay_end: Stream
    backend_relay_end: Stream
    backend: Stream
    if kind == "unix":
        (client, client_relay_end), (backend_relay_end, backend) = unix_pair(), unix_pair()
    elif kind == "tcp":
        (client, client_relay_end), (backend_relay_end, backend) = await tcp_pair(), await tcp_pair()
    elif kind == "socket-to-memory":
        (client, client_relay_end), (backend_relay_end, backend) = unix_pair(), random_chunk_pair(rng)
    else:
        (client, client_relay_end), (backend_relay_end, backend) = random_chunk_pair(rng), unix_pair()
    # Larger than the kernel buffers and several relay buffers, so both directions block at times.
    upload = rng.randbytes(600_000 if "memory" not in kind else 24_000)
    download = rng.randbytes(450_000 if "memory" not in kind else 18_000)
    pool = prefilled_pool(16 * 1024, 4)
    received: dict[str, bytes] = {}

    async def collect(name: str, stream: Stream) -> None:
        received[name] = await receive_all(stream)

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            transfer, done = await run_relay(nursery, client_relay_end, backend_relay_end, pool=pool, spliced=spliced)
            nursery.start_soon(send_in_chunks, client, upload, random.Random(1))
            nursery.start_soon(send_in_chunks, backend, download, random.Random(2))
            nursery.start_soon(collect, "backend", backend)
            nursery.start_soon(collect, "client", client)
            await done.wait()

    assert received["backend"] == upload
    assert received["client"] == download
    assert outcome(transfer) == (len(upload), len(download), "closed")
    assert pool.free == 4  # every buffer came back
    await assert_closed(client_relay_end)
    await assert_closed(backend_relay_end)
    await client.aclose()
    await backend.aclose()


# ---------------------------------------------------------------------------------- half-close


@pytest.mark.parametrize("first", ["client", "backend"])
async def test_eof_is_passed_on_while_the_other_direction_keeps_flowing(first: str) -> None:
    client, client_relay_end = trio.testing.memory_stream_pair()
    backend_relay_end, backend = trio.testing.memory_stream_pair()
    # `quiet` sends EOF first; `talker` keeps sending afterwards.
    quiet, quiet_peer, talker, talker_peer = (
        (client, backend, backend, client) if first == "client" else (backend, client, client, backend)
    )
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            transfer, done = await run_relay(nursery, client_relay_end, backend_relay_end)
            await quiet.send_all(b"request")
            await quiet.send_eof()
            assert await receive_all(quiet_peer) == b"request"  # EOF arrived as EOF
            assert transfer.reason == ""  # still relaying the other way

            for i in range(5):
                await talker.send_all(b"response %d;" % i)
                assert await receive_exactly(talker_peer, 11) == b"response %d;" % i
            assert not done.is_set()
            await talker.send_eof()
            assert await receive_all(talker_peer) == b""
            await done.wait()

    assert transfer.reason == "closed"
    assert (transfer.client_to_backend, transfer.backend_to_client) == ((7, 55) if first == "client" else (55, 7))
    await assert_closed(client_relay_end)
    await assert_closed(backend_relay_end)


async def test_eof_over_sockets_is_a_write_shutdown(spliced: bool) -> None:
    client, client_relay_end = await tcp_pair()
    backend_relay_end, backend = await tcp_pair()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            transfer, done = await run_relay(nursery, client_relay_end, backend_relay_end, spliced=spliced)
            await client.send_all(b"GET /")
            await client.send_eof()
            assert await receive_all(backend) == b"GET /"
            await backend.send_all(b"200 OK")  # the backend can still answer
            assert await receive_exactly(client, 6) == b"200 OK"
            await backend.send_eof()
            assert await receive_all(client) == b""
            await done.wait()
    assert outcome(transfer) == (5, 6, "closed")
    await client.aclose()
    await backend.aclose()


@pytest.mark.parametrize("side", ["client", "backend"])
async def test_without_half_close_the_first_eof_closes_both(side: str) -> None:
    client, client_relay_end = trio.testing.memory_stream_pair()
    backend_relay_end, backend = trio.testing.memory_stream_pair()
    closing, other = (client, backend) if side == "client" else (backend, client)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            transfer, done = await run_relay(nursery, client_relay_end, backend_relay_end, half_close=False)
            await closing.send_all(b"bye")
            await closing.send_eof()
            await done.wait()
    assert transfer.reason == f"closed by {side}"
    assert await receive_all(other) == b"bye"
    assert await receive_all(closing) == b""
    with pytest.raises(trio.BrokenResourceError):
        await other.send_all(b"too late")
    await assert_closed(client_relay_end)
    await assert_closed(backend_relay_end)


# ------------------------------------------------------------------------------------- resets


def _raise_broken() -> Callable[[], Awaitable[None]]:
    async def hook() -> None:
        await trio.lowlevel.checkpoint()
        raise trio.BrokenResourceError

    return hook


@pytest.mark.parametrize(
    ("side", "hook"),
    [
        ("client", "receive_some_hook"),
        ("client", "send_all_hook"),
        ("backend", "receive_some_hook"),
        ("backend", "send_all_hook"),
    ],
)
async def test_a_reset_on_one_side_closes_both(side: str, hook: str) -> None:
    client, client_relay_end = trio.testing.memory_stream_pair()
    backend_relay_end, backend = trio.testing.memory_stream_pair()
    failing = client_relay_end if side == "client" else backend_relay_end
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            transfer, done = await run_relay(nursery, client_relay_end, backend_relay_end)
            await client.send_all(b"ping")
            assert await receive_exactly(backend, 4) == b"ping"
            if hook == "receive_some_hook":
                failing.receive_stream.receive_some_hook = _raise_broken()
            else:
                failing.send_stream.send_all_hook = _raise_broken()
            # Traffic both ways reaches the failing hook whichever it is.
            await client.send_all(b"a")
            await backend.send_all(b"b")
            await done.wait()
        # The healthy side's peer sees the end too.
        healthy_peer = backend if side == "client" else client
        assert await receive_all(healthy_peer) in (b"", b"a", b"b")
    assert transfer.reason == f"reset by {side}"
    await assert_closed(client_relay_end)
    await assert_closed(backend_relay_end)


@pytest.mark.parametrize(
    ("cause", "reason"),
    [
        (OSError(errno.EIO, "Input/output error"), "backend error: EIO Input/output error"),
        (OSError(errno.ECONNRESET, "Connection reset by peer"), "reset by backend"),
        # shutdown()/send() on a socket whose peer already reset it (seen in the soak).
        (OSError(errno.ENOTCONN, "Transport endpoint is not connected"), "reset by backend"),
        (ValueError("odd"), "backend error: ValueError: odd"),
        (ValueError(), "backend error: ValueError"),
    ],
)
async def test_a_failure_names_its_cause(cause: Exception, reason: str) -> None:
    client, client_relay_end = trio.testing.memory_stream_pair()
    backend_relay_end, _backend = trio.testing.memory_stream_pair()

    async def hook() -> None:
        await trio.lowlevel.checkpoint()
        raise trio.BrokenResourceError("socket broke") from cause

    backend_relay_end.send_stream.send_all_hook = hook
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            transfer, done = await run_relay(nursery, client_relay_end, backend_relay_end)
            await client.send_all(b"x")
            await done.wait()
    assert transfer.reason == reason


async def test_an_oserror_without_errno_is_described_by_its_type() -> None:
    client, client_relay_end = trio.testing.memory_stream_pair()
    backend_relay_end, _backend = trio.testing.memory_stream_pair()

    async def hook() -> None:
        await trio.lowlevel.checkpoint()
        raise OSError("no errno here")

    client_relay_end.receive_stream.receive_some_hook = hook
    with trio.fail_after(LIMIT):
        transfer = await relay(client_relay_end, backend_relay_end)
    assert transfer.reason == "client error: OSError: no errno here"
    await assert_closed(backend_relay_end)
    assert await receive_all(client) == b""


async def test_both_sides_failing_at_once_reports_one() -> None:
    _client, client_relay_end = trio.testing.memory_stream_pair()
    backend_relay_end, _backend = trio.testing.memory_stream_pair()
    fail_now = trio.Event()

    async def hook() -> None:
        await fail_now.wait()
        raise trio.BrokenResourceError

    client_relay_end.receive_stream.receive_some_hook = hook
    backend_relay_end.receive_stream.receive_some_hook = hook
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            transfer, done = await run_relay(nursery, client_relay_end, backend_relay_end)
            fail_now.set()  # wakes both directions in the same scheduler batch
            await done.wait()
    assert transfer.reason in ("reset by client", "reset by backend")
    await assert_closed(client_relay_end)
    await assert_closed(backend_relay_end)


async def test_a_failing_send_eof_resets_both() -> None:
    client, client_relay_end = trio.testing.memory_stream_pair()
    backend_relay_end, backend = trio.testing.memory_stream_pair()
    calls = 0

    def close_hook() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # the send_eof; the final close must work
            raise trio.BrokenResourceError

    backend_relay_end.send_stream.close_hook = close_hook
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            transfer, done = await run_relay(nursery, client_relay_end, backend_relay_end)
            await client.send_eof()
            await done.wait()
    assert transfer.reason == "reset by backend"
    assert await receive_all(client) == b""
    await assert_closed(client_relay_end)
    del backend


async def test_a_failed_write_after_a_socket_read_resets_both() -> None:
    # TCP, since a Unix socket cannot signal a reset; a memory backend keeps the recv_into path.
    client, client_relay_end = await tcp_pair()
    backend_relay_end, _backend = trio.testing.memory_stream_pair()
    backend_relay_end.send_stream.send_all_hook = _raise_broken()
    pool = prefilled_pool(4096, 2)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            transfer, done = await run_relay(nursery, client_relay_end, backend_relay_end, pool=pool)
            await client.send_all(b"to a broken backend")
            await done.wait()
        with pytest.raises(trio.BrokenResourceError) as failure:
            await client.receive_some()
    assert isinstance(failure.value.__cause__, ConnectionResetError)
    assert transfer.reason == "reset by backend"
    assert pool.free == 2  # the buffer came back on the failure path too
    await client.aclose()


async def test_a_socket_closed_under_the_relay_ends_it() -> None:
    client, client_relay_end = unix_pair()
    backend_relay_end, backend = trio.testing.memory_stream_pair()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            transfer, done = await run_relay(nursery, client_relay_end, backend_relay_end)
            client_relay_end.socket.close()  # a bug elsewhere; the relay must not hang on it
            await done.wait()
        assert await receive_all(backend) == b""
    assert transfer.reason == "client error: ClosedResourceError: another task closed this fd"
    await client.aclose()


@pytest.mark.parametrize("side", ["client", "backend"])
async def test_a_tcp_reset_is_passed_on_as_a_reset(side: str, spliced: bool) -> None:
    client, client_relay_end = await tcp_pair()
    backend_relay_end, backend = await tcp_pair()
    resetting, other = (client, backend) if side == "client" else (backend, client)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            transfer, done = await run_relay(nursery, client_relay_end, backend_relay_end, spliced=spliced)
            await client.send_all(b"hello")
            assert await receive_exactly(backend, 5) == b"hello"
            await backend.send_all(b"world")
            assert await receive_exactly(client, 5) == b"world"
            reset(resetting)
            await resetting.aclose()
            with pytest.raises(trio.BrokenResourceError) as failure:
                await other.receive_some()  # a reset, never a clean EOF
            await done.wait()
    assert isinstance(failure.value.__cause__, ConnectionResetError)
    assert outcome(transfer) == (5, 5, f"reset by {side}")
    await other.aclose()


async def test_abort_tolerates_a_closed_socket_and_non_sockets() -> None:
    a, b = unix_pair()
    await a.aclose()
    await abort(a)  # setsockopt on a closed socket fails; abort still returns
    memory, _ = trio.testing.memory_stream_pair()
    await abort(memory)
    await assert_closed(memory)
    await b.aclose()


# ------------------------------------------------------------------------------- backpressure


async def test_a_reader_that_does_not_read_stops_the_relay_reading() -> None:
    client, client_relay_memory = trio.testing.memory_stream_pair()
    client_relay_end = CountingStream(client_relay_memory)
    backend_relay_end, backend = trio.testing.lockstep_stream_pair()
    pool = BufferPool(4096)
    payload = random.Random(7).randbytes(1_000_000)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            transfer, done = await run_relay(nursery, client_relay_end, backend_relay_end, pool=pool)
            await client.send_all(payload)  # memory streams buffer all of it
            await client.send_eof()
            await settled()
            # The backend reads nothing, so the relay holds at most one chunk.
            assert 0 < client_relay_end.received <= pool.size
            assert transfer.client_to_backend == 0

            # As the backend reads, the relay reads: never more than a chunk ahead.
            received = bytearray()
            while data := await backend.receive_some(1000):
                received += data
                await settled()
                assert client_relay_end.received - len(received) <= pool.size
            assert received == payload
            await backend.send_eof()
            await done.wait()
    assert outcome(transfer) == (len(payload), 0, "closed")


async def test_a_socket_direction_reads_at_most_one_buffer_ahead() -> None:
    source, relay_side = socket.socketpair()
    source.setblocking(False)
    client_relay_end = trio.SocketStream(trio.socket.from_stdlib_socket(relay_side))
    backend_relay_end, backend = trio.testing.lockstep_stream_pair()
    pool = prefilled_pool(16 * 1024, 3)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            transfer, done = await run_relay(nursery, client_relay_end, backend_relay_end, pool=pool)
            # Fill the socket until the kernel pushes back.
            written = bytearray()
            rng = random.Random(3)
            while True:
                chunk = rng.randbytes(4096)
                try:
                    sent = source.send(chunk)
                except BlockingIOError:
                    break
                written += chunk[:sent]
            await settled()
            read_by_relay = len(written) - unread_bytes(client_relay_end.socket)
            assert 0 < read_by_relay <= pool.size
            assert pool.free == 2  # exactly one buffer is in flight
            assert transfer.client_to_backend == 0

            source.shutdown(socket.SHUT_WR)
            assert await receive_all(backend) == written
            await backend.send_eof()
            await done.wait()
    source.close()
    assert outcome(transfer) == (len(written), 0, "closed")
    assert pool.free == 3


# ------------------------------------------------------------------------------- idle timeout


async def test_idle_timeout_closes_both(autojump_clock: trio.testing.MockClock) -> None:
    client, client_relay_end = trio.testing.memory_stream_pair()
    backend_relay_end, backend = trio.testing.memory_stream_pair()
    with trio.fail_after(LIMIT * 10):
        start = trio.current_time()
        transfer = await relay(client_relay_end, backend_relay_end, idle_timeout=30)
        assert trio.current_time() - start == pytest.approx(30)
    assert outcome(transfer) == (0, 0, "idle timeout")
    await assert_closed(client_relay_end)
    await assert_closed(backend_relay_end)
    assert await receive_all(client) == b""
    assert await receive_all(backend) == b""


async def test_activity_either_way_resets_the_idle_timer(autojump_clock: trio.testing.MockClock) -> None:
    client, client_relay_end = trio.testing.memory_stream_pair()
    backend_relay_end, backend = trio.testing.memory_stream_pair()
    with trio.fail_after(LIMIT * 10):
        async with trio.open_nursery() as nursery:
            transfer, done = await run_relay(nursery, client_relay_end, backend_relay_end, idle_timeout=10)
            start = trio.current_time()
            for i in range(6):  # 6 x 8 s = 48 s, far beyond the timeout, but never 10 s idle
                await trio.sleep(8)
                if i % 2:
                    await client.send_all(b"c")
                    assert await backend.receive_some() == b"c"
                else:
                    await backend.send_all(b"b")
                    assert await client.receive_some() == b"b"
            assert not done.is_set()
            last_activity = trio.current_time()
            await done.wait()
            ended = trio.current_time()
    assert last_activity - start == pytest.approx(48)
    assert ended - last_activity == pytest.approx(10)
    assert outcome(transfer) == (3, 3, "idle timeout")


async def test_half_closed_connection_still_times_out(autojump_clock: trio.testing.MockClock) -> None:
    client, client_relay_end = trio.testing.memory_stream_pair()
    backend_relay_end, backend = trio.testing.memory_stream_pair()
    with trio.fail_after(LIMIT * 10):
        async with trio.open_nursery() as nursery:
            transfer, done = await run_relay(nursery, client_relay_end, backend_relay_end, idle_timeout=5)
            await client.send_eof()
            assert await receive_all(backend) == b""
            await done.wait()
    assert transfer.reason == "idle timeout"


async def test_an_idle_socket_connection_holds_no_buffer() -> None:
    client, client_relay_end = unix_pair()
    backend_relay_end, backend = unix_pair()
    pool = prefilled_pool(8192, 4)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            # The recv_into path; splice.py pools pipes.
            transfer, _ = await run_relay(nursery, client_relay_end, backend_relay_end, pool=pool, spliced=False)
            for _ in range(3):
                await client.send_all(b"q" * 20_000)
                assert await receive_exactly(backend, 20_000) == b"q" * 20_000
                await backend.send_all(b"a" * 30_000)
                assert await receive_exactly(client, 30_000) == b"a" * 30_000
                await settled()
                # Both directions wait for readability without a buffer in hand.
                assert pool.free == 4
            assert outcome(transfer) == (60_000, 90_000, "")
            nursery.cancel_scope.cancel()
    assert pool.free == 4
    await client.aclose()
    await backend.aclose()


# ----------------------------------------------------------------------- cancellation, counts


@pytest.mark.parametrize("kind", ["memory", "socket"])
async def test_cancellation_from_outside_closes_both(kind: str, spliced: bool) -> None:
    client_relay_end: Stream
    backend_relay_end: Stream
    peers: list[Stream]
    if kind == "memory":
        client, client_relay_end = trio.testing.memory_stream_pair()
        backend_relay_end, backend = trio.testing.memory_stream_pair()
        peers = [client, backend]
    else:
        unix_client, client_relay_end = unix_pair()
        backend_relay_end, unix_backend = unix_pair()
        peers = [unix_client, unix_backend]
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            transfer, done = await run_relay(nursery, client_relay_end, backend_relay_end, spliced=spliced)
            await peers[0].send_all(b"half a request")
            await settled()
            nursery.cancel_scope.cancel()
    assert not done.is_set()
    assert transfer.reason == "cancelled"
    assert transfer.client_to_backend == 14
    await assert_closed(client_relay_end)
    await assert_closed(backend_relay_end)
    for peer in peers:
        assert await receive_all(peer) in (b"", b"half a request")
        await peer.aclose()


async def test_transfer_counts_are_updated_live() -> None:
    client, client_relay_end = trio.testing.memory_stream_pair()
    backend_relay_end, backend = trio.testing.memory_stream_pair()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            transfer, done = await run_relay(nursery, client_relay_end, backend_relay_end)
            assert outcome(transfer) == (0, 0, "")
            await client.send_all(b"12345")
            await receive_exactly(backend, 5)
            await settled()
            assert outcome(transfer) == (5, 0, "")
            await backend.send_all(b"1234567")
            await receive_exactly(client, 7)
            await settled()
            assert outcome(transfer) == (5, 7, "")
            await client.send_eof()
            await backend.send_eof()
            await done.wait()
    assert outcome(transfer) == (5, 7, "closed")


async def test_relay_without_a_transfer_returns_a_new_one() -> None:
    client, client_relay_end = trio.testing.memory_stream_pair()
    backend_relay_end, backend = trio.testing.memory_stream_pair()
    await client.send_all(b"abc")
    await client.send_eof()
    await backend.send_eof()
    with trio.fail_after(LIMIT):
        transfer = await relay(client_relay_end, backend_relay_end)
    assert outcome(transfer) == (3, 0, "closed")
    assert await receive_all(backend) == b"abc"


# ------------------------------------------------------------------------------- buffer pools


def test_buffer_pool_reuses_and_caps_free_buffers() -> None:
    pool = BufferPool(100, max_free=2)
    assert pool.size == 100
    assert pool.free == 0
    buffers = [pool.take() for _ in range(3)]
    assert all(len(b) == 100 for b in buffers)
    for buffer in buffers:
        pool.give_back(buffer)
    assert pool.free == 2  # the third was dropped
    assert pool.take() is buffers[1]
    assert pool.free == 1


def test_buffer_pool_is_one_per_size() -> None:
    backend = Backend()
    assert backend.buffer_pool() is backend.buffer_pool(DEFAULT_BUFFER_SIZE)
    assert backend.buffer_pool(1234) is backend.buffer_pool(1234)
    assert backend.buffer_pool(1234) is not backend.buffer_pool()
    assert backend.buffer_pool(1234).size == 1234
    assert Backend().buffer_pool() is not backend.buffer_pool()  # one set per Backend


# ------------------------------------------------------------------ ends.py: the end-of-relay rules


@pytest.mark.parametrize(
    ("side", "half_close", "open_directions", "end"),
    [
        ("client", False, 1, EndReason.CLOSED_BY_CLIENT),
        ("backend", False, 1, EndReason.CLOSED_BY_BACKEND),
        ("client", True, 1, None),
        ("backend", True, 0, EndReason.CLOSED),
    ],
)
def test_eof_end(side: Side, half_close: bool, open_directions: int, end: EndReason | None) -> None:
    assert eof_end(side, half_close=half_close, directions_open=open_directions) is end


def test_failure_end_tells_a_reset_from_an_error() -> None:
    reset = OSError(errno.ECONNRESET, "Connection reset by peer")
    assert failure_end("backend", trio.BrokenResourceError("x")) == (EndReason.RESET_BY_BACKEND, "")
    wrapped = trio.BrokenResourceError("broken")
    wrapped.__cause__ = reset
    assert failure_end("client", wrapped) == (EndReason.RESET_BY_CLIENT, "")
    refused = OSError(errno.EACCES, "Permission denied")
    assert failure_end("client", refused) == (EndReason.CLIENT_ERROR, "EACCES Permission denied")


def test_end_reason_text_label_and_transfer_reason() -> None:
    assert EndReason.CLOSED_BY_CLIENT.label == "closed_by_client"
    assert EndReason.CONNECT_FAILED.not_relayed
    assert not EndReason.CLOSED.not_relayed
    transfer = Transfer()
    assert transfer.reason == ""
    transfer.end, transfer.detail = EndReason.CONNECT_FAILED, "timed out after 0.5s"
    assert transfer.reason == "connect failed: timed out after 0.5s"
