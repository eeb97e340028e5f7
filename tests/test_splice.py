"""Tests for hvbridge.relay.splice: the relay's Linux fast path (splice through pooled pipes).

Rules for this module: real loopback socket pairs only (TCP on 127.0.0.1, AF_UNIX socketpair),
driven through relay.relay(), which picks the splice path for two socket streams. The reactor
moves bytes in its own thread, so "nothing left to do" is settled() (trio's tasks and the
reactor both), and idle timeouts run on the real clock with sub-second timeouts: the autojump
clock would jump while the reactor thread is still moving bytes. Every test is bounded with
trio.fail_after. The whole module is Linux only (splice() and epoll).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import socket
import struct
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final, final

import attrs
import pytest
import trio
import trio.testing
from support.settle import settled

from hvbridge.relay import relay, splice
from hvbridge.relay.ends import Transfer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.skipif(not splice.enabled, reason="splice() and epoll are Linux only")

LIMIT: Final = 10.0
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
FAMILIES: Final = ["tcp", "unix"]
_MADE: list[trio.SocketStream] = []  # closed after each test by close_outer_ends


# ------------------------------------------------------------------------------------ helpers


def socket_pair(family: str) -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two connected stream sockets of `family` ("tcp" or "unix"), as trio streams."""
    if family == "unix":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            a = socket.create_connection(listener.getsockname())
            b, _ = listener.accept()
    pair = trio.SocketStream(trio.socket.from_stdlib_socket(a)), trio.SocketStream(trio.socket.from_stdlib_socket(b))
    _MADE.extend(pair)
    return pair


@final
@attrs.define(eq=False)
class Relayed:
    """A relay running between two socket pairs; the test holds the outer ends."""

    client: trio.SocketStream  # the test is the client here...
    backend: trio.SocketStream  # ...and the backend server here
    inner: tuple[trio.SocketStream, trio.SocketStream]  # what relay() got
    transfer: Transfer
    done: trio.Event
    scope: trio.CancelScope
    error: list[BaseException] = attrs.field(factory=list)


async def start_relay(
    nursery: trio.Nursery, family: str, *, half_close: bool = True, idle_timeout: float = 0.0
) -> Relayed:
    """Start relay() on a fresh pair of socket pairs of `family`."""
    client, client_inner = socket_pair(family)
    backend_inner, backend = socket_pair(family)
    assert splice.spliceable(client_inner, backend_inner)
    relayed = Relayed(client, backend, (client_inner, backend_inner), Transfer(), trio.Event(), trio.CancelScope())

    async def run() -> None:
        try:
            with relayed.scope:
                await relay(
                    client_inner,
                    backend_inner,
                    half_close=half_close,
                    idle_timeout=idle_timeout,
                    transfer=relayed.transfer,
                )
        except Exception as exc:
            relayed.error.append(exc)
        finally:
            relayed.done.set()

    nursery.start_soon(run)
    await settled()
    return relayed


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything until EOF."""
    chunks = []
    while chunk := await stream.receive_some(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


async def read_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    """Exactly n bytes."""
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return bytes(data)


def reset(stream: trio.SocketStream) -> None:
    """Close with SO_LINGER 0: the peer sees RST (TCP)."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    stream.socket.close()


def closed(stream: trio.SocketStream) -> bool:
    """True if relay() closed this (inner) stream."""
    return stream.socket.fileno() == -1


@pytest.fixture
async def pool() -> splice.PipePool:
    """The test run's pipe pool (the reactor is per trio run)."""
    return splice.pipe_pool()


@pytest.fixture(autouse=True)
async def close_outer_ends() -> AsyncIterator[None]:
    """Close every socket socket_pair() made once the test is over (no ResourceWarning)."""
    yield
    while _MADE:
        await trio.aclose_forcefully(_MADE.pop())


# -------------------------------------------------------------------------------------- tests


async def test_spliceable_only_for_two_tcp_or_unix_socket_streams() -> None:
    unix, _ = socket_pair("unix")
    tcp, _ = socket_pair("tcp")
    memory, _ = trio.testing.memory_stream_pair()
    assert splice.spliceable(unix, tcp)
    assert not splice.spliceable(unix, memory)
    assert not splice.spliceable(memory, tcp)
    if hasattr(socket, "AF_VSOCK"):
        try:
            vsock = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        except OSError:  # pragma: no cover - no vsock transport on this host
            pass
        else:
            with vsock:
                assert not splice.spliceable(unix, trio.SocketStream(vsock))


@pytest.mark.parametrize("family", FAMILIES)
async def test_bytes_arrive_intact_both_ways_at_once(family: str, nursery: trio.Nursery, pool: splice.PipePool) -> None:
    rng = random.Random(7)
    up = rng.randbytes(3 << 20)
    down = rng.randbytes(5 << 20)
    with trio.fail_after(LIMIT):
        r = await start_relay(nursery, family)
        got: dict[str, bytes] = {}

        async def send(stream: trio.SocketStream, data: bytes) -> None:
            await stream.send_all(data)
            await stream.send_eof()

        async def receive(stream: trio.SocketStream, key: str) -> None:
            got[key] = await read_all(stream)

        async with trio.open_nursery() as both:
            both.start_soon(send, r.client, up)
            both.start_soon(send, r.backend, down)
            both.start_soon(receive, r.client, "down")
            both.start_soon(receive, r.backend, "up")
        await r.done.wait()
    assert got == {"up": up, "down": down}
    assert (r.transfer.client_to_backend, r.transfer.backend_to_client) == (len(up), len(down))
    assert r.transfer.reason == "closed"
    assert closed(r.inner[0])
    assert closed(r.inner[1])
    assert pool.in_use == 0


@pytest.mark.parametrize("family", FAMILIES)
async def test_half_close_lets_the_other_way_flow(family: str, nursery: trio.Nursery) -> None:
    with trio.fail_after(LIMIT):
        r = await start_relay(nursery, family)
        await r.client.send_all(b"request")
        await r.client.send_eof()
        assert await read_all(r.backend) == b"request"  # EOF arrived...
        await r.backend.send_all(b"response after EOF")  # ...and this way still flows
        await r.backend.send_eof()
        assert await read_all(r.client) == b"response after EOF"
        await r.done.wait()
    assert r.transfer.reason == "closed"
    assert (r.transfer.client_to_backend, r.transfer.backend_to_client) == (7, 18)


@pytest.mark.parametrize("family", FAMILIES)
async def test_without_half_close_the_first_eof_ends_both_ways(family: str, nursery: trio.Nursery) -> None:
    with trio.fail_after(LIMIT):
        r = await start_relay(nursery, family, half_close=False)
        await r.backend.send_all(b"hello")
        await r.backend.send_eof()
        assert await read_all(r.client) == b"hello"
        assert await read_all(r.backend) == b""
        await r.done.wait()
    assert r.transfer.reason == "closed by backend"


async def test_reset_by_the_client_resets_the_backend(nursery: trio.Nursery, pool: splice.PipePool) -> None:
    with trio.fail_after(LIMIT):
        r = await start_relay(nursery, "tcp")
        await r.client.send_all(b"x")
        assert await read_exactly(r.backend, 1) == b"x"
        reset(r.client)
        await r.done.wait()
        with pytest.raises(trio.BrokenResourceError) as info:
            await r.backend.receive_some(1)
    assert isinstance(info.value.__cause__, ConnectionResetError)
    assert r.transfer.reason == "reset by client"
    assert closed(r.inner[0])
    assert closed(r.inner[1])
    assert pool.in_use == 0


async def fill_until_blocked(r: Relayed, nursery: trio.Nursery, data: bytes) -> int:
    """Send `data` from the client in the background until the relay stops reading from it."""

    async def send() -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # the relay may reset the client
            await r.client.send_all(data)

    nursery.start_soon(send)
    await settled()
    moved = r.transfer.client_to_backend
    assert 0 < moved < len(data)
    return moved


@pytest.mark.parametrize("family", FAMILIES)
async def test_backpressure_holds_one_pipe_and_stops_reading(
    family: str, nursery: trio.Nursery, pool: splice.PipePool
) -> None:
    """A backend that does not read: the relay holds one pipe of bytes and stops reading."""
    data = random.Random(3).randbytes(32 << 20)
    with trio.fail_after(LIMIT):
        r = await start_relay(nursery, family)
        moved = await fill_until_blocked(r, nursery, data)
        stats = await splice.statistics()
        assert stats.pipes.in_use == 1
        assert stats.queued == stats.pending > 0
        assert moved < (16 << 20)  # kernel socket buffers and one pipe, not the 32 MiB sent
        await settled()
        assert r.transfer.client_to_backend == moved  # stopped, not creeping on
        assert await read_exactly(r.backend, len(data)) == data  # and everything arrives
        await settled()
        assert pool.in_use == 0
    assert r.transfer.client_to_backend == len(data)


def sndbuf_ceiling() -> int:
    """net.core.wmem_max: the most SO_SNDBUF may be set to."""
    return int(Path("/proc/sys/net/core/wmem_max").read_text())


async def test_a_unix_send_buffer_grows_to_a_pipe_the_first_time_it_is_full(nursery: trio.Nursery) -> None:
    """A short exchange keeps the default send buffer (no system call for it per connection);
    the first time the destination is full it becomes a pipe's size (the kernel reports twice
    what was set, up to net.core.wmem_max)."""

    def sndbuf(stream: trio.SocketStream) -> int:
        value: int = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        return value

    data = random.Random(5).randbytes(32 << 20)
    with trio.fail_after(LIMIT):
        r = await start_relay(nursery, "unix")
        client_inner, backend_inner = r.inner
        default = sndbuf(backend_inner)
        assert default < 2 * splice.PIPE_SIZE
        await r.client.send_all(b"ping")
        assert await read_exactly(r.backend, 4) == b"ping"
        await settled()
        assert sndbuf(backend_inner) == default  # not full yet: untouched
        await fill_until_blocked(r, nursery, data)
        assert sndbuf(backend_inner) == 2 * min(splice.PIPE_SIZE, sndbuf_ceiling())
        assert sndbuf(client_inner) == default  # nothing filled the other way
        assert await read_exactly(r.backend, len(data)) == data


async def test_reset_with_bytes_in_the_pipe_discards_the_pipe(nursery: trio.Nursery, pool: splice.PipePool) -> None:
    data = random.Random(4).randbytes(32 << 20)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as sender:
            r = await start_relay(nursery, "tcp")
            await fill_until_blocked(r, sender, data)
            assert pool.in_use == 1
            reset(r.backend)
            await r.done.wait()
            sender.cancel_scope.cancel()
    assert r.transfer.reason == "reset by backend"
    assert pool.in_use == 0
    assert (await splice.statistics()).pipes.idle_queued == 0  # never reused with bytes in it


async def test_unix_peer_gone_while_bytes_wait_is_a_reset(nursery: trio.Nursery, pool: splice.PipePool) -> None:
    data = random.Random(5).randbytes(32 << 20)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as sender:
            r = await start_relay(nursery, "unix")
            await fill_until_blocked(r, sender, data)
            r.backend.socket.close()  # unread bytes: the relay's next write fails
            await r.done.wait()
            sender.cancel_scope.cancel()
    assert r.transfer.reason == "reset by backend"
    assert pool.in_use == 0


@pytest.mark.parametrize("family", FAMILIES)
async def test_idle_connection_holds_no_pipe(family: str, nursery: trio.Nursery, pool: splice.PipePool) -> None:
    with trio.fail_after(LIMIT):
        r = await start_relay(nursery, family)
        for _ in range(3):
            await r.client.send_all(b"ping" * 1000)
            assert await read_exactly(r.backend, 4000) == b"ping" * 1000
            await r.backend.send_all(b"pong")
            assert await read_exactly(r.client, 4) == b"pong"
        await settled()
        assert pool.in_use == 0
        assert not r.done.is_set()
        # Counted live, before the relay ends.
        assert (r.transfer.client_to_backend, r.transfer.backend_to_client) == (12000, 12)
        r.scope.cancel()
        await r.done.wait()
    assert r.transfer.reason == "cancelled"
    assert closed(r.inner[0])
    assert closed(r.inner[1])


async def test_cancel_while_idle_closes_both_and_leaves_the_epoll_set(nursery: trio.Nursery) -> None:
    with trio.fail_after(LIMIT):
        r = await start_relay(nursery, "tcp")
        fds = {r.inner[0].socket.fileno(), r.inner[1].socket.fileno()}
        assert fds <= (await splice.statistics()).watched
        r.scope.cancel()
        await r.done.wait()
        assert not fds & (await splice.statistics()).watched
        assert await read_all(r.client) == b""
        assert await read_all(r.backend) == b""
    assert r.transfer.reason == "cancelled"
    assert r.error == []


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
async def test_idle_timeout_counts_from_the_last_byte(family: str, nursery: trio.Nursery) -> None:
    with trio.fail_after(LIMIT):
        r = await start_relay(nursery, family, idle_timeout=0.5)
        start = trio.current_time()
        await trio.sleep(0.3)
        await r.client.send_all(b"still here")
        assert await read_exactly(r.backend, 10) == b"still here"
        await r.done.wait()
    assert r.transfer.reason == "idle timeout"
    assert 0.8 <= trio.current_time() - start < 0.8 + 2.0  # after the last byte + 0.5 s, not the first
    assert closed(r.inner[0])
    assert closed(r.inner[1])
    assert await read_all(r.client) == b""


@pytest.mark.slow
async def test_idle_timeouts_of_many_connections(nursery: trio.Nursery) -> None:
    with trio.fail_after(LIMIT):
        start = trio.current_time()
        short = await start_relay(nursery, "unix", idle_timeout=0.2)
        long = await start_relay(nursery, "unix", idle_timeout=0.8)
        never = await start_relay(nursery, "unix")
        await short.done.wait()
        assert not long.done.is_set()
        await long.done.wait()
        assert trio.current_time() - start >= 0.8
        assert not never.done.is_set()
    assert (short.transfer.reason, long.transfer.reason) == ("idle timeout", "idle timeout")


async def test_a_bug_in_the_reactor_ends_that_connection_only(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(LIMIT):
        healthy = await start_relay(nursery, "unix")
        broken = await start_relay(nursery, "unix")
        real_splice = os.splice
        broken_fd = broken.inner[0].socket.fileno()

        def buggy(
            src: int, dst: int, count: int, offset_src: None = None, offset_dst: None = None, flags: int = 0
        ) -> int:
            if src == broken_fd:
                raise ValueError("a bug")
            return real_splice(src, dst, count, flags=flags)

        monkeypatch.setattr(os, "splice", buggy)
        await broken.client.send_all(b"x")
        await broken.done.wait()
        await healthy.client.send_all(b"fine")
        assert await read_exactly(healthy.backend, 4) == b"fine"
    assert len(broken.error) == 1
    assert isinstance(broken.error[0], ValueError)
    assert closed(broken.inner[0])
    assert closed(broken.inner[1])


async def test_no_descriptor_for_a_pipe_fails_that_connection(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, pool: splice.PipePool
) -> None:
    def no_pipe(self: splice.PipePool) -> splice.Pipe:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    with trio.fail_after(LIMIT):
        r = await start_relay(nursery, "tcp")
        monkeypatch.setattr(splice.PipePool, "take", no_pipe)
        await r.client.send_all(b"x")
        await r.done.wait()
    assert r.transfer.reason == "client error: EMFILE Too many open files"
    assert pool.in_use == 0


async def test_eof_that_cannot_be_passed_on_is_a_failure(nursery: trio.Nursery) -> None:
    def shutdown_fails(how: int) -> None:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    with trio.fail_after(LIMIT):
        r = await start_relay(nursery, "tcp")
        r.inner[1].socket.shutdown = shutdown_fails  # type: ignore[method-assign,assignment]
        await r.client.send_eof()
        await r.done.wait()
    assert r.transfer.reason == f"backend error: EINVAL {os.strerror(errno.EINVAL)}"


async def test_pipe_pool_keeps_at_most_max_free(pool: splice.PipePool) -> None:
    small = splice.PipePool(1 << 16, max_free=1)
    a, b = small.take(), small.take()
    assert small.in_use == 2
    assert a.size >= 1 << 16
    small.give_back(a)
    small.give_back(b)  # over max_free: closed
    assert (small.free, small.in_use) == (1, 0)
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(b.read_fd)
    assert small.take() is a
    small.discard(a)
    small.close()
    assert (small.free, small.in_use) == (0, 0)


async def test_pipe_keeps_the_default_size_past_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    real_fcntl = fcntl.fcntl

    def no_bigger(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETPIPE_SZ:
            raise PermissionError(errno.EPERM, "over the user's pipe quota")
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(fcntl, "fcntl", no_bigger)
    pipe = splice.Pipe(1 << 20)
    try:
        assert pipe.size == real_fcntl(pipe.write_fd, fcntl.F_GETPIPE_SZ)
    finally:
        pipe.close()


async def test_a_spurious_wake_up_moves_nothing_and_waits_again(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(LIMIT):
        r = await start_relay(nursery, "unix")
        real_splice = os.splice
        client_fd = r.inner[0].socket.fileno()
        spurious = [True]

        def once_again(
            src: int, dst: int, count: int, offset_src: None = None, offset_dst: None = None, flags: int = 0
        ) -> int:
            if src == client_fd and spurious:
                spurious.clear()
                raise BlockingIOError(errno.EAGAIN, "readiness that was gone by the time we read")
            return real_splice(src, dst, count, flags=flags)

        monkeypatch.setattr(os, "splice", once_again)
        await r.client.send_all(b"late")
        assert await read_exactly(r.backend, 4) == b"late"
    assert not spurious


async def test_events_for_a_connection_that_ended_in_the_same_batch_are_dropped(nursery: trio.Nursery) -> None:
    with trio.fail_after(LIMIT):
        r = await start_relay(nursery, "tcp")
        # Both sockets become ready before the reactor runs: whichever event it handles first
        # ends the connection, and the other one finds no owner.
        os.write(r.backend.socket.fileno(), b"reply")
        reset(r.client)
        await r.done.wait()
    assert r.transfer.reason == "reset by client"


async def test_ended_connections_do_not_pile_up_in_the_idle_deadlines(nursery: trio.Nursery) -> None:
    with trio.fail_after(LIMIT):
        for _ in range(200):
            r = await start_relay(nursery, "unix", idle_timeout=3600.0)
            await r.client.send_eof()
            await r.backend.send_eof()
            await r.done.wait()
            assert r.transfer.reason == "closed"
    stats = await splice.statistics()
    assert stats.timed == 0
    assert stats.deadlines <= splice._COMPACT_SLACK


async def test_a_busy_direction_yields_after_a_few_pipefuls_and_resumes(
    nursery: trio.Nursery, pool: splice.PipePool
) -> None:
    assert pool.free == 0  # a new run's pool: every pipe is made from now on, of this size
    pool.size = 4096  # one page: 64 KiB take many rounds and many events
    data = random.Random(6).randbytes(64 << 10)
    with trio.fail_after(LIMIT):
        r = await start_relay(nursery, "unix")
        async with trio.open_nursery() as both:
            both.start_soon(r.client.send_all, data)
            assert await read_exactly(r.backend, len(data)) == data
        await settled()  # the reactor counts a splice's bytes after the reader may have them
    assert r.transfer.client_to_backend == len(data)


async def test_a_dead_reactor_thread_crashes_the_run_instead_of_hanging(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a trio run of its own (in a thread): the crash ends that run, not the test's."""

    class BrokenClock(trio.abc.Clock):
        """The real time, until broken and the reactor thread asks for it."""

        broken = False

        def start_clock(self) -> None:
            pass

        def current_time(self) -> float:
            if self.broken and threading.current_thread().name == "hvbridge-splice":
                raise ZeroDivisionError("a bug in the reactor loop")
            return time.perf_counter()

        def deadline_to_sleep_time(self, deadline: float) -> float:
            return deadline - self.current_time()

    relays: list[Relayed] = []
    clock = BrokenClock()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            relays.append(await start_relay(nursery, "unix"))
            clock.broken = True
            await relays[0].client.send_all(b"x")  # wakes the reactor, which asks the time
            await trio.sleep_forever()  # the crash must end the run

    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the thread's traceback
    with pytest.raises(trio.TrioInternalError) as info, trio.fail_after(LIMIT):
        await trio.to_thread.run_sync(lambda: trio.run(main, clock=clock), abandon_on_cancel=True)
    group = info.value.__cause__
    assert isinstance(group, BaseExceptionGroup)
    died: BaseException | None = group.subgroup(RuntimeError)
    while isinstance(died, BaseExceptionGroup):
        died = died.exceptions[0]
    assert died is not None
    assert str(died) == "the splice reactor thread died"
    assert isinstance(died.__cause__, ZeroDivisionError)
    [r] = relays
    assert r.done.is_set()  # its task was woken, not left parked
    assert r.error == [died]
    assert closed(r.inner[0])
    assert closed(r.inner[1])
