"""An experiment: the kernel relaying bytes between two sockets with a sockmap, no relay wake-ups.

    .venv/bin/python benchmarks/sockmap.py                 # the rule experiments, then the benchmark
    .venv/bin/python benchmarks/sockmap.py --rules         # only the rule experiments (seconds)
    .venv/bin/python benchmarks/sockmap.py --quick         # smaller benchmark, 1 repeat
    .venv/bin/python benchmarks/sockmap.py --vsock-check   # inside the micro-VM guest only:
    scripts/microvm .venv/bin/python benchmarks/sockmap.py --vsock-check

Linux can move a socket's incoming bytes straight to another socket's send path: put both sockets
in a BPF_MAP_TYPE_SOCKHASH and attach a BPF_PROG_TYPE_SK_SKB verdict program to the map that calls
bpf_sk_redirect_hash() with the peer's key. This file loads that program with the bpf(2) system
call through ctypes (no bcc, no clang, no libbpf): the map is keyed by socket cookie (SO_COOKIE)
and each socket is stored under its PEER's cookie, so the program is "look up my own cookie,
redirect there", eleven instructions.

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
import json
import os
import platform
import resource
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

HERE: Final = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import peer  # noqa: E402
from relays import Relay, free_port, tree_cpu_seconds, wait_connectable  # noqa: E402

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


def unix_peer_cookie(sock: socket.socket) -> int:
    """The cookie of the socket at the other end of a connected Unix stream socket."""
    _cookie, attrs = _unix_diag(os.fstat(sock.fileno()).st_ino, UDIAG_SHOW_PEER)
    if UNIX_DIAG_PEER not in attrs:
        raise OSError(errno.ENOTCONN, "sock_diag reports no peer for this Unix socket")
    peer_cookie, _ = _unix_diag(struct.unpack("<I", attrs[UNIX_DIAG_PEER])[0], 0)
    return peer_cookie


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
    (the sender shut down writing) and EPOLLHUP/EPOLLERR (reset, or both ways closed) on every
    relayed socket, and passes them on: shutdown(SHUT_WR) on the peer, or an abortive close.
    """

    def __init__(self, sockmap: Sockmap) -> None:
        self.sockmap = sockmap
        self.epoll = select.epoll()
        self.lock = threading.Lock()
        # fd -> (socket, peer socket, key the socket is stored under)
        self.conns: dict[int, tuple[socket.socket, socket.socket, int]] = {}
        self.shut: set[int] = set()  # fds whose sender has shut down writing

    def add(self, a: socket.socket, b: socket.socket) -> None:
        """Relay a <-> b in the kernel; bytes that arrived before the map held them are copied."""
        key_a, key_b = self.sockmap.pair(a, b)
        with self.lock:
            self.conns[a.fileno()] = (a, b, key_b)
            self.conns[b.fileno()] = (b, a, key_a)
        # Bytes queued before the socket entered the map are not run through the program until
        # more arrive (the verdict runs from sk_data_ready): move them by hand.
        for src, dst in ((a, b), (b, a)):
            with contextlib.suppress(BlockingIOError, InterruptedError):
                data = src.recv(BUFFER, socket.MSG_DONTWAIT)
                if data:
                    dst.sendall(data)
        for sock in (a, b):
            self.epoll.register(sock.fileno(), select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR)

    def run(self, stop: threading.Event) -> None:
        """Pass FIN and RST on until `stop` is set."""
        while not stop.is_set():
            for fd, events in self.epoll.poll(0.2):
                with self.lock:
                    entry = self.conns.get(fd)
                if entry is None:
                    continue
                sock, other, _key = entry
                if events & (select.EPOLLERR | select.EPOLLHUP):
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    self.finish(sock, other, abort=err != 0)
                elif events & select.EPOLLRDHUP:
                    self.epoll.modify(fd, select.EPOLLHUP | select.EPOLLERR)
                    self.shut.add(fd)
                    with contextlib.suppress(OSError):
                        other.shutdown(socket.SHUT_WR)
                    if other.fileno() in self.shut:
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
                    self.shut.discard(s.fileno())
        if abort:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        other.close()


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
def relayed(family: str, sockmap: Sockmap) -> Iterator[tuple[socket.socket, socket.socket, socket.socket, socket.socket]]:
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
def watching(sockmap: Sockmap) -> Iterator[SockmapWatcher]:
    """A SockmapWatcher running in a thread (stopped afterwards)."""
    watcher = SockmapWatcher(sockmap)
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
    size = 256 * MiB
    for attempt in range(3):
        with watching(sockmap) as watcher, relayed(family, sockmap) as (c, a, b, s):
            # The watcher passes the FIN on as soon as it sees it (pair() above put a, b in the
            # map; register them with the watcher without pairing them twice).
            with watcher.lock:
                watcher.conns[a.fileno()] = (a, b, 0)
                watcher.conns[b.fileno()] = (b, a, 0)
            for sock in (a, b):
                watcher.epoll.register(sock.fileno(), select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR)
            thread = sender(c, size, then_shutdown=True)
            got, eof, err = read_for(s, 20.0)
            thread.join(5)
            out.append(
                f"half-close after {size // MiB} MiB, relay thread passes the FIN on (try {attempt + 1}): "
                f"backend read {got:,} of {size:,} bytes, EOF {'seen' if eof else 'not seen'}"
                f"{', LOST ' + format(size - got, ',') + ' bytes' if eof and got < size else ''}{' ' + err if err else ''}"
            )
            with watcher.lock:
                watcher.conns.clear()
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
        out = [
            f"backpressure, {label}: backend reads nothing; client sent {sent / MiB:,.1f} MiB before "
            f"{'blocking (send buffer full for 1 s)' if blocked else f'this test stopped it ({limit // MiB} MiB or {seconds:g} s), never blocked'}; "
            f"kernel memory held: TCP sockstat +{held_tcp / 1024:,.1f} MiB, MemAvailable -{held_avail / 1024:,.1f} MiB; "
            f"then the backend read {got / MiB:,.1f} MiB of it"
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


def run_rules(families: list[str]) -> list[str]:
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
