"""The benchmark's two ends: a server process and the client-side workloads.

The server (`python benchmarks/peer.py serve --unix PATH`) listens on TCP 127.0.0.1:0 and on a
Unix socket, prints `READY <tcp-port>` on stdout, and serves each connection by its first line:

    SRC <n>\\n   send n bytes, then shut down writing and wait for EOF (download)
    SINK\\n      read until EOF, then answer `<count>\\n` (upload)
    ECHO\\n      echo every byte until EOF (ping-pong, held connections, connection rate)

The ends are written so that they are not the bottleneck: bulk bytes go through the kernel
without a copy into Python (sendall() of one shared block, splice() into /dev/null), one epoll
loop serves every ECHO connection, and the client workloads use blocking sockets or their own
epoll loop. No trio, no asyncio: the relay under test is the only event loop framework running.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import resource
import select
import socket
import sys
import threading
import time
from typing import Final

CHUNK: Final = 1 << 20
PAYLOAD: Final = b"\xa5" * CHUNK
PIPE_SIZE: Final = 1 << 20
_AGAIN: Final = (BlockingIOError, InterruptedError)


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE to the hard limit (children inherit it); return the new limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def nodelay(sock: socket.socket) -> None:
    """TCP_NODELAY on TCP sockets (ping-pong must not wait for Nagle)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_pipe() -> tuple[int, int]:
    """A pipe with 1 MiB capacity (fewer splice calls per byte)."""
    r, w = os.pipe()
    with contextlib.suppress(OSError):
        import fcntl

        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return r, w


def send_bytes(sock: socket.socket, count: int) -> None:
    """Send `count` bytes from one shared 1 MiB block (blocking socket).

    sendall() of large blocks beats sendfile() from tmpfs on loopback TCP: sendfile builds
    skbs of 4 KiB page fragments, which cost more per byte downstream than sendall's 32 KiB ones.
    """
    view = memoryview(PAYLOAD)
    left = count
    while left >= CHUNK:
        sock.sendall(view)
        left -= CHUNK
    if left:
        sock.sendall(view[:left])


def drain(sock: socket.socket, null_fd: int) -> int:
    """Read until EOF, splicing the bytes into /dev/null; return how many (blocking socket)."""
    r, w = make_pipe()
    total = 0
    try:
        while True:
            n = os.splice(sock.fileno(), w, PIPE_SIZE, flags=os.SPLICE_F_MOVE)
            if n == 0:
                return total
            total += n
            while n:
                n -= os.splice(r, null_fd, n, flags=os.SPLICE_F_MOVE)
    finally:
        os.close(r)
        os.close(w)


def read_exactly(sock: socket.socket, n: int) -> bytes:
    """Receive exactly n bytes (blocking socket)."""
    buffer = bytearray(n)
    view = memoryview(buffer)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError(f"EOF after {got} of {n} bytes")
        got += k
    return bytes(buffer)


# ------------------------------------------------------------------------------------ server


class Server:
    """Listeners, an epoll loop for headers and ECHO, threads for bulk transfers."""

    def __init__(self, unix_path: str) -> None:
        self.null_fd = os.open(os.devnull, os.O_WRONLY)
        self.epoll = select.epoll()
        self.tcp = socket.create_server(("127.0.0.1", 0), backlog=4096)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(unix_path)
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(unix_path)
        self.unix.listen(4096)
        self.listeners = {s.fileno(): s for s in (self.tcp, self.unix)}
        self.conns: dict[int, socket.socket] = {}
        self.heads: dict[int, bytes] = {}  # connections whose first line has not arrived
        self.pending: dict[int, bytes] = {}  # ECHO bytes a full socket buffer refused
        for listener in self.listeners.values():
            listener.setblocking(False)
            self.epoll.register(listener.fileno(), select.EPOLLIN)

    def serve(self) -> None:
        """Run the epoll loop forever."""
        while True:
            for fd, events in self.epoll.poll():
                if fd in self.listeners:
                    self._accept(self.listeners[fd])
                elif fd in self.heads:
                    self._read_head(fd)
                elif fd in self.conns:
                    self._echo(fd, events)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except _AGAIN:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    time.sleep(0.01)
                    return
                raise
            sock.setblocking(False)
            nodelay(sock)
            self.conns[sock.fileno()] = sock
            self.heads[sock.fileno()] = b""
            self.epoll.register(sock.fileno(), select.EPOLLIN)

    def _close(self, fd: int) -> None:
        self.epoll.unregister(fd)
        self.heads.pop(fd, None)
        self.pending.pop(fd, None)
        self.conns.pop(fd).close()

    def _read_head(self, fd: int) -> None:
        sock = self.conns[fd]
        try:
            data = sock.recv(4096)
        except _AGAIN:
            return
        except OSError:
            self._close(fd)
            return
        if not data:
            self._close(fd)
            return
        head = self.heads[fd] + data
        line, newline, rest = head.partition(b"\n")
        if not newline:
            self.heads[fd] = head
            return
        del self.heads[fd]
        command, _, argument = line.decode().partition(" ")
        if command == "ECHO":
            if rest:
                self._send_echo(fd, rest)
            return
        # Bulk: hand the socket to a thread of its own, blocking.
        self.epoll.unregister(fd)
        del self.conns[fd]
        sock.setblocking(True)
        if command == "SRC":
            threading.Thread(target=self._source, args=(sock, int(argument)), daemon=True).start()
        else:
            threading.Thread(target=self._sink, args=(sock, len(rest)), daemon=True).start()

    def _echo(self, fd: int, events: int) -> None:
        sock = self.conns[fd]
        if fd in self.pending:
            self._send_echo(fd, b"")
            return
        try:
            data = sock.recv(CHUNK)
        except _AGAIN:
            return
        except OSError:
            self._close(fd)
            return
        if not data:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            self._close(fd)
            return
        self._send_echo(fd, data)

    def _send_echo(self, fd: int, data: bytes) -> None:
        sock = self.conns[fd]
        data = self.pending.pop(fd, b"") + data
        try:
            sent = sock.send(data)
        except _AGAIN:
            sent = 0
        except OSError:
            self._close(fd)
            return
        if sent < len(data):
            self.pending[fd] = data[sent:]
            self.epoll.modify(fd, select.EPOLLOUT)
        else:
            self.epoll.modify(fd, select.EPOLLIN)

    def _source(self, sock: socket.socket, count: int) -> None:
        with sock:
            try:
                send_bytes(sock, count)
                sock.shutdown(socket.SHUT_WR)
                sock.recv(1)
            except OSError:
                pass

    def _sink(self, sock: socket.socket, already: int) -> None:
        with sock:
            try:
                total = already + drain(sock, self.null_fd)
                sock.sendall(f"{total}\n".encode())
            except OSError:
                pass


def serve_main(unix_path: str) -> None:
    """Entry point of the server process."""
    raise_fd_limit()
    server = Server(unix_path)
    sys.stdout.write(f"READY {server.tcp.getsockname()[1]}\n")
    sys.stdout.flush()
    server.serve()


# ------------------------------------------------------------------------------------ client


Address = tuple[str, int] | str


def connect(address: Address) -> socket.socket:
    """A blocking client connection to a TCP (host, port) or a Unix path."""
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock
    sock = socket.create_connection(address)
    nodelay(sock)
    return sock


def download(address: Address, count: int, null_fd: int) -> int:
    """Ask the server for `count` bytes through `address`; return how many arrived."""
    with connect(address) as sock:
        sock.sendall(f"SRC {count}\n".encode())
        got = drain(sock, null_fd)
    if got != count:
        raise ConnectionError(f"download: {got} of {count} bytes arrived")
    return got


def upload(address: Address, count: int) -> int:
    """Send `count` bytes to the server through `address`; return how many it counted."""
    with connect(address) as sock:
        sock.sendall(b"SINK\n")
        send_bytes(sock, count)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while not answer.endswith(b"\n"):
            part = sock.recv(64)
            if not part:
                break
            answer += part
    got = int(answer or b"-1")
    if got != count:
        raise ConnectionError(f"upload: the server counted {got} of {count} bytes")
    return got


def ping_pong(address: Address, size: int, rounds: int, warmup: int = 200) -> list[int]:
    """Round trips of `size` bytes through an ECHO connection; nanoseconds each."""
    payload = b"p" * size
    buffer = bytearray(size)
    view = memoryview(buffer)
    times: list[int] = []
    clock = time.perf_counter_ns
    with connect(address) as sock:
        sock.sendall(b"ECHO\n")
        for i in range(warmup + rounds):
            start = clock()
            sock.sendall(payload)
            got = 0
            while got < size:
                k = sock.recv_into(view[got:])
                if k == 0:
                    raise ConnectionError("ping-pong: EOF")
                got += k
            if i >= warmup:
                times.append(clock() - start)
    return times


def connection_rate(address: Address, seconds: float, concurrency: int = 16) -> tuple[int, int]:
    """Open, request, answer, close, as fast as possible with `concurrency` in flight.

    Each connection sends `ECHO\\nping` and waits for `ping` back before closing. Returns
    (connections completed, connections failed).
    """
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    epoll = select.epoll()
    live: dict[int, tuple[socket.socket, bytearray]] = {}
    done = failed = 0
    deadline = time.monotonic() + seconds

    def start() -> None:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # EINPROGRESS (TCP), EAGAIN (full Unix backlog)
            sock.connect(address)
        live[sock.fileno()] = (sock, bytearray())
        epoll.register(sock.fileno(), select.EPOLLOUT)

    def finish(fd: int, ok: bool) -> None:
        nonlocal done, failed
        sock, _ = live.pop(fd)
        epoll.unregister(fd)
        sock.close()
        if ok:
            done += 1
        else:
            failed += 1
        if time.monotonic() < deadline:
            start()

    for _ in range(concurrency):
        start()
    while live:
        for fd, events in epoll.poll(1.0):
            sock, got = live[fd]
            if events & select.EPOLLOUT:
                try:
                    sock.send(b"ECHO\nping")
                except OSError:
                    finish(fd, False)
                    continue
                epoll.modify(fd, select.EPOLLIN)
                continue
            try:
                data = sock.recv(64)
            except _AGAIN:
                continue
            except OSError:
                finish(fd, False)
                continue
            got += data
            if len(got) >= 4 or not data:
                finish(fd, bytes(got) == b"ping")
    epoll.close()
    return done, failed


class Held:
    """Many idle ECHO connections, opened in steps and verified to still work."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self.socks: list[socket.socket] = []

    def open_to(self, n: int) -> None:
        """Open connections until `n` are held; each sends its ECHO line at once."""
        while len(self.socks) < n:
            sock = connect(self.address)
            sock.sendall(b"ECHO\n")
            self.socks.append(sock)

    def verify(self, start: int = 0) -> int:
        """One round trip on each held connection from `start`; return how many worked."""
        ok = 0
        for sock in self.socks[start:]:
            try:
                sock.settimeout(10.0)
                sock.sendall(b"v")
                if sock.recv(1) == b"v":
                    ok += 1
            except OSError:
                pass
        return ok

    def close(self) -> None:
        """Close every held connection."""
        for sock in self.socks:
            sock.close()
        self.socks.clear()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--unix", required=True, help="Unix socket path to listen on")
    serve_main(parser.parse_args().unix)
