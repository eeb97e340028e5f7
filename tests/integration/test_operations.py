"""The real `hvbridge` daemon operated as a service: reload, shutdown, metrics, systemd, workers.

Rules: localhost only (127.0.0.1 and Unix sockets in tmp_path); port 0 everywhere, bound ports
read from hvbridge's `listening` / `metrics listening` log lines; every test bounded by
trio.fail_after and every loop bounded in count; every hvbridge started exits 0 on SIGTERM
(checked here or at teardown by the `processes` fixture). Backends are in-process trio servers
(support.HashServer). No test asserts an absolute duration.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from support.processes import START_TIMEOUT, STOP_TIMEOUT, LineReader, MiB, hvbridge_argv, run_hvbridge

from .support import Hvbridge, expect_closed, free_port, open_stream, receive_into, send_random, start_hash_server

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from .support import HashServer, Processes

pytestmark = pytest.mark.slow

TIMEOUT = 60
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# ------------------------------------------------------------------------------- helpers


async def start(
    processes: Processes,
    argv: Sequence[str],
    *,
    listeners: int = 1,
    env: dict[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> Hvbridge:
    """Start `argv` (an hvbridge) with this environment and these fds; wait for its listeners."""
    process = await trio.lowlevel.open_process(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        pass_fds=tuple(pass_fds),
    )
    assert process.stderr is not None
    reader = LineReader(" ".join(argv))
    processes.nursery.start_soon(reader.pump, process.stderr)
    child = Hvbridge(list(argv), process, reader)
    processes.children.append(child)
    with trio.fail_after(START_TIMEOUT):
        await child.wait_for_event("listening", count=listeners)
    return child


def write_table(path: Path, backend: str, *routes: str, bridge: str = "") -> None:
    """A route table at `path`: each route named in `routes` listens on 127.0.0.1 port 0."""
    text = f"[bridge]\nshutdown_grace = '30s'\n{bridge}\n"
    for name in routes:
        text += f"\n[routes.{name}]\nlisten = 'tcp://127.0.0.1:0'\nconnect = '{backend}'\n"
    path.write_text(text)


async def echo_round_trip(endpoint: str, size: int = 4096) -> None:
    """Send `size` random bytes through `endpoint` to an echo backend; they come back intact."""
    stream = await open_stream(endpoint)
    async with stream:
        sent, received = hashlib.sha256(), hashlib.sha256()
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await send_random(stream, size, sent)
                await stream.send_eof()

            nursery.start_soon(send)
            assert await receive_into(stream, received, size) == size
        assert sent.digest() == received.digest()


async def assert_refused(endpoint: str) -> None:
    """Nothing accepts on `endpoint` (the kernel refuses the connection)."""
    assert endpoint.startswith("tcp://127.0.0.1:"), endpoint
    sock = trio.socket.socket()
    with sock, pytest.raises(ConnectionRefusedError):
        await sock.connect(("127.0.0.1", int(endpoint.rpartition(":")[2])))


@pytest.fixture
async def echo(nursery: trio.Nursery) -> HashServer:
    """An echo backend on 127.0.0.1 (port 0), for the length of the test."""
    return await start_hash_server(nursery, "tcp", "echo")


async def transfer_in_two_halves(endpoint: str, size: int, middle: trio.Event, resume: trio.Event) -> bool:
    """Echo `size` bytes through `endpoint`: half, then `middle.set()`, wait `resume`, the rest.

    Returns:
        True when every byte came back intact and in order.
    """
    stream = await open_stream(endpoint)
    sent, received = hashlib.sha256(), hashlib.sha256()
    async with stream, trio.open_nursery() as nursery:

        async def send() -> None:
            await send_random(stream, size // 2, sent)
            middle.set()
            await resume.wait()
            await send_random(stream, size - size // 2, sent)
            await stream.send_eof()

        nursery.start_soon(send)
        count = await receive_into(stream, received, size)
    return count == size and sent.digest() == received.digest()


def sighup(child: Hvbridge) -> None:
    """Ask `child` to reload."""
    child.process.send_signal(signal.SIGHUP)


async def stop(child: Hvbridge, sig: signal.Signals = signal.SIGTERM) -> int:
    """Stop `child` with `sig` and return its exit status (bounded)."""
    with trio.fail_after(STOP_TIMEOUT + 5):
        return await child.stop(sig)


# ---------------------------------------------------------------------------------- reload


async def test_reload_adds_and_removes_routes_during_a_transfer(
    processes: Processes, echo: HashServer, tmp_path: Path
) -> None:
    table = tmp_path / "routes.toml"
    write_table(table, echo.endpoint, "keep", "drop")
    with trio.fail_after(TIMEOUT):
        relay = await start(processes, [*hvbridge_argv(), "-c", str(table)], listeners=2)
        keep, drop = relay.listening("keep"), relay.listening("drop")
        middle, resume = trio.Event(), trio.Event()
        outcome: list[bool] = []
        async with trio.open_nursery() as nursery:

            async def transfer() -> None:
                outcome.append(await transfer_in_two_halves(keep, 8 * MiB, middle, resume))

            nursery.start_soon(transfer)
            await middle.wait()
            write_table(table, echo.endpoint, "keep", "new")
            sighup(relay)
            [reloaded] = await relay.wait_for_event("reloaded")
            assert (reloaded.fields["added"], reloaded.fields["removed"]) == ("new", "drop")
            resume.set()
        assert outcome == [True]  # the transfer across the reload arrived intact
        await relay.wait_for_event("listening", route="new")
        assert relay.listening("keep") == keep  # same socket, same port
        await echo_round_trip(keep)
        await echo_round_trip(relay.listening("new"))
        await assert_refused(drop)


async def test_invalid_reload_keeps_the_running_table(processes: Processes, echo: HashServer, tmp_path: Path) -> None:
    table = tmp_path / "routes.toml"
    write_table(table, echo.endpoint, "web")
    with trio.fail_after(TIMEOUT):
        relay = await start(processes, [*hvbridge_argv(), "-c", str(table)])
        web = relay.listening("web")
        table.write_text(
            f"[routes.web]\nlisten = 'tcp://127.0.0.1:0'\nconnect = '{echo.endpoint}'\nconect_timeout = '1s'\n"
            "[routes.db]\nlisten = 'tcp://127.0.0.1:0'\nconnect = 'vsock://abc:22'\n"
        )
        sighup(relay)
        lines = await relay.output.wait_for(r"reload failed, keeping the running table", count=2)
        text = "\n".join(lines)
        assert "routes.web.conect_timeout" in text
        assert "routes.db.connect" in text
        assert all(" ERROR " in line for line in lines)
        await echo_round_trip(web)
        assert not relay.events("reloaded")


async def test_watch_reloads_when_the_file_changes(processes: Processes, echo: HashServer, tmp_path: Path) -> None:
    table = tmp_path / "routes.toml"
    write_table(table, echo.endpoint, "web")
    with trio.fail_after(TIMEOUT):
        relay = await start(processes, [*hvbridge_argv(), "run", "-c", str(table), "--watch"])
        write_table(table, echo.endpoint, "web", "more")
        [reloaded] = await relay.wait_for_event("reloaded")
        assert reloaded.fields["added"] == "more"
        await relay.wait_for_event("listening", route="more")
        await echo_round_trip(relay.listening("more"))


# -------------------------------------------------------------------------------- shutdown


async def test_sigterm_lets_a_transfer_finish(processes: Processes, echo: HashServer, tmp_path: Path) -> None:
    table = tmp_path / "routes.toml"
    write_table(table, echo.endpoint, "web")
    with trio.fail_after(TIMEOUT):
        relay = await start(processes, [*hvbridge_argv(), "-c", str(table)])
        web = relay.listening("web")
        middle, resume = trio.Event(), trio.Event()
        outcome: list[bool] = []
        async with trio.open_nursery() as nursery:

            async def transfer() -> None:
                outcome.append(await transfer_in_two_halves(web, 8 * MiB, middle, resume))

            nursery.start_soon(transfer)
            await middle.wait()
            relay.stopped = True  # this test stops it
            relay.process.send_signal(signal.SIGTERM)
            await relay.output.wait_for(r"not accepting; waiting up to 30s")
            await assert_refused(web)  # new connections are refused at once
            assert relay.process.returncode is None  # still serving the open one
            resume.set()
        assert outcome == [True]
        with trio.fail_after(STOP_TIMEOUT):  # well within the 30 s grace
            assert await relay.process.wait() == 0
        [closed] = relay.events("connection closed", route="web")
        assert closed.fields["reason"] == "closed"
        assert closed.fields["bytes_in"] == str(8 * MiB)


async def test_a_second_signal_exits_at_once(processes: Processes, echo: HashServer, tmp_path: Path) -> None:
    table = tmp_path / "routes.toml"
    write_table(table, echo.endpoint, "web")
    with trio.fail_after(TIMEOUT):
        relay = await start(processes, [*hvbridge_argv(), "-c", str(table)])
        stream = await open_stream(relay.listening("web"))
        async with stream:
            await stream.send_all(b"hello")
            assert await stream.receive_some(5) == b"hello"  # relayed: the connection is open
            relay.stopped = True
            relay.process.send_signal(signal.SIGINT)
            await relay.output.wait_for(r"not accepting")
            relay.process.send_signal(signal.SIGINT)
            with trio.fail_after(STOP_TIMEOUT):
                assert await relay.process.wait() == 0
            assert await expect_closed(stream) in ("eof", "reset")
        await relay.output.wait_for(r"SIGINT again: exiting now")


# --------------------------------------------------------------------------------- metrics


async def scrape(endpoint: str, path: str = "/metrics") -> tuple[str, Samples]:
    """GET `path` from the metrics endpoint: the status line and the parsed samples."""
    stream = await open_stream(endpoint)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        data = bytearray()
        for _ in range(10_000):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status = head.split(b"\r\n")[0].decode()
    samples: Samples = {}
    if status.endswith("200 OK"):
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return status, samples


async def closed_at_once(endpoint: str) -> str:
    """Connect to `endpoint`, which closes the connection at once: `eof` or `reset`."""
    try:
        stream = await open_stream(endpoint)
    except OSError:  # the reset can beat the end of the connect
        return "reset"
    async with stream:
        return await expect_closed(stream)


async def test_metrics_count_the_traffic(processes: Processes, echo: HashServer, tmp_path: Path) -> None:
    table = tmp_path / "routes.toml"
    unused = socket.socket()  # bound, never listening: connects to it are refused
    unused.bind(("127.0.0.1", 0))
    # A fixed metrics port (found free a moment before), as `hvbridge probe` needs one.
    table.write_text(
        f"[bridge]\nmetrics = 'tcp://127.0.0.1:{free_port()}'\n"
        f"[routes.web]\nlisten = 'tcp://127.0.0.1:0'\nconnect = '{echo.endpoint}'\n"
        "[routes.down]\nlisten = 'tcp://127.0.0.1:0'\n"
        f"connect = 'tcp://127.0.0.1:{unused.getsockname()[1]}'\n"
        f"[routes.private]\nlisten = 'tcp://127.0.0.1:0'\nconnect = '{echo.endpoint}'\nallow = ['10.0.0.0/8']\n"
    )
    with unused, trio.fail_after(TIMEOUT):
        relay = await start(processes, [*hvbridge_argv(), "-c", str(table)], listeners=3)
        [metrics_line] = await relay.wait_for_event("metrics listening")
        metrics = metrics_line.fields["listen"]
        sizes = [1000, 20_000, 300_000]
        for size in sizes:
            await echo_round_trip(relay.listening("web"), size)
        for route in ("down", "private"):
            assert await closed_at_once(relay.listening(route)) in ("eof", "reset")
        await relay.wait_for_event("connection closed", count=len(sizes) + 2)
        status, samples = await scrape(metrics)
        assert status == "HTTP/1.1 200 OK"
        web, down, private = (("route", "web"),), (("route", "down"),), (("route", "private"),)
        assert samples["hvbridge_connections_accepted_total", web] == len(sizes)
        assert samples["hvbridge_connections_active", web] == 0
        assert samples["hvbridge_relayed_bytes_total", (("direction", "client_to_backend"), *web)] == sum(sizes)
        assert samples["hvbridge_relayed_bytes_total", (("direction", "backend_to_client"), *web)] == sum(sizes)
        assert samples["hvbridge_connections_closed_total", (("reason", "closed"), *web)] == len(sizes)
        assert samples["hvbridge_connect_duration_seconds_count", web] == len(sizes)
        assert samples["hvbridge_connect_duration_seconds_bucket", (("le", "+Inf"), *web)] == len(sizes)
        assert samples["hvbridge_connections_failed_total", down] == 1
        assert samples["hvbridge_connections_closed_total", (("reason", "connect_failed"), *down)] == 1
        assert samples["hvbridge_connections_refused_total", private] == 1
        assert samples["hvbridge_route_listeners", web] == 1
        assert samples["process_open_fds", ()] > 0
        assert (await scrape(metrics, "/"))[0] == "HTTP/1.1 404 Not Found"

        # The container HEALTHCHECK: healthy while every route listens.
        probed = await run_hvbridge("probe", "-c", str(table))
        assert (probed.returncode, probed.stdout) == (0, b"healthy: 3 route(s) listening\n")
        assert await stop(relay) == 0
        probed = await run_hvbridge("probe", "-c", str(table))
        assert probed.returncode == 1
        assert probed.stderr.decode().startswith(f"Error: {metrics}: connect {metrics}: ")


async def test_probe_needs_metrics_and_watch_needs_a_file(tmp_path: Path) -> None:
    table = tmp_path / "routes.toml"
    write_table(table, "tcp://127.0.0.1:9", "web")
    with trio.fail_after(TIMEOUT):
        probed = await run_hvbridge("probe", "-c", str(table))
        assert probed.returncode == 1
        assert probed.stderr.decode() == (
            f"Error: {table}: bridge.metrics is not set; `probe` asks the metrics endpoint\n"
        )
        write_table(table, "tcp://127.0.0.1:9", "web", bridge="metrics = 'tcp://127.0.0.1:0'")
        probed = await run_hvbridge("probe", "-c", str(table))
        assert (
            probed.stderr.decode() == f"Error: {table}: bridge.metrics has port 0; `probe` needs a fixed port to ask\n"
        )
        watched = await run_hvbridge("run", "-c", "-", "--watch", stdin=table.read_bytes())
        assert watched.returncode == 2
        assert "--watch needs a route table file (not stdin)" in watched.stderr.decode()


# ------------------------------------------------------------------------------- systemd


async def test_notify_socket_messages(processes: Processes, echo: HashServer, tmp_path: Path) -> None:
    table = tmp_path / "routes.toml"
    write_table(table, echo.endpoint, "web")
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify.bind(str(tmp_path / "notify.sock"))
    with notify, trio.fail_after(TIMEOUT):
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
        relay = await start(processes, [*hvbridge_argv(), "-c", str(table)], env=env)

        async def message() -> dict[str, str]:
            data = await notify.recv(4096)
            return dict(line.split("=", 1) for line in data.decode().splitlines())

        ready = await message()
        assert ready["READY"] == "1"
        assert relay.events("listening")  # READY=1 came after the listener was up
        sighup(relay)
        reloading = await message()
        assert reloading["RELOADING"] == "1"
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert (await message())["READY"] == "1"
        assert await stop(relay) == 0
        assert (await message())["STOPPING"] == "1"


_ACTIVATE = """\
import fcntl, os, sys
# As systemd does: the passed sockets at fds 3, 4, ... and LISTEN_PID = the pid that execs.
fds = [int(fd) for fd in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = str(len(fds))
os.execv(sys.argv[2], sys.argv[2:])
"""


async def test_socket_activation(processes: Processes, echo: HashServer, tmp_path: Path) -> None:
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    port = tcp.getsockname()[1]
    path = tmp_path / "activated.sock"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(path))
    unix.listen()
    table = tmp_path / "routes.toml"
    # `web` takes fd 3 by its name; `local` takes fd 4 because it listens on the same path.
    table.write_text(
        f"[routes.web]\nlisten = 'tcp://127.0.0.1:0'\nconnect = '{echo.endpoint}'\n"
        f"[routes.local]\nlisten = 'unix://{path}'\nconnect = '{echo.endpoint}'\n"
    )
    env = {**os.environ, "LISTEN_FDNAMES": "web:unknown"}
    wrapper = [sys.executable, "-c", _ACTIVATE, f"{tcp.fileno()},{unix.fileno()}", *hvbridge_argv()]
    with tcp, unix, trio.fail_after(TIMEOUT):
        relay = await start(
            processes,
            [*wrapper, "-c", str(table)],
            listeners=2,
            env=env,
            pass_fds=[tcp.fileno(), unix.fileno()],
        )
        assert relay.listening("web") == f"tcp://127.0.0.1:{port}"
        assert relay.listening("local") == f"unix://{path}"
        tcp.close()  # hvbridge has its own copies now
        unix.close()
        await echo_round_trip(f"tcp://127.0.0.1:{port}")
        await echo_round_trip(f"unix://{path}")
        assert await stop(relay) == 0
    assert path.exists()  # an activated socket's file belongs to the manager, not to hvbridge


# ------------------------------------------------------------------------------- workers


async def test_workers_share_the_listening_socket(processes: Processes, echo: HashServer, tmp_path: Path) -> None:
    table = tmp_path / "routes.toml"
    write_table(table, echo.endpoint, "web", bridge="metrics = 'tcp://127.0.0.1:0'")
    with trio.fail_after(TIMEOUT):
        relay = await start(processes, [*hvbridge_argv(), "-c", str(table), "--workers", "2"], listeners=2)
        web = relay.listening("web")
        assert len({line.fields["listen"] for line in relay.events("listening")}) == 1
        [metrics_line] = await relay.wait_for_event("metrics listening")
        made = 0
        for _ in range(50):  # batches of concurrent connections until both workers served one
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(echo_round_trip, web, 1000)
            made += 8
            await relay.wait_for_event("connection closed", count=made)
            if len({line.fields["pid"] for line in relay.events("connection closed")}) == 2:
                break
        pids = {line.fields["pid"] for line in relay.events("connection closed")}
        assert len(pids) == 2, "only one worker accepted connections"
        assert str(relay.process.pid) not in pids  # the main process relays nothing
        _, samples = await scrape(metrics_line.fields["listen"])
        assert samples["hvbridge_connections_accepted_total", (("route", "web"),)] == made
        bytes_in = samples["hvbridge_relayed_bytes_total", (("direction", "client_to_backend"), ("route", "web"))]
        assert bytes_in == 1000 * made
        process_pids = {dict(labels)["pid"] for name, labels in samples if name == "process_open_fds"}
        assert process_pids == pids | {str(relay.process.pid)}

        # A reload starts a new generation on the same socket; counters carry on.
        write_table(table, echo.endpoint, "web", "more", bridge="metrics = 'tcp://127.0.0.1:0'")
        sighup(relay)
        await relay.wait_for_event("reloaded")
        await echo_round_trip(web, 1000)
        await relay.wait_for_event("listening", route="more", count=2)
        await echo_round_trip(relay.events("listening", route="more")[0].fields["listen"], 1000)
        _, samples = await scrape(metrics_line.fields["listen"])
        assert samples["hvbridge_connections_accepted_total", (("route", "web"),)] == made + 1
        assert await stop(relay) == 0
