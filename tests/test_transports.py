"""Tests for hvbridge.transports: listeners and connects for TCP and Unix sockets.

Rules for this module: real sockets only on loopback (127.0.0.1, ::1, port 0) and in tmp_path
(plus Linux abstract names unique to this process). One side closes each connection. Every
async test is bounded with trio.fail_after. The VM families live in test_vsock/test_hvsock.
"""

from __future__ import annotations

import errno
import grp
import os
import platform
import pwd
import re
import socket
import stat
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Final

import pytest
import trio
import trio.testing

from hvbridge.addresses import (
    VMADDR_CID_ANY,
    Address,
    HyperVAddress,
    StdioAddress,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    VsockMuxAddress,
)
from hvbridge.backend import Backend
from hvbridge.errors import AddressFamilyUnavailable, BackendUnavailable, EndpointError
from hvbridge.routes import RouteOptions
from hvbridge.transports import base, unavailable_reason
from hvbridge.transports.base import listener_address, peer_address, sockaddr_text, translate_connect_error

LIMIT: Final = 10.0
DEFAULTS: Final = RouteOptions()
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="Linux abstract Unix socket namespace")

BACKEND = Backend()


def _have_ipv6_loopback() -> bool:
    if not socket.has_ipv6:  # pragma: no cover - depends on the machine
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:  # pragma: no cover - depends on the machine
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _have_ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")


def lexists(path: Path) -> bool:
    """Whether anything (even a dangling symlink) is at `path` (sync: a local tmp_path)."""
    return os.path.lexists(path)


def listdir(path: Path) -> list[str]:
    return os.listdir(path)


async def exchange(client: trio.abc.Stream, server: trio.abc.Stream) -> None:
    """A few bytes each way, then both sides close."""
    await client.send_all(b"ping")
    assert await server.receive_some() == b"ping"
    await server.send_all(b"pong")
    assert await client.receive_some() == b"pong"
    await client.aclose()
    assert await server.receive_some() == b""
    await server.aclose()


def port_of(listener: base.Listener) -> int:
    match = re.fullmatch(r"tcp://(?:[0-9.]+|\[[0-9a-f:]+\]):(\d+)", listener_address(listener))
    assert match is not None, listener_address(listener)
    return int(match.group(1))


async def close_all(listeners: list[base.Listener]) -> None:
    for listener in listeners:
        await listener.aclose()


# ------------------------------------------------------------------------------------------ TCP


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", pytest.param("::1", marks=needs_ipv6)],
)
async def test_tcp_listen_on_port_0_and_connect(host: str) -> None:
    with trio.fail_after(LIMIT):
        listeners = await BACKEND.open_listeners(TcpAddress(host, 0), DEFAULTS)
        try:
            (listener,) = listeners
            port = port_of(listener)
            assert port > 0
            assert listener_address(listener) == str(TcpAddress(host, port))
            client = await BACKEND.connect(TcpAddress(host, port), DEFAULTS)
            server = await listener.accept()
            assert isinstance(client, trio.SocketStream)
            client_port = client.socket.getsockname()[1]
            family = socket.AF_INET if host == "127.0.0.1" else socket.AF_INET6
            peer = peer_address(server)
            assert peer is not None
            assert peer[0] == family
            assert sockaddr_text(*peer) == str(TcpAddress(host, client_port))
            await exchange(client, server)
        finally:
            await close_all(listeners)


async def test_tcp_host_name_localhost() -> None:
    with trio.fail_after(LIMIT):
        listeners = await BACKEND.open_listeners(TcpAddress("localhost", 0), DEFAULTS)
        try:
            assert listeners
            for listener in listeners:  # one per address localhost resolves to
                assert re.fullmatch(r"tcp://(127\.0\.0\.1|\[::1\]):\d+", listener_address(listener))
            listener = listeners[0]
            client = await BACKEND.connect(TcpAddress("localhost", port_of(listener)), DEFAULTS)
            server = await listener.accept()
            await exchange(client, server)
        finally:
            await close_all(listeners)


async def test_tcp_address_in_use_says_what_to_do() -> None:
    with trio.fail_after(LIMIT):
        listeners = await BACKEND.open_listeners(TcpAddress("127.0.0.1", 0), DEFAULTS)
        try:
            address = TcpAddress("127.0.0.1", port_of(listeners[0]))
            with pytest.raises(EndpointError) as raised:
                await BACKEND.open_listeners(address, DEFAULTS)
        finally:
            await close_all(listeners)
    assert str(raised.value) == (
        f"listen {address}: address already in use; stop the other process or choose another port/path"
    )
    assert raised.value.op == "listen"
    assert raised.value.address == str(address)
    assert isinstance(raised.value.__cause__, OSError)
    assert raised.value.__cause__.errno == errno.EADDRINUSE


async def test_tcp_address_not_on_this_machine() -> None:
    with trio.fail_after(LIMIT), pytest.raises(EndpointError) as raised:
        await BACKEND.open_listeners(TcpAddress("192.0.2.1", 0), DEFAULTS)  # TEST-NET-1, never local
    assert raised.value.message == "address not available on this machine; use an address of a local interface"


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (
            OSError(errno.EADDRINUSE, "Address in use"),
            "address already in use; stop the other process or choose another port/path",
        ),
        (
            OSError(errno.EACCES, "Permission denied"),
            "permission denied; ports below 1024 need root or CAP_NET_BIND_SERVICE",
        ),
        (
            OSError(errno.EADDRNOTAVAIL, "x"),
            "address not available on this machine; use an address of a local interface",
        ),
        (OSError(errno.EINVAL, "Invalid argument"), "Invalid argument"),
        (OSError("no errno"), "no errno"),
    ],
)
def test_listen_hints(exc: OSError, message: str) -> None:
    assert base.listen_hint(exc) == message


async def test_connect_to_a_closed_tcp_port_is_backend_unavailable() -> None:
    # A bound socket that does not listen: the kernel answers connects with RST, and no other
    # process can take the port while we hold it.
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        address = TcpAddress("127.0.0.1", bound.getsockname()[1])
        with trio.fail_after(LIMIT), pytest.raises(BackendUnavailable) as raised:
            await BACKEND.connect(address, DEFAULTS)
    assert str(raised.value) == f"connect {address}: backend unavailable (Connection refused)"
    assert raised.value.__cause__ is not None


# ----------------------------------------------------------------------------------------- Unix


@pytest.mark.parametrize(("options", "mode"), [(RouteOptions(), 0o600), (RouteOptions(mode=0o660), 0o660)])
async def test_unix_listener_creates_the_file_with_its_mode(tmp_path: Path, options: RouteOptions, mode: int) -> None:
    path = tmp_path / "s.sock"
    with trio.fail_after(LIMIT):
        (listener,) = await BACKEND.open_listeners(UnixAddress(str(path)), options)
        try:
            st = path.lstat()
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == mode
            assert listener_address(listener) == f"unix://{path}"
            client = await BACKEND.connect(UnixAddress(str(path)), DEFAULTS)
            server = await listener.accept()
            peer = peer_address(server)
            assert peer is not None
            assert sockaddr_text(*peer) == "unix:(unnamed)"
            await exchange(client, server)
        finally:
            await listener.aclose()
    assert not path.exists()  # removed on close


async def test_unix_listener_file_is_removed_by_a_forceful_close(tmp_path: Path) -> None:
    # trio.aclose_forcefully() runs aclose() already cancelled: the removal must not be skipped.
    path = tmp_path / "s.sock"
    with trio.fail_after(LIMIT):
        (listener,) = await BACKEND.open_listeners(UnixAddress(str(path)), DEFAULTS)
        assert path.exists()
        await trio.aclose_forcefully(listener)
    assert not path.exists()


async def test_unix_listener_owner_and_group(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    for owner, group_spec in [(user, str(os.getgid())), (str(os.getuid()), group), (None, group), (user, None)]:
        with trio.fail_after(LIMIT):
            (listener,) = await BACKEND.open_listeners(
                UnixAddress(str(path)), RouteOptions(owner=owner, group=group_spec)
            )
            st = path.lstat()
            await listener.aclose()
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            RouteOptions(owner="no-such-user-hvbridge"),
            "unknown owner 'no-such-user-hvbridge'; expected a user/group name or id",
        ),
        (
            RouteOptions(group="no-such-group-hvbridge"),
            "unknown group 'no-such-group-hvbridge'; expected a user/group name or id",
        ),
    ],
)
async def test_unix_listener_unknown_owner_leaves_nothing_behind(
    tmp_path: Path, options: RouteOptions, message: str
) -> None:
    path = tmp_path / "s.sock"
    with trio.fail_after(LIMIT), pytest.raises(EndpointError) as raised:
        await BACKEND.open_listeners(UnixAddress(str(path)), options)
    assert str(raised.value) == f"listen unix://{path}: {message}"
    assert not lexists(path)


async def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(str(path))  # closed without unlinking: what a crashed process leaves
    with trio.fail_after(LIMIT):
        (listener,) = await BACKEND.open_listeners(UnixAddress(str(path)), DEFAULTS)
        try:
            assert stat.S_ISSOCK(path.lstat().st_mode)
            client = await BACKEND.connect(UnixAddress(str(path)), DEFAULTS)
            await exchange(client, await listener.accept())
        finally:
            await listener.aclose()


async def test_a_live_socket_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    address = UnixAddress(str(path))
    with trio.fail_after(LIMIT):
        (first,) = await BACKEND.open_listeners(address, DEFAULTS)
        try:
            with pytest.raises(EndpointError) as raised:
                await BACKEND.open_listeners(address, DEFAULTS)
            assert str(raised.value) == f"listen {address}: another process is listening on this socket; stop it first"
            # The first listener still owns the path and still works.
            client = await BACKEND.connect(address, DEFAULTS)
            server = await first.accept()  # the refused attempt's probe connection
            assert await server.receive_some() == b""
            await server.aclose()
            await exchange(client, await first.accept())
        finally:
            await first.aclose()


async def test_a_live_socket_with_a_full_backlog_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    queued: list[socket.socket] = []
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen(0)
        try:
            while True:  # fill the backlog until connects would block
                client = socket.socket(socket.AF_UNIX)
                client.setblocking(False)
                queued.append(client)
                try:
                    client.connect(str(path))
                except BlockingIOError:
                    break
            with trio.fail_after(LIMIT), pytest.raises(EndpointError, match="another process is listening"):
                await BACKEND.open_listeners(UnixAddress(str(path)), DEFAULTS)
            assert lexists(path)
            # Still the live listener's socket: the queued connection can be accepted.
            accepted, _ = live.accept()
            accepted.close()
        finally:
            for client in queued:
                client.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
async def test_a_socket_we_may_not_probe_is_never_deleted() -> None:
    # Another user's live socket (mode 0600): connect() says EACCES, which does not mean stale.
    # Not in tmp_path (mode 0700): the other user must be able to reach the socket.
    directory = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        os.chmod(directory, 0o777)
        path = directory / "theirs.sock"
        with socket.socket(socket.AF_UNIX) as live:
            live.bind(str(path))
            path.chmod(0o600)
            live.listen(1)
            os.seteuid(pwd.getpwnam("nobody").pw_uid)
            try:
                with trio.fail_after(LIMIT), pytest.raises(EndpointError) as raised:
                    await BACKEND.open_listeners(UnixAddress(str(path)), DEFAULTS)
            finally:
                os.seteuid(0)
            assert raised.value.message == (
                "cannot probe the socket file already there (Permission denied); remove it if it is stale,"
                " or choose another path"
            )
            assert stat.S_ISSOCK(path.lstat().st_mode)
    finally:
        for child in listdir(directory):
            os.unlink(directory / child)
        os.rmdir(directory)


async def test_a_unix_listener_in_a_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "s.sock"
    with trio.fail_after(LIMIT), pytest.raises(EndpointError) as raised:
        await BACKEND.open_listeners(UnixAddress(str(path)), DEFAULTS)
    assert raised.value.message == (
        f"no such directory {str(path.parent)!r}; create it (systemd: RuntimeDirectory=) or choose another path"
    )
    assert listdir(tmp_path) == []


@pytest.mark.parametrize("kind", ["regular file", "directory", "fifo"])
async def test_a_file_that_is_not_a_socket_is_never_deleted(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "s.sock"
    if kind == "regular file":
        path.write_text("precious")
    elif kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    with trio.fail_after(LIMIT), pytest.raises(EndpointError) as raised:
        await BACKEND.open_listeners(UnixAddress(str(path)), DEFAULTS)
    assert str(raised.value) == (
        f"listen unix://{path}: a file that is not a socket is in the way; refusing to delete it,"
        " remove it or choose another path"
    )
    assert lexists(path)
    if kind == "regular file":
        assert path.read_text() == "precious"


@pytest.mark.parametrize("target", ["regular file", "stale socket", "dangling"])
async def test_a_symlink_is_neither_followed_nor_deleted(tmp_path: Path, target: str) -> None:
    path = tmp_path / "s.sock"
    target_path = tmp_path / "target"
    if target == "regular file":
        target_path.write_text("precious")
    elif target == "stale socket":
        with socket.socket(socket.AF_UNIX) as old:
            old.bind(str(target_path))
    path.symlink_to(target_path)
    with trio.fail_after(LIMIT), pytest.raises(EndpointError) as raised:
        await BACKEND.open_listeners(UnixAddress(str(path)), DEFAULTS)
    assert raised.value.message == "path is a symlink; refusing to follow or delete it, choose another path"
    assert path.is_symlink()
    assert os.readlink(path) == str(target_path)
    if target == "regular file":
        assert target_path.read_text() == "precious"
    elif target == "stale socket":
        assert stat.S_ISSOCK(target_path.lstat().st_mode)
    else:
        assert not target_path.exists()


async def test_close_leaves_a_file_that_is_no_longer_ours(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with trio.fail_after(LIMIT):
        (listener,) = await BACKEND.open_listeners(UnixAddress(str(path)), DEFAULTS)
        path.unlink()
        path.write_text("someone else's now")
        await listener.aclose()
    assert path.read_text() == "someone else's now"
    # And closing when the file is already gone is fine too.
    with trio.fail_after(LIMIT):
        path.unlink()
        (listener,) = await BACKEND.open_listeners(UnixAddress(str(path)), DEFAULTS)
        path.unlink()
        await listener.aclose()
    assert not lexists(path)


@linux_only
async def test_abstract_namespace(tmp_path: Path) -> None:
    name = f"hvbridge-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    address = UnixAddress(name, abstract=True)
    with trio.fail_after(LIMIT):
        (listener,) = await BACKEND.open_listeners(address, DEFAULTS)
        try:
            assert listener_address(listener) == f"unix:@{name}"
            client = await BACKEND.connect(address, DEFAULTS)
            await exchange(client, await listener.accept())
        finally:
            await listener.aclose()
        with pytest.raises(BackendUnavailable):  # gone once closed
            await BACKEND.connect(address, DEFAULTS)
    assert listdir(tmp_path) == []


async def test_connect_to_a_missing_unix_path_is_backend_unavailable(tmp_path: Path) -> None:
    address = UnixAddress(str(tmp_path / "missing.sock"))
    with trio.fail_after(LIMIT), pytest.raises(BackendUnavailable) as raised:
        await BACKEND.connect(address, DEFAULTS)
    assert str(raised.value) == f"connect {address}: backend unavailable (No such file or directory)"


async def test_connect_to_a_stale_unix_socket_is_backend_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(str(path))
    with trio.fail_after(LIMIT), pytest.raises(BackendUnavailable) as raised:
        await BACKEND.connect(UnixAddress(str(path)), DEFAULTS)
    assert raised.value.message == "backend unavailable (Connection refused)"


async def test_connect_to_a_unix_path_that_is_not_a_socket_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "plain"
    path.write_text("x")
    with trio.fail_after(LIMIT), pytest.raises(EndpointError) as raised:
        await BACKEND.connect(UnixAddress(str(path)), DEFAULTS)
    assert raised.value.op == "connect"


# ------------------------------------------------------------------------ errors and addresses


async def test_stdio_cannot_listen() -> None:
    with pytest.raises(EndpointError) as raised:
        await BACKEND.open_listeners(StdioAddress(), DEFAULTS)
    assert str(raised.value) == "listen stdio: stdio cannot listen"


def _with_group(errnos: list[int]) -> OSError:
    # What trio.open_tcp_stream raises when every address failed.
    exc = OSError("all attempts to connect to host:1 failed")
    exc.__cause__ = ExceptionGroup("attempts", [OSError(e, os.strerror(e)) for e in errnos])
    return exc


@pytest.mark.parametrize(
    ("exc", "kind", "message"),
    [
        (
            OSError(errno.ECONNREFUSED, "Connection refused"),
            BackendUnavailable,
            "backend unavailable (Connection refused)",
        ),
        (
            OSError(errno.ETIMEDOUT, "Connection timed out"),
            BackendUnavailable,
            "backend unavailable (Connection timed out)",
        ),
        (OSError(errno.ENODEV, "No such device"), BackendUnavailable, "backend unavailable (No such device)"),
        (OSError(errno.EACCES, "Permission denied"), EndpointError, "Permission denied"),
        (
            socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
            BackendUnavailable,
            "cannot resolve host name: Name or service not known",
        ),
        (_with_group([errno.ECONNREFUSED]), BackendUnavailable, "backend unavailable (Connection refused)"),
        (
            _with_group([errno.ENETUNREACH, errno.ECONNREFUSED, errno.ECONNREFUSED]),
            BackendUnavailable,
            "backend unavailable (Network is unreachable; Connection refused)",
        ),
        (_with_group([errno.EACCES]), EndpointError, "Permission denied"),
        (
            OSError("all attempts to connect to host:1 failed"),
            EndpointError,
            "all attempts to connect to host:1 failed",
        ),
    ],
)
def test_translate_connect_error(exc: OSError, kind: type[EndpointError], message: str) -> None:
    error = translate_connect_error(TcpAddress("host", 1), exc)
    assert type(error) is kind
    assert (error.address, error.op, error.message) == ("tcp://host:1", "connect", message)


@pytest.mark.parametrize(
    ("family", "sockaddr", "text"),
    [
        (socket.AF_INET, ("127.0.0.1", 80), "tcp://127.0.0.1:80"),
        (socket.AF_INET6, ("::1", 8080, 0, 0), "tcp://[::1]:8080"),
        (socket.AF_INET6, ("fe80::1%eth0", 22, 0, 2), "tcp://[fe80::1]:22"),
        (socket.AF_INET6, ("::ffff:127.0.0.1", 22, 0, 0), "tcp://[::ffff:127.0.0.1]:22"),
        (socket.AF_UNIX, "/run/hvbridge/web.sock", "unix:///run/hvbridge/web.sock"),
        (socket.AF_UNIX, b"/run/x.sock", "unix:///run/x.sock"),
        (socket.AF_UNIX, b"\0hvbridge", "unix:@hvbridge"),
        (socket.AF_UNIX, "\0name", "unix:@name"),
        (socket.AF_UNIX, "", "unix:(unnamed)"),
        (socket.AF_UNIX, b"", "unix:(unnamed)"),
        (getattr(socket, "AF_VSOCK", 40), (3, 5000), "vsock://3:5000"),
        (getattr(socket, "AF_VSOCK", 40), (VMADDR_CID_ANY, 22), "vsock://any:22"),
        (12345, ("something", "else"), "('something', 'else')"),
    ],
)
def test_sockaddr_text(family: int, sockaddr: object, text: str) -> None:
    assert sockaddr_text(family, sockaddr) == text


async def test_listener_address_and_peer_address_of_non_sockets() -> None:
    _client, server = trio.testing.memory_stream_pair()
    assert peer_address(server) is None

    class NoSocket(trio.abc.Listener[trio.abc.Stream]):
        async def accept(self) -> trio.abc.Stream:
            raise NotImplementedError

        async def aclose(self) -> None:
            raise NotImplementedError

        def __repr__(self) -> str:
            return "<no socket>"

    assert listener_address(NoSocket()) == "<no socket>"  # type: ignore[arg-type]
    a, b = trio.socket.socketpair()
    stream = trio.SocketStream(a)
    await stream.aclose()
    assert peer_address(stream) is None  # getpeername() on a closed socket fails
    b.close()


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        (TcpAddress("127.0.0.1", 1), None),
        (UnixAddress("/x"), None),
        (VsockMuxAddress("/run/fc.sock", 5), None),
        (StdioAddress(), None),
        (
            VsockAddress(3, 5),
            None if hasattr(socket, "AF_VSOCK") else "AF_VSOCK needs Linux",
        ),
        (
            HyperVAddress(uuid.UUID(int=0), uuid.UUID(int=1)),
            None
            if hasattr(socket, "AF_HYPERV")
            else "Hyper-V sockets (AF_HYPERV) need Windows and Python >= 3.12; this is Linux with Python "
            + platform.python_version(),
        ),
    ],
)
def test_unavailable_reason(address: Address, reason: str | None) -> None:
    assert unavailable_reason(address) == reason


def test_family_unavailable() -> None:
    error = base.family_unavailable(VsockAddress(3, 5), "AF_VSOCK needs Linux")
    assert isinstance(error, AddressFamilyUnavailable)
    assert str(error) == "open vsock://3:5: AF_VSOCK needs Linux"


@pytest.mark.parametrize(
    ("family", "sockaddr", "exposed"),
    [
        (socket.AF_INET, ("0.0.0.0", 80), True),
        (socket.AF_INET, ("127.0.0.1", 80), False),
        (socket.AF_INET6, ("::", 80, 0, 0), True),
        (socket.AF_INET6, ("::1", 80, 0, 0), False),
        (socket.AF_INET6, ("fe80::1%eth0", 80, 0, 2), True),
        (socket.AF_UNIX, "/run/x.sock", False),
    ],
)
def test_exposed_tcp_compares_the_bound_address_as_a_value(family: int, sockaddr: object, exposed: bool) -> None:
    assert base.exposed_tcp(family, sockaddr) is exposed
