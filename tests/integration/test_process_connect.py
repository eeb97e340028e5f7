"""`hvbridge connect` as a real process, as ssh runs a ProxyCommand: signals, resets, closed stdio.

Rules: loopback only (a TCP backend on 127.0.0.1, port 0, run by the test); every wait bounded
by trio.fail_after; the process is killed at the end if it is still running. Only what needs a
real process is here (signals, closed descriptors, pipes); argument errors are CliRunner tests.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
from typing import TYPE_CHECKING

import pytest
import trio
from support.processes import hvbridge_argv

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.slow

LIMIT = 30


@contextlib.asynccontextmanager
async def backend() -> AsyncIterator[tuple[trio.socket.SocketType, str]]:
    """A listening TCP socket on loopback and its endpoint text."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock, f"tcp://127.0.0.1:{sock.getsockname()[1]}"


async def connect(endpoint: str, *, shell: str = "") -> trio.Process:
    """Start `hvbridge connect ENDPOINT` with piped stdio (`shell`: redirections such as `<&-`)."""
    argv = [*hvbridge_argv(), "connect", endpoint]
    if shell:
        argv = ["sh", "-c", f'exec "$@" {shell}', "sh", *argv]
    return await trio.lowlevel.open_process(argv, stdin=-1, stdout=-1, stderr=-1)


async def read_all(stream: trio.abc.ReceiveStream | None) -> bytes:
    assert stream is not None
    data = b""
    for _ in range(10_000):
        try:
            chunk = await stream.receive_some()
        except trio.ClosedResourceError:  # the test closed it: nothing more to read
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError("too many reads")


async def recv_exactly(sock: trio.socket.SocketType, size: int) -> bytes:
    data = b""
    for _ in range(10_000):
        if len(data) >= size:
            return data
        chunk = await sock.recv(size - len(data))
        if not chunk:
            return data
        data += chunk
    raise AssertionError("too many reads")


async def finish(process: trio.Process) -> tuple[int, bytes, bytes]:
    """Wait for the exit; return the status, stdout and stderr."""
    try:
        stdout = await read_all(process.stdout)
        stderr = await read_all(process.stderr)
        return await process.wait(), stdout, stderr
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sigint_exits_130_with_one_line() -> None:
    with trio.fail_after(LIMIT):
        async with backend() as (server, endpoint):
            process = await connect(endpoint)
            peer, _ = await server.accept()  # connected: the relay is running
            with peer:
                process.send_signal(signal.SIGINT)
                status, stdout, stderr = await finish(process)
    assert (status, stdout) == (130, b"")
    assert stderr.decode().splitlines() == ["Error: connect: interrupted (SIGINT)"]


async def test_a_backend_reset_mid_stream_is_status_1_naming_the_backend() -> None:
    with trio.fail_after(LIMIT):
        async with backend() as (server, endpoint):
            process = await connect(endpoint)
            peer, _ = await server.accept()
            with peer:
                await peer.send(b"hello")
                # Reset only once the bytes are through: a reset that overtakes them discards them
                # from hvbridge's receive queue (RFC 793: a RST flushes the queues).
                assert process.stdout is not None
                relayed = b""
                for _ in range(5):
                    if len(relayed) < 5:
                        relayed += await process.stdout.receive_some(5 - len(relayed))
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            status, stdout, stderr = await finish(process)
    assert (status, relayed + stdout) == (1, b"hello")
    assert stderr.decode().splitlines() == [f"Error: connect: the backend {endpoint} reset the connection"]


@pytest.mark.parametrize("stdin", ["<&-", "</dev/null"])
async def test_stdin_closed_or_at_eof_is_a_half_close(stdin: str) -> None:
    with trio.fail_after(LIMIT):
        async with backend() as (server, endpoint):
            process = await connect(endpoint, shell=stdin)
            peer, _ = await server.accept()
            with peer:
                assert await peer.recv(1) == b""  # EOF, not a reset
                await peer.send(b"still flowing")  # the other way keeps going
            status, stdout, stderr = await finish(process)
    assert (status, stdout, stderr) == (0, b"still flowing", b"")


async def test_stdout_closed_by_its_reader_is_status_1() -> None:
    with trio.fail_after(LIMIT):
        async with backend() as (server, endpoint):
            process = await connect(endpoint)
            peer, _ = await server.accept()
            with peer:
                assert process.stdout is not None
                await process.stdout.aclose()  # the reader goes away (ssh exited)
                await peer.send(b"x" * 4096)
                status, _, stderr = await finish(process)
                # The backend sees the connection end (a reset), never a clean EOF.
                with contextlib.suppress(ConnectionResetError):
                    assert await recv_exactly(peer, 1) == b""
    assert status == 1
    assert stderr.decode().splitlines() == ["Error: connect: stdout closed"]


async def test_stdout_closed_at_start_is_status_1() -> None:
    with trio.fail_after(LIMIT):
        async with backend() as (_, endpoint):
            process = await connect(endpoint, shell=">&-")
            status, _, stderr = await finish(process)
    assert status == 1
    assert stderr.decode().splitlines() == [
        "Error: connect: stdout is closed; expected somewhere to write what ENDPOINT sends"
    ]
