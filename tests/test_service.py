"""service.py in this process (reload, graceful shutdown, signals, --watch) and listeners.py.

Routes run on loopback (127.0.0.1 port 0, Unix sockets in tmp_path) to an echo backend in the
test's nursery; every test is bounded by trio.fail_after. Signals are real (os.kill on this
process) and sent only while serve() has its signal receiver open.
"""

from __future__ import annotations

import errno
import functools
import grp
import logging
import os
import pwd
import signal
import socket
from typing import TYPE_CHECKING, NoReturn

import attrs
import pytest
import trio
from support.settle import settled

from hvbridge import service, transports
from hvbridge.addresses import HyperVAddress, TcpAddress, UnixAddress, VsockAddress, parse_address
from hvbridge.backend import Backend
from hvbridge.engine import LocalEngine
from hvbridge.errors import ConfigError, EndpointError, Problem
from hvbridge.listeners import Inherited, ListenerPool, inherit, listener_from_fd, pool_key
from hvbridge.routes import BridgeSettings, Route, RouteOptions, RouteTable
from hvbridge.service import Service, check_families, file_signature, serve, watch_file
from hvbridge.systemd import ActivatedSocket, Notifier
from hvbridge.transports import base

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from hvbridge.addresses import Address

TIMEOUT = 15


# ------------------------------------------------------------------------------- helpers


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
        await stream.send_eof()


async def echo_backend(nursery: trio.Nursery) -> TcpAddress:
    """An echo server on 127.0.0.1 (port 0)."""
    [listener] = await nursery.start(functools.partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
    return TcpAddress("127.0.0.1", listener.socket.getsockname()[1])


def route(name: str, backend: Address, listen: str = "tcp://127.0.0.1:0", options: RouteOptions | None = None) -> Route:
    """A route from `listen` to `backend`."""
    return Route(name, parse_address(listen), backend, options or RouteOptions())


def table(*routes: Route, grace: float = 10.0, metrics: str | None = None) -> RouteTable:
    """A table of `routes`."""
    bridge = BridgeSettings(shutdown_grace=grace, metrics=parse_address(metrics) if metrics else None)
    return RouteTable(routes, bridge, "routes.toml")


def bound(svc: Service, name: str) -> Address:
    """Where route `name` listens now."""
    engine = svc.engine
    assert isinstance(engine, LocalEngine)
    return parse_address(base.listener_address(engine.running[name].listeners[0]))


async def connect(address: Address) -> trio.SocketStream:
    """A connection to a TCP or Unix endpoint."""
    if isinstance(address, TcpAddress):
        sock = trio.socket.socket()
        try:
            await sock.connect((address.host, address.port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)
    assert isinstance(address, UnixAddress)
    return await trio.open_unix_socket(address.path)


async def round_trip(stream: trio.SocketStream, data: bytes) -> None:
    """Send `data` and read the same bytes back."""
    await stream.send_all(data)
    received = b""
    while len(received) < len(data):
        chunk = await stream.receive_some(65536)
        assert chunk, "EOF before the echo came back"
        received += chunk
    assert received == data


async def assert_serves(address: Address) -> None:
    """A fresh connection to `address` echoes."""
    stream = await connect(address)
    async with stream:
        await round_trip(stream, b"ping")


async def assert_refused(address: Address) -> None:
    """Nothing accepts on `address`."""
    with pytest.raises(OSError, match=r"Connection refused|No such file"):
        await connect(address)


@attrs.define
class Loader:
    """A `load` callable that returns the tables (or raises the errors) it is given in turn."""

    results: list[RouteTable | ConfigError] = attrs.field(factory=list)

    def __call__(self) -> RouteTable:
        result = self.results.pop(0)
        if isinstance(result, ConfigError):
            raise result
        return result


@attrs.define
class Notes:
    """A Notifier stand-in that records what it would send."""

    sent: list[str] = attrs.field(factory=list)

    def notifier(self) -> Notifier:
        notes = self

        @attrs.define(eq=False)
        class Recording(Notifier):
            def notify(self, **fields: str | int) -> bool:
                notes.sent.append(next(iter(fields)))
                return True

        return Recording("unused")


async def start(
    nursery: trio.Nursery, first: RouteTable, loader: Loader | None = None, pool: ListenerPool | None = None
) -> Service:
    """serve(first) in `nursery`; the Service once every route is up."""
    run = functools.partial(serve, first, load=loader, notifier=Notifier(None), pool=pool)
    svc: Service = await nursery.start(run)
    return svc


# ---------------------------------------------------------------------------------- reload


async def test_reload_adds_removes_and_changes_routes(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        loader = Loader()
        first = table(route("keep", backend), route("change", backend), route("drop", backend))
        svc = await start(nursery, first, loader)
        engine = svc.engine
        assert isinstance(engine, LocalEngine)
        keep, change, drop = bound(svc, "keep"), bound(svc, "change"), bound(svc, "drop")
        keep_listener = engine.running["keep"].listeners[0]
        change_listener = engine.running["change"].listeners[0]
        # A connection open on each route across the reload.
        open_streams = [await connect(a) for a in (keep, change, drop)]
        for stream in open_streams:
            await round_trip(stream, b"before")

        loader.results.append(
            table(
                route("keep", backend),
                route("change", backend, options=RouteOptions(connect_timeout=1.0)),
                route("new", backend),
            )
        )
        assert await svc.reload()

        assert engine.running["keep"].listeners[0] is keep_listener
        assert engine.running["change"].listeners[0] is change_listener  # same address: same socket
        assert engine.running["change"].route.options.connect_timeout == 1.0
        assert "drop" not in engine.running
        await assert_serves(keep)
        await assert_serves(change)
        await assert_serves(bound(svc, "new"))
        await assert_refused(drop)
        for stream in open_streams:  # never cut by the reload
            await round_trip(stream, b"after")
            await stream.aclose()
        svc.request_stop("test")


async def test_invalid_reload_keeps_the_table(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        problems = [
            Problem("routes.toml", 3, "routes.web.connect", "invalid vsock CID 'x'"),
            Problem("routes.toml", 7, "routes.db.listen_x", "unknown key"),
        ]
        loader = Loader([ConfigError(problems)])
        svc = await start(nursery, table(route("web", backend)), loader)
        before = svc.table
        with caplog.at_level(logging.ERROR, "hvbridge"):
            assert not await svc.reload()
        assert svc.table is before
        await assert_serves(bound(svc, "web"))
        messages = [r.getMessage() for r in caplog.records]
        assert messages == [f"reload failed, keeping the running table: {p}" for p in problems]
        svc.request_stop("test")


async def test_reload_that_cannot_bind_keeps_the_table(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        busy = trio.socket.socket()
        await busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        loader = Loader()
        svc = await start(nursery, table(route("web", backend)), loader)
        engine = svc.engine
        assert isinstance(engine, LocalEngine)
        loader.results.append(
            table(
                route("web", backend, options=RouteOptions(connect_timeout=1.0)),
                route("new", backend, listen="tcp://127.0.0.2:0"),
            )
        )
        loader.results.append(
            table(
                route("web", backend),
                route("fresh", backend, listen="tcp://127.0.0.3:0"),  # opened, then closed again
                route("busy", backend, listen=f"tcp://127.0.0.1:{port}"),
            )
        )
        with caplog.at_level(logging.ERROR, "hvbridge"):
            assert await svc.reload()
            assert set(engine.running) == {"web", "new"}
            assert not await svc.reload()
        assert set(engine.running) == {"web", "new"}
        assert engine.running["web"].route.options.connect_timeout == 1.0
        assert "address already in use" in caplog.records[-1].getMessage()
        assert len(svc.pool.opened) == 2  # the new route's socket was not kept, nor leaked
        busy.close()
        svc.request_stop("test")


@pytest.mark.parametrize("spelling", ["tcp://0.0.0.0:{port}", "tcp://localhost:{port}", "tcp://127.0.0.1:{port}"])
async def test_reload_moves_a_route_to_another_spelling_of_its_port(
    nursery: trio.Nursery, spelling: str, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        with socket.socket() as probe:  # a port free a moment ago; the route binds it at once
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        loader = Loader()
        first = "tcp://127.0.0.1:{port}" if spelling != "tcp://127.0.0.1:{port}" else "tcp://0.0.0.0:{port}"
        svc = await start(nursery, table(route("web", backend, listen=first.format(port=port))), loader)
        loader.results.append(table(route("web", backend, listen=spelling.format(port=port))))
        with caplog.at_level(logging.INFO, "hvbridge"):
            assert await svc.reload()
        assert svc.table is not None
        assert str(svc.table.routes[0].listen) == spelling.format(port=port)
        await assert_serves(TcpAddress("127.0.0.1", port))
        assert len(svc.pool.opened) == 1
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        svc.request_stop("test")


async def test_a_failed_reload_binds_a_released_socket_again(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        busy = trio.socket.socket()
        await busy.bind(("127.0.0.1", 0))
        busy.listen()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        loader = Loader()
        svc = await start(nursery, table(route("web", backend, listen=f"tcp://127.0.0.1:{port}")), loader)
        loader.results.append(
            table(
                route("web", backend, listen=f"tcp://0.0.0.0:{port}"),  # released, then bound
                route("busy", backend, listen=f"tcp://127.0.0.1:{busy.getsockname()[1]}"),  # fails
            )
        )
        with caplog.at_level(logging.ERROR, "hvbridge"):
            assert not await svc.reload()
        assert svc.table is not None
        assert str(svc.table.routes[0].listen) == f"tcp://127.0.0.1:{port}"
        await assert_serves(TcpAddress("127.0.0.1", port))  # the running table serves again
        assert caplog.records[-1].getMessage() == (
            f"reload failed, keeping the running table: routes.busy.listen: listen tcp://127.0.0.1:"
            f"{busy.getsockname()[1]}: address already in use; stop the other process or choose another port/path"
        )
        busy.close()
        svc.request_stop("test")


async def test_an_address_in_use_at_start_names_the_route(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        with trio.socket.socket() as busy:
            await busy.bind(("127.0.0.1", 0))
            busy.listen()
            listen = f"tcp://127.0.0.1:{busy.getsockname()[1]}"
            with pytest.raises(EndpointError) as raised:
                await start(nursery, table(route("web", backend, listen=listen)))
        assert str(raised.value) == (
            f"routes.web.listen: listen {listen}: address already in use; stop the other process or choose"
            " another port/path"
        )


async def test_routes_whose_names_bind_one_address_are_refused_at_start(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        first = table(
            route("a", backend, listen="tcp://127.0.0.1:8080"), route("b", backend, listen="tcp://localhost:8080")
        )
        with pytest.raises(ConfigError) as raised:
            await start(nursery, first)
        assert str(raised.value) == (
            "routes.toml: routes.b.listen: 'tcp://localhost:8080' binds what routes.a.listen ('tcp://127.0.0.1:8080')"
            " binds; expected each route to listen on its own endpoint"
        )


async def test_reload_of_a_family_this_os_lacks(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        hyperv = Route("vm", parse_address("tcp://127.0.0.1:0"), parse_address("hvsock://loopback/22"))
        svc = await start(nursery, table(route("web", backend)), Loader([table(route("web", backend), hyperv)]))
        with caplog.at_level(logging.ERROR, "hvbridge"):
            if transports.unavailable_reason(hyperv.connect) is None:  # pragma: no cover - Windows
                pytest.skip("Hyper-V sockets exist here")
            assert not await svc.reload()
        assert "routes.vm.connect" in caplog.records[-1].getMessage()
        svc.request_stop("test")


async def test_reload_changes_a_kept_unix_socket_mode(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = tmp_path / "web.sock"
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        web = route("web", backend, listen=f"unix://{path}", options=RouteOptions(mode=0o600))
        loader = Loader([table(attrs.evolve(web, options=attrs.evolve(web.options, mode=0o660)))])
        svc = await start(nursery, table(web), loader)
        inode = path.stat().st_ino
        assert path.stat().st_mode & 0o777 == 0o600
        assert await svc.reload()
        assert path.stat().st_ino == inode
        assert path.stat().st_mode & 0o777 == 0o660
        await assert_serves(UnixAddress(str(path)))
        svc.request_stop("test")


@pytest.mark.parametrize(
    ("owner", "group"),
    [
        (pwd.getpwuid(os.getuid()).pw_name, None),
        (None, grp.getgrgid(os.getgid()).gr_name),
        (str(os.getuid()), str(os.getgid())),
    ],
)
async def test_reload_changes_a_kept_unix_socket_owner(
    nursery: trio.Nursery, tmp_path: Path, owner: str | None, group: str | None
) -> None:
    path = tmp_path / "web.sock"
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        web = route("web", backend, listen=f"unix://{path}")
        changed = route("web", backend, listen=f"unix://{path}", options=RouteOptions(owner=owner, group=group))
        unknown = route("web", backend, listen=f"unix://{path}", options=RouteOptions(owner="no-such-user-here"))
        svc = await start(nursery, table(web), Loader([table(changed), table(unknown)]))
        assert await svc.reload()
        assert (path.stat().st_uid, path.stat().st_gid) == (os.getuid(), os.getgid())
        assert not await svc.reload()  # cannot chown: keep the table
        await assert_serves(UnixAddress(str(path)))
        svc.request_stop("test")


async def test_start_fails_when_metrics_cannot_listen(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        busy = trio.socket.socket()
        await busy.bind(("127.0.0.1", 0))
        busy.listen()
        with busy, pytest.raises(EndpointError, match="address already in use"):
            await serve(
                table(route("web", backend), metrics=f"tcp://127.0.0.1:{busy.getsockname()[1]}"),
                notifier=Notifier(None),
            )


async def test_reload_from_a_table_without_a_file(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        svc = await start(nursery, table(route("web", backend)))
        with caplog.at_level(logging.WARNING, "hvbridge"):
            svc.request_reload("SIGHUP")
        assert caplog.records[-1].getMessage().startswith("SIGHUP: ignored; this process cannot re-read")
        svc.request_stop("test")


async def test_reload_moves_the_metrics_endpoint(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        first = table(route("web", backend), metrics="tcp://127.0.0.1:0")
        loader = Loader([table(route("web", backend), metrics="tcp://127.0.0.2:0"), table(route("web", backend))])
        svc = await start(nursery, first, loader)
        old = parse_address(base.listener_address(svc.metrics_listeners[0]))
        assert isinstance(old, TcpAddress)
        await assert_metrics(old, 'hvbridge_route_listeners{route="web"} 1.0')
        assert await svc.reload()
        new = parse_address(base.listener_address(svc.metrics_listeners[0]))
        assert isinstance(new, TcpAddress)
        assert new.host == "127.0.0.2"
        await assert_metrics(new, 'hvbridge_route_listeners{route="web"} 1.0')
        await assert_refused(old)
        assert await svc.reload()
        assert svc.metrics_listeners == []
        await assert_refused(new)
        svc.request_stop("test")


async def test_reload_keeps_metrics_where_it_cannot_move(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        busy = trio.socket.socket()
        await busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f"tcp://127.0.0.1:{busy.getsockname()[1]}"
        loader = Loader([table(route("web", backend), metrics=taken)])
        svc = await start(nursery, table(route("web", backend), metrics="tcp://127.0.0.1:0"), loader)
        with caplog.at_level(logging.ERROR, "hvbridge"):
            assert await svc.reload()
        assert caplog.records[-1].getMessage().startswith("metrics not moved: listen ")
        old = parse_address(base.listener_address(svc.metrics_listeners[0]))
        assert isinstance(old, TcpAddress)
        await assert_metrics(old, "hvbridge_connections_active")
        busy.close()
        svc.request_stop("test")


async def assert_metrics(address: TcpAddress, expected: str) -> None:
    """GET /metrics at `address` answers 200 with `expected` in the text."""
    stream = await connect(address)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        response = b""
        while chunk := await stream.receive_some(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert expected in response.decode()


async def test_metrics_count_the_traffic(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        svc = await start(nursery, table(route("web", backend), metrics="tcp://127.0.0.1:0"))
        stream = await connect(bound(svc, "web"))
        await round_trip(stream, b"x" * 1000)
        await stream.send_eof()
        assert await stream.receive_some(10) == b""
        await stream.aclose()
        await wait_until(lambda: engine_idle(svc))
        text = (await svc.render_metrics()).decode()
        assert 'hvbridge_connections_accepted_total{route="web"} 1.0' in text
        assert 'hvbridge_relayed_bytes_total{direction="client_to_backend",route="web"} 1000.0' in text
        assert 'hvbridge_relayed_bytes_total{direction="backend_to_client",route="web"} 1000.0' in text
        assert 'hvbridge_connect_duration_seconds_count{route="web"} 1.0' in text
        assert 'hvbridge_connections_closed_total{reason="closed",route="web"} 1.0' in text
        svc.request_stop("test")


def engine_idle(svc: Service) -> bool:
    """No connection is open in the service's (local) engine."""
    engine = svc.engine
    assert isinstance(engine, LocalEngine)
    return engine.supervisor.active == 0


async def test_nothing_is_logged_per_read(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        svc = await start(nursery, table(route("web", backend)))
        with caplog.at_level(logging.DEBUG, "hvbridge"):
            stream = await connect(bound(svc, "web"))
            for _ in range(200):
                await round_trip(stream, b"y" * 100)
            await stream.send_eof()
            assert await stream.receive_some(10) == b""
            await stream.aclose()
            await svc.engine.wait_idle()
        assert [r.getMessage() for r in caplog.records] == ["connection closed"]
        svc.request_stop("test")


# -------------------------------------------------------------------------------- shutdown


async def test_stop_waits_for_open_connections(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        done = trio.Event()
        svc: Service | None = None

        async def run(task_status: trio.TaskStatus[Service]) -> None:
            await serve(table(route("web", backend)), notifier=Notifier(None), task_status=task_status)
            done.set()

        svc = await nursery.start(run)
        address = bound(svc, "web")
        stream = await connect(address)
        await round_trip(stream, b"before")
        svc.request_stop("SIGTERM")
        await settled()  # the splice reactor too: it serves this route's listener
        await assert_refused(address)  # not accepting at once
        await round_trip(stream, b"during")  # the open one goes on
        assert not done.is_set()
        await stream.send_eof()
        assert await stream.receive_some(10) == b""
        await stream.aclose()
        await done.wait()


async def test_stop_cuts_connections_after_the_grace(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        svc = await start(nursery, table(route("web", backend), grace=0.05))
        stream = await connect(bound(svc, "web"))
        await round_trip(stream, b"before")
        with caplog.at_level(logging.INFO, "hvbridge"):
            svc.request_stop("SIGTERM")
            with pytest.raises(trio.BrokenResourceError):  # cut: the relay resets the client
                await _read_until_cut(stream)
        await stream.aclose()
        assert any("shutdown grace of 0.05s is over" in r.getMessage() for r in caplog.records)


async def _read_until_cut(stream: trio.SocketStream) -> None:
    for _ in range(2):  # a reset shows on a read, or after an EOF on the next write
        if not await stream.receive_some(10):
            await stream.send_all(b"x" * 65536)


async def wait_until(done: Callable[[], bool]) -> None:
    """Poll `done()` (bounded in count; the caller bounds the time)."""
    for _ in range(10_000):
        if done():
            return
        await trio.sleep(0.01)
    raise AssertionError("gave up waiting")


async def test_a_second_stop_exits_at_once(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        done = trio.Event()

        async def run(task_status: trio.TaskStatus[Service]) -> None:
            await serve(table(route("web", backend), grace=3600), notifier=Notifier(None), task_status=task_status)
            done.set()

        svc = await nursery.start(run)
        stream = await connect(bound(svc, "web"))
        await round_trip(stream, b"x")
        svc.request_stop("SIGTERM")
        svc.request_reload("SIGHUP")  # ignored while stopping
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        svc.request_stop("SIGINT")
        await done.wait()
        await stream.aclose()


async def test_a_worker_drain_request_only_shortens_the_grace(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        done = trio.Event()

        async def run(task_status: trio.TaskStatus[Service]) -> None:
            await serve(table(route("web", backend), grace=3600), notifier=Notifier(None), task_status=task_status)
            done.set()

        svc = await nursery.start(run)
        stream = await connect(bound(svc, "web"))
        await round_trip(stream, b"x")
        svc.request_stop("SIGTERM")
        await settled()
        svc.request_stop("asked by the main process", float("inf"))  # not a second signal
        await settled()
        assert not done.is_set()
        svc.request_stop("asked by the main process", 0.01)
        await done.wait()
        await stream.aclose()


async def test_signals(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        loader = Loader([table(route("web", backend), route("new", backend))])
        done = trio.Event()
        notes = Notes()

        async def run(task_status: trio.TaskStatus[Service]) -> None:
            first = table(route("web", backend))
            await serve(first, load=loader, notifier=notes.notifier(), task_status=task_status)
            done.set()

        svc = await nursery.start(run)
        engine = svc.engine
        assert isinstance(engine, LocalEngine)
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_until(lambda: "new" in engine.running)
        os.kill(os.getpid(), signal.SIGTERM)
        await done.wait()
        assert notes.sent == ["READY", "RELOADING", "READY", "STOPPING"]


async def test_start_fails_when_a_listener_cannot_open(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a socket")
    bad = route("web", TcpAddress("127.0.0.1", 9), listen=f"unix://{tmp_path / 'file'}")
    with trio.fail_after(TIMEOUT), pytest.raises(EndpointError, match="not a socket"):
        await serve(table(bad), notifier=Notifier(None))


async def test_check_families() -> None:
    hyperv = parse_address("hvsock://loopback/22")
    assert isinstance(hyperv, HyperVAddress)
    if transports.unavailable_reason(hyperv) is None:  # pragma: no cover - Windows
        pytest.skip("Hyper-V sockets exist here")
    check_families(table(route("ok", TcpAddress("127.0.0.1", 1))))
    bad = Route("vm", hyperv, hyperv)
    with pytest.raises(ConfigError) as info:
        check_families(table(bad))
    assert [p.location for p in info.value.problems] == ["routes.vm.listen", "routes.vm.connect"]


# ---------------------------------------------------------------------------- route errors


@attrs.define(eq=False)
class BrokenListener(trio.abc.Listener[trio.abc.HalfCloseableStream]):
    """A listener whose accept() fails with an error that is not a lack of resources."""

    async def accept(self) -> NoReturn:
        await trio.lowlevel.checkpoint()
        raise OSError(errno.EINVAL, "broken")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_a_failing_route_stops_alone(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)

        async def open_listeners(address: Address, options: RouteOptions) -> list[base.Listener]:
            if address == parse_address("unix:@hvbridge-test-broken"):
                return [BrokenListener()]
            return await Backend().open_listeners(address, options)

        pool = ListenerPool(open_listeners=open_listeners)
        broken = route("broken", backend, listen="unix:@hvbridge-test-broken")
        with caplog.at_level(logging.ERROR, "hvbridge"):
            svc = await start(nursery, table(route("web", backend), broken), pool=pool)
            engine = svc.engine
            assert isinstance(engine, LocalEngine)
            await wait_until(lambda: "broken" not in engine.running)
        assert "route stopped: " in caplog.records[-1].getMessage()
        await assert_serves(bound(svc, "web"))
        text = (await svc.render_metrics()).decode()
        assert 'hvbridge_route_listeners{route="broken"} 0.0' in text
        svc.request_stop("test")


# ---------------------------------------------------------------------------------- pool


def test_pool_key() -> None:
    backend = TcpAddress("127.0.0.1", 1)
    assert pool_key(route("a", backend)) == (TcpAddress("127.0.0.1", 0), "a")
    assert pool_key(route("a", backend, listen="tcp://127.0.0.1:80")) == (TcpAddress("127.0.0.1", 80), None)
    assert pool_key(route("a", backend, listen="vsock://any:any")) == (parse_address("vsock://any:any"), "a")
    assert pool_key(route("a", backend, listen="vsock://any:22"))[1] is None
    assert isinstance(parse_address("vsock://any:22"), VsockAddress)


async def test_inherited_sockets_by_name_and_by_address(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        socks = []
        for _ in range(2):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            socks.append(sock)
        by_address = f"tcp://127.0.0.1:{socks[1].getsockname()[1]}"
        activated = [ActivatedSocket(socks[0].detach(), "web"), ActivatedSocket(socks[1].detach(), "unknown")]
        pool = ListenerPool(inherit(activated))
        routes = table(route("web", backend, listen="tcp://127.0.0.1:1"), route("other", backend, listen=by_address))
        svc = await start(nursery, routes, pool=pool)
        engine = svc.engine
        assert isinstance(engine, LocalEngine)
        assert [engine.running[n].listeners[0] for n in ("web", "other")] == [i.listener for i in pool.inherited]
        assert pool.opened == {}
        await assert_serves(bound(svc, "web"))
        await assert_serves(parse_address(by_address))
        svc.request_stop("test")


async def test_inherit_skips_what_is_not_a_listening_socket(caplog: pytest.LogCaptureFixture) -> None:
    a, b = socket.socketpair()
    fd = a.fileno()
    with a, b, caplog.at_level(logging.WARNING, "hvbridge"):
        assert inherit([ActivatedSocket(fd, "x")]) == []
        assert a.fileno() == fd  # left open, as found
    assert caplog.records[0].getMessage().startswith(f"socket-activated fd {fd} is not a listening")


async def test_listener_from_fd_takes_the_socket() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    listener = listener_from_fd(sock.detach())
    assert isinstance(listener, trio.SocketListener)
    listener.socket.close()


# --------------------------------------------------------------------------------- --watch


def test_file_signature(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    assert file_signature(str(path)) is None
    path.write_text("x")
    first = file_signature(str(path))
    assert first is not None
    assert first[2] == 1
    path.write_text("xy")
    assert file_signature(str(path)) != first


@pytest.mark.slow
async def test_watch_file(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    path = tmp_path / "routes.toml"
    path.write_text("a")
    changes: list[float] = []

    async def edit(step: Callable[[], object]) -> None:
        step()
        await trio.sleep(service.WATCH_INTERVAL * 3)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(watch_file, str(path), lambda: changes.append(trio.current_time())))
        await trio.sleep(service.WATCH_INTERVAL * 2.5)
        assert changes == []
        await edit(lambda: path.write_text("bb"))
        assert len(changes) == 1
        # A file that keeps changing is loaded once it holds still.
        for n in range(5):
            path.write_text("c" * (n + 3))
            await trio.sleep(service.WATCH_INTERVAL)
        await trio.sleep(service.WATCH_INTERVAL * 3)
        assert len(changes) == 2
        await edit(path.unlink)  # gone: a change too (the reload will report it)
        assert len(changes) == 3
        await edit(lambda: path.write_text("bb"))
        assert len(changes) == 4
        nursery.cancel_scope.cancel()


async def test_inherited_in_a_worker(nursery: trio.Nursery) -> None:
    """A worker's pool: sockets named by route, never reopened by a reload."""
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        listener = listener_from_fd(sock.detach())
        pool = ListenerPool([Inherited("web", "", listener)])
        svc = await start(nursery, table(route("web", backend)), pool=pool)
        await assert_serves(bound(svc, "web"))
        svc.request_stop("test")


async def test_watch_file_since_the_file_was_read(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    path = tmp_path / "routes.toml"
    path.write_text("a")
    since = file_signature(str(path))
    path.write_text("changed before watching began")
    changes: list[float] = []
    async with trio.open_nursery() as nursery:
        watch = functools.partial(watch_file, str(path), lambda: changes.append(trio.current_time()), since=since)
        nursery.start_soon(watch)
        await trio.sleep(service.WATCH_INTERVAL * 2.5)
        assert len(changes) == 1
        nursery.cancel_scope.cancel()
