"""Standard input and output as one stream: `stdio:` for `hvbridge connect` (and ssh's ProxyCommand)."""

from __future__ import annotations

import functools
import os
import sys
import threading
from typing import TYPE_CHECKING, TypeVar, final

import trio

from hvbridge.transports.base import Stream

if TYPE_CHECKING:
    from collections.abc import Callable

_T = TypeVar("_T")


def open_stdio_stream() -> Stream:
    """Standard input and output as one half-closeable stream (for `hvbridge connect`).

    send_eof() closes our copy of stdout, so the reader on the other end sees EOF.
    """
    if sys.platform == "win32":  # pragma: no cover - Windows only (trio has no FdStream there)
        return ThreadFdStream(0, 1)
    stdin = trio.lowlevel.FdStream(os.dup(0))
    stdout = trio.lowlevel.FdStream(os.dup(1))
    return trio.StapledStream(stdout, stdin)


@final
class ThreadFdStream(Stream):
    """A reading and a writing file descriptor as one stream, each read and write in a worker thread.

    For `hvbridge connect` on Windows: trio has no FdStream there, and pipes and consoles have
    no readiness to wait on, so each call blocks a thread (in binary mode: Python sets it on the
    standard descriptors). A cancelled call abandons its thread, which ends with the call or with
    the process; a descriptor is closed only once no call is using it. The stream owns both
    descriptors: send_eof() closes the writing one, so the reader on the other end sees EOF.
    """

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._lock = threading.Lock()
        self._fds: dict[str, int | None] = {"read": read_fd, "write": write_fd}
        self._busy: set[str] = set()
        self._closing: set[str] = set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self._call("read", lambda fd: os.read(fd, max_bytes or 65536))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            sent = await self._call("write", functools.partial(_write, view))
            view = view[sent:]

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        self._close("write")
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self._close("read")
        self._close("write")
        await trio.lowlevel.checkpoint()

    async def _call(self, end: str, call: Callable[[int], _T]) -> _T:
        with self._lock:
            fd = self._fds[end]
            if fd is None or end in self._busy:
                raise (
                    trio.ClosedResourceError(f"the {end} end is closed")
                    if fd is None
                    else trio.BusyResourceError(f"another task is using the {end} end")
                )
            self._busy.add(end)

        def run() -> _T:
            try:
                return call(fd)
            finally:
                with self._lock:
                    self._busy.discard(end)
                    if end in self._closing:
                        self._closing.discard(end)
                        os.close(fd)

        try:
            return await trio.to_thread.run_sync(run, abandon_on_cancel=True)
        except OSError as exc:  # EPIPE/EINVAL: the other end went away
            raise trio.BrokenResourceError(f"{end} failed: {exc.strerror or exc}") from exc

    def _close(self, end: str) -> None:
        with self._lock:
            fd, self._fds[end] = self._fds[end], None
            if fd is None:
                return
            if end in self._busy:
                self._closing.add(end)  # the thread still in the call closes it when it returns
                return
        os.close(fd)


def _write(data: memoryview, fd: int) -> int:
    return os.write(fd, data)
