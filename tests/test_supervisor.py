"""Tests for hvbridge.supervisor: accept loops, connection tasks, allow lists, logs, statistics.

Rules for this module: the socket layer is injected. Listeners are FakeListener (accept()
pulls from a memory channel; an accept_hook can fail it), backends come from FakeBackends
(memory streams, or a planned failure or hang per attempt). Time runs on the autojump clock,
so timeouts and backoff delays are checked exactly and no test sleeps for real. A few tests
at the end use real loopback sockets (127.0.0.1, port 0, Unix sockets in tmp_path) through
transports/. Every test is bounded with trio.fail_after.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import math
import socket
import uuid
from itertools import pairwise
from typing import TYPE_CHECKING, Final, Literal, final

import pytest
import trio
import trio.testing
from trio.testing import MemoryReceiveStream, MemorySendStream

from hvbridge.addresses import Address, TcpAddress, UnixAddress
from hvbridge.backend import Backend
from hvbridge.errors import BackendUnavailable, EndpointError
from hvbridge.logs import LOGGER
from hvbridge.relay.ends import EndReason
from hvbridge.routes import AllowRule, CidRule, Route, RouteOptions, RouteTable, VmRule
from hvbridge.supervisor import Supervisor, is_allowed, serve_routes
from hvbridge.transports import base

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator
    from pathlib import Path

MemoryStream = trio.StapledStream[MemorySendStream, MemoryReceiveStream]
Stream = trio.abc.HalfCloseableStream
Peer = tuple[int, object]
Step = Literal["hang"] | Exception

LIMIT: Final = 10.0
BACKEND: Final = TcpAddress("backend.test", 8080)
AF_VSOCK: Final[int] = getattr(socket, "AF_VSOCK", 40)
AF_HYPERV: Final = 34  # Windows' value; tests patch it into the socket module
VM: Final = uuid.UUID("c2b5a3b5-8f4a-4f2e-9a3c-1d2e3f405162")


# --------------------------------------------------------------------------------------- fakes


@final
class FakeSocket:
    """Just enough of a socket for peer_address() and listener_address()."""

    def __init__(self, family: int, address: object) -> None:
        self.family = family
        self.address = address
        self.options: dict[tuple[int, int], bytes] = {}

    def getpeername(self) -> object:
        return self.address

    def getsockname(self) -> object:
        return self.address

    def setsockopt(self, level: int, option: int, value: bytes) -> None:
        self.options[level, option] = value


@final
class PeerStream(trio.abc.HalfCloseableStream):
    """A memory stream that has a peer address, as an accepted socket stream has."""

    def __init__(self, inner: Stream, peer: Peer) -> None:
        self.inner = inner
        self.socket = FakeSocket(*peer)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@final
class FakeListener(trio.abc.Listener[Stream]):
    """accept() returns the streams dial() queued; accept_hook runs first and may raise."""

    def __init__(self, name: str = "a", bound: Peer | None = None) -> None:
        self.name = name
        self._send, self._receive = trio.open_memory_channel[Stream](math.inf)
        self.accept_hook: Callable[[], Awaitable[None]] | None = None
        self.accepted = 0
        self.closed = False
        if bound is not None:
            self.socket = FakeSocket(*bound)

    def __repr__(self) -> str:
        return f"fake://{self.name}"

    def dial(self, peer: Peer | None = None) -> MemoryStream:
        """Queue a connection for accept(); return the client's end."""
        client, server = trio.testing.memory_stream_pair()
        self._send.send_nowait(server if peer is None else PeerStream(server, peer))
        return client

    @property
    def pending(self) -> int:
        """Connections dialled and not accepted yet (the backlog)."""
        return self._receive.statistics().current_buffer_used

    async def accept(self) -> Stream:
        if self.accept_hook is not None:
            await self.accept_hook()
        stream = await self._receive.receive()
        self.accepted += 1
        return stream

    async def aclose(self) -> None:
        self.closed = True
        self._receive.close()
        await trio.lowlevel.checkpoint()


@final
class FakeBackends:
    """A connect() that hands out memory streams, following `plan` for the first attempts.

    A plan step is an exception to raise or "hang" (never finishes); after the plan, every
    attempt succeeds and the test gets (relay's end, backend's end) from next().
    """

    def __init__(self, plan: list[Step] | None = None) -> None:
        self.plan = list(plan or [])
        self.attempts: list[float] = []
        self._send, self._receive = trio.open_memory_channel[tuple[MemoryStream, MemoryStream]](math.inf)

    async def connect(self, address: Address, options: RouteOptions) -> Stream:
        assert address == BACKEND
        self.attempts.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        if self.plan:
            step = self.plan.pop(0)
            if step == "hang":
                await trio.sleep_forever()
            assert isinstance(step, Exception)
            raise step
        relay_end, backend = trio.testing.memory_stream_pair()
        self._send.send_nowait((relay_end, backend))
        return relay_end

    async def next(self) -> tuple[MemoryStream, MemoryStream]:
        """The next successful connect: (the relay's end, the backend's end)."""
        return await self._receive.receive()


def make_route(name: str = "r", options: RouteOptions | None = None) -> Route:
    return Route(name, UnixAddress(f"/fake/{name}"), BACKEND, options or RouteOptions())


async def start(
    nursery: trio.Nursery,
    *routes: tuple[Route, list[FakeListener]],
    backends: FakeBackends,
) -> Supervisor:
    """Run serve_routes over fake listeners and backends in `nursery`."""
    by_address = {route.listen: listeners for route, listeners in routes}

    async def open_listeners(address: Address, options: RouteOptions) -> list[base.Listener]:
        await trio.lowlevel.checkpoint()
        opened: list[base.Listener] = []
        opened.extend(by_address[address])
        return opened

    table = RouteTable(tuple(route for route, _ in routes))
    supervisor: Supervisor = await nursery.start(
        functools.partial(serve_routes, table, open_listeners=open_listeners, connect=backends.connect)
    )
    return supervisor


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    received = bytearray()
    while data := await stream.receive_some():
        received += data
    return bytes(received)


async def roundtrip(client: Stream, backend: Stream, tag: bytes = b"") -> None:
    """Bytes go both ways through the relay."""
    await client.send_all(b"ping" + tag)
    assert await backend.receive_some() == b"ping" + tag
    await backend.send_all(b"pong" + tag)
    assert await client.receive_some() == b"pong" + tag


def fields(record: logging.LogRecord) -> dict[str, object]:
    value = record.__dict__.get("hvbridge_fields")
    assert isinstance(value, dict)
    return dict(value)


def closed_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [fields(r) for r in caplog.records if r.getMessage() == "connection closed"]


@pytest.fixture(autouse=True)
def _capture_hvbridge_log(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # setup_logging() (CLI tests in the same run) stops propagation to caplog's root handler.
    monkeypatch.setattr(LOGGER, "propagate", True)
    monkeypatch.setattr(LOGGER, "handlers", [])
    with caplog.at_level(logging.DEBUG, logger="hvbridge"):
        yield


# ----------------------------------------------------------------------------- accept errors


async def test_emfile_on_accept_is_logged_and_accepting_recovers(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    listener = FakeListener()
    backends = FakeBackends()
    calls: list[float] = []

    async def accept_hook() -> None:
        calls.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        if len(calls) <= 2:
            raise OSError(errno.EMFILE, "Too many open files")

    listener.accept_hook = accept_hook
    # One slot: a failed accept must give its slot back, or the route would stall.
    route = make_route(options=RouteOptions(max_connections=1))
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            supervisor = await start(nursery, (route, [listener]), backends=backends)
            client = listener.dial()
            _, backend = await backends.next()
            await roundtrip(client, backend)
            assert supervisor.statistics()["r"].accepted == 1
            nursery.cancel_scope.cancel()

    assert len(calls) == 3
    assert [b - a for a, b in pairwise(calls)] == pytest.approx([0.1, 0.1])  # recovers after 100 ms
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "accept failed: Too many open files; pausing 100 ms (raise the file descriptor limit, `ulimit -n`)"
    ] * 2
    assert fields(errors[0]) == {"route": "r"}


# ------------------------------------------------------------------------------------ connect


async def test_connect_timeout_closes_the_client_and_the_route_keeps_serving(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    listener = FakeListener()
    backends = FakeBackends(plan=["hang"])
    route = make_route(options=RouteOptions(connect_timeout=5))
    with trio.fail_after(LIMIT * 10):
        async with trio.open_nursery() as nursery:
            supervisor = await start(nursery, (route, [listener]), backends=backends)
            started = trio.current_time()
            client = listener.dial()
            assert await receive_all(client) == b""
            assert trio.current_time() - started == pytest.approx(5)
            with pytest.raises(trio.BrokenResourceError):
                await client.send_all(b"anyone there?")
            await trio.testing.wait_all_tasks_blocked()
            stats = supervisor.statistics()["r"]
            assert (stats.accepted, stats.active, stats.failed, stats.closed) == (
                1,
                0,
                1,
                {EndReason.CONNECT_FAILED.label: 1},
            )

            second = listener.dial()
            _, backend = await backends.next()
            await roundtrip(second, backend)
            nursery.cancel_scope.cancel()

    line = closed_lines(caplog)[0]
    assert line["reason"] == "connect failed: timed out after 5s"
    assert line["duration"] == pytest.approx(5)
    record = next(r for r in caplog.records if r.getMessage() == "connection closed")
    assert record.levelno == logging.WARNING


def unavailable(message: str = "backend unavailable (Connection refused)") -> BackendUnavailable:
    return BackendUnavailable(str(BACKEND), "connect", message)


@pytest.mark.parametrize(
    ("retries", "delays"),
    [
        (0, []),
        (3, [0.2, 0.4, 0.8]),
        (8, [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]),  # capped at MAX_RETRY_DELAY
    ],
)
async def test_connect_retries_back_off_exponentially(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    retries: int,
    delays: list[float],
) -> None:
    backends = FakeBackends(plan=[unavailable() for _ in range(retries + 1)])
    route = make_route(options=RouteOptions(connect_retries=retries))
    with trio.fail_after(LIMIT * 10):
        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(nursery, connect=backends.connect)
            with pytest.raises(BackendUnavailable, match=r"^connect tcp://backend.test:8080: backend unavailable"):
                await supervisor.open_backend(route)
    assert len(backends.attempts) == retries + 1
    assert [b - a for a, b in pairwise(backends.attempts)] == pytest.approx(delays)
    retry_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("connect failed (")]
    assert retry_lines == [
        f"connect failed (backend unavailable (Connection refused)); retry {i}/{retries} in {delay:g}s"
        for i, delay in enumerate(delays, 1)
    ]


async def test_connect_retries_until_the_backend_is_up(autojump_clock: trio.testing.MockClock) -> None:
    backends = FakeBackends(plan=[unavailable(), unavailable()])
    route = make_route(options=RouteOptions(connect_retries=5))
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(nursery, connect=backends.connect)
            stream = await supervisor.open_backend(route)
            relay_end, _ = await backends.next()
            assert stream is relay_end
    assert len(backends.attempts) == 3
    assert backends.attempts[-1] - backends.attempts[0] == pytest.approx(0.2 + 0.4)
    assert sum(supervisor.statistics()["r"].connect_buckets) == 1


async def test_connect_timeouts_are_retried(autojump_clock: trio.testing.MockClock) -> None:
    backends = FakeBackends(plan=["hang", "hang"])
    route = make_route(options=RouteOptions(connect_timeout=1, connect_retries=1))
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(nursery, connect=backends.connect)
            with pytest.raises(BackendUnavailable, match=r"^connect tcp://backend.test:8080: timed out after 1s$"):
                await supervisor.open_backend(route)
    assert [b - a for a, b in pairwise(backends.attempts)] == pytest.approx([1 + 0.2])


async def test_other_endpoint_errors_are_not_retried(autojump_clock: trio.testing.MockClock) -> None:
    error = EndpointError(str(BACKEND), "connect", "Permission denied")
    backends = FakeBackends(plan=[error])
    route = make_route(options=RouteOptions(connect_retries=3))
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(nursery, connect=backends.connect)
            with pytest.raises(EndpointError) as raised:
                await supervisor.open_backend(route)
    assert raised.value is error
    assert len(backends.attempts) == 1


async def test_a_failed_connect_is_logged_with_its_reason(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    listener = FakeListener()
    backends = FakeBackends(plan=[unavailable(), EndpointError(str(BACKEND), "connect", "Permission denied")])
    route = make_route(options=RouteOptions(connect_retries=2))
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            supervisor = await start(nursery, (route, [listener]), backends=backends)
            client = listener.dial()
            assert await receive_all(client) == b""
            nursery.cancel_scope.cancel()
    assert supervisor.statistics()["r"].failed == 1
    assert [line["reason"] for line in closed_lines(caplog)] == ["connect failed: Permission denied"]


# ---------------------------------------------------------------------------- max_connections


async def test_max_connections_holds_further_connections_in_the_backlog(
    autojump_clock: trio.testing.MockClock,
) -> None:
    listener = FakeListener()
    backends = FakeBackends()
    # Without half-close, a client's EOF ends its connection.
    route = make_route(options=RouteOptions(max_connections=2, half_close=False))
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            supervisor = await start(nursery, (route, [listener]), backends=backends)
            clients = [listener.dial() for _ in range(3)]
            await trio.testing.wait_all_tasks_blocked()
            assert (listener.accepted, listener.pending) == (2, 1)
            stats = supervisor.statistics()["r"]
            assert (stats.accepted, stats.active) == (2, 2)
            assert supervisor.active == 2

            await clients[0].aclose()  # the first connection ends...
            await trio.testing.wait_all_tasks_blocked()
            assert (listener.accepted, listener.pending) == (3, 0)  # ...and only then the third is accepted
            stats = supervisor.statistics()["r"]
            assert (stats.accepted, stats.active) == (3, 2)
            nursery.cancel_scope.cancel()


# -------------------------------------------------------------------------------- allow lists


V4_LOOPBACK: Final = ipaddress.IPv4Network("127.0.0.0/8")
V4_PRIVATE: Final = ipaddress.IPv4Network("10.0.0.0/8")
V6_LOOPBACK: Final = ipaddress.IPv6Network("::1/128")
V6_LINK_LOCAL: Final = ipaddress.IPv6Network("fe80::/10")


@pytest.mark.parametrize(
    ("rules", "peer", "allowed"),
    [
        # IPv4 CIDRs
        ([V4_LOOPBACK], (socket.AF_INET, ("127.0.0.1", 40000)), True),
        ([V4_LOOPBACK], (socket.AF_INET, ("127.255.255.254", 1)), True),
        ([V4_LOOPBACK], (socket.AF_INET, ("10.0.0.1", 40000)), False),
        ([V4_PRIVATE, V4_LOOPBACK], (socket.AF_INET, ("10.200.3.4", 1)), True),
        ([ipaddress.IPv4Network("192.0.2.7/32")], (socket.AF_INET, ("192.0.2.7", 1)), True),
        ([ipaddress.IPv4Network("192.0.2.7/32")], (socket.AF_INET, ("192.0.2.8", 1)), False),
        # IPv6 CIDRs, with and without a scope id
        ([V6_LOOPBACK], (socket.AF_INET6, ("::1", 40000, 0, 0)), True),
        ([V6_LOOPBACK], (socket.AF_INET6, ("::2", 40000, 0, 0)), False),
        ([V6_LINK_LOCAL], (socket.AF_INET6, ("fe80::1%eth0", 40000, 0, 2)), True),
        ([ipaddress.IPv6Network("2001:db8::/32")], (socket.AF_INET6, ("2001:db8:1::5", 1, 0, 0)), True),
        # families do not cross: an IPv4 rule never matches a plain IPv6 peer and vice versa
        ([V4_LOOPBACK], (socket.AF_INET6, ("::1", 1, 0, 0)), False),
        ([V6_LOOPBACK], (socket.AF_INET, ("127.0.0.1", 1)), False),
        # IPv4-mapped IPv6 peers (dual-stack listeners) match IPv4 rules, and mapped rules
        ([V4_LOOPBACK], (socket.AF_INET6, ("::ffff:127.0.0.1", 1, 0, 0)), True),
        ([V4_LOOPBACK], (socket.AF_INET6, ("::ffff:10.0.0.1", 1, 0, 0)), False),
        ([ipaddress.IPv6Network("::ffff:10.0.0.0/104")], (socket.AF_INET6, ("::ffff:10.1.2.3", 1, 0, 0)), True),
        ([ipaddress.IPv6Network("::ffff:10.0.0.0/104")], (socket.AF_INET, ("10.1.2.3", 1)), True),
        ([ipaddress.IPv6Network("::ffff:10.0.0.0/104")], (socket.AF_INET, ("11.1.2.3", 1)), False),
        # vsock CIDs
        ([CidRule(3)], (AF_VSOCK, (3, 1234)), True),
        ([CidRule(3)], (AF_VSOCK, (4, 1234)), False),
        ([CidRule(2), CidRule(3)], (AF_VSOCK, (3, 1)), True),
        # rules of one family never match peers of another
        ([CidRule(127)], (socket.AF_INET, ("127.0.0.1", 1)), False),
        ([V4_LOOPBACK], (AF_VSOCK, (3, 1)), False),
        ([VmRule(VM)], (socket.AF_INET, ("127.0.0.1", 1)), False),
        ([VmRule(VM), CidRule(1), V4_LOOPBACK], (socket.AF_INET, ("127.0.0.1", 1)), True),
        # unknown peers match nothing
        ([V4_LOOPBACK], None, False),
        ([V4_LOOPBACK, CidRule(1)], (socket.AF_UNIX, "/run/x.sock"), False),
        ([V4_LOOPBACK], (socket.AF_UNIX, ""), False),
        ([], (socket.AF_INET, ("127.0.0.1", 1)), False),
    ],
)
def test_is_allowed(rules: list[AllowRule], peer: Peer | None, allowed: bool) -> None:
    assert is_allowed(rules, peer) is allowed


async def test_a_refused_peer_is_closed_counted_and_logged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    listener = FakeListener()
    backends = FakeBackends()
    route = make_route(options=RouteOptions(allow=(V4_LOOPBACK,)))
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            supervisor = await start(nursery, (route, [listener]), backends=backends)
            refused = listener.dial(peer=(socket.AF_INET, ("10.0.0.7", 40000)))
            assert await receive_all(refused) == b""
            unknown = listener.dial()  # no peer address at all: refused too
            assert await receive_all(unknown) == b""
            allowed = listener.dial(peer=(socket.AF_INET6, ("::ffff:127.0.0.1", 40001, 0, 0)))
            _, backend = await backends.next()
            await roundtrip(allowed, backend)
            stats = supervisor.statistics()["r"]
            assert (stats.accepted, stats.refused, stats.failed, stats.active) == (3, 2, 0, 1)
            assert stats.closed == {EndReason.REFUSED_BY_ALLOW_LIST.label: 2}
            nursery.cancel_scope.cancel()
    assert len(backends.attempts) == 1  # refused peers never reach the backend
    refusals = [r for r in caplog.records if r.getMessage() == "connection closed"][:2]
    assert [r.levelno for r in refusals] == [logging.WARNING] * 2
    assert [(fields(r)["peer"], fields(r)["reason"]) for r in refusals] == [
        ("tcp://10.0.0.7:40000", "refused by allow list"),
        ("-", "refused by allow list"),
    ]


# ------------------------------------------------------------------- statistics and isolation


async def test_statistics_count_connections_and_bytes(autojump_clock: trio.testing.MockClock) -> None:
    listener = FakeListener()
    backends = FakeBackends()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            supervisor = await start(nursery, (make_route(), [listener]), backends=backends)
            stats = supervisor.statistics()["r"]
            assert (stats.accepted, stats.active, stats.refused, stats.failed) == (0, 0, 0, 0)
            assert (stats.bytes_in, stats.bytes_out, stats.closed) == (0, 0, {})

            client = listener.dial()
            _, backend = await backends.next()
            await client.send_all(b"0123456789")
            assert await backend.receive_some() == b"0123456789"
            await backend.send_all(b"x" * 20)
            assert await client.receive_some() == b"x" * 20
            await trio.testing.wait_all_tasks_blocked()
            stats = supervisor.statistics()["r"]  # live transfers count
            assert (stats.accepted, stats.active, stats.bytes_in, stats.bytes_out) == (1, 1, 10, 20)

            await client.send_eof()
            await backend.send_eof()
            assert await receive_all(client) == b""
            await trio.testing.wait_all_tasks_blocked()
            stats = supervisor.statistics()["r"]
            assert (stats.accepted, stats.active, stats.bytes_in, stats.bytes_out) == (1, 0, 10, 20)
            assert stats.closed == {EndReason.CLOSED.label: 1}
            assert supervisor.active == 0
            nursery.cancel_scope.cancel()


async def test_one_connection_failing_does_not_affect_another(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    listener = FakeListener()
    backends = FakeBackends()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            supervisor = await start(nursery, (make_route(), [listener]), backends=backends)
            first = listener.dial()
            first_relay_end, first_backend = await backends.next()
            second = listener.dial()
            _, second_backend = await backends.next()
            await roundtrip(first, first_backend, b"1")
            await roundtrip(second, second_backend, b"2")

            async def broken() -> None:
                await trio.lowlevel.checkpoint()
                raise trio.BrokenResourceError("backend went away")

            first_relay_end.receive_stream.receive_some_hook = broken
            await first_backend.send_all(b"last words")  # the read after these fails
            assert await receive_all(first) in (b"", b"last words")

            await roundtrip(second, second_backend, b"2 again")
            third = listener.dial()  # the listener still accepts
            _, third_backend = await backends.next()
            await roundtrip(third, third_backend, b"3")
            stats = supervisor.statistics()["r"]
            assert (stats.accepted, stats.active) == (3, 2)
            nursery.cancel_scope.cancel()
    reasons = [str(line["reason"]) for line in closed_lines(caplog)]
    assert reasons[0] == "reset by backend"
    assert sorted(reasons[1:]) == ["cancelled", "cancelled"]


async def test_a_log_line_per_connection_end(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    listener = FakeListener()
    backends = FakeBackends()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            await start(nursery, (make_route("ssh"), [listener]), backends=backends)
            client = listener.dial(peer=(socket.AF_INET, ("127.0.0.1", 5555)))
            _, backend = await backends.next()
            await client.send_all(b"hello")
            assert await backend.receive_some() == b"hello"
            await backend.send_all(b"welcome")
            assert await client.receive_some() == b"welcome"
            await trio.sleep(3)
            await client.send_eof()
            await backend.send_eof()
            assert await receive_all(client) == b""
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    (line,) = closed_lines(caplog)
    assert line == {
        "route": "ssh",
        "peer": "tcp://127.0.0.1:5555",
        "target": "tcp://backend.test:8080",
        "bytes_in": 5,
        "bytes_out": 7,
        "duration": pytest.approx(3.0),
        "reason": "closed",
    }
    record = next(r for r in caplog.records if r.getMessage() == "connection closed")
    assert record.levelno == logging.INFO


async def test_idle_timeout_from_the_route(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    listener = FakeListener()
    backends = FakeBackends()
    route = make_route(options=RouteOptions(idle_timeout=30))
    with trio.fail_after(LIMIT * 10):
        async with trio.open_nursery() as nursery:
            await start(nursery, (route, [listener]), backends=backends)
            client = listener.dial()
            _, backend = await backends.next()
            await roundtrip(client, backend)
            assert await receive_all(client) == b""
            assert await receive_all(backend) == b""
            nursery.cancel_scope.cancel()
    (line,) = closed_lines(caplog)
    assert (line["reason"], line["duration"]) == ("idle timeout", pytest.approx(30))


async def test_shutdown_while_connecting_closes_the_client(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    listener = FakeListener()
    backends = FakeBackends(plan=["hang"])
    route = make_route(options=RouteOptions(connect_timeout=100))
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            await start(nursery, (route, [listener]), backends=backends)
            client = listener.dial()
            await trio.testing.wait_all_tasks_blocked()
            assert backends.attempts
            nursery.cancel_scope.cancel()
        assert await receive_all(client) == b""  # the accepted stream was closed, not leaked
    assert [line["reason"] for line in closed_lines(caplog)] == ["cancelled"]


async def test_shutdown_closes_open_connections(autojump_clock: trio.testing.MockClock) -> None:
    listener = FakeListener()
    backends = FakeBackends()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            await start(nursery, (make_route(), [listener]), backends=backends)
            client = listener.dial()
            _, backend = await backends.next()
            await roundtrip(client, backend)
            nursery.cancel_scope.cancel()
        assert await receive_all(client) == b""
        assert await receive_all(backend) == b""
    assert listener.closed


# ----------------------------------------------------------------------- listeners and routes


@pytest.mark.parametrize(
    ("bound", "allow", "warned"),
    [
        ((socket.AF_INET, ("0.0.0.0", 8080)), (), True),
        ((socket.AF_INET, ("192.0.2.1", 8080)), (), True),
        ((socket.AF_INET6, ("::", 8080, 0, 0)), (), True),
        ((socket.AF_INET, ("0.0.0.0", 8080)), (V4_PRIVATE,), False),
        ((socket.AF_INET, ("127.0.0.1", 8080)), (), False),
        ((socket.AF_INET6, ("::1", 8080, 0, 0)), (), False),
        ((socket.AF_INET, ("localhost", 8080)), (), True),  # never a name in practice; warn anyway
        ((socket.AF_UNIX, "/run/x.sock"), (), False),
    ],
)
async def test_listening_lines_and_the_open_listener_warning(
    caplog: pytest.LogCaptureFixture, bound: Peer, allow: tuple[AllowRule, ...], warned: bool
) -> None:
    listener = FakeListener(bound=bound)
    route = make_route("web", RouteOptions(allow=allow))
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            supervisor = await start(nursery, (route, [listener]), backends=FakeBackends())
            assert supervisor.listeners == {"web": [listener]}
            nursery.cancel_scope.cancel()
    listen = base.sockaddr_text(*bound)
    (up,) = [r for r in caplog.records if r.getMessage() == "listening"]
    assert fields(up) == {"route": "web", "listen": listen, "connect": "tcp://backend.test:8080"}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == int(warned)
    if warned:
        assert warnings[0].getMessage().startswith("listening on a non-loopback address with no allow list")
        assert fields(warnings[0]) == {"route": "web", "listen": listen}


async def test_routes_with_several_listeners(autojump_clock: trio.testing.MockClock) -> None:
    a1, a2, b1 = FakeListener("a1"), FakeListener("a2"), FakeListener("b1")
    backends = FakeBackends()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            supervisor = await start(nursery, (make_route("a"), [a1, a2]), (make_route("b"), [b1]), backends=backends)
            for listener in (a1, a2, b1):
                client = listener.dial()
                _, backend = await backends.next()
                await roundtrip(client, backend)
            stats = supervisor.statistics()
            assert (stats["a"].accepted, stats["b"].accepted) == (2, 1)
            nursery.cancel_scope.cancel()
    assert [a1.closed, a2.closed, b1.closed] == [True, True, True]


async def test_a_route_that_cannot_listen_stops_serve_routes_and_closes_the_others() -> None:
    opened = FakeListener("first")
    error = EndpointError("unix:///fake/second", "listen", "address already in use")

    async def open_listeners(address: Address, options: RouteOptions) -> list[base.Listener]:
        await trio.lowlevel.checkpoint()
        if address == UnixAddress("/fake/second"):
            raise error
        return [opened]

    table = RouteTable((make_route("first"), make_route("second")))
    with trio.fail_after(LIMIT), pytest.RaisesGroup(EndpointError, flatten_subgroups=True) as raised:
        await serve_routes(table, open_listeners=open_listeners, connect=FakeBackends().connect)
    assert _leaves(raised.value) == [error]
    assert opened.closed


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


async def test_serve_route_leaves_listeners_it_was_given_open(autojump_clock: trio.testing.MockClock) -> None:
    listener = FakeListener()
    backends = FakeBackends()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as connections:
            supervisor = Supervisor(connections, connect=backends.connect)
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as routes:
                    got = await routes.start(
                        functools.partial(supervisor.serve_route, make_route(), listeners=[listener])
                    )
                    assert got == [listener]
                    client = listener.dial()
                    _, backend = await backends.next()
                    await roundtrip(client, backend)
                    routes.cancel_scope.cancel()
            assert not scope.cancelled_caught
            assert not listener.closed
            # Stopping the route stops accepting, but its open connection goes on.
            await roundtrip(client, backend, b" after the route stopped")
            await client.send_eof()
            await backend.send_eof()
            await supervisor.wait_idle()
    assert supervisor.statistics()["r"].closed == {EndReason.CLOSED.label: 1}


# ------------------------------------------------------------------------ real loopback sockets


async def _echo(stream: Stream) -> None:
    async with stream:
        while data := await stream.receive_some():
            await stream.send_all(data)
        await stream.send_eof()


async def test_end_to_end_tcp_to_unix(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    backend_address = UnixAddress(str(tmp_path / "echo.sock"))
    route = Route("e2e", TcpAddress("127.0.0.1", 0), backend_address)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            echo_listeners = await Backend().open_listeners(backend_address, RouteOptions())
            await nursery.start(trio.serve_listeners, _echo, echo_listeners)
            supervisor: Supervisor = await nursery.start(serve_routes, RouteTable((route,)))
            (listener,) = supervisor.listeners["e2e"]
            assert isinstance(listener, trio.SocketListener)
            client = await trio.testing.open_stream_to_socket_listener(listener)
            await client.send_all(b"hello through hvbridge")
            await client.send_eof()
            assert await receive_all(client) == b"hello through hvbridge"
            await client.aclose()
            await supervisor.wait_idle()
            nursery.cancel_scope.cancel()
    (line,) = closed_lines(caplog)
    assert line["route"] == "e2e"
    assert str(line["peer"]).startswith("tcp://127.0.0.1:")
    assert line["target"] == str(backend_address)
    assert (line["bytes_in"], line["bytes_out"], line["reason"]) == (22, 22, "closed")


async def test_real_allow_list_refuses_with_a_reset(tmp_path: Path) -> None:
    refuse = Route("deny", TcpAddress("127.0.0.1", 0), BACKEND, RouteOptions(allow=(V4_PRIVATE,)))
    backends = FakeBackends()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            supervisor: Supervisor = await nursery.start(
                functools.partial(serve_routes, RouteTable((refuse,)), connect=backends.connect)
            )
            (listener,) = supervisor.listeners["deny"]
            assert isinstance(listener, trio.SocketListener)
            client = await trio.testing.open_stream_to_socket_listener(listener)
            with pytest.raises(trio.BrokenResourceError) as failure:
                await client.receive_some()
            assert isinstance(failure.value.__cause__, ConnectionResetError)
            await client.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert supervisor.statistics()["deny"].refused == 1
            nursery.cancel_scope.cancel()
    assert backends.attempts == []


async def test_real_connect_failure_resets_the_client(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = UnixAddress(str(tmp_path / "nobody-here.sock"))
    route = Route("gone", TcpAddress("127.0.0.1", 0), missing)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            supervisor: Supervisor = await nursery.start(serve_routes, RouteTable((route,)))
            (listener,) = supervisor.listeners["gone"]
            assert isinstance(listener, trio.SocketListener)
            sock = trio.socket.socket()
            with sock:
                try:  # the splice reactor may reset it before connect() has returned
                    await sock.connect(listener.socket.getsockname())
                    with pytest.raises(ConnectionResetError):
                        await sock.recv(1)
                except ConnectionResetError:
                    pass
            await supervisor.wait_idle()
            nursery.cancel_scope.cancel()
    (line,) = closed_lines(caplog)
    assert line["reason"] == "connect failed: backend unavailable (No such file or directory)"


# ------------------------------------------------------------------------- PROXY protocol

V1_HEADER: Final = b"PROXY TCP4 10.1.2.3 192.0.2.1 4000 443\r\n"


async def test_proxy_protocol_header_goes_first_and_the_splice_path_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hvbridge.relay import splice

    spliced: list[bool] = []

    def spy(client: trio.abc.Stream, backend: trio.abc.Stream) -> bool:
        spliced.append(splice.spliceable.__wrapped__(client, backend))  # type: ignore[attr-defined]
        return spliced[-1]

    spy.__wrapped__ = splice.spliceable  # type: ignore[attr-defined]
    monkeypatch.setattr(splice, "spliceable", spy)
    with trio.fail_after(LIMIT):
        backend_listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        backend_port = backend_listener.socket.getsockname()[1]
        route = Route(
            "pp",
            TcpAddress("127.0.0.1", 0),
            TcpAddress("127.0.0.1", backend_port),
            RouteOptions(proxy_protocol="v1"),
        )
        async with trio.open_nursery() as nursery:
            supervisor: Supervisor = await nursery.start(serve_routes, RouteTable((route,)))
            (listener,) = supervisor.listeners["pp"]
            assert isinstance(listener, trio.SocketListener)
            client = await trio.testing.open_stream_to_socket_listener(listener)
            await client.send_all(b"hello")
            backend = await backend_listener.accept()
            expected = (
                f"PROXY TCP4 127.0.0.1 127.0.0.1 {client.socket.getsockname()[1]}"
                f" {listener.socket.getsockname()[1]}\r\nhello"
            ).encode()
            received = b""
            while len(received) < len(expected):
                received += await backend.receive_some()
            assert received == expected
            await backend.send_all(b"pong")
            assert await client.receive_some() == b"pong"
            await client.aclose()
            await backend.aclose()
            await supervisor.wait_idle()
            await backend_listener.aclose()
            nursery.cancel_scope.cancel()
    assert spliced == [True]


async def test_accept_proxy_uses_the_header_source_for_allow_and_logs(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    listener = FakeListener()
    backends = FakeBackends()
    route = make_route(options=RouteOptions(accept_proxy=True, allow=(V4_PRIVATE,)))
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            await start(nursery, (route, [listener]), backends=backends)
            # The load balancer itself is 127.0.0.1, outside the allow list; its client is inside.
            client = listener.dial((socket.AF_INET, ("127.0.0.1", 5555)))
            await client.send_all(V1_HEADER + b"first bytes")
            _, backend = await backends.next()
            assert await backend.receive_some() == b"first bytes"  # the header is not passed on
            await roundtrip(client, backend)
            await client.aclose()
            assert await receive_all(backend) == b""
            await backend.aclose()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    (line,) = closed_lines(caplog)
    assert (line["peer"], line["via"]) == ("tcp://10.1.2.3:4000", "tcp://127.0.0.1:5555")


async def test_accept_proxy_refuses_a_header_source_outside_allow(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    listener = FakeListener()
    backends = FakeBackends()
    route = make_route(options=RouteOptions(accept_proxy=True, allow=(V4_PRIVATE,)))
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            supervisor = await start(nursery, (route, [listener]), backends=backends)
            client = listener.dial((socket.AF_INET, ("10.0.0.1", 5555)))
            await client.send_all(b"PROXY TCP4 192.0.2.9 192.0.2.1 4000 443\r\n")
            assert await receive_all(client) == b""
            await trio.testing.wait_all_tasks_blocked()  # counted as the connection ends, after the close
            assert supervisor.statistics()["r"].refused == 1
            nursery.cancel_scope.cancel()
    assert backends.attempts == []
    assert closed_lines(caplog)[0]["reason"] == "refused by allow list"


@pytest.mark.parametrize(
    ("sent", "close", "reason", "after"),
    [
        (
            b"GET / HTTP/1.1\r\n",
            False,
            "no PROXY protocol header: the connection starts with b'GET / HTTP/1.1\\r\\n'",
            0,
        ),
        (b"PROXY TCP4 1.2.3.4", True, "the client closed after 18 bytes, before a whole PROXY header", 0),
        (b"PROXY TCP4 1.2.3.4", False, "no whole PROXY header within 5s (18 bytes came)", 5),
    ],
)
async def test_accept_proxy_closes_a_connection_without_a_valid_header(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    sent: bytes,
    close: bool,
    reason: str,
    after: float,
) -> None:
    listener = FakeListener()
    backends = FakeBackends()
    route = make_route(options=RouteOptions(accept_proxy=True, connect_timeout=5))
    with trio.fail_after(LIMIT * 10):
        async with trio.open_nursery() as nursery:
            supervisor = await start(nursery, (route, [listener]), backends=backends)
            started = trio.current_time()
            client = listener.dial()
            await client.send_all(sent)
            if close:
                await client.send_stream.aclose()
            assert await receive_all(client) == b""
            assert trio.current_time() - started == pytest.approx(after)
            await trio.testing.wait_all_tasks_blocked()
            assert supervisor.statistics()["r"].refused == 1
            nursery.cancel_scope.cancel()
    assert backends.attempts == []
    (line,) = closed_lines(caplog)
    assert line["reason"] == f"refused: bad PROXY header: {reason}"
    record = next(r for r in caplog.records if r.getMessage() == "connection closed")
    assert record.levelno == logging.WARNING


async def test_accept_proxy_and_proxy_protocol_pass_the_client_on(autojump_clock: trio.testing.MockClock) -> None:
    listener = FakeListener()
    backends = FakeBackends()
    route = make_route("lb", RouteOptions(accept_proxy=True, proxy_protocol="v2"))
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            await start(nursery, (route, [listener]), backends=backends)
            client = listener.dial((socket.AF_INET, ("127.0.0.1", 5555)))
            await client.send_all(V1_HEADER + b"x")
            _, backend = await backends.next()
            received = b""
            while not received.endswith(b"x"):
                received += await backend.receive_some()
            signature = b"\r\n\r\n\x00\r\nQUIT\n"
            assert received == (
                signature
                + b"\x21\x11\x00\x11"
                + bytes([10, 1, 2, 3, 192, 0, 2, 1])
                + (4000).to_bytes(2, "big")
                + (443).to_bytes(2, "big")
                + b"\xe0\x00\x02lb"
                + b"x"
            )
            nursery.cancel_scope.cancel()


async def test_a_backend_that_fails_the_header_send_closes_the_client(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    listener = FakeListener()
    route = make_route(options=RouteOptions(proxy_protocol="v1"))

    async def connect(address: Address, options: RouteOptions) -> Stream:
        await trio.lowlevel.checkpoint()
        relay_end, backend = trio.testing.memory_stream_pair()
        await backend.aclose()
        return relay_end

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            supervisor: Supervisor = await nursery.start(
                functools.partial(
                    serve_routes,
                    RouteTable((route,)),
                    open_listeners=lambda *_: _listeners(listener),
                    connect=connect,
                )
            )
            client = listener.dial()
            assert await receive_all(client) == b""
            await trio.testing.wait_all_tasks_blocked()
            assert supervisor.statistics()["r"].failed == 1
            nursery.cancel_scope.cancel()
    assert str(closed_lines(caplog)[0]["reason"]).startswith(
        "connect failed: cannot send the first bytes to the backend"
    )


async def _listeners(listener: FakeListener) -> list[base.Listener]:
    await trio.lowlevel.checkpoint()
    return [listener]


async def test_accept_proxy_when_the_client_goes_mid_header(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    listener = FakeListener()
    backends = FakeBackends()
    route = make_route(options=RouteOptions(accept_proxy=True))
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            await start(nursery, (route, [listener]), backends=backends)
            client = listener.dial()
            await client.send_all(b"PROXY ")
            await trio.testing.wait_all_tasks_blocked()
            await client.aclose()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert backends.attempts == []
    assert str(closed_lines(caplog)[0]["reason"]).startswith("refused: bad PROXY header: ")
