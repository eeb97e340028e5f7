"""The real `hvbridge` process relaying on loopback: bulk data, half-close, failed backends, signals.

Rules: localhost only (127.0.0.1, ::1 and Unix sockets in tmp_path); port 0 everywhere, the bound
port read from hvbridge's `listening` log line; every test bounded by trio.fail_after and every
loop bounded in count; every hvbridge started must exit 0 on SIGTERM at teardown. Backends are
in-process trio servers (support.HashServer); no test asserts an absolute duration.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
from typing import TYPE_CHECKING, Literal

import pytest
import trio
from support.processes import MiB, run_hvbridge

from .support import (
    bound_port,
    connect_and_expect_closed,
    exchange,
    expect_closed,
    mib_per_s,
    open_stream,
    random_bytes,
    receive_into,
    send_random,
    sha256,
    start_hash_server,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from .support import Hvbridge, Processes

pytestmark = pytest.mark.slow

BIG = 64 * MiB


def _listen(kind: Literal["tcp", "unix"], tmp_path: Path) -> str:
    return "tcp://127.0.0.1:0" if kind == "tcp" else f"unix://{tmp_path / 'relay.sock'}"


async def _closed_event(relay: Hvbridge, route: str = "forward", count: int = 1) -> dict[str, str]:
    lines = await relay.wait_for_event("connection closed", route=route, count=count)
    return dict(lines[count - 1].fields)


@pytest.mark.parametrize(
    ("listen", "backend"),
    [("tcp", "tcp"), ("tcp", "unix"), ("unix", "tcp")],
    ids=["tcp-to-tcp", "tcp-to-unix", "unix-to-tcp"],
)
async def test_64_mib_each_way_at_once_arrive_intact(
    processes: Processes,
    nursery: trio.Nursery,
    tmp_path: Path,
    listen: Literal["tcp", "unix"],
    backend: Literal["tcp", "unix"],
    record_property: Callable[[str, object], None],
) -> None:
    with trio.fail_after(90):
        # The random bytes are made once per session (os.urandom is slow here), not timed.
        random_bytes(BIG)
        random_bytes(BIG, "server")
        where: Path | Literal["tcp"] = tmp_path / "backend.sock" if backend == "unix" else "tcp"
        server = await start_hash_server(nursery, where, "concurrent", reply_size=BIG)
        relay = await processes.forward(_listen(listen, tmp_path), server.endpoint)
        async with await open_stream(relay.listening()) as stream:
            outcome = await exchange(stream, send=BIG, reply=BIG, trailer=32)
        result = await server.result()

        assert result.error is None
        assert (result.received, result.received_sha256) == (BIG, outcome.sent_sha256)
        assert outcome.trailer == outcome.sent_sha256  # the backend's hash of what it read
        assert (outcome.received, outcome.received_sha256) == (BIG, result.sent_sha256)
        closed = await _closed_event(relay)
        assert (closed["bytes_in"], closed["bytes_out"], closed["reason"]) == (str(BIG), str(BIG + 32), "closed")
        rate = mib_per_s(2 * BIG, outcome.elapsed)
        record_property("mib_per_s_both_ways", round(rate, 1))
        print(f"{listen}->{backend}: 2 x 64 MiB in {outcome.elapsed:.2f}s = {rate:.0f} MiB/s (both ways)")


async def test_client_shuts_down_write_and_still_gets_the_whole_reply(
    processes: Processes, nursery: trio.Nursery
) -> None:
    with trio.fail_after(30):
        # The backend reads to EOF before it sends a byte: the reply flows only after the
        # client's write shutdown went through the relay.
        server = await start_hash_server(nursery, "tcp", "reply_after_eof", reply_size=8 * MiB)
        relay = await processes.forward("tcp://127.0.0.1:0", server.endpoint)
        async with await open_stream(relay.listening()) as stream:
            outcome = await exchange(stream, send=2 * MiB, reply=8 * MiB, trailer=32)
        result = await server.result()

        assert result.error is None
        assert (result.received, result.received_sha256) == (2 * MiB, outcome.sent_sha256)
        assert outcome.trailer == outcome.sent_sha256
        assert (outcome.received, outcome.received_sha256) == (8 * MiB, result.sent_sha256)
        closed = await _closed_event(relay)
        assert (closed["bytes_in"], closed["bytes_out"], closed["reason"]) == (
            str(2 * MiB),
            str(8 * MiB + 32),
            "closed",
        )


async def test_backend_shuts_down_write_and_still_gets_everything(processes: Processes, nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        # The backend sends its reply and shuts down its write side, then reads to EOF.
        server = await start_hash_server(nursery, "tcp", "reply_first", reply_size=4 * MiB)
        relay = await processes.forward("tcp://127.0.0.1:0", server.endpoint)
        sent, received = hashlib.sha256(), hashlib.sha256()
        async with await open_stream(relay.listening()) as stream:
            async with trio.open_nursery() as both:
                both.start_soon(send_random, stream, 1 * MiB, sent)
                got = await receive_into(stream, received, 4 * MiB)  # to the backend's EOF
            assert got == 4 * MiB
            # Only now, with the other direction finished, send most of the data.
            await send_random(stream, 8 * MiB, sent, name="client, second part")
            await stream.send_eof()
            result = await server.result()
            assert await expect_closed(stream) == "eof"

        assert result.error is None
        assert (result.received, result.received_sha256) == (9 * MiB, sent.digest())
        assert (result.sent, result.sent_sha256) == (4 * MiB, received.digest())
        closed = await _closed_event(relay)
        assert (closed["bytes_in"], closed["bytes_out"], closed["reason"]) == (str(9 * MiB), str(4 * MiB), "closed")


async def test_no_half_close_ends_both_ways_on_the_first_eof(processes: Processes, nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        server = await start_hash_server(nursery, "tcp", "reply_after_eof", reply_size=4 * MiB)
        relay = await processes.forward("tcp://127.0.0.1:0", server.endpoint, "--no-half-close")
        async with await open_stream(relay.listening()) as stream:
            outcome = await exchange(stream, send=1 * MiB, reply=0, trailer=0)
        result = await server.result()

        assert outcome.received == 0  # the reply only starts after the relay closed both sides
        assert (result.received, result.received_sha256) == (1 * MiB, outcome.sent_sha256)
        closed = await _closed_event(relay)
        assert (closed["bytes_in"], closed["bytes_out"], closed["reason"]) == (str(1 * MiB), "0", "closed by client")


async def test_unreachable_backend_closes_the_client_and_the_relay_keeps_serving(
    processes: Processes, nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(45), bound_port() as refused, socket.socket() as full, socket.socket() as filler:
        # `refused`: bound, not listening. `full`: listening with a full accept queue, so the
        # kernel drops further SYNs and a connect hangs until connect_timeout.
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        filler.connect(full.getsockname())
        live = await start_hash_server(nursery, "tcp", "concurrent", reply_size=1 * MiB)
        table = f"""
[defaults]
connect_timeout = "1s"

[routes.refused]
listen = "tcp://127.0.0.1:0"
connect = "tcp://127.0.0.1:{refused.getsockname()[1]}"

[routes.nosocket]
listen = "tcp://127.0.0.1:0"
connect = "unix://{tmp_path / "nobody-listens-here.sock"}"

[routes.timeout]
listen = "tcp://127.0.0.1:0"
connect = "tcp://127.0.0.1:{full.getsockname()[1]}"

[routes.live]
listen = "unix://{tmp_path / "live.sock"}"
connect = "{live.endpoint}"
"""
        relay = await processes.run_table(table, listeners=4)
        expected = {"refused": "backend unavailable", "nosocket": "backend unavailable", "timeout": "timed out"}
        for attempt in (1, 2):
            for route, why in expected.items():
                with trio.fail_after(15):  # connect_timeout is 1 s; generous for a loaded machine
                    assert await connect_and_expect_closed(relay.listening(route)) in ("eof", "reset")
                closed = await _closed_event(relay, route, count=attempt)
                assert closed["reason"].startswith("connect failed: "), closed
                assert why in closed["reason"], closed
                assert (closed["bytes_in"], closed["bytes_out"]) == ("0", "0")
        assert all(line.level == "WARNING" for line in relay.events("connection closed"))

        async with await open_stream(relay.listening("live")) as stream:
            outcome = await exchange(stream, send=1 * MiB, reply=1 * MiB, trailer=32)
        result = await live.result()
        assert outcome.trailer == outcome.sent_sha256
        assert outcome.received_sha256 == result.sent_sha256
        assert (await _closed_event(relay, "live"))["reason"] == "closed"


async def test_ipv6_loopback_listener_and_backend(processes: Processes, nursery: trio.Nursery) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    with trio.fail_after(30):
        server = await start_hash_server(nursery, "tcp6", "concurrent", reply_size=1 * MiB)
        relay = await processes.forward("tcp://[::1]:0", server.endpoint)
        endpoint = relay.listening()
        assert endpoint.startswith("tcp://[::1]:"), endpoint
        async with await open_stream(endpoint) as stream:
            outcome = await exchange(stream, send=1 * MiB, reply=1 * MiB, trailer=32)
        result = await server.result()
        assert outcome.trailer == outcome.sent_sha256
        assert outcome.received_sha256 == result.sent_sha256
        closed = await _closed_event(relay)
        assert closed["peer"].startswith("tcp://[::1]:"), closed
        assert closed["target"] == server.endpoint


def _stoppable_table(server: str, tmp_path: Path, grace: str) -> str:
    return f"""
[bridge]
shutdown_grace = "{grace}"

[routes.tcp]
listen = "tcp://127.0.0.1:0"
connect = "{server}"

[routes.unix]
listen = "unix://{tmp_path / "relay.sock"}"
connect = "{server}"
"""


async def _ping(stream: trio.SocketStream, data: bytes) -> None:
    await stream.send_all(data)
    got = b""
    for _ in range(len(data)):
        got += await stream.receive_some(len(data) - len(got))
        if len(got) == len(data):
            break
    assert got == data


async def _assert_refused(endpoint: str) -> None:
    try:
        stream = await open_stream(endpoint)
    except OSError:
        return  # refused, or the socket file is gone
    await stream.aclose()
    raise AssertionError(f"{endpoint} still accepts connections")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_signal_stops_accepting_lets_open_connections_finish_and_exits_0(
    processes: Processes, nursery: trio.Nursery, tmp_path: Path, sig: signal.Signals
) -> None:
    with trio.fail_after(30):
        server = await start_hash_server(nursery, "tcp", "echo")
        relay = await processes.run_table(_stoppable_table(server.endpoint, tmp_path, "60s"), listeners=2)
        socket_file = tmp_path / "relay.sock"
        assert socket_file.is_socket()
        assert socket_file.stat().st_mode & 0o777 == 0o600
        async with await open_stream(relay.listening("unix")) as stream:
            await _ping(stream, b"ping")  # the relay has the backend connected
            relay.process.send_signal(sig)
            await relay.output.wait_for(r"not accepting")
            for route in ("tcp", "unix"):
                await _assert_refused(relay.listening(route))
            await _ping(stream, b"still relaying during the grace period")
            await stream.send_eof()
            assert await expect_closed(stream) == "eof"
            assert await relay.wait_exit() == 0
        closed = await _closed_event(relay, "unix")
        assert closed["reason"] == "closed", closed
        assert "Traceback" not in relay.output.text
        assert not socket_file.exists(), "the Unix listener's socket file is left behind"


async def test_open_connections_are_closed_when_the_shutdown_grace_is_over(
    processes: Processes, nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        server = await start_hash_server(nursery, "tcp", "echo")
        relay = await processes.run_table(_stoppable_table(server.endpoint, tmp_path, "500ms"), listeners=2)
        async with await open_stream(relay.listening("tcp")) as stream:
            await _ping(stream, b"ping")
            relay.process.send_signal(signal.SIGTERM)
            assert await expect_closed(stream) in ("eof", "reset")
            assert await relay.wait_exit() == 0
        assert (await _closed_event(relay, "tcp"))["bytes_in"] == "4"
        assert "Traceback" not in relay.output.text
        assert not (tmp_path / "relay.sock").exists()


async def test_a_second_signal_exits_at_once(processes: Processes, nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        server = await start_hash_server(nursery, "tcp", "echo")
        relay = await processes.run_table(_stoppable_table(server.endpoint, tmp_path, "1h"), listeners=2)
        async with await open_stream(relay.listening("tcp")) as stream:
            await _ping(stream, b"ping")
            relay.process.send_signal(signal.SIGTERM)
            await relay.output.wait_for(r"not accepting")
            relay.process.send_signal(signal.SIGINT)
            assert await relay.wait_exit() == 0
            assert await expect_closed(stream) in ("eof", "reset")
        assert "Traceback" not in relay.output.text
        assert not (tmp_path / "relay.sock").exists()


async def test_json_log_format_prints_the_same_fields_as_text(processes: Processes, nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        server = await start_hash_server(nursery, "tcp", "concurrent", reply_size=1000)
        text = await processes.forward("tcp://127.0.0.1:0", server.endpoint)
        js = await processes.forward("tcp://127.0.0.1:0", server.endpoint, "--log-format", "json")
        for relay in (text, js):
            async with await open_stream(relay.listening()) as stream:
                await exchange(stream, send=2000, reply=1000, trailer=32)
            await _closed_event(relay)
            assert await relay.stop() == 0

        objects = []
        for line in js.output.lines:
            obj: object = json.loads(line)  # every line is one JSON object
            assert isinstance(obj, dict), line
            assert {"time", "level", "message"} <= obj.keys(), line
            objects.append(obj)
        assert objects
        for message in ("listening", "connection closed"):
            [text_line] = text.events(message)
            [json_line] = js.events(message)
            assert set(json_line.fields) == set(text_line.fields), message
        [closed] = [o for o in objects if o["message"] == "connection closed"]
        assert (closed["bytes_in"], closed["bytes_out"], closed["reason"]) == (2000, 1032, "closed")
        assert isinstance(closed["duration"], float | int)
        assert closed["level"] == "info"


@pytest.mark.parametrize("backend", ["tcp", "unix"])
async def test_connect_command_relays_stdin_and_stdout(
    nursery: trio.Nursery, tmp_path: Path, backend: Literal["tcp", "unix"]
) -> None:
    with trio.fail_after(30):
        server = await start_hash_server(nursery, tmp_path / "echo.sock" if backend == "unix" else "tcp", "echo")
        data = os.urandom(4 * MiB)
        done = await run_hvbridge("connect", server.endpoint, stdin=data)
        assert done.returncode == 0, done.stderr.decode()
        assert (len(done.stdout), sha256(done.stdout)) == (len(data), sha256(data))
        assert done.stderr == b""  # quiet by default: ssh shows a ProxyCommand's stderr


async def test_connect_command_to_a_dead_backend_is_a_user_error() -> None:
    with trio.fail_after(30), bound_port() as refused:
        port = refused.getsockname()[1]
        done = await run_hvbridge("connect", f"tcp://127.0.0.1:{port}", "--connect-timeout", "2s")
        lines = done.stderr.decode().splitlines()
        assert done.returncode == 1, lines
        assert len(lines) == 1, lines
        assert lines[0].startswith("Error: "), lines
        assert f"tcp://127.0.0.1:{port}" in lines[0]
        assert done.stdout == b""
