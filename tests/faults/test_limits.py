"""Limits (docs/reference.md: max_connections/idle_timeout/connect_timeout, and file descriptors).

Each test runs the real hvbridge process against one limit: the connection limit, the idle
timeout, running out of file descriptors, and a connect that never completes.

Rules: loopback only (127.0.0.1), port 0, bounded by trio.fail_after and loop counts; times are
never asserted (a relay's own `duration=` may be checked to be at least a timeout).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final, Literal

import pytest
import trio

from .harness import (
    Received,
    open_blackhole,
    open_client,
    probe_closed,
    read_to_end,
    roundtrip,
    set_nofile,
    start_backend,
)

if TYPE_CHECKING:
    from pathlib import Path

    from .harness import Launcher

pytestmark = pytest.mark.slow

TIMEOUT: Final = 60.0
#: How long a test waits to see that something does *not* happen.
QUIET: Final = 0.5


async def ping(stream: trio.SocketStream, data: bytes) -> None:
    """Send `data` to an echo backend through hvbridge and read it back."""
    await stream.send_all(data)
    got = b""
    for _ in range(len(data)):
        got += await stream.receive_some(len(data) - len(got))
        if len(got) == len(data):
            break
    assert got == data


def duration(line: str) -> float:
    """The `duration=` field of a `connection closed` log line."""
    match = re.search(r" duration=([0-9.]+)", line)
    assert match is not None, line
    return float(match.group(1))


async def test_max_connections_excess_waits_then_is_served(hvbridge: Launcher, nursery: trio.Nursery) -> None:
    """At max_connections the next client waits in the backlog and is served when a slot frees."""
    with trio.fail_after(TIMEOUT):
        backend = await start_backend(nursery, "tcp")
        hv = await hvbridge.forward("tcp://127.0.0.1:0", backend.endpoint, "--max-connections", "2")
        baseline = hv.fds()
        listen = hv.listening()

        first, second = await open_client(listen), await open_client(listen)
        await ping(first, b"1")
        await ping(second, b"2")
        # The kernel completes the third handshake (backlog), but hvbridge does not accept it.
        third = await open_client(listen)
        await third.send_all(b"3")
        with trio.move_on_after(QUIET):
            early = await third.receive_some(1)
            raise AssertionError(f"the third connection was served above the limit: {early!r}")
        assert backend.accepted == 2

        await first.aclose()
        assert await third.receive_some(1) == b"3"
        assert backend.accepted == 3
        await ping(third, b"still served")
        for stream in (second, third):
            await stream.aclose()
        await hv.wait_for(r"connection closed .*reason=closed$", count=3)
        await hv.wait_fds(baseline)


async def test_idle_timeout_closes_only_idle_connections(hvbridge: Launcher, nursery: trio.Nursery) -> None:
    """An idle connection is closed after idle_timeout with reason "idle timeout"; a busy one is not."""
    with trio.fail_after(TIMEOUT):
        backend = await start_backend(nursery, "tcp")
        hv = await hvbridge.forward("tcp://127.0.0.1:0", backend.endpoint, "--idle-timeout", "0.5s")
        baseline = hv.fds()
        listen = hv.listening()

        idle, busy = await open_client(listen), await open_client(listen)
        await ping(idle, b"hello")
        await ping(busy, b"hello")
        idle_closed = trio.Event()
        outcome: list[Received] = []

        async def watch_idle() -> None:
            outcome.append(await read_to_end(idle, limit=0))
            idle_closed.set()

        nursery.start_soon(watch_idle)
        # Keep the busy one moving well inside the timeout until the idle one is gone, and a
        # little longer; it must survive.
        after = 0
        for i in range(10_000):
            await ping(busy, str(i).encode())
            await trio.sleep(0.05)
            after += idle_closed.is_set()
            if after == 5:
                break
        assert outcome == [Received(0, outcome[0].sha256, "eof")]
        [line] = await hv.wait_for(r'connection closed .*reason="idle timeout"')
        assert duration(line) >= 0.5
        await ping(busy, b"still open")
        await busy.aclose()
        await idle.aclose()
        await hv.wait_for(r"connection closed .*reason=closed$")
        assert len(hv.matching(r'reason="idle timeout"')) == 1
        await hv.wait_fds(baseline)


async def test_file_descriptors_exhausted_pauses_and_recovers(hvbridge: Launcher, nursery: trio.Nursery) -> None:
    """Out of fds, hvbridge logs "accept failed", keeps the excess in the backlog, and recovers.

    hvbridge runs under a low RLIMIT_NOFILE, set on the running process as `prlimit --pid`
    does: its current fd count plus room for exactly PAIRS relayed connections (2 fds each),
    so the next accept() is the one that fails with EMFILE.
    """
    pairs = 8
    extra = 4
    with trio.fail_after(TIMEOUT):
        backend = await start_backend(nursery, "tcp")
        hv = await hvbridge.forward("tcp://127.0.0.1:0", backend.endpoint)
        baseline = hv.fds()
        listen = hv.listening()
        await roundtrip(listen)
        await hv.wait_fds(baseline)
        set_nofile(hv.pid, hv.fd_count() + 2 * pairs)

        held = []
        for i in range(pairs):
            stream = await open_client(listen)
            await ping(stream, f"held {i}".encode())
            held.append(stream)
        waiting = []
        for i in range(extra):
            stream = await open_client(listen)  # the kernel completes it; hvbridge cannot accept
            await stream.send_all(f"waiting {i}".encode())
            waiting.append(stream)
        await hv.wait_for(r"ERROR accept failed: Too many open files")
        assert backend.accepted == 1 + pairs

        for stream in held:
            await stream.aclose()
        for i, stream in enumerate(waiting):  # recovered by itself: the backlog is served
            expected = f"waiting {i}".encode()
            got = b""
            for _ in range(len(expected)):
                got += await stream.receive_some(len(expected) - len(got))
                if len(got) == len(expected):
                    break
            assert got == expected
            await stream.aclose()
        await roundtrip(listen)
        await hv.wait_for(r"connection closed .*reason=closed$", count=1 + pairs + extra + 1)
        assert hv.matching(r"connect failed") == []
        await hv.wait_fds(baseline)


@pytest.mark.parametrize("family", ["tcp", "unix"])
async def test_file_descriptors_exhausted_at_backend_connect(
    hvbridge: Launcher, nursery: trio.Nursery, tmp_path: Path, family: Literal["tcp", "unix"]
) -> None:
    """With one fd to spare, accept() succeeds and the backend socket() fails: that client alone is reset.

    The limit leaves room for PAIRS connections plus one fd, so each further client is
    accepted and then cannot get a backend socket: "connect failed: Too many open files",
    logged, the client reset; hvbridge keeps running and serves again once fds are free.
    """
    pairs = 4
    with trio.fail_after(TIMEOUT):
        backend = await start_backend(nursery, "tcp" if family == "tcp" else tmp_path / "backend.sock")
        hv = await hvbridge.forward("tcp://127.0.0.1:0", backend.endpoint)
        baseline = hv.fds()
        listen = hv.listening()
        await roundtrip(listen)
        await hv.wait_fds(baseline)  # the warm-up connection's sockets are closed: count exactly
        set_nofile(hv.pid, hv.fd_count() + 2 * pairs + 1)
        held = []
        for i in range(pairs):
            stream = await open_client(listen)
            await ping(stream, f"held {i}".encode())
            held.append(stream)
        got = await probe_closed(listen, send=b"one too many")
        assert got.size == 0
        assert got.ending in ("eof", "reset")
        await hv.wait_for(r'reason="connect failed: Too many open files"')
        for stream in held:
            await stream.aclose()
        set_nofile(hv.pid, 1024)
        await roundtrip(listen)
        assert hv.process.returncode is None, hv.text
        await hv.wait_fds(baseline)


async def test_file_descriptors_exhausted_while_relaying(hvbridge: Launcher, nursery: trio.Nursery) -> None:
    """Out of fds in the data path (the splice pipes): that connection fails alone, hvbridge lives.

    The splice fast path takes a pipe (2 fds) per direction with bytes in flight and keeps it
    while the destination is full. With every fd taken by connections whose backends do not
    read, the next direction that needs a pipe cannot get one: that connection may fail (reset,
    logged), but hvbridge must keep running and serve again once fds are free.
    """
    pairs = 6
    with trio.fail_after(TIMEOUT):
        backend = await start_backend(nursery, "tcp")
        hv = await hvbridge.forward("tcp://127.0.0.1:0", backend.endpoint)
        baseline = hv.fds()
        listen = hv.listening()
        await roundtrip(listen)
        release = trio.Event()

        async def hold(stream: trio.SocketStream) -> None:
            await release.wait()

        for _ in range(pairs):
            backend.then(hold)
        await hv.wait_fds(baseline)  # the warm-up connection's sockets are closed: count exactly
        set_nofile(hv.pid, hv.fd_count() + 2 * pairs)
        held = []
        for _ in range(pairs):
            held.append(await open_client(listen))
        await backend.wait_accepted(1 + pairs)
        chunk = b"x" * 65536
        failed = 0
        for stream in held:  # each stalled direction keeps a pipe: the free ones run out
            for _ in range(2000):
                with trio.move_on_after(0.3):
                    try:
                        await stream.socket.send(chunk)
                    except OSError:  # this connection could not get a pipe and was reset
                        failed += 1
                        break
                    continue
                break
        assert failed < pairs, "every connection failed, not just those short of a pipe"
        release.set()
        for stream in held:
            await stream.aclose()
        set_nofile(hv.pid, 1024)
        await roundtrip(listen)
        await hv.wait_for(r"connection closed ", count=1 + pairs + 1)
        assert hv.process.returncode is None, hv.text
        assert "Traceback" not in hv.text, hv.text
        errors = hv.matching(r"reason=\"(client|backend) error")
        assert all("EMFILE" in line for line in errors), errors
        await hv.wait_fds(baseline)


async def test_connect_timeout_blackholed_backend(hvbridge: Launcher, nursery: trio.Nursery) -> None:
    """A connect that never completes is given up after connect_timeout; the client is closed.

    The blackhole is a loopback listener with backlog 0 that never accepts and whose accept
    queue is full: Linux then drops further SYNs, so connects hang in SYN-SENT (see
    harness.Blackhole). An unroutable address would leave the machine; a full Unix-socket
    backlog fails a non-blocking connect at once with EAGAIN, so neither is used.
    """
    with trio.fail_after(TIMEOUT):
        blackhole = await open_blackhole()
        try:
            backend = await start_backend(nursery, "tcp")
            table = f"""
[routes.blackhole]
listen = "tcp://127.0.0.1:0"
connect = "tcp://127.0.0.1:{blackhole.port}"
connect_timeout = "0.5s"

[routes.echo]
listen = "tcp://127.0.0.1:0"
connect = "{backend.endpoint}"
"""
            hv = await hvbridge.run_table(table, listeners=2)
            baseline = hv.fds()

            got = await probe_closed(hv.listening("blackhole"), send=b"anyone there?")
            assert got.size == 0
            assert got.ending in ("eof", "reset")
            [line] = await hv.wait_for(
                r'connection closed route=blackhole .*reason="connect failed: timed out after 0.5s"'
            )
            assert duration(line) >= 0.5

            await roundtrip(hv.listening("echo"))
            await hv.wait_fds(baseline)
        finally:
            blackhole.close()
