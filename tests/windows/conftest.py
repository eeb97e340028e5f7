"""The Windows lane: tests that run only under Windows CPython (scripts/windows-tests, in Wine).

On any other system this directory is not collected: the main suite covers the same code there.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeAlias

import pytest

collect_ignore_glob = [] if sys.platform == "win32" else ["*.py"]

#: Every wait on a process or socket in this lane ends by this many seconds (Wine starts slowly).
TIMEOUT = 60.0


def run_hvbridge(*args: str, stdin: bytes = b"", timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run `python -m hvbridge ARGS` as its own Windows process; its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "hvbridge", *args],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_hvbridge(*args: str) -> subprocess.Popen[bytes]:
    """Start `python -m hvbridge ARGS` with pipes on all three standard streams."""
    return subprocess.Popen(
        [sys.executable, "-m", "hvbridge", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def connect_when_up(port: int, proc: subprocess.Popen[bytes] | None = None) -> socket.socket:
    """A TCP connection to 127.0.0.1:PORT, retried until the listener is up (bounded)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        except ConnectionRefusedError:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(
                    f"hvbridge exited with {proc.returncode}: {proc.stderr and proc.stderr.read()!r}"
                ) from None
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {TIMEOUT} s") from None
            time.sleep(0.1)
            continue
        return sock


def receive_all(sock: socket.socket) -> bytes:
    """Everything until EOF."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


class Backend:
    """A real TCP server in a thread; `handle` gets each accepted connection (blocking socket)."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port: int = self.listener.getsockname()[1]
        self.errors: list[BaseException] = []
        self._handle = handle
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
            conn.settimeout(TIMEOUT)
            with conn:
                self._handle(conn)
        except BaseException as exc:  # reported by join()
            self.errors.append(exc)

    def join(self) -> None:
        self._thread.join(TIMEOUT)
        self.listener.close()
        assert not self._thread.is_alive(), "the backend never finished"
        if self.errors:
            raise self.errors[0]


MakeBackend: TypeAlias = Callable[[Callable[[socket.socket], None]], Backend]


@pytest.fixture
def backend() -> Iterator[MakeBackend]:
    made: list[Backend] = []

    def make(handle: Callable[[socket.socket], None]) -> Backend:
        made.append(Backend(handle))
        return made[-1]

    yield make
    for b in made:
        b.listener.close()


def payload(size: int = 1 << 20) -> bytes:
    """Random bytes: they include CR, LF and Ctrl-Z, which a text-mode pipe would change."""
    return os.urandom(size) + b"\r\n\x1a\n\r"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_for_log(proc: subprocess.Popen[bytes], text: str) -> str:
    """Read proc's stderr until a line holds `text`; the lines read. Kills proc after TIMEOUT."""
    assert proc.stderr is not None
    timer = threading.Timer(TIMEOUT, proc.kill)
    timer.start()
    lines = []
    try:
        while line := proc.stderr.readline().decode(errors="replace"):
            lines.append(line)
            if text in line:
                return "".join(lines)
    finally:
        timer.cancel()
    raise AssertionError(f"hvbridge never logged {text!r}:\n{''.join(lines)}")
