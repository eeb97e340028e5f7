"""Tests for hvbridge.transports.vsock and vsock_mux on the host: options, errors, and hybrid vsock against a fake VMM.

Rules for this module:
- No AF_VSOCK connection is ever made here: this machine's CID 2 is infrastructure that is not
  ours. The autouse `no_vsock_connect` fixture replaces connect() of every AF_VSOCK socket with
  a script (an errno to raise, or a pretend success that makes no system call); an unscripted
  connect fails the test. Creating, configuring and binding AF_VSOCK sockets is harmless and is
  done for real, so option packing is checked against the running kernel. Real vsock traffic
  is tested in the micro-VM guest (tests/vm, scripts/vm-tests).
- Hybrid vsock runs against FakeFirecracker: real Unix sockets in tmp_path, following
  firecracker docs/vsock.md and its muxer source exactly (the CONNECT line, `OK <port>` with
  host ports counting from 2**30, the host connection dropped when nothing listens in the guest,
  guest-initiated connections delivered to `<uds>_<port>`, a host EOF turned into a full close).
- Every test is bounded with trio.fail_after; every loop has a maximum count; timeouts run on
  the autojump clock.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
import socket
import stat
import struct
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Final, NoReturn, final

import attrs
import pytest
import trio
import trio.testing
from integration.support import Processes, open_stream
from support.processes import STOP_TIMEOUT

from hvbridge.addresses import VMADDR_CID_ANY, VMADDR_PORT_ANY, VsockAddress, VsockMuxAddress, parse_address
from hvbridge.errors import AddressFamilyUnavailable, BackendUnavailable, EndpointError
from hvbridge.relay import relay
from hvbridge.routes import RouteOptions
from hvbridge.transports import vsock, vsock_mux
from hvbridge.transports.base import listener_address

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

LIMIT: Final = 10.0
CHUNK: Final = 64 * 1024
MiB: Final = 1024 * 1024
MAX_READS: Final = 1_000_000
#: Firecracker allocates host-side ports for host-initiated connections from 1 << 30 upwards.
FIRST_HOST_PORT: Final = 1 << 30
HAVE_AF_VSOCK: Final = sys.platform == "linux" and hasattr(socket, "AF_VSOCK")
needs_af_vsock = pytest.mark.skipif(not HAVE_AF_VSOCK, reason="AF_VSOCK needs Linux")
GuestApp = Callable[[trio.SocketStream], Awaitable[None]]


# -------------------------------------------------------------------------- safety: no connects


@final
@attrs.define(eq=False)
class VsockConnectScript:
    """What connect() of an AF_VSOCK socket does in this module: never the real system call.

    Attributes:
        outcome: An errno to raise, "pretend" to return as if connected (no system call),
            or None: fail the test.
        calls: The addresses connect() was called with.
    """

    outcome: int | str | None = None
    calls: list[object] = attrs.Factory(list)


@pytest.fixture(autouse=True)
def no_vsock_connect(monkeypatch: pytest.MonkeyPatch) -> VsockConnectScript:
    """Replace connect()/connect_ex() of AF_VSOCK sockets by a script; others stay real."""
    script = VsockConnectScript()
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def connect(self: socket.socket, address: object) -> None:
        if self.family != getattr(socket, "AF_VSOCK", -1):
            return real_connect(self, address)  # type: ignore[arg-type]
        script.calls.append(address)
        if script.outcome == "pretend":
            return None
        if isinstance(script.outcome, int):
            raise OSError(script.outcome, os.strerror(script.outcome))
        raise AssertionError(f"AF_VSOCK connect to {address!r} attempted on the host; this is forbidden")

    def connect_ex(self: socket.socket, address: object) -> int:
        if self.family != getattr(socket, "AF_VSOCK", -1):
            return real_connect_ex(self, address)  # type: ignore[arg-type]
        raise AssertionError(f"AF_VSOCK connect_ex to {address!r} attempted on the host; this is forbidden")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return script


def test_the_guard_stops_vsock_connects(no_vsock_connect: VsockConnectScript) -> None:
    if not HAVE_AF_VSOCK:
        pytest.skip("AF_VSOCK needs Linux")
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as sock, pytest.raises(AssertionError, match="forbidden"):
        sock.connect((2, 1))
    assert no_vsock_connect.calls == [(2, 1)]


# ----------------------------------------------------------------------------------- constants


def test_constants_match_linux_vm_sockets_h() -> None:
    # Values from include/uapi/linux/vm_sockets.h.
    assert vsock.AF_VSOCK == 40
    assert vsock.SOL_VSOCK_OPTIONS == 40
    assert vsock.SO_VM_SOCKETS_BUFFER_SIZE == 0
    assert vsock.SO_VM_SOCKETS_BUFFER_MIN_SIZE == 1
    assert vsock.SO_VM_SOCKETS_BUFFER_MAX_SIZE == 2
    assert vsock.SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD == 6
    assert vsock.SO_VM_SOCKETS_CONNECT_TIMEOUT_NEW == 8
    assert vsock.IOCTL_VM_SOCKETS_GET_LOCAL_CID == (7 << 8) | 0xB9 == 1977
    expected = 6 if ctypes.sizeof(ctypes.c_long) == 8 else 8
    assert expected == vsock.SO_VM_SOCKETS_CONNECT_TIMEOUT


@needs_af_vsock
def test_constants_agree_with_the_socket_module() -> None:
    for name in (
        "AF_VSOCK",
        "SO_VM_SOCKETS_BUFFER_SIZE",
        "SO_VM_SOCKETS_BUFFER_MIN_SIZE",
        "SO_VM_SOCKETS_BUFFER_MAX_SIZE",
        "IOCTL_VM_SOCKETS_GET_LOCAL_CID",
    ):
        assert getattr(vsock, name) == getattr(socket, name), name
    assert getattr(socket, "VMADDR_CID_ANY", VMADDR_CID_ANY) == VMADDR_CID_ANY
    assert getattr(socket, "VMADDR_PORT_ANY", VMADDR_PORT_ANY) == VMADDR_PORT_ANY


# ------------------------------------------------------------------------- the connect timeout


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (5.0, (5, 0)),
        (1.5, (1, 500_000)),
        (0.25, (0, 250_000)),
        (2.0000001, (2, 1)),  # rounded up: never shorter than asked
        (0.0000001, (0, 1)),
        (0.0, (0, 1)),  # the kernel reads 0 as "its default of 2 s"
        (-3.0, (0, 1)),
        (float("-inf"), (0, 1)),
        (float("inf"), (365 * 24 * 3600, 0)),
        (float("nan"), (365 * 24 * 3600, 0)),
        (1e12, (365 * 24 * 3600, 0)),
    ],
)
def test_timeval_for(seconds: float, expected: tuple[int, int]) -> None:
    assert vsock.timeval_for(seconds) == expected


def test_pack_timeval_is_the_native_struct_timeval() -> None:
    if ctypes.sizeof(ctypes.c_long) == 8:
        assert vsock.pack_timeval(7.25) == struct.pack("@ll", 7, 250_000)
        assert len(vsock.pack_timeval(1)) == 16
    else:  # pragma: no cover - 32-bit userland
        assert vsock.pack_timeval(7.25) == struct.pack("=qq", 7, 250_000)
    assert vsock.unpack_timeval(vsock.pack_timeval(7.25)) == 7.25


def _vsock_socket() -> socket.socket:
    """An AF_VSOCK socket that is never connected (harmless on any machine)."""
    if not HAVE_AF_VSOCK:
        pytest.skip("AF_VSOCK needs Linux")
    try:
        return socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as exc:
        pytest.skip(f"cannot create an AF_VSOCK socket here: {exc}")


def _jiffy() -> float:
    # The kernel stores the timeout in jiffies (HZ is 100..1000): allow one jiffy of rounding.
    return 0.010


def test_connect_timeout_round_trips_through_the_kernel() -> None:
    with _vsock_socket() as sock:
        assert vsock.get_connect_timeout(sock) == pytest.approx(vsock.KERNEL_DEFAULT_CONNECT_TIMEOUT, abs=_jiffy())
        for seconds in (7.25, 30.0, 0.5):
            vsock.set_connect_timeout(sock, seconds)
            got = vsock.get_connect_timeout(sock)
            assert seconds <= got <= seconds + _jiffy()


def test_connect_timeout_errors_say_what_failed() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        with pytest.raises(OSError, match=r"setting the vsock connect timeout: ") as set_info:
            vsock.set_connect_timeout(sock, 1.0)
        with pytest.raises(OSError, match=r"reading the vsock connect timeout: ") as get_info:
            vsock.get_connect_timeout(sock)
    assert set_info.value.errno in (errno.ENOPROTOOPT, errno.EOPNOTSUPP)  # no level 40 on AF_UNIX
    assert get_info.value.errno in (errno.ENOPROTOOPT, errno.EOPNOTSUPP)


def test_buffer_size_sets_max_before_size() -> None:
    with _vsock_socket() as sock:
        default_max = sock.getsockopt(vsock.SOL_VSOCK_OPTIONS, vsock.SO_VM_SOCKETS_BUFFER_MAX_SIZE)
        big = 4 * default_max  # above the default maximum: only works if MAX goes first
        vsock.set_buffer_size(sock, big)
        assert sock.getsockopt(vsock.SOL_VSOCK_OPTIONS, vsock.SO_VM_SOCKETS_BUFFER_MAX_SIZE) == big
        assert sock.getsockopt(vsock.SOL_VSOCK_OPTIONS, vsock.SO_VM_SOCKETS_BUFFER_SIZE) == big
        vsock.set_buffer_size(sock, 64 * 1024)
        assert sock.getsockopt(vsock.SOL_VSOCK_OPTIONS, vsock.SO_VM_SOCKETS_BUFFER_SIZE) == 64 * 1024
        vsock.set_buffer_size(sock, None)  # leaves it alone
        assert sock.getsockopt(vsock.SOL_VSOCK_OPTIONS, vsock.SO_VM_SOCKETS_BUFFER_SIZE) == 64 * 1024


# ---------------------------------------------------------------------------------- local CID


def test_local_cid_of_a_missing_device_is_none(tmp_path: Path) -> None:
    assert vsock.local_cid(str(tmp_path / "no-such-device")) is None
    text = vsock.describe_local_cid(str(tmp_path / "no-such-device"))
    assert text.startswith(f"local vsock CID: unknown ({tmp_path / 'no-such-device'} is missing: load the transport")
    assert "vhost_vsock" in text
    assert "--device" in text


def test_local_cid_of_a_device_that_is_not_vsock_is_none() -> None:
    assert vsock.local_cid("/dev/null") is None  # the ioctl fails with ENOTTY
    assert vsock.describe_local_cid("/dev/null") == (
        f"local vsock CID: unknown (/dev/null reports none: no vsock transport is loaded; {vsock.TRANSPORT_MODULES})"
    )


def test_local_cid_of_this_machine() -> None:
    # An ioctl on /dev/vsock, not a connection: harmless anywhere.
    cid = vsock.local_cid()
    text = vsock.describe_local_cid()
    if cid is None:
        assert text.startswith("local vsock CID: unknown (")
    else:
        assert 0 <= cid < VMADDR_CID_ANY
        assert text == f"local vsock CID: {cid}"


# ------------------------------------------------------------------------------ error messages


ADDRESS: Final = VsockAddress(5, 22)


@pytest.mark.parametrize("code", [errno.EPERM, errno.EACCES])
def test_socket_denied_names_seccomp_and_the_fix(code: int) -> None:
    error = vsock.socket_error(ADDRESS, "connect", OSError(code, os.strerror(code)))
    assert isinstance(error, AddressFamilyUnavailable)
    assert str(error).startswith(
        f"connect vsock://5:22: creating an AF_VSOCK socket was denied ({errno.errorcode[code]});"
    )
    for needle in ("seccomp", "moby/moby#44562", "--security-opt seccomp=", "unconfined", "docs/vsock.md"):
        assert needle in str(error)


@pytest.mark.parametrize("code", [errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.ENODEV])
def test_socket_unsupported_names_the_modules(code: int) -> None:
    error = vsock.socket_error(ADDRESS, "listen", OSError(code, os.strerror(code)))
    assert isinstance(error, AddressFamilyUnavailable)
    assert "this kernel has no AF_VSOCK support loaded" in str(error)
    for module in ("vmw_vsock_virtio_transport", "hv_sock", "vhost_vsock", "vsock_loopback", "modprobe"):
        assert module in str(error)


def test_socket_other_errors_keep_the_reason() -> None:
    error = vsock.socket_error(ADDRESS, "listen", OSError(errno.EMFILE, "Too many open files"))
    assert type(error) is EndpointError
    assert str(error) == "listen vsock://5:22: cannot create an AF_VSOCK socket: Too many open files"


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (
            errno.ECONNRESET,
            "backend unavailable (connection reset: nothing listens on port 22 at CID 5; start the service)",
        ),
        (
            errno.ECONNREFUSED,
            "backend unavailable (connection refused: nothing listens on port 22 at CID 5; start the service)",
        ),
        (errno.ETIMEDOUT, "backend unavailable (timed out after 7.5s: CID 5 did not answer; is the VM running?)"),
        (
            errno.ENODEV,
            "backend unavailable (no vsock transport reaches CID 5: no running VM has that CID, or the"
            f" transport module is not loaded ({vsock.TRANSPORT_MODULES}))",
        ),
        (
            errno.ENETUNREACH,
            "backend unavailable (CID 5 is unreachable from here: the loaded transport does not route to it"
            " (under Hyper-V hv_sock a guest can connect only to CID 2, the host))",
        ),
        (errno.EHOSTUNREACH, "backend unavailable (CID 5 is unreachable from here; check the CID)"),
        (errno.EHOSTDOWN, "backend unavailable (Host is down)"),
    ],
)
def test_connect_errors_that_mean_backend_unavailable(code: int, message: str) -> None:
    error = vsock.connect_error(ADDRESS, OSError(code, os.strerror(code)), 7.5)
    assert isinstance(error, BackendUnavailable)
    assert error.message == message
    assert str(error) == f"connect vsock://5:22: {message}"


def test_connect_permission_errors_are_not_retried() -> None:
    error = vsock.connect_error(ADDRESS, OSError(errno.EACCES, "Permission denied"), 5)
    assert type(error) is EndpointError
    assert error.message == (
        "permission denied (Permission denied); the hypervisor or a security policy refuses this connection"
    )
    # trio reports a failed non-blocking connect as "Error connecting to ADDRESS: REASON".
    other = vsock.connect_error(ADDRESS, OSError(errno.EPROTO, "Error connecting to (5, 22): Protocol error"), 5)
    assert type(other) is EndpointError
    assert other.message == "Protocol error"
    assert vsock.connect_error(ADDRESS, OSError("no errno"), 5).message == "no errno"


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (errno.EADDRINUSE, "vsock port 22 is already bound; stop the other process or choose another port"),
        (errno.EACCES, "permission denied; vsock ports below 1024 need root or CAP_NET_BIND_SERVICE"),
        (errno.EINVAL, "Invalid argument"),
    ],
)
def test_listen_errors(code: int, message: str) -> None:
    error = vsock.listen_error(ADDRESS, OSError(code, os.strerror(code)))
    assert type(error) is EndpointError
    assert str(error) == f"listen vsock://5:22: {message}"


def test_listen_on_a_cid_that_is_not_ours_names_the_local_cid() -> None:
    error = vsock.listen_error(ADDRESS, OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"))
    cid = vsock.local_cid()
    assert error.message == (
        f"CID 5 is not one of this machine's CIDs (local CID: {'unknown' if cid is None else cid}); listen on"
        " vsock://any:PORT, or load vsock_loopback to bind CID 1 (local) or vhost_vsock for CID 2 (host)"
    )


# ------------------------------------------------------------------ AF_VSOCK listen and connect


@final
@attrs.define(eq=False)
class RefusingSocketFactory(trio.abc.SocketFactory):
    """A trio socket factory whose every socket() fails with `code` (a container's seccomp)."""

    code: int

    def socket(self, family: int = -1, type: int = -1, proto: int = -1) -> NoReturn:
        """Fail like the blocked system call."""
        raise OSError(self.code, os.strerror(self.code))


async def test_not_linux_is_family_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(AddressFamilyUnavailable) as info:
        await vsock.connect_vsock(ADDRESS, RouteOptions())
    assert str(info.value) == (
        "open vsock://5:22: AF_VSOCK needs Linux (this is win32); on a Windows Hyper-V host use hvsock://VM/PORT"
    )


async def test_a_blocked_socket_call_says_seccomp(no_vsock_connect: VsockConnectScript) -> None:
    if not HAVE_AF_VSOCK:
        pytest.skip("AF_VSOCK needs Linux")
    trio.socket.set_custom_socket_factory(RefusingSocketFactory(errno.EPERM))
    try:
        with pytest.raises(AddressFamilyUnavailable, match=r"moby/moby#44562"):
            await vsock.open_vsock_listener(VsockAddress(VMADDR_CID_ANY, VMADDR_PORT_ANY), RouteOptions())
        with pytest.raises(AddressFamilyUnavailable, match=r"^connect vsock://5:22: creating an AF_VSOCK socket"):
            await vsock.connect_vsock(ADDRESS, RouteOptions())
    finally:
        trio.socket.set_custom_socket_factory(None)
    assert no_vsock_connect.calls == []


@needs_af_vsock
async def test_listen_on_port_any_reports_the_bound_port() -> None:
    # Binding and listening is harmless on the host; nothing here connects.
    try:
        listener = await vsock.open_vsock_listener(
            VsockAddress(VMADDR_CID_ANY, VMADDR_PORT_ANY), RouteOptions(vsock_buffer_size=512 * 1024)
        )
    except AddressFamilyUnavailable as exc:
        pytest.skip(str(exc))
    async with listener:
        cid, port = listener.socket.getsockname()
        assert cid == VMADDR_CID_ANY
        assert port != VMADDR_PORT_ANY
        text = listener_address(listener)
        assert text == f"vsock://any:{port}"
        assert parse_address(text) == VsockAddress(VMADDR_CID_ANY, port)
        sock = listener.socket
        assert sock.getsockopt(vsock.SOL_VSOCK_OPTIONS, vsock.SO_VM_SOCKETS_BUFFER_SIZE) == 512 * 1024
        # The same port again: taken.
        with pytest.raises(EndpointError, match=rf"^listen vsock://any:{port}: vsock port {port} is already bound;"):
            await vsock.open_vsock_listener(VsockAddress(VMADDR_CID_ANY, port), RouteOptions())


@needs_af_vsock
async def test_listen_on_a_foreign_cid_is_refused() -> None:
    with pytest.raises(EndpointError, match=r"^listen vsock://4000000000:any: CID 4000000000 is not one of"):
        await vsock.open_vsock_listener(VsockAddress(4_000_000_000, VMADDR_PORT_ANY), RouteOptions())


@needs_af_vsock
@pytest.mark.parametrize("code", [errno.ECONNRESET, errno.ETIMEDOUT, errno.ENODEV, errno.ENETUNREACH])
async def test_connect_failures_are_backend_unavailable(no_vsock_connect: VsockConnectScript, code: int) -> None:
    no_vsock_connect.outcome = code
    with (
        trio.fail_after(LIMIT),
        pytest.raises(BackendUnavailable, match=r"^connect vsock://5:22: backend unavailable \("),
    ):
        await vsock.connect_vsock(ADDRESS, RouteOptions())
    assert no_vsock_connect.calls == [(5, 22)]


@needs_af_vsock
async def test_connect_sets_the_kernel_timeout_and_buffer(
    no_vsock_connect: VsockConnectScript, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "pretend": connect() returns without a system call, so we can look at the socket that
    # connect_vsock configured before it would have connected.
    no_vsock_connect.outcome = "pretend"
    stream = await vsock.connect_vsock(ADDRESS, RouteOptions(connect_timeout=12.5, vsock_buffer_size=MiB))
    async with stream:
        assert isinstance(stream, trio.SocketStream)
        sock = stream.socket
        assert 12.5 <= vsock.get_connect_timeout(sock) <= 12.5 + _jiffy()
        assert sock.getsockopt(vsock.SOL_VSOCK_OPTIONS, vsock.SO_VM_SOCKETS_BUFFER_MAX_SIZE) == MiB
        assert sock.getsockopt(vsock.SOL_VSOCK_OPTIONS, vsock.SO_VM_SOCKETS_BUFFER_SIZE) == MiB
    assert no_vsock_connect.calls == [(5, 22)]


@needs_af_vsock
@pytest.mark.parametrize("op", ["listen", "connect"])
async def test_cancelled_listen_and_connect_close_their_socket(
    no_vsock_connect: VsockConnectScript, monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    no_vsock_connect.outcome = "pretend"
    sockets: list[trio.socket.SocketType] = []
    real_socket = trio.socket.socket

    def recording_socket(family: int = -1, type: int = -1, proto: int = 0) -> trio.socket.SocketType:
        sock = real_socket(family, type, proto)
        sockets.append(sock)
        return sock

    monkeypatch.setattr(trio.socket, "socket", recording_socket)
    with trio.CancelScope() as scope:
        scope.cancel()
        if op == "listen":
            await vsock.open_vsock_listener(VsockAddress(VMADDR_CID_ANY, VMADDR_PORT_ANY), RouteOptions())
        else:
            await vsock.connect_vsock(ADDRESS, RouteOptions())
    assert scope.cancelled_caught
    assert len(sockets) == 1
    assert sockets[0].fileno() == -1


# ---------------------------------------------------------------------- fake Firecracker muxer


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


async def _pump(source: trio.abc.ReceiveStream, sink: trio.abc.SendStream) -> bool:
    """Copy until EOF (True) or until either side fails (False)."""
    try:
        for _ in range(MAX_READS):
            data = await source.receive_some(CHUNK)
            if not data:
                return True
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    raise AssertionError("too many reads")  # pragma: no cover


@final
@attrs.define(eq=False)
class FakeFirecracker:
    """The host side of a Firecracker vsock device, as firecracker docs/vsock.md describes it.

    The "guest" is in-process: `guest_listen(port, app)` is a guest AF_VSOCK listener, and
    `guest_connect(port, app)` a guest connecting to the host (CID 2). A guest application gets
    one end of a socketpair; the muxer pumps between the other end and the host Unix socket.

    Muxer behaviour (src/vmm/src/devices/virtio/vsock/unix/muxer.rs, csm/connection.rs):
    - host-initiated: accept on `uds_path`, read at least 10 bytes then one byte at a time up to
      `\\n` (at most 32), `connect <port>` in any case; a bad line drops the connection. If a
      guest listens on the port, answer `OK <host port>\\n` (host ports from 2**30), else the
      guest's RST makes the muxer drop the host connection.
    - guest-initiated: connect to `<uds_path>_<port>`; if nothing is there the guest gets RST.
    - EOF from the host is sent to the guest as SHUTDOWN(RCV|SEND): a full close. A guest's
      SHUTDOWN(SEND) alone is not passed on; the host connection closes when the guest closes.
    """

    uds_path: str
    guest_listeners: dict[int, GuestApp] = attrs.Factory(dict)
    connect_lines: list[bytes] = attrs.Factory(list)
    next_host_port: int = FIRST_HOST_PORT

    def guest_listen(self, port: int, app: GuestApp) -> None:
        """Make `app` the guest's listener on vsock port `port`."""
        self.guest_listeners[port] = app

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on uds_path and serve host-initiated connections until cancelled."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(self.uds_path)
        sock.listen(16)
        async with trio.SocketListener(sock) as listener, trio.open_nursery() as nursery:
            task_status.started()
            for _ in range(1000):
                host = await listener.accept()
                nursery.start_soon(self._host_initiated, host)

    async def _host_initiated(self, host: trio.SocketStream) -> None:
        try:
            port = await self._read_connect_line(host)
            app = self.guest_listeners.get(port) if port is not None else None
            if app is None:
                return  # the guest answered RST: the muxer drops the host connection
            local_port = self.next_host_port
            self.next_host_port += 1
            await host.send_all(b"OK %d\n" % local_port)
            await self._connect_guest_app(host, app)
        finally:
            await trio.aclose_forcefully(host)

    async def _read_connect_line(self, host: trio.SocketStream) -> int | None:
        line = b""
        try:
            for _ in range(10):  # read_exact(&mut buf[..10])
                byte = await host.receive_some(1)
                if not byte:
                    return None
                line += byte
            while not line.endswith(b"\n") and len(line) < 32:
                byte = await host.receive_some(1)
                if not byte:
                    return None
                line += byte
        except trio.BrokenResourceError:
            return None
        self.connect_lines.append(line)
        words = line.decode("ascii", "replace").split()
        if len(words) < 2 or words[0].lower() != "connect" or not words[1].isdigit() or int(words[1]) >= 2**32:
            return None
        return int(words[1])

    async def guest_connect(self, port: int, app: GuestApp) -> None:
        """A guest connects to the host's vsock port `port` and runs `app` on the connection.

        Raises:
            ConnectionResetError: Nothing listens on `<uds_path>_<port>` (the guest gets RST).
        """
        try:
            host = await trio.open_unix_socket(f"{self.uds_path}_{port}")
        except OSError as exc:
            raise ConnectionResetError(errno.ECONNRESET, f"RST: nothing listens on {self.uds_path}_{port}") from exc
        try:
            await self._connect_guest_app(host, app)
        finally:
            await trio.aclose_forcefully(host)

    async def _connect_guest_app(self, host: trio.SocketStream, app: GuestApp) -> None:
        app_sock, mux_sock = trio.socket.socketpair()
        app_end, mux_end = trio.SocketStream(app_sock), trio.SocketStream(mux_sock)
        guest_closed = trio.Event()

        async def run_app() -> None:
            try:
                await app(app_end)
            finally:
                await trio.aclose_forcefully(app_end)
                guest_closed.set()

        async def host_to_guest(cancel: trio.CancelScope) -> None:
            await _pump(host, mux_end)
            cancel.cancel()  # EOF (or failure) from the host: SHUTDOWN(RCV|SEND), a full close

        async def guest_to_host(cancel: trio.CancelScope) -> None:
            if await _pump(mux_end, host):
                await guest_closed.wait()  # SHUTDOWN(SEND) alone is not passed on
            cancel.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_app)
                try:
                    async with trio.open_nursery() as pumps:
                        pumps.start_soon(host_to_guest, pumps.cancel_scope)
                        pumps.start_soon(guest_to_host, pumps.cancel_scope)
                finally:
                    await trio.aclose_forcefully(mux_end)
                    await trio.aclose_forcefully(host)
        finally:
            await trio.aclose_forcefully(app_end)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory for Unix socket paths (sun_path holds 107 bytes)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="hvb-", dir="/tmp"))
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


@pytest.fixture
async def firecracker(short_tmp: Path, nursery: trio.Nursery) -> FakeFirecracker:
    """A FakeFirecracker listening on `<short_tmp>/v.sock`."""
    fake = FakeFirecracker(str(short_tmp / "v.sock"))
    await nursery.start(fake.serve)
    return fake


async def peer_exact(stream: trio.abc.HalfCloseableStream, *, receive: int, send: bytes) -> bytes:
    """Send `send` while reading exactly `receive` bytes; then send their sha256 and return them.

    The side that runs this knows both sizes, so it never needs a half-close: hybrid vsock has
    none (a host EOF is a full close).
    """
    received = bytearray()

    async def sender() -> None:
        for offset in range(0, len(send), CHUNK):
            await stream.send_all(send[offset : offset + CHUNK])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        for _ in range(MAX_READS):
            if len(received) >= receive:
                break
            data = await stream.receive_some(min(CHUNK, receive - len(received)))
            assert data, f"EOF after {len(received)} of {receive} bytes"
            received += data
    await stream.send_all(_digest(bytes(received)))
    return bytes(received)


async def client_to_eof(stream: trio.abc.HalfCloseableStream, *, send: bytes) -> bytes:
    """Send `send` (no EOF) while reading until the peer closes; return what was read."""
    received = bytearray()

    async def sender() -> None:
        for offset in range(0, len(send), CHUNK):
            await stream.send_all(send[offset : offset + CHUNK])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        for _ in range(MAX_READS):
            data = await stream.receive_some(CHUNK)
            if not data:
                break
            received += data
    return bytes(received)


def _data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# --------------------------------------------------------------------------- vsock-mux connect


async def test_mux_connect_sends_connect_and_keeps_the_guests_first_bytes(firecracker: FakeFirecracker) -> None:
    banner = b"SSH-2.0-OpenSSH_9.2 guest\r\n"

    async def sshd_like(stream: trio.SocketStream) -> None:
        await stream.send_all(banner)  # a server that speaks first, right after accept
        for _ in range(10):
            data = await stream.receive_some(CHUNK)
            if not data:
                return
            await stream.send_all(data.upper())

    firecracker.guest_listen(52, sshd_like)
    address = VsockMuxAddress(firecracker.uds_path, 52)
    with trio.fail_after(LIMIT):
        stream = await vsock_mux.connect_mux(address, RouteOptions())
        async with stream:
            got = b""
            for _ in range(len(banner)):
                got += await stream.receive_some(CHUNK)
                if len(got) >= len(banner):
                    break
            assert got == banner
            await stream.send_all(b"ping")
            assert await stream.receive_some(CHUNK) == b"PING"
    assert firecracker.connect_lines == [b"CONNECT 52\n"]


async def test_mux_connect_writes_the_connect_line_in_one_write(short_tmp: Path, nursery: trio.Nursery) -> None:
    path = short_tmp / "v.sock"
    firsts: list[bytes] = []

    async def answer(stream: trio.SocketStream) -> None:
        firsts.append(await stream.receive_some(4096))
        await stream.send_all(b"OK 1073741824\nguest-bytes")
        await trio.sleep_forever()

    listener = await _unix_listener(path)
    await nursery.start(trio.serve_listeners, answer, [listener])
    with trio.fail_after(LIMIT):
        stream = await vsock_mux.connect_mux(VsockMuxAddress(str(path), 4294967294), RouteOptions())
        async with stream:
            assert await stream.receive_some(CHUNK) == b"guest-bytes"
    assert firsts == [b"CONNECT 4294967294\n"]


async def _unix_listener(path: Path) -> trio.SocketListener:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(16)
    return trio.SocketListener(sock)


async def test_mux_connect_to_a_port_nobody_listens_on_is_refused(firecracker: FakeFirecracker) -> None:
    address = VsockMuxAddress(firecracker.uds_path, 53)
    with trio.fail_after(LIMIT), pytest.raises(BackendUnavailable) as info:
        await vsock_mux.connect_mux(address, RouteOptions())
    assert str(info.value) == (
        f"connect vsock-mux://{firecracker.uds_path}:53: backend unavailable (the VMM closed the connection:"
        " nothing listens on port 53 in the guest)"
    )
    assert firecracker.connect_lines == [b"CONNECT 53\n"]


async def test_mux_connect_without_a_vmm_socket(short_tmp: Path) -> None:
    path = short_tmp / "v.sock"
    with trio.fail_after(LIMIT), pytest.raises(BackendUnavailable) as info:
        await vsock_mux.connect_mux(VsockMuxAddress(str(path), 52), RouteOptions())
    assert str(info.value) == (
        f"connect vsock-mux://{path}:52: backend unavailable (cannot reach the VMM's vsock socket {path}"
        " (No such file or directory); is the VM running, and is this its vsock uds_path?)"
    )


async def test_mux_connect_refused_by_permissions_is_an_error(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A socket file we may not connect to: not "unavailable", as retrying will not help.
    path = str(short_tmp / "v.sock")
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: object) -> None:
        if address == path:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_connect(self, address)  # type: ignore[arg-type]  # pragma: no cover

    monkeypatch.setattr(socket.socket, "connect", connect)
    with pytest.raises(EndpointError) as info:
        await vsock_mux.connect_mux(VsockMuxAddress(path, 52), RouteOptions())
    assert type(info.value) is EndpointError
    assert info.value.message == (
        f"cannot reach the VMM's vsock socket {path} (Permission denied); is the VM running, and is this its"
        " vsock uds_path?"
    )


async def test_mux_connect_when_the_socket_cannot_be_created(monkeypatch: pytest.MonkeyPatch) -> None:
    trio.socket.set_custom_socket_factory(RefusingSocketFactory(errno.EMFILE))
    try:
        with pytest.raises(EndpointError, match=r"^connect vsock-mux:///x:1: cannot create a Unix socket: "):
            await vsock_mux.connect_mux(VsockMuxAddress("/x", 1), RouteOptions())
    finally:
        trio.socket.set_custom_socket_factory(None)


async def test_mux_connect_to_a_silent_vmm_times_out(
    short_tmp: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    path = short_tmp / "v.sock"

    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    listener = await _unix_listener(path)
    await nursery.start(trio.serve_listeners, silent, [listener])
    start = trio.current_time()
    with trio.fail_after(LIMIT), pytest.raises(BackendUnavailable) as info:
        await vsock_mux.connect_mux(VsockMuxAddress(str(path), 52), RouteOptions(connect_timeout=5.0))
    assert trio.current_time() - start == pytest.approx(5.0)
    assert str(info.value) == (
        f"connect vsock-mux://{path}:52: backend unavailable (no answer to CONNECT 52 within 5s; is the guest up,"
        f" and is {path} a Firecracker/Cloud Hypervisor vsock socket?)"
    )


@pytest.mark.parametrize(
    ("answer", "shown"),
    [
        (b"NO\n", r"b'NO\n'"),
        (b"OK\tx\n", r"b'OK\tx\n'"),
        (b"HTTP/1.1 400 Bad Request\r\n", r"b'HTTP/1.1 400 Bad Request\r\n'"),
        (b"x" * 80, repr(b"x" * 64)),
    ],
)
async def test_mux_connect_with_a_wrong_answer_is_refused(
    short_tmp: Path, nursery: trio.Nursery, answer: bytes, shown: str
) -> None:
    path = short_tmp / "v.sock"

    async def wrong(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.send_all(answer)
        await trio.sleep_forever()

    listener = await _unix_listener(path)
    await nursery.start(trio.serve_listeners, wrong, [listener])
    with trio.fail_after(LIMIT), pytest.raises(BackendUnavailable) as info:
        await vsock_mux.connect_mux(VsockMuxAddress(str(path), 52), RouteOptions())
    assert info.value.message == f"backend unavailable (unexpected answer {shown} to CONNECT 52; expected 'OK <port>')"


async def test_mux_connect_reset_by_the_vmm(short_tmp: Path, nursery: trio.Nursery) -> None:
    path = short_tmp / "v.sock"

    async def reset(stream: trio.SocketStream) -> None:
        # Closing a Unix socket with unread bytes makes the peer's next read fail ECONNRESET.
        await trio.lowlevel.wait_readable(stream.socket)
        await trio.aclose_forcefully(stream)

    listener = await _unix_listener(path)
    await nursery.start(trio.serve_listeners, reset, [listener])
    with trio.fail_after(LIMIT), pytest.raises(BackendUnavailable) as info:
        await vsock_mux.connect_mux(VsockMuxAddress(str(path), 52), RouteOptions())
    assert info.value.message == "backend unavailable (the VMM dropped the connection: Connection reset by peer)"


async def test_mux_connect_accepts_cloud_hypervisor_and_firecracker_answers(firecracker: FakeFirecracker) -> None:
    async def quiet(stream: trio.SocketStream) -> None:
        await stream.receive_some(1)

    firecracker.guest_listen(1024, quiet)
    with trio.fail_after(LIMIT):
        for expected in (FIRST_HOST_PORT, FIRST_HOST_PORT + 1):
            stream = await vsock_mux.connect_mux(VsockMuxAddress(firecracker.uds_path, 1024), RouteOptions())
            await stream.aclose()
            assert firecracker.next_host_port == expected + 1


# ---------------------------------------------------------------------------- vsock-mux listen


async def test_mux_listener_is_a_unix_socket_at_path_underscore_port(short_tmp: Path) -> None:
    address = VsockMuxAddress(str(short_tmp / "v.sock"), 52)
    listener = await vsock_mux.open_mux_listener(address, RouteOptions())
    async with listener:
        st = os.lstat(short_tmp / "v.sock_52")
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert address.listen_path == f"{short_tmp}/v.sock_52"
    assert not (short_tmp / "v.sock_52").exists()


async def test_mux_listener_never_deletes_a_file_in_the_way(short_tmp: Path) -> None:
    (short_tmp / "v.sock_52").write_text("precious")
    address = VsockMuxAddress(str(short_tmp / "v.sock"), 52)
    with pytest.raises(EndpointError) as info:
        await vsock_mux.open_mux_listener(address, RouteOptions())
    assert str(info.value).startswith(
        f"listen vsock-mux://{short_tmp}/v.sock:52: {short_tmp}/v.sock_52: a file that is not"
    )
    assert (short_tmp / "v.sock_52").read_text() == "precious"


# ------------------------------------------------------------- relaying through the fake VMM


async def _serve_relay(
    nursery: trio.Nursery,
    listener: trio.abc.Listener[trio.abc.HalfCloseableStream],
    connect: Callable[[], Awaitable[trio.abc.HalfCloseableStream]],
) -> None:
    async def handle(client: trio.abc.HalfCloseableStream) -> None:
        backend = await connect()
        await relay(client, backend)  # closes both, also when cancelled at teardown

    await nursery.start(trio.serve_listeners, handle, [listener])


@pytest.mark.slow
async def test_relay_to_a_guest_through_the_muxer_both_ways(
    firecracker: FakeFirecracker, nursery: trio.Nursery
) -> None:
    # host client --tcp--> relay --vsock-mux--> fake Firecracker --> guest app, 4 MiB each way.
    up, down = _data(4 * MiB, 1), _data(4 * MiB, 2)
    guest_got: list[bytes] = []

    async def guest(stream: trio.SocketStream) -> None:
        guest_got.append(await peer_exact(stream, receive=len(up), send=down))

    firecracker.guest_listen(52, guest)
    address = VsockMuxAddress(firecracker.uds_path, 52)
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await _serve_relay(nursery, listener, lambda: vsock_mux.connect_mux(address, RouteOptions()))
    with trio.fail_after(LIMIT):
        client = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
        async with client:
            received = await client_to_eof(client, send=up)
    assert _digest(received[:-32]) == _digest(down)
    assert received[-32:] == _digest(up)
    assert guest_got == [up]


@pytest.mark.slow
async def test_relay_from_a_guest_through_the_muxer_both_ways(
    firecracker: FakeFirecracker, nursery: trio.Nursery
) -> None:
    # guest app --> fake Firecracker --> <uds>_53 listener --> relay --tcp--> host backend.
    up, down = _data(4 * MiB, 3), _data(4 * MiB, 4)
    backend_got: list[bytes] = []

    async def backend(stream: trio.SocketStream) -> None:
        async with stream:
            backend_got.append(await peer_exact(stream, receive=len(up), send=down))

    [backend_listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(trio.serve_listeners, backend, [backend_listener])
    backend_port = backend_listener.socket.getsockname()[1]
    listener = await vsock_mux.open_mux_listener(VsockMuxAddress(firecracker.uds_path, 53), RouteOptions())

    async def connect_backend() -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", backend_port)

    await _serve_relay(nursery, listener, connect_backend)
    guest_received: list[bytes] = []

    async def guest(stream: trio.SocketStream) -> None:
        guest_received.append(await client_to_eof(stream, send=up))

    with trio.fail_after(LIMIT):
        await firecracker.guest_connect(53, guest)
    [received] = guest_received
    assert _digest(received[:-32]) == _digest(down)
    assert received[-32:] == _digest(up)
    assert backend_got == [up]


async def test_a_guest_connect_with_no_host_listener_is_reset(firecracker: FakeFirecracker) -> None:
    async def unused(stream: trio.SocketStream) -> None:  # pragma: no cover - never connected
        raise AssertionError("connected")

    with trio.fail_after(LIMIT), pytest.raises(ConnectionResetError, match="RST: nothing listens on"):
        await firecracker.guest_connect(54, unused)


# --------------------------------------------------------------- through the hvbridge process

PROCESS_LIMIT: Final = 60.0


@pytest.fixture
async def processes(tmp_path: Path) -> AsyncIterator[Processes]:
    """Real hvbridge child processes (integration/support.py), stopped at teardown (exit 0)."""
    async with trio.open_nursery() as nursery:
        children = Processes(nursery, tmp_path)
        try:
            yield children
        finally:
            with trio.fail_after(4 * STOP_TIMEOUT):
                problems = await children.close()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.mark.slow
async def test_hvbridge_forwards_tcp_into_a_firecracker_guest(
    firecracker: FakeFirecracker, processes: Processes
) -> None:
    # `hvbridge forward tcp://127.0.0.1:0 vsock-mux:///.../v.sock:52`, 16 MiB each way.
    up, down = _data(16 * MiB, 5), _data(16 * MiB, 6)
    guest_got: list[bytes] = []

    async def guest(stream: trio.SocketStream) -> None:
        guest_got.append(await peer_exact(stream, receive=len(up), send=down))

    firecracker.guest_listen(52, guest)
    target = f"vsock-mux://{firecracker.uds_path}:52"
    with trio.fail_after(PROCESS_LIMIT):
        bridge = await processes.forward("tcp://127.0.0.1:0", target)
        client = await open_stream(bridge.listening())
        async with client:
            received = await client_to_eof(client, send=up)
        [closed] = await bridge.wait_for_event("connection closed", route="forward")
    assert _digest(received[:-32]) == _digest(down)
    assert received[-32:] == _digest(up)
    assert guest_got == [up]
    assert closed.fields["target"] == target
    assert closed.fields["bytes_in"] == str(len(up))
    assert closed.fields["bytes_out"] == str(len(down) + 32)
    assert firecracker.connect_lines == [b"CONNECT 52\n"]


@pytest.mark.slow
async def test_hvbridge_serves_connections_from_a_firecracker_guest(
    firecracker: FakeFirecracker, processes: Processes, nursery: trio.Nursery
) -> None:
    # `hvbridge forward vsock-mux:///.../v.sock:53 tcp://127.0.0.1:PORT`: the guest connects to
    # host port 53, Firecracker delivers it on v.sock_53, 16 MiB each way.
    up, down = _data(16 * MiB, 7), _data(16 * MiB, 8)
    backend_got: list[bytes] = []

    async def backend(stream: trio.SocketStream) -> None:
        async with stream:
            backend_got.append(await peer_exact(stream, receive=len(up), send=down))

    [backend_listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(trio.serve_listeners, backend, [backend_listener])
    backend_port = backend_listener.socket.getsockname()[1]
    guest_received: list[bytes] = []

    async def guest(stream: trio.SocketStream) -> None:
        guest_received.append(await client_to_eof(stream, send=up))

    with trio.fail_after(PROCESS_LIMIT):
        bridge = await processes.forward(f"vsock-mux://{firecracker.uds_path}:53", f"tcp://127.0.0.1:{backend_port}")
        assert bridge.listening() == f"unix://{firecracker.uds_path}_53"
        assert stat.S_IMODE(os.lstat(f"{firecracker.uds_path}_53").st_mode) == 0o600
        await firecracker.guest_connect(53, guest)
        await bridge.wait_for_event("connection closed", route="forward")
    [received] = guest_received
    assert _digest(received[:-32]) == _digest(down)
    assert received[-32:] == _digest(up)
    assert backend_got == [up]


@pytest.mark.slow
async def test_hvbridge_closes_the_client_when_no_guest_listens(
    firecracker: FakeFirecracker, processes: Processes
) -> None:
    target = f"vsock-mux://{firecracker.uds_path}:55"
    with trio.fail_after(PROCESS_LIMIT):
        bridge = await processes.forward("tcp://127.0.0.1:0", target)
        client = await open_stream(bridge.listening())
        async with client:
            start = trio.current_time()
            with pytest.raises(trio.BrokenResourceError):  # reset: failure shows as failure
                await client.receive_some(CHUNK)
            assert trio.current_time() - start < 5.0
        [closed] = await bridge.wait_for_event("connection closed", route="forward")
    assert closed.level == "WARNING"
    assert closed.fields["reason"] == (
        "connect failed: backend unavailable (the VMM closed the connection: nothing listens on port 55 in the guest)"
    )
