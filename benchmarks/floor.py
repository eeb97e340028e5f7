"""The least a Python relay can do per connection: the floor that hvbridge's connection rate is read against.

    python benchmarks/floor.py LISTEN TARGET     # each `HOST:PORT` or a Unix socket path

One thread and one epoll: accept, a non-blocking connect, splice() both ways through a pipe,
pass EOF on, close. No allow list, limits, timeouts, counters, logs or error reporting, and
a destination that is full is waited for by spinning: good for the connection-rate test
(`benchmarks/run.py --relays python-floor`), which moves a few bytes per connection, and for
nothing else. What hvbridge costs beyond it is what its rules and its two threads cost
(docs/performance.md, "Connection rate").
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys

FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


def address(text: str) -> tuple[int, str | tuple[str, int]]:
    if text.startswith("/"):
        return socket.AF_UNIX, text
    host, _, port = text.rpartition(":")
    return socket.AF_INET, (host, int(port))


def main() -> None:
    listen_family, listen_at = address(sys.argv[1])
    target_family, target = address(sys.argv[2])
    listener = socket.socket(listen_family, socket.SOCK_STREAM)
    if listen_family == socket.AF_UNIX:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(listen_at))
    else:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(listen_at)
    listener.listen(4096)
    listener.setblocking(False)
    epoll = select.epoll()
    epoll.register(listener.fileno(), select.EPOLLIN)
    read_end, write_end = os.pipe()
    peers: dict[int, tuple[socket.socket, socket.socket]] = {}  # fd -> (its socket, the other one)
    state: dict[int, str] = {}  # fd -> "connecting" (a backend), "open" or "eof" (read its EOF)

    def close(sock: socket.socket, peer: socket.socket) -> None:
        for s in (sock, peer):
            peers.pop(s.fileno(), None)
            state.pop(s.fileno(), None)
            s.close()  # also leaves the epoll set

    while True:
        for fd, _ in epoll.poll():
            if fd == listener.fileno():
                while True:
                    try:
                        client, _ = listener.accept()
                    except BlockingIOError:
                        break
                    client.setblocking(False)
                    backend = socket.socket(target_family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                    with contextlib.suppress(BlockingIOError):
                        backend.connect(target)
                    peers[backend.fileno()] = backend, client
                    state[backend.fileno()] = "connecting"
                    epoll.register(backend.fileno(), select.EPOLLOUT)
                continue
            if fd not in peers:
                continue
            sock, peer = peers[fd]
            if state[fd] == "connecting":
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    close(sock, peer)
                    continue
                peers[peer.fileno()] = peer, sock
                state[fd] = state[peer.fileno()] = "open"
                epoll.modify(fd, select.EPOLLIN)
                epoll.register(peer.fileno(), select.EPOLLIN)
                continue
            try:
                n = os.splice(fd, write_end, 1 << 16, flags=FLAGS)
            except BlockingIOError:
                continue
            except OSError:
                close(sock, peer)
                continue
            if n == 0:  # EOF: pass it on; once both ways have ended, close both
                if state[peer.fileno()] == "eof":
                    close(sock, peer)
                    continue
                state[fd] = "eof"
                epoll.unregister(fd)
                with contextlib.suppress(OSError):
                    peer.shutdown(socket.SHUT_WR)
                continue
            while n:
                try:
                    n -= os.splice(read_end, peer.fileno(), n, flags=FLAGS)
                except BlockingIOError:
                    continue  # the peer is full: spin (see the docstring)
                except OSError:
                    close(sock, peer)
                    os.close(read_end)
                    os.close(write_end)
                    read_end, write_end = os.pipe()  # the pipe may hold bytes nobody will read
                    break


if __name__ == "__main__":
    main()
