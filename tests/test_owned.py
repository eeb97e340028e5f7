"""Tests for hvbridge.relay.owned: routes the splice reactor serves whole (accept, allow, connect).

Rules for this module: real loopback sockets (TCP on 127.0.0.1, Unix sockets in tmp_path) and
the real Backend, through supervisor.serve_routes(), which hands every eligible route to the
reactor. "Nothing left to do" is settled() (trio's tasks and the reactor thread both). Every
test is bounded with trio.fail_after; none sleeps on the real clock. Linux only.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import os
import resource
import socket
from typing import TYPE_CHECKING, Final

import pytest
import trio
import trio.testing
from support.settle import settled

from hvbridge.addresses import Address, TcpAddress, UnixAddress
from hvbridge.backend import Backend
from hvbridge.logs import LOGGER
from hvbridge.relay import owned, splice
from hvbridge.routes import Route, RouteOptions, RouteTable
from hvbridge.supervisor import Supervisor, serve_routes

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.skipif(not splice.enabled, reason="the splice reactor is Linux only")

LIMIT: Final = 10.0
FAMILIES: Final = ["tcp", "unix"]


@pytest.fixture(autouse=True)
def _capture_hvbridge_log(monkeypatch: pytest.MonkeyPatch) -> None:
    # setup_logging() (CLI tests in the same run) stops propagation to caplog's root handler.
    monkeypatch.setattr(LOGGER, "propagate", True)
    monkeypatch.setattr(LOGGER, "handlers", [])


def closed_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    lines = []
    for record in caplog.records:
        if record.getMessage() == "connection closed":
            value = record.__dict__.get("hvbridge_fields")
            assert isinstance(value, dict)
            lines.append(dict(value))
    return lines


async def echo(stream: trio.SocketStream) -> None:
    """Echo until EOF, then close (a half-close answers what came, then ends); a reset ends it."""
    async with stream:
        try:
            async for data in stream:
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass


async def start_backend(nursery: trio.Nursery, family: str, tmp_path: Path) -> Address:
    """An echo server of `family`; its address."""
    if family == "unix":
        path = tmp_path / "backend.sock"
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(path))
        sock.listen(64)
        await nursery.start(trio.serve_listeners, echo, [trio.SocketListener(sock)])
        return UnixAddress(str(path))
    listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
    return TcpAddress("127.0.0.1", listeners[0].socket.getsockname()[1])


def listen_address(family: str, tmp_path: Path, name: str = "r") -> Address:
    return UnixAddress(str(tmp_path / f"{name}.sock")) if family == "unix" else TcpAddress("127.0.0.1", 0)


async def serve(nursery: trio.Nursery, *routes: Route, backend: Backend | None = None) -> Supervisor:
    supervisor: Supervisor = await nursery.start(
        lambda task_status: serve_routes(RouteTable(routes), backend=backend, task_status=task_status)
    )
    return supervisor


def bound(supervisor: Supervisor, name: str = "r") -> tuple[int, object]:
    sock = supervisor.listeners[name][0].socket  # type: ignore[attr-defined]
    return sock.family, sock.getsockname()


async def dial(address: tuple[int, object]) -> trio.SocketStream:
    sock = trio.socket.socket(address[0], socket.SOCK_STREAM)
    await sock.connect(address[1])
    return trio.SocketStream(sock)


async def receive_all(stream: trio.SocketStream) -> bytes:
    got = b""
    async for data in stream:
        got += data
    return got


async def ending(address: tuple[int, object]) -> str:
    """Connect, then read until the end: `reset` (a TCP RST, at connect or later) or `eof`.

    A Unix socket has no reset: closed with SO_LINGER 0 its peer sees a clean EOF."""
    sock = trio.socket.socket(address[0], socket.SOCK_STREAM)
    try:
        await sock.connect(address[1])
    except ConnectionResetError:
        sock.close()
        return "reset"
    stream = trio.SocketStream(sock)
    try:
        return "eof" if await receive_all(stream) == b"" else "data"
    except trio.BrokenResourceError:
        return "reset"
    finally:
        await stream.aclose()


def reset_or_eof(family: str) -> str:
    return "eof" if family == "unix" else "reset"


def tasks(supervisor: Supervisor) -> int:
    return len(supervisor.connections.child_tasks)


@pytest.mark.parametrize("family", FAMILIES)
async def test_an_eligible_route_relays_with_no_task_per_connection(
    family: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Ten open connections and one task (the route's keeper); half-close, counts and the log line."""
    caplog.set_level(logging.INFO, "hvbridge")
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            target = await start_backend(nursery, family, tmp_path)
            supervisor = await serve(nursery, Route("r", listen_address(family, tmp_path), target))
            streams = [await dial(bound(supervisor)) for _ in range(10)]
            for i, stream in enumerate(streams):
                await stream.send_all(b"ping %d" % i)
                assert await stream.receive_some(100) == b"ping %d" % i
            await settled()
            assert tasks(supervisor) == 1
            assert supervisor.active == 10
            stats = supervisor.statistics()["r"]
            assert (stats.accepted, stats.active, stats.bytes_in) == (
                10,
                10,
                sum(len(b"ping %d" % i) for i in range(10)),
            )
            assert sum(stats.connect_buckets) == 10  # the connect latency of each, once
            for stream in streams:
                await stream.send_eof()  # half-close: the backend still answers what came, then ends
                assert await receive_all(stream) == b""
                await stream.aclose()
            await settled()
            assert supervisor.active == 0
            assert supervisor.statistics()["r"].closed == {"closed": 10}
            nursery.cancel_scope.cancel()
    lines = closed_lines(caplog)
    assert len(lines) == 10
    assert {line["reason"] for line in lines} == {"closed"}
    assert lines[0]["bytes_in"] == lines[0]["bytes_out"] == len(b"ping 0")
    assert str(lines[0]["peer"]).startswith("tcp://127.0.0.1:" if family == "tcp" else "unix:")


@pytest.mark.parametrize(
    "options",
    [
        RouteOptions(proxy_protocol="v1"),
        RouteOptions(accept_proxy=True),
        RouteOptions(connect_retries=1),
    ],
)
async def test_routes_that_need_trio_per_connection_keep_tasks(options: RouteOptions, tmp_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            target = await start_backend(nursery, "tcp", tmp_path)
            supervisor = await serve(nursery, Route("r", TcpAddress("127.0.0.1", 0), target, options))
            assert not supervisor.owned_target(Route("r", TcpAddress("127.0.0.1", 0), target, options), [])
            nursery.cancel_scope.cancel()


async def test_a_host_name_target_and_a_disabled_splice_keep_tasks(tmp_path: Path) -> None:
    """A name needs a lookup per connection; Backend(splice=False) turns the reactor off."""
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            target = await start_backend(nursery, "tcp", tmp_path)
            assert isinstance(target, TcpAddress)
            named = Route("named", TcpAddress("127.0.0.1", 0), TcpAddress("localhost", target.port))
            supervisor = await serve(nursery, named)
            stream = await dial(bound(supervisor, "named"))
            await stream.send_all(b"x")
            assert await stream.receive_some(10) == b"x"
            assert tasks(supervisor) == 1  # its connection task: no keeper, as nothing is owned
            await stream.aclose()
            plain = await serve(nursery, Route("r", TcpAddress("127.0.0.1", 0), target), backend=Backend(splice=False))
            assert not plain.owned_target(Route("r", TcpAddress("127.0.0.1", 0), target), [])
            nursery.cancel_scope.cancel()
    assert owned.target_sockaddr(TcpAddress("::1", 80)) == (socket.AF_INET6, ("::1", 80))
    assert owned.target_sockaddr(TcpAddress("example.org", 80)) is None


@pytest.mark.parametrize("family", FAMILIES)
async def test_the_allow_list_resets_a_refused_peer(
    family: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """TCP from 127.0.0.1 against 10.0.0.0/8, or any Unix peer (which no CIDR matches): a reset,
    counted as refused, logged as a warning; the backend is never dialled."""
    caplog.set_level(logging.INFO, "hvbridge")
    options = RouteOptions(allow=(ipaddress.ip_network("10.0.0.0/8"),))
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            target = await start_backend(nursery, family, tmp_path)
            supervisor = await serve(nursery, Route("r", listen_address(family, tmp_path), target, options))
            assert await ending(bound(supervisor)) == reset_or_eof(family)
            await settled()
            stats = supervisor.statistics()["r"]
            assert (stats.accepted, stats.refused, stats.failed, stats.active) == (1, 1, 0, 0)
            assert sum(stats.connect_buckets) == 0
            nursery.cancel_scope.cancel()
    (line,) = closed_lines(caplog)
    assert line["reason"] == "refused by allow list"
    assert [r.levelno for r in caplog.records if r.getMessage() == "connection closed"] == [logging.WARNING]


async def test_the_allow_list_admits_a_matching_peer(tmp_path: Path) -> None:
    options = RouteOptions(allow=(ipaddress.ip_network("127.0.0.0/8"),))
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            target = await start_backend(nursery, "tcp", tmp_path)
            supervisor = await serve(nursery, Route("r", TcpAddress("127.0.0.1", 0), target, options))
            stream = await dial(bound(supervisor))
            await stream.send_all(b"in")
            assert await stream.receive_some(10) == b"in"
            await stream.aclose()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("family", FAMILIES)
async def test_a_refused_backend_resets_the_client_and_counts_a_failure(
    family: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "hvbridge")
    if family == "unix":
        target: Address = UnixAddress(str(tmp_path / "nobody.sock"))
        reason = "connect failed: backend unavailable (No such file or directory)"
    else:
        with socket.socket() as unused:  # bound, never listening: connects are refused
            unused.bind(("127.0.0.1", 0))
            target = TcpAddress("127.0.0.1", unused.getsockname()[1])
        reason = "connect failed: backend unavailable (Connection refused)"
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            supervisor = await serve(nursery, Route("r", listen_address(family, tmp_path), target))
            assert await ending(bound(supervisor)) == reset_or_eof(family)
            await settled()
            stats = supervisor.statistics()["r"]
            assert (stats.accepted, stats.failed, stats.refused, stats.active) == (1, 1, 0, 0)
            nursery.cancel_scope.cancel()
    assert closed_lines(caplog)[0]["reason"] == reason


async def test_the_connect_timeout_ends_a_connect_that_hangs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A backend whose accept queue is full drops SYNs: the connect hangs until connect_timeout,
    then the client is reset. The real clock, with a short timeout: the autojump clock would
    jump past it before the reactor thread has even accepted."""
    caplog.set_level(logging.INFO, "hvbridge")
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    queued = []
    for _ in range(2):  # Linux queues backlog + 1; no accept() is ever made
        sock = socket.socket()
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # EINPROGRESS
            sock.connect(full.getsockname())
        queued.append(sock)
    target = TcpAddress("127.0.0.1", full.getsockname()[1])
    try:
        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as nursery:
                options = RouteOptions(connect_timeout=0.2)
                supervisor = await serve(nursery, Route("r", TcpAddress("127.0.0.1", 0), target, options))
                start = trio.current_time()
                assert await ending(bound(supervisor)) == "reset"
                assert trio.current_time() - start >= 0.2
                await settled()
                assert supervisor.statistics()["r"].failed == 1
                nursery.cancel_scope.cancel()
    finally:
        for sock in [*queued, full]:
            sock.close()
    assert closed_lines(caplog)[0]["reason"] == "connect failed: timed out after 0.2s"


async def test_max_connections_holds_the_rest_in_the_backlog(tmp_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            target = await start_backend(nursery, "tcp", tmp_path)
            options = RouteOptions(max_connections=2)
            supervisor = await serve(nursery, Route("r", TcpAddress("127.0.0.1", 0), target, options))
            first, second, third = [await dial(bound(supervisor)) for _ in range(3)]
            for stream in (first, second):
                await stream.send_all(b"a")
                assert await stream.receive_some(10) == b"a"
            await third.send_all(b"waits")
            await settled()
            stats = supervisor.statistics()["r"]
            assert (stats.accepted, stats.active) == (2, 2)  # the third is in the kernel's backlog
            await first.aclose()
            assert await third.receive_some(10) == b"waits"  # served once one ended
            await settled()  # trio hears of it within the reactor's report interval
            assert supervisor.statistics()["r"].accepted == 3
            for stream in (second, third):
                await stream.aclose()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("family", FAMILIES)
async def test_cancelling_the_connections_ends_owned_ones_as_cancelled(
    family: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A shutdown past its grace cancels the connection nursery: the keeper ends them all."""
    caplog.set_level(logging.INFO, "hvbridge")
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as outer:
            target = await start_backend(outer, family, tmp_path)
            async with trio.open_nursery() as nursery:
                supervisor = await serve(nursery, Route("r", listen_address(family, tmp_path), target))
                streams = [await dial(bound(supervisor)) for _ in range(3)]
                for stream in streams:
                    await stream.send_all(b"x")
                    assert await stream.receive_some(10) == b"x"
                nursery.cancel_scope.cancel()
            for stream in streams:
                assert await receive_all(stream) == b""  # closed, not reset: as a cancelled task's relay
                await stream.aclose()
            outer.cancel_scope.cancel()
    assert [line["reason"] for line in closed_lines(caplog)] == ["cancelled"] * 3
    assert supervisor.active == 0


async def test_let_go_stops_accepting_and_keeps_the_open_connections(tmp_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            target = await start_backend(nursery, "tcp", tmp_path)
            supervisor = await serve(nursery, Route("r", TcpAddress("127.0.0.1", 0), target))
            address = bound(supervisor)
            kept = await dial(address)
            await kept.send_all(b"1")
            assert await kept.receive_some(10) == b"1"
            await supervisor.let_go(supervisor.listeners["r"])
            late = await dial(address)  # the socket still listens: the backlog takes it...
            await late.send_all(b"2")
            await settled()
            assert supervisor.statistics()["r"].accepted == 1  # ...and nobody accepts it
            await kept.send_all(b"3")
            assert await kept.receive_some(10) == b"3"
            for stream in (kept, late):
                await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_a_bug_in_one_connection_is_logged_and_ends_it_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception in the reactor's work for one connection ends that connection (reset, logged
    with its traceback); the next connection is served."""
    caplog.set_level(logging.INFO, "hvbridge")
    calls = []
    real = owned.OwnedConnection.connected

    def broken_once(self: owned.OwnedConnection) -> None:
        calls.append(self)
        if len(calls) == 1:
            raise RuntimeError("boom")
        real(self)

    monkeypatch.setattr(owned.OwnedConnection, "connected", broken_once)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            target = await start_backend(nursery, "tcp", tmp_path)
            supervisor = await serve(nursery, Route("r", TcpAddress("127.0.0.1", 0), target))
            assert await ending(bound(supervisor)) == "reset"
            second = await dial(bound(supervisor))
            await second.send_all(b"ok")
            assert await second.receive_some(10) == b"ok"
            await second.aclose()
            nursery.cancel_scope.cancel()
    bugs = [r for r in caplog.records if r.getMessage() == "relay bug on route r"]
    assert len(bugs) == 1
    assert bugs[0].exc_info is not None
    assert closed_lines(caplog)[0]["reason"] == "cancelled: relay bug: RuntimeError: boom"


class _Seen(logging.Handler):
    """Sets `event` when a record whose message starts with `prefix` is logged (in trio's thread)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.event = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.prefix):
            self.event.set()


async def test_running_out_of_descriptors_at_accept_pauses_the_route(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real EMFILE from accept() (the descriptor limit lowered to what is open): logged, the
    listener paused, and once descriptors are free again the waiting client is served."""
    seen = _Seen("accept failed: Too many open files; pausing")
    caplog.set_level(logging.INFO, "hvbridge")
    LOGGER.addHandler(seen)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            target = await start_backend(nursery, "tcp", tmp_path)
            supervisor = await serve(nursery, Route("r", TcpAddress("127.0.0.1", 0), target))
            family, address = bound(supervisor)
            sock = trio.socket.socket(family, socket.SOCK_STREAM)
            lowest_free = os.dup(0)
            os.close(lowest_free)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
            try:
                await sock.connect(address)  # the kernel's backlog takes it; accept() cannot
                await seen.event.wait()
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            stream = trio.SocketStream(sock)
            await stream.send_all(b"later")
            assert await stream.receive_some(10) == b"later"  # after the pause
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_the_idle_timeout_is_armed_when_a_slow_connect_completes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Idle 0.2 s against a connect timeout of 60 s, and a backend whose full accept queue drops
    the first SYN, so the backend connects (about 1 s later, at the SYN's retransmission) after
    trio heard of the accept: the idle deadline must be armed then, not only when the connect
    deadline comes up (the test's LIMIT is 10 s). The real clock: the autojump clock would jump
    while the reactor thread still works."""
    caplog.set_level(logging.INFO, "hvbridge")
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    queued = [socket.create_connection(full.getsockname(), timeout=5)]  # fills a backlog of 0
    options = RouteOptions(idle_timeout=0.2, connect_timeout=60.0)
    target = TcpAddress("127.0.0.1", full.getsockname()[1])
    try:
        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as nursery:
                supervisor = await serve(nursery, Route("r", TcpAddress("127.0.0.1", 0), target, options))
                stream = await dial(bound(supervisor))
                await stream.send_all(b"once")
                await settled()
                assert supervisor.statistics()["r"].accepted == 1  # heard of, still connecting
                for _ in queued:
                    full.accept()[0].close()  # room in the queue: the retransmitted SYN gets in
                full.setblocking(False)
                listener = trio.SocketListener(trio.socket.from_stdlib_socket(full))
                await nursery.start(trio.serve_listeners, echo, [listener])
                assert await stream.receive_some(10) == b"once"
                assert await receive_all(stream) == b""  # then nothing moves: closed
                await stream.aclose()
                nursery.cancel_scope.cancel()
    finally:
        for sock in queued:
            sock.close()
    assert closed_lines(caplog)[0]["reason"] == "idle timeout"


async def test_current_statistics_include_connections_not_yet_handed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reactor hands its reports to trio every REPORT_INTERVAL; a scrape (the engine's
    snapshot) asks for them first, so it counts every connection accepted before it."""
    monkeypatch.setattr(splice, "REPORT_INTERVAL", 3600.0)  # after the first hand-off, none by itself
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            target = await start_backend(nursery, "tcp", tmp_path)
            supervisor = await serve(nursery, Route("r", TcpAddress("127.0.0.1", 0), target))
            streams = []
            for i in range(4):
                stream = await dial(bound(supervisor))
                await stream.send_all(b"%d" % i)
                assert await stream.receive_some(10) == b"%d" % i
                streams.append(stream)
            assert supervisor.statistics()["r"].accepted < 4  # some reports are still held
            stats = (await supervisor.current_statistics())["r"]
            assert (stats.accepted, stats.active) == (4, 4)
            for stream in streams:
                await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_wait_idle_counts_connections_not_yet_handed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drain's wait_idle() takes the reactor's held reports first: an open connection that
    trio has not heard of yet still keeps it waiting."""
    monkeypatch.setattr(splice, "REPORT_INTERVAL", 3600.0)
    idle = trio.Event()

    async def drain(supervisor: Supervisor) -> None:
        await supervisor.wait_idle()
        idle.set()

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            target = await start_backend(nursery, "tcp", tmp_path)
            supervisor = await serve(nursery, Route("r", TcpAddress("127.0.0.1", 0), target))
            first = await dial(bound(supervisor))  # the first hand-off goes at once...
            await first.send_all(b"a")
            assert await first.receive_some(10) == b"a"
            await first.aclose()
            await settled()  # its end too: nothing open that trio knows of
            assert supervisor.active == 0
            second = await dial(bound(supervisor))  # ...and this one's reports wait
            await second.send_all(b"b")
            assert await second.receive_some(10) == b"b"
            nursery.start_soon(drain, supervisor)
            await trio.testing.wait_all_tasks_blocked()
            assert not idle.is_set()
            await second.aclose()
            await settled()  # the reactor has seen the end and handed it over
            await idle.wait()
            nursery.cancel_scope.cancel()
