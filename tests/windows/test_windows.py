"""hvbridge on Windows CPython: imports, CLI, relaying, connect over pipes, Hyper-V edges.

Run by scripts/windows-tests under Wine. What Wine cannot show is a real AF_HYPERV connection:
its Winsock has no Hyper-V provider, which is exactly the "no provider" path tested here.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import signal
import socket
import sys
import time
import uuid
import winreg

import pytest
import trio
from conftest import (
    TIMEOUT,
    Backend,
    MakeBackend,
    connect_when_up,
    digest,
    free_port,
    payload,
    receive_all,
    run_hvbridge,
    start_hvbridge,
    wait_for_log,
)

import hvbridge
from hvbridge import service, transports
from hvbridge.config import format_table, table_from_mapping
from hvbridge.hyperv.registry import SERVICES_KEY
from hvbridge.relay import splice
from hvbridge.transports import base
from hvbridge.transports.threadstream import ThreadSocketStream

# Windows only (conftest.py collects this file nowhere else); mypy on Linux skips the rest.
assert sys.platform == "win32"

#: Every module, subpackages' included (walk_packages imports each package to look inside it).
MODULES = sorted(m.name for m in pkgutil.walk_packages(hvbridge.__path__, "hvbridge.") if m.name != "hvbridge.__main__")


def test_this_is_windows_cpython() -> None:
    assert sys.platform == "win32"
    assert sys.version_info >= (3, 12)
    assert not hasattr(socket, "AF_UNIX")
    assert socket.AF_HYPERV == 34


@pytest.mark.parametrize("name", MODULES)
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_splice_is_off() -> None:
    assert not splice.enabled


def test_signals_are_windows_ones() -> None:
    assert signal.SIGBREAK in service._STOP_SIGNALS
    assert service._RELOAD_SIGNALS == ()


def test_winsock_error_text_is_readable() -> None:
    assert "refused" in base.error_text(10061).lower()


# ------------------------------------------------------------------------------------ CLI


def test_cli_version_and_help() -> None:
    version = run_hvbridge("--version")
    assert version.returncode == 0, version.stderr
    assert hvbridge.__version__ in version.stdout
    helped = run_hvbridge("--help")
    assert helped.returncode == 0, helped.stderr
    for command in ("run", "check", "forward", "connect", "hyperv"):
        assert command in helped.stdout


def test_cli_hyperv_guid_and_port() -> None:
    guid = run_hvbridge("hyperv", "guid", "22")
    assert guid.returncode == 0, guid.stderr
    assert guid.stdout.strip() == "00000016-facb-11e6-bd58-64006a7986d3"
    port = run_hvbridge("hyperv", "port", "00000016-facb-11e6-bd58-64006a7986d3")
    assert port.returncode == 0, port.stderr
    assert port.stdout.strip() == "22"


ROUTES = """\
[routes.ssh]
listen = "tcp://127.0.0.1:2222"
connect = "hvsock://11111111-2222-3333-4444-555555555555/22"

[routes.sock]
listen = "tcp://127.0.0.1:2223"
connect = "unix:///run/x.sock"
"""


def test_cli_check(tmp_path: object) -> None:
    path = f"{tmp_path}\\routes.toml"
    with open(path, "w") as f:
        f.write(ROUTES)
    checked = run_hvbridge("check", "-c", path)
    assert checked.returncode == 0, checked.stderr
    assert "hvsock://11111111-2222-3333-4444-555555555555/" in checked.stdout
    # Hyper-V sockets exist in this Python; Unix sockets do not, and check says so.
    assert "routes.ssh" not in checked.stderr
    assert "routes.sock.connect" in checked.stderr
    assert "AF_UNIX" in checked.stderr
    assert "Traceback" not in checked.stderr


def test_route_table() -> None:
    table = table_from_mapping(
        {"routes": {"ssh": {"listen": "tcp://127.0.0.1:2222", "connect": "hvsock://my-vm/22"}}}, source="<test>"
    )
    (route,) = table.routes
    assert str(route.connect) == "hvsock://my-vm/00000016-facb-11e6-bd58-64006a7986d3"
    assert str(route.connect) in format_table(table)
    assert transports.unavailable_reason(route.connect) is None
    assert transports.unavailable_reason(route.listen) is None


def test_unix_listener_is_refused_at_start() -> None:
    result = run_hvbridge("forward", "unix:///tmp/x.sock", "tcp://127.0.0.1:1")
    assert result.returncode != 0
    assert "AF_UNIX" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------- relaying


def test_tcp_relay_half_close(backend: MakeBackend) -> None:
    sent, reply = payload(), payload(300_000)
    got: dict[str, str] = {}

    def handle(conn: socket.socket) -> None:
        got["digest"] = digest(receive_all(conn))  # the client's EOF came through
        conn.sendall(reply)  # and this way still flows

    server: Backend = backend(handle)
    port = free_port()
    proc = start_hvbridge("forward", f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{server.port}")
    try:
        with connect_when_up(port, proc) as client:
            client.sendall(sent)
            client.shutdown(socket.SHUT_WR)
            assert receive_all(client) == reply
        server.join()
        assert got["digest"] == digest(sent)
    finally:
        proc.kill()
        proc.communicate(timeout=TIMEOUT)


def test_tcp_relay_passes_a_reset_on(backend: MakeBackend) -> None:
    # Wine's closesocket() sends FIN, never RST, even with SO_LINGER 0 or unread data, and its
    # recv() reads a reset as EOF; only send() sees it. So the backend closes, the client keeps
    # sending, hvbridge's send to the backend is reset, and the client's connection must end.
    def handle(conn: socket.socket) -> None:
        conn.recv(1)

    server: Backend = backend(handle)
    port = free_port()
    proc = start_hvbridge("forward", f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{server.port}")
    assert proc.stderr is not None
    try:
        with connect_when_up(port, proc) as client:
            ended = _send_until_refused(client, 2000)  # bounded: hvbridge ends it long before
        assert isinstance(ended, (ConnectionResetError, ConnectionAbortedError)), ended
        server.join()
        text = wait_for_log(proc, "connection closed")
    finally:
        proc.terminate()
        proc.communicate(timeout=TIMEOUT)
    assert "reset" in text.lower(), text
    assert "Traceback" not in text, text


def _send_until_refused(sock: socket.socket, chunks: int) -> OSError | None:
    try:
        for _ in range(chunks):
            sock.sendall(bytes(65536))
    except OSError as exc:
        return exc
    return None


def test_connect_over_pipes_half_closes_each_way(backend: MakeBackend) -> None:
    sent, reply = payload(), payload(200_000)
    got: dict[str, str] = {}

    def handle(conn: socket.socket) -> None:
        conn.sendall(reply)
        conn.shutdown(socket.SHUT_WR)  # connect must close its stdout: EOF for the reader
        got["digest"] = digest(receive_all(conn))

    server: Backend = backend(handle)
    proc = start_hvbridge("connect", f"tcp://127.0.0.1:{server.port}")
    assert proc.stdin is not None
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        # Read all of stdout while stdin is still open: the backend's EOF arrives by itself.
        assert proc.stdout.read() == reply
        proc.stdin.write(sent)
        proc.stdin.close()
        assert proc.wait(TIMEOUT) == 0, proc.stderr.read()
        server.join()
        assert got["digest"] == digest(sent)
    finally:
        proc.kill()
        proc.communicate(timeout=TIMEOUT)


def test_connect_refused_says_why() -> None:
    result = run_hvbridge("connect", f"tcp://127.0.0.1:{free_port()}")
    assert result.returncode != 0
    assert "refused" in result.stderr.lower(), result.stderr
    assert "Unknown error" not in result.stderr
    assert "Traceback" not in result.stderr


async def test_thread_pump_over_windows_sockets() -> None:
    a, b = socket.socketpair()
    pumped = ThreadSocketStream(a, trio.CapacityLimiter(4))
    peer = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    there, back = payload(), payload(500_000)
    received: dict[str, bytes] = {}

    async def drain(stream: trio.abc.ReceiveStream, key: str) -> None:
        chunks = []
        while chunk := await stream.receive_some():
            chunks.append(chunk)
        received[key] = b"".join(chunks)

    async def send(stream: trio.abc.HalfCloseableStream, data: bytes) -> None:
        await stream.send_all(data)
        await stream.send_eof()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, pumped, there)
            nursery.start_soon(drain, peer, "peer")
            nursery.start_soon(send, peer, back)
            nursery.start_soon(drain, pumped, "pumped")
        await pumped.aclose()
        await peer.aclose()
    assert digest(received["peer"]) == digest(there)
    assert digest(received["pumped"]) == digest(back)


# ------------------------------------------------------------------------------- Hyper-V


def test_hvsock_with_no_provider_closes_the_client_at_once() -> None:
    port = free_port()
    proc = start_hvbridge(
        "forward",
        "--connect-timeout",
        "60",
        f"tcp://127.0.0.1:{port}",
        "hvsock://11111111-2222-3333-4444-555555555555/22",
    )
    assert proc.stderr is not None
    try:
        with connect_when_up(port, proc) as client:
            client.settimeout(10)
            started = time.monotonic()
            # Closed with EOF, or with a reset (failure seen as failure).
            with contextlib.suppress(ConnectionResetError, ConnectionAbortedError):
                assert receive_all(client) == b""
            # At once: not after the route's 60 s connect_timeout, as a connect that hangs would be.
            assert time.monotonic() - started < 20
        text = wait_for_log(proc, "connection closed")
        assert proc.poll() is None, "one failed connection must not end the route"
    finally:
        proc.terminate()
        proc.communicate(timeout=TIMEOUT)
    assert "Hyper-V sockets need" in text, text
    # The Winsock text, not Python's "Windows Error 0x273f" for a code os.strerror() does not know.
    assert "Windows Error" not in text, text
    assert "Traceback" not in text, text


def test_connect_to_hvsock_with_no_provider_is_a_clear_error() -> None:
    result = run_hvbridge("connect", "hvsock://11111111-2222-3333-4444-555555555555/22")
    assert result.returncode != 0
    assert "Hyper-V" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_registry_round_trip() -> None:
    # A port nobody else uses in this (cached) Wine prefix; unregistered again at the end.
    port = 0x7000_0000 + uuid.uuid4().int % 0x0FFF_FFFF
    guid = run_hvbridge("hyperv", "guid", str(port)).stdout.strip()
    registered = run_hvbridge("hyperv", "register", "--name", "hvbridge lane", "--port", str(port))
    assert registered.returncode == 0, registered.stderr
    try:
        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, rf"{SERVICES_KEY}\{guid}") as key:
            assert winreg.QueryValueEx(key, "ElementName")[0] == "hvbridge lane"
        listed = run_hvbridge("hyperv", "services")
        assert listed.returncode == 0, listed.stderr
        assert any(
            guid in line and str(port) in line and "hvbridge lane" in line for line in listed.stdout.splitlines()
        )
        again = run_hvbridge("hyperv", "register", "--name", "again", "--port", str(port))
        assert again.returncode != 0
        assert "Traceback" not in again.stderr
    finally:
        unregistered = run_hvbridge("hyperv", "unregister", "--port", str(port))
    assert unregistered.returncode == 0, unregistered.stderr
    assert guid not in run_hvbridge("hyperv", "services").stdout
    with pytest.raises(FileNotFoundError):
        winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, rf"{SERVICES_KEY}\{guid}")
