"""workers.py: the control channel, and the main process's side of `--workers` in this process.

The channel runs over memory streams. The WorkerEngine tests start real worker processes
(`python -c ...`) from this process on loopback (127.0.0.1 port 0) and are marked slow; each
is bounded by trio.fail_after.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import signal
import socket
import struct
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing
from test_service import (
    Loader,
    assert_refused,
    assert_serves,
    connect,
    echo_backend,
    round_trip,
    route,
    wait_until,
)

from hvbridge import workers
from hvbridge.addresses import TcpAddress
from hvbridge.logs import LOGGER
from hvbridge.routes import BridgeSettings, Route, RouteTable
from hvbridge.service import Service, serve
from hvbridge.stats import RouteStatistics, retired
from hvbridge.systemd import Notifier
from hvbridge.workers import Channel, WorkerEngine, WorkerError, open_worker_engine

if TYPE_CHECKING:
    from collections.abc import Iterator

    from hvbridge.addresses import Address

TIMEOUT = 30


# --------------------------------------------------------------------------------- channel


async def test_channel_round_trip() -> None:
    left, right = trio.testing.memory_stream_pair()
    a, b = Channel(left), Channel(right)
    stats = {"web": RouteStatistics(1, 0, 0, 0, 5, 6, {"closed": 1})}
    with trio.fail_after(5):
        await a.send(("stats", 7, stats))
        await a.send(("ready",))
        assert await b.receive() == ("stats", 7, stats)
        assert await b.receive() == ("ready",)
        await left.send_eof()
        assert await b.receive() is None


async def test_channel_reassembles_frames_cut_anywhere() -> None:
    left, right = trio.testing.memory_stream_pair()
    channel = Channel(right)
    data = pickle.dumps(("drain", 1.5))
    frame = struct.pack(">I", len(data)) + data
    with trio.fail_after(5):
        for i in range(len(frame)):
            await left.send_all(frame[i : i + 1])
        assert await channel.receive() == ("drain", 1.5)


@pytest.mark.parametrize(
    "frame",
    [
        struct.pack(">I", 1 << 30),
        struct.pack(">I", 4) + pickle.dumps([]),
        struct.pack(">I", 100) + b"short",
        struct.pack(">I", len(pickle.dumps(()))) + pickle.dumps(()),
        struct.pack(">I", len(pickle.dumps("x"))) + pickle.dumps("x"),
    ],
    ids=["too-large", "bad-pickle", "cut-by-eof", "empty-tuple", "not-a-tuple"],
)
async def test_channel_refuses_bad_frames(frame: bytes) -> None:
    left, right = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        await left.send_all(frame)
        await left.send_eof()
        if frame.endswith(b"short"):  # a frame cut short by EOF is an EOF
            assert await Channel(right).receive() is None
        else:
            with pytest.raises(trio.BrokenResourceError):
                await Channel(right).receive()


def test_snapshot_narrowing() -> None:
    good = {"web": RouteStatistics(1, 1, 0, 0, 0, 0, {})}
    assert workers.snapshot_from(good) == good
    for bad in (None, {"web": 1}, {1: good["web"]}):
        with pytest.raises(trio.BrokenResourceError):
            workers.snapshot_from(bad)
    assert retired(good)["web"].active == 0


# ---------------------------------------------------------------------- the main process


def _table(*routes: Route, grace: float = 10.0) -> RouteTable:
    return RouteTable(routes, BridgeSettings(shutdown_grace=grace), "routes.toml")


def _engine(svc: Service) -> WorkerEngine:
    engine = svc.engine
    assert isinstance(engine, WorkerEngine)
    return engine


async def _start(nursery: trio.Nursery, table: RouteTable, loader: Loader | None = None) -> Service:
    run = functools.partial(
        serve,
        table,
        engine=functools.partial(open_worker_engine, 2, "info", "text"),
        load=loader,
        notifier=Notifier(None),
    )
    svc: Service = await nursery.start(run)
    return svc


def _bound(svc: Service, name: str) -> Address:
    from hvbridge.addresses import parse_address
    from hvbridge.transports import base

    return parse_address(base.listener_address(_engine(svc).listeners[name][0]))


@pytest.mark.slow
async def test_workers_serve_reload_and_drain(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        loader = Loader()
        svc = await _start(nursery, _table(route("web", backend), route("drop", backend)), loader)
        engine = _engine(svc)
        first = list(engine.current)
        assert len(first) == 2
        web, drop = _bound(svc, "web"), _bound(svc, "drop")
        for _ in range(4):
            await assert_serves(web)
        text = (await svc.render_metrics()).decode()
        assert 'hvbridge_connections_accepted_total{route="web"} 4.0' in text
        assert f'process_open_fds{{pid="{first[0].pid}"}}' in text

        loader.results.append(_table(route("web", backend), route("new", backend)))
        assert await svc.reload()
        assert engine.current != first
        await wait_until(lambda: not any(w in engine.workers for w in first))  # drained and gone
        assert _bound(svc, "web") == web
        await assert_serves(web)
        await assert_serves(_bound(svc, "new"))
        await assert_refused(drop)
        text = (await svc.render_metrics()).decode()
        assert 'hvbridge_connections_accepted_total{route="web"} 5.0' in text  # the first 4 kept
        assert 'hvbridge_route_listeners{route="new"} 1.0' in text

        done = trio.Event()
        svc.request_stop("test")
        nursery.start_soon(_set_when_idle, engine, done)
        await done.wait()
        assert engine.workers == []


async def _set_when_idle(engine: WorkerEngine, done: trio.Event) -> None:
    await engine.wait_idle()
    done.set()


@pytest.mark.slow
async def test_a_dead_worker_is_replaced(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        svc = await _start(nursery, _table(route("web", backend)))
        engine = _engine(svc)
        victim = engine.current[0]
        os.kill(victim.pid, signal.SIGKILL)
        await wait_until(lambda: victim not in engine.current and len(engine.current) == 2)
        await wait_until(lambda: all(w.is_ready for w in engine.current))
        for _ in range(4):
            await assert_serves(_bound(svc, "web"))
        svc.request_stop("test")


@pytest.mark.slow
async def test_a_worker_that_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "_WORKER_CODE", "import sys; sys.exit(3)")
    backend = route("web", workers_backend()).connect
    with trio.fail_after(TIMEOUT), pytest.raises(WorkerError, match="did not start its routes"):
        await serve(
            _table(route("web", backend)),
            engine=functools.partial(open_worker_engine, 2, "info", "text"),
            notifier=Notifier(None),
        )


def workers_backend() -> Address:
    """A backend address nobody needs to reach."""
    from hvbridge.addresses import TcpAddress

    return TcpAddress("127.0.0.1", 9)


# ------------------------------------------------------------------------------ the worker


@pytest.fixture
def keep_logging() -> Iterator[None]:
    """Undo what a worker's setup_logging() does to the hvbridge logger."""
    state = (list(LOGGER.handlers), list(LOGGER.filters), LOGGER.level, LOGGER.propagate)
    yield
    LOGGER.handlers[:], LOGGER.filters[:], LOGGER.level, LOGGER.propagate = (
        state[0],
        state[1],
        state[2],
        state[3],
    )


async def _worker_and_parent(nursery: trio.Nursery, table: RouteTable) -> tuple[Channel, trio.Event, Address]:
    """Run a worker's trio task here; return the main process's end of its channel."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    address = TcpAddress("127.0.0.1", listening.getsockname()[1])
    mine, theirs = socket.socketpair()
    done = trio.Event()

    async def worker() -> None:
        await workers.worker_main(theirs.detach())
        done.set()

    nursery.start_soon(worker)
    channel = Channel(trio.SocketStream(trio.socket.from_stdlib_socket(mine)))
    await channel.send(("start", table, {"web": [listening.detach()]}, "info", "text"))
    assert await channel.receive() == ("ready",)
    return channel, done, address


@pytest.mark.usefixtures("keep_logging")
async def test_worker_serves_answers_and_drains(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        channel, done, address = await _worker_and_parent(nursery, _table(route("web", backend)))
        LOGGER.propagate = True  # let caplog see the worker's records
        with caplog.at_level(logging.INFO, "hvbridge"):
            await assert_serves(address)
            await channel.send(("stats", 1))
            reply = await channel.receive()
            assert reply is not None
            assert reply[:2] == ("stats", 1)
            assert workers.snapshot_from(reply[2])["web"].accepted == 1
            await channel.send(("drain", 5.0))
            final = await channel.receive()
            assert final is not None
            assert final[0] == "final"
            assert await channel.receive() is None
        await channel.stream.aclose()
        closed = [r for r in caplog.records if r.getMessage() == "connection closed"]
        assert getattr(closed[0], "hvbridge_fields", {})["pid"] == os.getpid()
        await done.wait()


@pytest.mark.usefixtures("keep_logging")
@pytest.mark.parametrize("how", ["exit", "main process gone", "nonsense"])
async def test_worker_stops(nursery: trio.Nursery, how: str) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        channel, done, address = await _worker_and_parent(nursery, _table(route("web", backend), grace=0.01))
        held = await connect(address)
        await round_trip(held, b"x")
        if how == "exit":
            await channel.send(("exit",))
        elif how == "nonsense":
            await channel.send(("what?",))
        else:
            await channel.stream.send_eof()  # type: ignore[attr-defined]
        await done.wait()
        await held.aclose()
        await channel.stream.aclose()


async def test_worker_needs_a_start_message() -> None:
    mine, theirs = socket.socketpair()
    with mine, trio.fail_after(TIMEOUT):
        channel = Channel(trio.SocketStream(trio.socket.from_stdlib_socket(mine)))
        await channel.send(("stats", 1))
        with pytest.raises(SystemExit, match="expected a start message"):
            await workers.worker_main(theirs.detach())


@pytest.mark.slow
async def test_a_generation_that_cannot_start_keeps_the_old_one(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TIMEOUT):
        backend = await echo_backend(nursery)
        loader = Loader([_table(route("web", backend), route("new", backend))])
        svc = await _start(nursery, _table(route("web", backend)), loader)
        engine = _engine(svc)
        first = list(engine.current)
        monkeypatch.setattr(workers, "_WORKER_CODE", "import sys; sys.exit(3)")
        with caplog.at_level(logging.ERROR, "hvbridge"):
            assert not await svc.reload()
        assert "did not start its routes" in caplog.records[-1].getMessage()
        assert engine.current == first
        assert len(svc.pool.opened) == 1  # the new route's socket was closed again
        await assert_serves(_bound(svc, "web"))
        svc.request_stop("test")
