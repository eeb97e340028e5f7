"""An experiment: the kernel relaying bytes between two sockets with a sockmap, no relay wake-ups.

    .venv/bin/python benchmarks/sockmap.py                 # the rule experiments, then the benchmark
    .venv/bin/python benchmarks/sockmap.py --rules         # only the rule experiments (about a minute)
    .venv/bin/python benchmarks/sockmap.py --bench         # only the benchmark (--size, --repeat, --rounds)
    .venv/bin/python benchmarks/sockmap.py --quick         # both, smaller, 1 repeat
    scripts/microvm .venv/bin/python benchmarks/sockmap.py --vsock-check   # in the micro-VM guest only

Linux can move a socket's incoming bytes straight to another socket's send path: put both sockets
in a BPF_MAP_TYPE_SOCKHASH and attach a BPF_PROG_TYPE_SK_SKB verdict program to the map that calls
bpf_sk_redirect_hash() with the peer's key. This file loads that program with the bpf(2) system
call through ctypes (no bcc, no clang, no libbpf). The map is keyed by socket cookie, the cookie
the program sees for an skb (see redirect_key()), and each socket is stored under the key of the
bytes arriving at its PEER, so the program is "look up the skb's own key, redirect there", eleven
instructions.

It then measures, on loopback, a minimal sockmap relay against a minimal splice relay and a plain
Python recv/send relay (and hvbridge itself, whose data path is splice), with the benchmark's own
server and client (benchmarks/peer.py), interleaved so that the shared machine's noise hits all of
them alike. And it checks, with real sockets, what becomes of the relay's rules (half-close,
backpressure, resets, idle timeout, byte counts) once the kernel moves the bytes.

Needs root (CAP_BPF and CAP_NET_ADMIN) and a kernel with CONFIG_BPF_STREAM_PARSER; says exactly
what failed (errno, verifier log) otherwise. Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import os
import platform
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterator

HERE: Final = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import peer  # noqa: E402
from relays import Family, Relay, free_port, stop_relay, tree_cpu_seconds, wait_connectable  # noqa: E402

GiB: Final = 1 << 30
MiB: Final = 1 << 20

# ------------------------------------------------------------------------------- bpf(2) by hand
# Numbers from include/uapi/linux/bpf.h (stable ABI).
SYS_BPF: Final = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), -1)
BPF_MAP_CREATE: Final = 0
BPF_MAP_UPDATE_ELEM: Final = 2
BPF_MAP_DELETE_ELEM: Final = 3
BPF_PROG_LOAD: Final = 5
BPF_PROG_ATTACH: Final = 8
BPF_MAP_TYPE_SOCKHASH: Final = 18
BPF_PROG_TYPE_SK_SKB: Final = 14
BPF_SK_SKB_STREAM_PARSER: Final = 4
BPF_SK_SKB_STREAM_VERDICT: Final = 5
BPF_SK_SKB_VERDICT: Final = 38
BPF_FUNC_GET_SOCKET_COOKIE: Final = 46
BPF_FUNC_SK_REDIRECT_HASH: Final = 72
BPF_PSEUDO_MAP_FD: Final = 1
BPF_ANY: Final = 0
ATTR_SIZE: Final = 144  # sizeof(union bpf_attr) in the 6.x headers; the kernel accepts a shorter one
SO_COOKIE: Final = 57
SIOCOUTQ: Final = 0x5411
TCP_INFO_SIZE: Final = 232
# struct tcp_info offsets (include/uapi/linux/tcp.h)
TCPI_LAST_DATA_RECV: Final = 52
TCPI_BYTES_ACKED: Final = 120
TCPI_BYTES_RECEIVED: Final = 128

_libc = ctypes.CDLL(None, use_errno=True)


class BpfError(OSError):
    """A bpf(2) command failed; `log` is the verifier's output for BPF_PROG_LOAD."""

    def __init__(self, what: str, err: int, log: str = "") -> None:
        super().__init__(err, f"{what}: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})")
        self.log = log


def bpf(cmd: int, attr: bytes, what: str) -> int:
    """Run one bpf(2) command on a copy of `attr`; return its result or raise BpfError."""
    if SYS_BPF < 0:
        raise BpfError(what, errno.ENOSYS)
    buf = ctypes.create_string_buffer(attr.ljust(ATTR_SIZE, b"\0"), ATTR_SIZE)
    ret: int = _libc.syscall(SYS_BPF, cmd, buf, ATTR_SIZE)
    if ret < 0:
        raise BpfError(what, ctypes.get_errno())
    return ret


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One eBPF instruction: opcode, dst/src registers, 16-bit offset, 32-bit immediate."""
    return struct.pack("<BBhi", code, dst | src << 4, off, imm)


def verdict_program(map_fd: int) -> bytes:
    """r0 = bpf_sk_redirect_hash(skb, map, &cookie_of(skb->sk), 0): send to the peer's send path."""
    return b"".join(
        (
            insn(0xBF, dst=6, src=1),  # r6 = r1 (the skb)
            insn(0x85, imm=BPF_FUNC_GET_SOCKET_COOKIE),  # r0 = bpf_get_socket_cookie(skb)
            insn(0x7B, dst=10, src=0, off=-8),  # *(u64 *)(r10 - 8) = r0
            insn(0xBF, dst=1, src=6),  # r1 = skb
            insn(0x18, dst=2, src=BPF_PSEUDO_MAP_FD, imm=map_fd),  # r2 = map (ld_imm64, 2 slots)
            insn(0x00),
            insn(0xBF, dst=3, src=10),  # r3 = r10
            insn(0x07, dst=3, imm=-8),  # r3 -= 8: the key, on the stack
            insn(0xB7, dst=4, imm=0),  # r4 = 0: flags, egress (the peer's send path)
            insn(0x85, imm=BPF_FUNC_SK_REDIRECT_HASH),  # r0 = SK_PASS, or SK_DROP without a peer
            insn(0x95),  # exit
        )
    )


def parser_program() -> bytes:
    """r0 = skb->len: every skb is one whole message (for kernels that need a stream parser)."""
    return insn(0x61, dst=0, src=1, off=0) + insn(0x95)


def load_program(code: bytes, attach_type: int, name: bytes) -> int:
    """BPF_PROG_LOAD an SK_SKB program with a verifier log; return its fd."""
    log = ctypes.create_string_buffer(1 << 16)
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = struct.pack(
        "<IIQQIIQII16sII",
        BPF_PROG_TYPE_SK_SKB,
        len(code) // 8,
        ctypes.addressof(insns),
        ctypes.addressof(license_),
        1,  # log_level
        len(log),
        ctypes.addressof(log),
        0,  # kern_version
        0,  # prog_flags
        name[:15],
        0,  # prog_ifindex
        attach_type,  # expected_attach_type
    )
    try:
        return bpf(BPF_PROG_LOAD, attr, f"BPF_PROG_LOAD {name.decode()}")
    except BpfError as exc:
        exc.log = log.value.decode(errors="replace")
        raise


def socket_cookie(sock: socket.socket) -> int:
    """The kernel's 64-bit id of a socket (what bpf_get_socket_cookie() returns for it)."""
    value: int = struct.unpack("<Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
    return value


def redirect_key(sock: socket.socket) -> int:
    """The cookie the verdict program sees for bytes arriving on `sock`.

    bpf_get_socket_cookie(skb) reads skb->sk. TCP's read_skb (tcp_read_skb) makes the receiving
    socket the skb's owner, so for TCP that is `sock` itself. A Unix stream skb stays owned by the
    socket that SENT it (unix_stream_read_skb hands it over as queued), so for Unix it is the
    connected peer's cookie, which only sock_diag can tell this process.
    """
    if sock.family == socket.AF_UNIX:
        return unix_peer_cookie(sock)
    return socket_cookie(sock)


NETLINK_SOCK_DIAG: Final = 4
SOCK_DIAG_BY_FAMILY: Final = 20
UDIAG_SHOW_PEER: Final = 0x4
UNIX_DIAG_PEER: Final = 2
NOCOOKIE: Final = 0xFFFFFFFF


def _unix_diag(ino: int, show: int) -> tuple[int, dict[int, bytes]]:
    """Ask sock_diag about the Unix socket with inode `ino`: (its cookie, its attributes)."""
    request = struct.pack("<BBHIIIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino, show, NOCOOKIE, NOCOOKIE)
    header = struct.pack("<IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, 1, 1, 0)  # NLM_F_REQUEST
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2.0)
        nl.send(header + request)
        reply = nl.recv(65536)
    length, kind = struct.unpack_from("<IH", reply)
    if kind == 2:  # NLMSG_ERROR
        raise OSError(-struct.unpack_from("<i", reply, 16)[0], f"sock_diag on Unix socket inode {ino}")
    _family, _type, _state, _pad, _ino, low, high = struct.unpack_from("<BBBBIII", reply, 16)
    attrs: dict[int, bytes] = {}
    offset = 32
    while offset + 4 <= length:
        size, attr = struct.unpack_from("<HH", reply, offset)
        attrs[attr] = reply[offset + 4 : offset + size]
        offset += (size + 3) & ~3
    return low | high << 32, attrs


def unix_peer_cookie(sock: socket.socket, timeout: float = 2.0) -> int:
    """The cookie of the socket at the other end of a connected Unix stream socket.

    The peer of a socket that connect()ed has no inode until the server accept()s it, and
    sock_diag finds sockets by inode: wait (polling, at most `timeout`) for the accept.
    """
    deadline = time.monotonic() + timeout
    while True:
        _cookie, attrs = _unix_diag(os.fstat(sock.fileno()).st_ino, UDIAG_SHOW_PEER)
        if UNIX_DIAG_PEER not in attrs:
            raise OSError(errno.ENOTCONN, "sock_diag reports no peer for this Unix socket")
        peer_ino: int = struct.unpack("<I", attrs[UNIX_DIAG_PEER])[0]
        if peer_ino:
            peer_cookie, _ = _unix_diag(peer_ino, 0)
            return peer_cookie
        if time.monotonic() > deadline:
            raise OSError(errno.ETIMEDOUT, f"the Unix peer was not accepted within {timeout:g} s")
        time.sleep(0.0005)


class Sockmap:
    """A SOCKHASH keyed by peer cookie, with the redirect program attached.

    `pair(a, b)`: bytes arriving on `a` go out of `b` and the other way round, in the kernel.
    `mode` says how the program got attached (for the report).
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self.map_fd = bpf(
            BPF_MAP_CREATE,
            struct.pack("<IIIII", BPF_MAP_TYPE_SOCKHASH, 8, 4, max_entries, 0),
            "BPF_MAP_CREATE SOCKHASH",
        )
        self.fds = [self.map_fd]
        self.mode = ""
        try:
            self._attach()
        except BaseException:
            self.close()
            raise

    def _attach(self) -> None:
        """Verdict alone (the read_skb path, TCP and Unix); the strparser variant if refused."""
        failures: list[str] = []
        for attach_type, label, parser in (
            (BPF_SK_SKB_STREAM_VERDICT, "stream verdict, no parser", False),
            (BPF_SK_SKB_VERDICT, "skb verdict", False),
            (BPF_SK_SKB_STREAM_VERDICT, "stream parser + stream verdict", True),
        ):
            try:
                if parser:
                    parser_fd = load_program(parser_program(), BPF_SK_SKB_STREAM_PARSER, b"hvb_parser")
                    self.fds.append(parser_fd)
                    self._prog_attach(parser_fd, BPF_SK_SKB_STREAM_PARSER)
                prog_fd = load_program(verdict_program(self.map_fd), attach_type, b"hvb_redirect")
                self.fds.append(prog_fd)
                self._prog_attach(prog_fd, attach_type)
            except BpfError as exc:
                failures.append(f"{label}: {exc.strerror}{' / verifier: ' + exc.log.strip() if exc.log else ''}")
                continue
            self.mode = label
            return
        raise BpfError("attaching the verdict program: " + "; ".join(failures), errno.EOPNOTSUPP)

    def _prog_attach(self, prog_fd: int, attach_type: int) -> None:
        bpf(BPF_PROG_ATTACH, struct.pack("<IIII", self.map_fd, prog_fd, attach_type, 0), "BPF_PROG_ATTACH")

    def _update(self, key: int, sock: socket.socket) -> None:
        k = ctypes.create_string_buffer(struct.pack("<Q", key), 8)
        v = ctypes.create_string_buffer(struct.pack("<I", sock.fileno()), 4)
        attr = struct.pack("<IIQQQ", self.map_fd, 0, ctypes.addressof(k), ctypes.addressof(v), BPF_ANY)
        bpf(BPF_MAP_UPDATE_ELEM, attr, f"BPF_MAP_UPDATE_ELEM ({sock.family.name})")

    def pair(self, a: socket.socket, b: socket.socket) -> tuple[int, int]:
        """Redirect a's incoming bytes to b's send path and b's to a's; return the two keys."""
        key_a, key_b = redirect_key(a), redirect_key(b)
        self._update(key_a, b)
        try:
            self._update(key_b, a)
        except BaseException:
            self.delete(key_a)
            raise
        return key_a, key_b

    def delete(self, *keys: int) -> None:
        """Take these keys out of the map."""
        for key in keys:
            with contextlib.suppress(OSError):
                k = ctypes.create_string_buffer(struct.pack("<Q", key), 8)
                bpf(BPF_MAP_DELETE_ELEM, struct.pack("<IIQ", self.map_fd, 0, ctypes.addressof(k)), "DELETE")

    def close(self) -> None:
        """Close the programs and the map (sockets still in it leave it when they close)."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


# ------------------------------------------------------------------------------- the relays
# Minimal relays, each a process of its own (`--serve KIND`), so that the CPU it uses can be read
# from /proc. They accept on LISTEN, connect to CONNECT, and relay with one method each. A relay
# that cannot start prints `ERROR <why>` instead of `READY`.

RELAY_KINDS: Final = ("sockmap", "splice", "python")
BUFFER: Final = 64 * 1024


def parse_address(text: str) -> peer.Address:
    """`host:port` or a Unix path."""
    if text.startswith("/"):
        return text
    host, _, port = text.rpartition(":")
    return (host, int(port))


def listen_on(address: peer.Address) -> socket.socket:
    """A listening socket on a loopback address or a Unix path."""
    if isinstance(address, str):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(address)
        sock.listen(128)
        return sock
    return socket.create_server(address, backlog=128)


def copy_python(src: socket.socket, dst: socket.socket) -> None:
    """recv_into one buffer, sendall it; pass EOF on as shutdown(SHUT_WR)."""
    buffer = bytearray(BUFFER)
    view = memoryview(buffer)
    with contextlib.suppress(OSError):
        while n := src.recv_into(buffer):
            dst.sendall(view[:n])
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def copy_splice(src: socket.socket, dst: socket.socket) -> None:
    """socket -> pipe -> socket with splice(); pass EOF on as shutdown(SHUT_WR)."""
    r, w = peer.make_pipe()
    try:
        with contextlib.suppress(OSError):
            while n := os.splice(src.fileno(), w, peer.PIPE_SIZE, flags=os.SPLICE_F_MOVE):
                while n:
                    n -= os.splice(r, dst.fileno(), n, flags=os.SPLICE_F_MOVE)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
    finally:
        os.close(r)
        os.close(w)


class SockmapWatcher:
    """What a sockmap relay still has to do itself: the ends of connections.

    The kernel moves the bytes but not FIN or RST, so one thread waits in epoll for EPOLLRDHUP
    (the sender shut down writing) and EPOLLERR (reset) on every relayed socket, and passes them
    on: shutdown(SHUT_WR) on the peer, or an abortive close.

    A FIN passed on at once loses the bytes still queued in the peer's psock (they are dropped
    when shutdown() makes the kernel's deferred send fail). With `ordered`, for TCP the FIN waits
    until the peer's socket has taken in every byte this socket received: TCP_INFO's
    bytes_received on one side against bytes_acked + SIOCOUTQ on the other, polled every
    millisecond while a FIN waits. Unix sockets have no such counters.
    """

    def __init__(
        self, sockmap: Sockmap, ordered: bool = True, drain_timeout: float = 30.0, unix_grace: float = 0.01
    ) -> None:
        self.sockmap = sockmap
        self.ordered = ordered
        self.drain_timeout = drain_timeout
        self.unix_grace = unix_grace
        self.epoll = select.epoll()
        self.lock = threading.Lock()
        # fd -> (socket, peer socket, key the PEER is stored under)
        self.conns: dict[int, tuple[socket.socket, socket.socket, int]] = {}
        self.base: dict[int, int] = {}  # fd -> bytes received before the kernel relayed (TCP)
        self.base_out: dict[int, int] = {}  # fd -> bytes written before the kernel relayed (TCP)
        self.waiting: dict[int, float] = {}  # fd whose FIN waits for its peer to drain -> since when
        self.done: set[int] = set()  # fds whose FIN has been passed on
        self.lost_fins = 0  # FINs passed on at the deadline, with bytes possibly lost

    def add(self, a: socket.socket, b: socket.socket) -> None:
        """Relay a <-> b in the kernel; bytes that arrived before the map held them are copied."""
        key_a, key_b = self.sockmap.pair(a, b)
        with self.lock:
            self.conns[a.fileno()] = (a, b, key_a)
            self.conns[b.fileno()] = (b, a, key_b)
        for sock in (a, b):
            if sock.family != socket.AF_UNIX:
                received, acked, _ = tcp_info(sock)
                self.base[sock.fileno()] = received
                self.base_out[sock.fileno()] = acked + outq(sock)
        # Bytes queued before the socket entered the map are not run through the program until
        # more arrive (the verdict runs from sk_data_ready): move them by hand.
        for src, dst in ((a, b), (b, a)):
            with contextlib.suppress(BlockingIOError, InterruptedError):
                data = src.recv(BUFFER, socket.MSG_DONTWAIT)
                if data:
                    dst.sendall(data)
                    if src.fileno() in self.base:
                        self.base[src.fileno()] -= len(data)
        for sock in (a, b):
            self.epoll.register(sock.fileno(), select.EPOLLRDHUP | select.EPOLLERR)

    def drained(self, fd: int) -> bool:
        """Has the peer of `fd` taken in every byte `fd` received? (TCP both sides; else True)"""
        sock, other, _ = self.conns[fd]
        if not self.ordered:
            return True
        if fd not in self.base or other.fileno() not in self.base_out:
            # No counters on a Unix socket: wait a fixed grace and hope. Not a guarantee.
            return time.monotonic() > self.waiting[fd] + self.unix_grace
        try:
            received, _, _ = tcp_info(sock)
            _, acked, _ = tcp_info(other)
            written = acked + outq(other)
        except OSError:
            return True
        # bytes_received counts the FIN too (rcv_nxt moved past it): one more than the data.
        return received - 1 - self.base[fd] <= written - self.base_out[other.fileno()]

    def run(self, stop: threading.Event) -> None:
        """Pass FIN and RST on until `stop` is set."""
        while not stop.is_set():
            for fd, events in self.epoll.poll(0.001 if self.waiting else 0.2):
                with self.lock:
                    entry = self.conns.get(fd)
                if entry is None:
                    continue
                sock, other, _key = entry
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if events & select.EPOLLERR else 0
                # EPIPE is the kernel's own doing, not the peer's: a FIN arrives as an skb of no
                # bytes, the program redirects it like any other, and the peer's psock fails to
                # send zero bytes, reports EPIPE on the peer socket and stops its transmit side.
                if err and err != errno.EPIPE:
                    self.finish(sock, other, abort=True)
                elif events & (select.EPOLLRDHUP | select.EPOLLHUP) and fd not in self.done:
                    self.epoll.modify(fd, select.EPOLLERR)  # level-triggered RDHUP would spin
                    self.waiting.setdefault(fd, time.monotonic())
            for fd, since in list(self.waiting.items()):
                if fd not in self.conns:
                    del self.waiting[fd]
                elif self.drained(fd) or time.monotonic() > since + self.drain_timeout:
                    self.lost_fins += not self.drained(fd)
                    del self.waiting[fd]
                    self.pass_fin(fd)

    def pass_fin(self, fd: int) -> None:
        """The sender on `fd` shut down writing: shut down its peer's writing; close when both are."""
        sock, other, _ = self.conns[fd]
        self.done.add(fd)
        with contextlib.suppress(OSError):
            other.shutdown(socket.SHUT_WR)
        if other.fileno() in self.done:
            self.finish(sock, other, abort=False)

    def finish(self, sock: socket.socket, other: socket.socket, abort: bool) -> None:
        """Close both sockets; with an RST for the peer if this side was reset."""
        with self.lock:
            for s in (sock, other):
                entry = self.conns.pop(s.fileno(), None)
                if entry is not None:
                    self.sockmap.delete(entry[2])
                    with contextlib.suppress(OSError):
                        self.epoll.unregister(s.fileno())
                for table in (self.waiting, self.base, self.base_out):
                    table.pop(s.fileno(), None)
                self.done.discard(s.fileno())
        if abort:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        other.close()


def outq(sock: socket.socket) -> int:
    """Bytes in a socket's send queue not yet acknowledged (SIOCOUTQ)."""
    import fcntl

    value: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]
    return value


def serve_relay(kind: str, listen: peer.Address, connect: peer.Address) -> None:
    """Entry point of a relay process: print READY, then relay until killed."""
    sockmap: Sockmap | None = None
    watcher: SockmapWatcher | None = None
    stop = threading.Event()
    try:
        if kind == "sockmap":
            sockmap = Sockmap()
            watcher = SockmapWatcher(sockmap)
            threading.Thread(target=watcher.run, args=(stop,), daemon=True).start()
        listener = listen_on(listen)
    except OSError as exc:
        print(f"ERROR {exc}", flush=True)
        sys.exit(1)
    print(f"READY {sockmap.mode if sockmap else kind}", flush=True)
    copy = copy_splice if kind == "splice" else copy_python
    while True:
        client, _ = listener.accept()
        try:
            backend = peer.connect(connect)
        except OSError:
            client.close()
            continue
        peer.nodelay(client)
        if watcher is not None:
            try:
                watcher.add(client, backend)
            except OSError as exc:
                print(f"sockmap: {exc}", file=sys.stderr, flush=True)
                client.close()
                backend.close()
            continue

        def both(a: socket.socket = client, b: socket.socket = backend) -> None:
            other = threading.Thread(target=copy, args=(b, a), daemon=True)
            other.start()
            copy(a, b)
            other.join()
            a.close()
            b.close()

        threading.Thread(target=both, daemon=True).start()


# ------------------------------------------------------------------------------- the rules
# Small real-socket experiments: client c <-> a (relay) and b (relay) <-> s (server), a and b
# paired in the sockmap. Each prints what it saw; main() collects the lines for the docs.


def socket_pair(family: str) -> tuple[socket.socket, socket.socket]:
    """Two connected stream sockets over loopback TCP or a Unix socketpair."""
    if family == "unix":
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    peer.nodelay(near)
    peer.nodelay(far)
    return near, far


@contextlib.contextmanager
def relayed(
    family: str, sockmap: Sockmap
) -> Iterator[tuple[socket.socket, socket.socket, socket.socket, socket.socket]]:
    """c, a, b, s with a and b in the map; all closed afterwards."""
    c, a = socket_pair(family)
    b, s = socket_pair(family)
    try:
        sockmap.pair(a, b)
        yield c, a, b, s
    finally:
        for sock in (c, a, b, s):
            sock.close()


@contextlib.contextmanager
def watching(sockmap: Sockmap, ordered: bool = True) -> Iterator[SockmapWatcher]:
    """A SockmapWatcher running in a thread (stopped afterwards)."""
    watcher = SockmapWatcher(sockmap, ordered)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield watcher
    finally:
        stop.set()
        thread.join(2)
        watcher.epoll.close()


def read_for(sock: socket.socket, seconds: float, limit: int = 1 << 31) -> tuple[int, bool, str]:
    """Read for up to `seconds`: (bytes read, EOF seen, error seen or '')."""
    deadline = time.monotonic() + seconds
    total = 0
    buffer = bytearray(1 << 20)
    while total < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            return total, False, ""
        sock.settimeout(left)
        try:
            n = sock.recv_into(buffer)
        except TimeoutError:
            return total, False, ""
        except OSError as exc:
            return total, False, errno.errorcode.get(exc.errno or 0, str(exc))
        if n == 0:
            return total, True, ""
        total += n
    return total, False, ""


def poll_events(sock: socket.socket) -> str:
    """What poll() reports on a socket right now."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLOUT | select.POLLRDHUP)
    names = {
        select.POLLIN: "IN",
        select.POLLOUT: "OUT",
        select.POLLRDHUP: "RDHUP",
        select.POLLHUP: "HUP",
        select.POLLERR: "ERR",
    }
    events = dict(poller.poll(0)).get(sock.fileno(), 0)
    return "|".join(name for bit, name in names.items() if events & bit) or "none"


def sender(sock: socket.socket, count: int, then_shutdown: bool) -> threading.Thread:
    """Send `count` bytes (blocking) in a thread, then maybe shutdown(SHUT_WR)."""

    def run() -> None:
        with contextlib.suppress(OSError):
            peer.send_bytes(sock, count)
            if then_shutdown:
                sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def meminfo_kib(field: str) -> int:
    """One /proc/meminfo field, KiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def tcp_mem_kib() -> int:
    """Memory the kernel accounts to TCP sockets (/proc/net/sockstat, pages), KiB."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    return 0


def tcp_info(sock: socket.socket) -> tuple[int, int, int]:
    """(bytes received, bytes acked by the peer, ms since data last arrived) from TCP_INFO."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    last: int = struct.unpack_from("<I", raw, TCPI_LAST_DATA_RECV)[0]
    acked: int = struct.unpack_from("<Q", raw, TCPI_BYTES_ACKED)[0]
    received: int = struct.unpack_from("<Q", raw, TCPI_BYTES_RECEIVED)[0]
    return received, acked, last


def rule_half_close(family: str, sockmap: Sockmap) -> list[str]:
    """Does FIN cross the map? What does the relay see? Does passing it on lose bytes?"""
    out: list[str] = []
    with relayed(family, sockmap) as (c, a, _b, s):
        c.sendall(b"x" * 1000)
        c.shutdown(socket.SHUT_WR)
        got, eof, err = read_for(s, 1.0)
        out.append(
            f"half-close, no relay thread: client sent 1000 bytes + shutdown(SHUT_WR); backend read {got} bytes, "
            f"EOF {'seen' if eof else 'NOT seen in 1 s'}{' ' + err if err else ''}; "
            f"relay's accepted socket polls {poll_events(a)}"
        )
    with relayed(family, sockmap) as (c, _a, _b, s):
        c.sendall(b"request")
        read_for(s, 1.0, limit=7)
        c.shutdown(socket.SHUT_WR)
        time.sleep(0.1)
        s.sendall(b"answer")
        got, eof, err = read_for(c, 1.0, limit=6)
        out.append(
            f"half-close, then the other way: client shut down writing, backend answered 6 bytes; "
            f"client read {got}{' and EOF' if eof else ''}{' ' + err if err else ''}"
            + ("" if got == 6 else " (the answer is LOST)")
        )
    size = 256 * MiB
    for ordered in (False, True):
        how = (
            ("after the backend socket took in every byte (TCP_INFO)" if family == "tcp" else "after 10 ms")
            if ordered
            else "at once"
        )
        for attempt in range(3):
            with watching(sockmap, ordered) as watcher:
                c, a = socket_pair(family)
                b, s = socket_pair(family)
                with c, s:
                    watcher.add(a, b)
                    thread = sender(c, size, then_shutdown=True)
                    got, eof, err = read_for(s, 20.0)
                    thread.join(5)
                out.append(
                    f"half-close after {size // MiB} MiB, the relay thread passes the FIN on {how} "
                    f"(try {attempt + 1}): backend read {got:,} of {size:,} bytes, "
                    f"EOF {'seen' if eof else 'not seen'}"
                    + (f", LOST {size - got:,} bytes" if eof and got < size else "")
                    + (f" {err}" if err else "")
                )
    return out


def rule_backpressure(family: str, sockmap: Sockmap | None, seconds: float = 3.0, limit: int = 512 * MiB) -> list[str]:
    """A backend that reads nothing: how much does the client get to send, and where does it sit?"""
    label = "sockmap" if sockmap else "splice relay (reference)"
    c, a = socket_pair(family)
    b, s = socket_pair(family)
    threads: list[threading.Thread] = []
    before_avail, before_tcp = meminfo_kib("MemAvailable"), tcp_mem_kib()
    try:
        if sockmap:
            sockmap.pair(a, b)
        else:
            threads = [
                threading.Thread(target=copy_splice, args=(a, b), daemon=True),
                threading.Thread(target=copy_splice, args=(b, a), daemon=True),
            ]
            for thread in threads:
                thread.start()
        c.setblocking(False)
        sent = 0
        view = memoryview(peer.PAYLOAD)
        deadline = time.monotonic() + seconds
        stalled_since: float | None = None
        while time.monotonic() < deadline and sent < limit:
            try:
                sent += c.send(view)
                stalled_since = None
            except BlockingIOError:
                now = time.monotonic()
                stalled_since = stalled_since or now
                if now - stalled_since > 1.0:
                    break
                select.select([], [c], [], 0.1)
        time.sleep(0.3)
        held_tcp = tcp_mem_kib() - before_tcp
        held_avail = before_avail - meminfo_kib("MemAvailable")
        blocked = stalled_since is not None
        got, _eof, _err = read_for(s, 10.0, limit=sent)
        how = (
            "blocking (send buffer full for 1 s)"
            if blocked
            else f"this test stopped it ({limit // MiB} MiB or {seconds:g} s), never blocked"
        )
        out = [
            f"backpressure, {label}: backend reads nothing; client sent {sent / MiB:,.1f} MiB before {how}; "
            f"kernel memory held: TCP sockstat +{held_tcp / 1024:,.1f} MiB, "
            f"MemAvailable -{held_avail / 1024:,.1f} MiB; then the backend read {got / MiB:,.1f} MiB of it"
        ]
    finally:
        for sock in (c, a, b, s):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in threads:
            thread.join(2)
    return out


def rule_reset(family: str, sockmap: Sockmap) -> list[str]:
    """The backend resets its connection: does the client learn, with and without the relay thread?"""
    out: list[str] = []
    with relayed(family, sockmap) as (c, _a, b, s):
        c.sendall(b"hello")
        read_for(s, 1.0, limit=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        time.sleep(0.3)
        with contextlib.suppress(OSError):
            c.send(b"after")
        time.sleep(0.2)
        got, eof, err = read_for(c, 1.0)
        out.append(
            f"reset, no relay thread: backend closed with {'RST' if family == 'tcp' else 'close()'}; relay's backend "
            f"socket polls {poll_events(b)}; client: {got} bytes, "
            f"{'EOF' if eof else err or 'nothing in 1 s (it still thinks the connection is up)'}"
        )
    with watching(sockmap) as watcher:
        c, a = socket_pair(family)
        b, s = socket_pair(family)
        with c, s:
            watcher.add(a, b)
            c.sendall(b"hello")
            read_for(s, 1.0, limit=5)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            got, eof, err = read_for(c, 2.0)
            out.append(
                f"reset, relay thread passes it on: client {'EOF' if eof else err or 'nothing in 2 s'} ({got} bytes)"
            )
    return out


def rule_counts(family: str, sockmap: Sockmap) -> list[str]:
    """What the relay can still count and time when it never reads the bytes."""
    size = 64 * MiB
    with relayed(family, sockmap) as (c, a, b, s):
        thread = sender(c, size, then_shutdown=False)
        got, _eof, _err = read_for(s, 10.0, limit=size)
        thread.join(5)
        if family != "tcp":
            inq = struct.unpack("i", fcntl_ioctl(a, 0x541B))[0]  # FIONREAD
            return [
                f"counts, unix: {got:,} of {size:,} bytes crossed; the relay's sockets hold no counters "
                f"(FIONREAD on the accepted socket: {inq}); only the program itself could count"
            ]
        received, _, last_before = tcp_info(a)
        _, acked, _ = tcp_info(b)
        time.sleep(1.0)
        _, _, last_after = tcp_info(a)
        return [
            f"counts, tcp: {got:,} of {size:,} bytes crossed; TCP_INFO on the relay's accepted socket says "
            f"bytes_received {received:,}, on its backend socket bytes_acked {acked:,}; last_data_recv "
            f"{last_before} ms right after, {last_after} ms after 1 s idle"
        ]


def fcntl_ioctl(sock: socket.socket, request: int) -> bytes:
    """An int-sized ioctl on a socket."""
    import fcntl

    return fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0")


def run_rules(families: list[Family]) -> list[str]:
    """Every rule experiment, for each family; the lines they print."""
    lines: list[str] = []
    sockmap = Sockmap()
    try:
        lines.append(f"program attached as: {sockmap.mode}")
        for family in families:
            for experiment in (rule_half_close, rule_reset, rule_counts):
                for line in experiment(family, sockmap):
                    print(f"{family}: {line}", flush=True)
                    lines.append(f"{family}: {line}")
            for mode in (sockmap, None):
                for line in rule_backpressure(family, mode):
                    print(f"{family}: {line}", flush=True)
                    lines.append(f"{family}: {line}")
    finally:
        sockmap.close()
    return lines


# ------------------------------------------------------------------------------- AF_VSOCK
VMADDR_CID_LOCAL: Final = 1


def vsock_check() -> int:
    """Inside the micro-VM guest: can a TCP <-> vsock pair be redirected? Prints the answer."""
    if "microvm_guest" not in Path("/proc/cmdline").read_text().split():
        print("--vsock-check runs only inside the micro-VM guest (scripts/microvm): never AF_VSOCK on a host")
        return 2
    print(f"guest kernel {platform.release()}")
    try:
        sockmap = Sockmap()
    except BpfError as exc:
        print(f"no sockmap: {exc}{' / ' + exc.log if exc.log else ''}")
        return 1
    print(f"program attached as: {sockmap.mode}")
    port = 5000 + os.getpid() % 1000
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as listener:
        listener.bind((socket.VMADDR_CID_ANY, port))
        listener.listen(1)
        far = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        far.settimeout(5)
        far.connect((VMADDR_CID_LOCAL, port))
        near, _ = listener.accept()
    c, a = socket_pair("tcp")
    try:
        try:
            sockmap._update(socket_cookie(a), near)
        except BpfError as exc:
            print(f"a vsock socket in the sockmap: REFUSED, {exc}")
            return 1
        print("a vsock socket in the sockmap: accepted")
        sockmap._update(socket_cookie(near), a)
        c.sendall(b"tcp->vsock")
        got, _, _ = read_for(far, 2.0, limit=10)
        print(f"TCP -> vsock through the map: {got} of 10 bytes arrived")
        far.sendall(b"vsock->tcp")
        got, _, _ = read_for(c, 2.0, limit=10)
        print(f"vsock -> TCP through the map (keyed by the vsock socket's own cookie): {got} of 10 bytes arrived")
        size = 64 * MiB
        start = time.perf_counter()
        thread = sender(c, size, then_shutdown=False)
        got, _, _ = read_for(far, 30.0, limit=size)
        thread.join(5)
        elapsed = time.perf_counter() - start
        print(f"TCP -> vsock, {size // MiB} MiB through the map: {got:,} bytes in {elapsed:.2f} s")
    finally:
        for sock in (c, a, near, far):
            sock.close()
        sockmap.close()
    return 0


# ------------------------------------------------------------------------------- the benchmark
#: (key, label, unit, digits)
METRICS: Final = (
    ("down", "1 connection, server -> client", "GiB/s", 2),
    ("up", "1 connection, client -> server", "GiB/s", 2),
    ("down_cpu", "relay process CPU per GiB, server -> client", "s", 3),
    ("up_cpu", "relay process CPU per GiB, client -> server", "s", 3),
    ("down_all", "whole machine CPU per GiB, server -> client", "s", 2),
    ("up_all", "whole machine CPU per GiB, client -> server", "s", 2),
    ("rtt_p50", "1-byte round trip p50", "us", 1),
    ("rtt_p99", "1-byte round trip p99", "us", 1),
)


def machine_busy_seconds() -> float:
    """CPU time every core has spent not idle (/proc/stat), seconds: kworkers and softirqs included."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class MiniRelay:
    """One of this file's relays (`--serve KIND`) as a process of its own."""

    def __init__(self, kind: str, family: str, server: peer.Address, workdir: Path) -> None:
        self.name = kind
        self.listen: peer.Address = str(workdir / f"{kind}.sock") if family == "unix" else ("127.0.0.1", free_port())
        listen = self.listen if isinstance(self.listen, str) else f"{self.listen[0]}:{self.listen[1]}"
        connect = server if isinstance(server, str) else f"{server[0]}:{server[1]}"
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, "--listen", listen, "--connect", connect],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.startswith("READY"):
            self.close()
            raise RuntimeError(f"the {kind} relay did not start: {line or 'no output'}")
        self.mode = line.partition(" ")[2]
        wait_connectable(self.listen, None)

    @property
    def pid(self) -> int:
        """The relay process's id."""
        return self.process.pid

    def cpu_seconds(self) -> float:
        """CPU the relay process has used (all its threads)."""
        return tree_cpu_seconds(self.pid)

    def close(self) -> None:
        """Stop the process."""
        stop_relay(self.process, self.listen, timeout=5)


@contextlib.contextmanager
def default_timeout(seconds: float) -> Iterator[None]:
    """socket.setdefaulttimeout() for the sockets made inside the block."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def measure(relay: MiniRelay | Relay, size: int, rounds: int, null_fd: int, notes: list[str]) -> dict[str, float]:
    """Throughput each way with CPU, then the 1-byte round trip, through one relay.

    A measurement that fails (a relay that breaks the protocol) is left out and said in `notes`.
    """
    out: dict[str, float] = {}
    for way in ("down", "up"):
        cpu, busy = relay.cpu_seconds(), machine_busy_seconds()
        start = time.perf_counter()
        try:
            if way == "down":
                peer.download(relay.listen, size, null_fd)  # splices: a blocking socket, no timeout
            else:
                with default_timeout(10.0):  # a relay that loses the answer must not hang the run
                    peer.upload(relay.listen, size)
        except (OSError, ValueError) as exc:
            notes.append(f"{relay.name}: {'download' if way == 'down' else 'upload'} failed: {exc}")
            continue
        elapsed = time.perf_counter() - start
        time.sleep(0.2)  # let the relay finish closing: its CPU for this transfer counts
        out[way] = size / elapsed / GiB
        out[f"{way}_cpu"] = (relay.cpu_seconds() - cpu) / (size / GiB)
        out[f"{way}_all"] = (machine_busy_seconds() - busy) / (size / GiB)
    try:
        with default_timeout(30.0):
            times = peer.ping_pong(relay.listen, 1, rounds)
    except OSError as exc:
        notes.append(f"{relay.name}: round trips failed: {exc}")
        return out
    ordered = sorted(times)
    out["rtt_p50"] = ordered[len(ordered) // 2] / 1000
    out["rtt_p99"] = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1000
    return out


def run_benchmark(families: list[Family], repeat: int, size: int, rounds: int, with_hvbridge: bool) -> str:
    """Every relay, each family, `repeat` interleaved rounds; a markdown report."""
    peer.raise_fd_limit()
    null_fd = os.open(os.devnull, os.O_WRONLY)
    load_before = os.getloadavg()
    started = time.monotonic()
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="hvbridge-sockmap-") as tmp:
        workdir = Path(tmp)
        server_unix = str(workdir / "server.sock")
        server = subprocess.Popen(
            [sys.executable, str(HERE / "peer.py"), "serve", "--unix", server_unix], stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline().split()[1])
            for family in families:
                target: peer.Address = server_unix if family == "unix" else ("127.0.0.1", port)
                with contextlib.ExitStack() as stack:
                    relays: list[MiniRelay | Relay] = []
                    for kind in RELAY_KINDS:
                        try:
                            mini = MiniRelay(kind, family, target, workdir)
                        except RuntimeError as exc:
                            notes.append(f"{family}: {exc}")
                            continue
                        stack.callback(mini.close)
                        if kind == "sockmap":
                            notes.append(f"{family}: sockmap program attached as {mini.mode}")
                        relays.append(mini)
                    if with_hvbridge:
                        command = "{python} -m hvbridge run -q -c {config}"
                        relays.append(stack.enter_context(Relay("hvbridge", family, target, workdir, command)))
                    by_relay = results.setdefault(family, {r.name: {} for r in relays})
                    for i in range(repeat):
                        # Rotate the order each repeat: a burst of noise does not always hit the same relay.
                        for relay in relays[i % len(relays) :] + relays[: i % len(relays)]:
                            failed: list[str] = []
                            for key, value in measure(relay, size, rounds, null_fd, failed).items():
                                by_relay[relay.name].setdefault(key, []).append(value)
                            notes += [f"{family}, repeat {i + 1}: {note}" for note in failed]
                            print(f"{family} {relay.name} repeat {i + 1} done {failed}", file=sys.stderr, flush=True)
        finally:
            server.terminate()
            server.wait(5)
    load_after = os.getloadavg()
    lines = [
        f"Measured {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} by `benchmarks/sockmap.py` "
        f"({repeat} interleaved repeats, {size / GiB:g} GiB per transfer, {rounds} round trips; "
        f"{time.monotonic() - started:.0f} s; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after). "
        f"Linux {platform.release()}, {os.cpu_count()} cores shared by client, server and relay.",
        "",
        *[f"- {note}" for note in notes],
        "",
    ]
    for name_of_family, by_relay in results.items():
        names = list(by_relay)
        lines += [
            f"**{name_of_family.upper()}** (median of {repeat}, ± half the min-max spread)",
            "",
            "| metric | unit | " + " | ".join(names) + " |",
            "|---|---|" + "---:|" * len(names),
        ]
        for key, label, unit, digits in METRICS:
            cells = []
            for name in names:
                values = by_relay[name].get(key, [])
                if not values:
                    cells.append("-")
                    continue
                median = statistics.median(values)
                spread = (max(values) - min(values)) / median * 50 if median and len(values) > 1 else 0.0
                cells.append(f"{median:,.{digits}f}" + (f" ±{spread:.0f}%" if len(values) > 1 else ""))
            lines.append(f"| {label} | {unit} | " + " | ".join(cells) + " |")
        lines.append("")
    os.close(null_fd)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", action="store_true", help="only the rule experiments")
    parser.add_argument("--bench", action="store_true", help="only the benchmark")
    parser.add_argument("--vsock-check", action="store_true", help="inside the micro-VM guest: TCP <-> vsock")
    parser.add_argument("--quick", action="store_true", help="0.25 GiB transfers, 1 repeat, 1000 round trips")
    parser.add_argument("--families", default="tcp,unix", help="tcp, unix or both")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size", type=lambda s: int(float(s) * GiB), default=GiB, help="GiB per transfer (1)")
    parser.add_argument("--rounds", type=int, default=3000, help="1-byte round trips per run (3000)")
    parser.add_argument("--no-hvbridge", action="store_true", help="leave hvbridge itself out of the benchmark")
    parser.add_argument("--serve", choices=RELAY_KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--listen", help=argparse.SUPPRESS)
    parser.add_argument("--connect", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_relay(args.serve, parse_address(args.listen), parse_address(args.connect))
        return
    if args.vsock_check:
        sys.exit(vsock_check())
    if args.quick:
        args.repeat, args.rounds = 1, 1000
        args.size = min(args.size, GiB // 4)
    families: list[Family] = [f for f in ("tcp", "unix") if f in args.families.split(",")]
    try:
        if not args.bench:
            run_rules(families)  # prints each line as it comes
        if not args.rules:
            print(run_benchmark(families, args.repeat, args.size, args.rounds, not args.no_hvbridge))
    except BpfError as exc:
        print(f"sockmap unavailable: {exc}{chr(10) + 'verifier log: ' + exc.log if exc.log else ''}")
        print("(a relay would keep splice here)")
        sys.exit(1)


if __name__ == "__main__":
    main()
