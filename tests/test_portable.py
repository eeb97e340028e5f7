"""Tests, on Linux, of the code paths hvbridge takes on Windows (where tests/windows/ runs them for real).

ThreadFdStream is `hvbridge connect`'s stdio on Windows; here it runs over os.pipe(). Winsock
error text and the refusal of Unix sockets without AF_UNIX are shown by faking what the socket
module has on Windows. Threads are real, so each wait is bounded by trio.fail_after.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
from typing import TYPE_CHECKING

import pytest
import trio

from hvbridge.addresses import parse_address
from hvbridge.backend import Backend
from hvbridge.errors import AddressFamilyUnavailable, BackendUnavailable
from hvbridge.routes import RouteOptions
from hvbridge.transports import unavailable_reason
from hvbridge.transports.base import error_text, translate_connect_error
from hvbridge.transports.stdio import ThreadFdStream

if TYPE_CHECKING:
    from collections.abc import Iterator

WAIT = 10.0


@pytest.fixture
def pipes() -> Iterator[tuple[ThreadFdStream, int, int]]:
    """A ThreadFdStream reading one pipe and writing another; the far ends (write fd, read fd)."""
    in_read, in_write = os.pipe()
    out_read, out_write = os.pipe()
    yield ThreadFdStream(in_read, out_write), in_write, out_read
    for fd in (in_write, out_read):
        with contextlib.suppress(OSError):  # closed by the test
            os.close(fd)


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


async def _read_to_eof(fd: int) -> bytes:
    chunks = []
    while chunk := await trio.to_thread.run_sync(os.read, fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


async def test_thread_fd_stream_moves_bytes_both_ways_and_half_closes(pipes: tuple[ThreadFdStream, int, int]) -> None:
    stream, in_write, out_read = pipes
    there, back = os.urandom(300_000) + b"\r\n\x1a", os.urandom(200_000)
    got: dict[str, bytes] = {}

    async def feed() -> None:
        await trio.to_thread.run_sync(os.write, in_write, back)
        os.close(in_write)

    async def drain() -> None:
        got["out"] = await _read_to_eof(out_read)

    async def receive() -> None:
        chunks = []
        while chunk := await stream.receive_some():
            chunks.append(chunk)
        got["in"] = b"".join(chunks)

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            nursery.start_soon(drain)
            nursery.start_soon(receive)
            await stream.wait_send_all_might_not_block()  # no readiness to wait for: returns at once
            await stream.send_all(there)
            await stream.send_eof()  # the reader of our output sees EOF while we still read
        await stream.aclose()
    assert hashlib.sha256(got["out"]).digest() == hashlib.sha256(there).digest()
    assert got["in"] == back
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")


async def test_thread_fd_stream_write_to_a_gone_reader_is_broken(pipes: tuple[ThreadFdStream, int, int]) -> None:
    stream, _, out_read = pipes
    os.close(out_read)
    with trio.fail_after(WAIT), pytest.raises(trio.BrokenResourceError, match="write failed"):
        await stream.send_all(b"x")  # EPIPE (Python ignores SIGPIPE)
    await stream.aclose()


async def test_thread_fd_stream_cancelled_read_closes_its_fd_when_the_read_returns(
    pipes: tuple[ThreadFdStream, int, int],
) -> None:
    stream, in_write, _ = pipes
    read_fd = stream._fds["read"]
    assert read_fd is not None
    with trio.move_on_after(0.05):
        await stream.receive_some()  # blocks in its thread; abandoned on cancel
    with trio.fail_after(WAIT), pytest.raises(trio.BusyResourceError):
        await stream.receive_some()  # the abandoned read still holds the read end
    await stream.aclose()
    assert not _closed(read_fd), "closed under a read still in progress"
    os.write(in_write, b"x")  # the abandoned read returns, and closes its fd
    with trio.fail_after(WAIT):
        while not _closed(read_fd):  # noqa: ASYNC110 - a worker thread's end is no trio event
            await trio.sleep(0.01)


def test_error_text_uses_the_socket_modules_table_where_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    assert error_text(errno.ECONNREFUSED) == os.strerror(errno.ECONNREFUSED)
    # What Windows has: os.strerror(10061) there is "Unknown error", socket.errorTab knows.
    monkeypatch.setattr(socket, "errorTab", {10061: "Connection refused."}, raising=False)
    assert error_text(10061) == "Connection refused"
    error = translate_connect_error(
        parse_address("tcp://127.0.0.1:1"), OSError(10061, "Error connecting to ('127.0.0.1', 1): Unknown error")
    )
    assert isinstance(error, BackendUnavailable)
    assert "backend unavailable (Connection refused)" in str(error)


@pytest.mark.parametrize("text", ["unix:///tmp/x.sock", "vsock-mux:///tmp/v.sock:5000"])
def test_unix_sockets_are_refused_without_af_unix(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    address = parse_address(text)
    assert unavailable_reason(address) is None
    monkeypatch.delattr(socket, "AF_UNIX")  # CPython on Windows has none
    why = unavailable_reason(address)
    assert why is not None
    assert "AF_UNIX" in why
    assert "tcp://127.0.0.1:PORT" in why


async def test_unix_listen_and_connect_without_af_unix_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    address = parse_address("unix:///tmp/hvbridge-never-made.sock")
    monkeypatch.delattr(socket, "AF_UNIX")
    with pytest.raises(AddressFamilyUnavailable, match="AF_UNIX"):
        await Backend().open_listeners(address, RouteOptions())
    with pytest.raises(AddressFamilyUnavailable, match="AF_UNIX"):
        await Backend().connect(address, RouteOptions())
