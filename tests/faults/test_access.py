"""Who may connect (docs/reference.md, "Who may connect"): allow lists, Unix listener files, exposure warnings.

Runs the real hvbridge process. TCP allow lists are checked for IPv4 and IPv6 CIDRs, accepting
and rejecting, and for rules written in IPv4-mapped IPv6 form. Unix listener files must get the
configured mode whatever the umask, and a regular file, a directory, a symlink or a live socket
at a listen path is never deleted or followed. vsock `cid:N` rules are exercised inside the
micro-VM (tests/vm/) and hvsock `vm:GUID` rules by unit tests, since neither transport exists on
this host.

Rules: loopback only (127.0.0.1, 127.0.0.2, ::1 and Unix sockets in tmp_path; the one 0.0.0.0
listener exists for a moment to check its warning and is reached through 127.0.0.1), port 0,
bounded by trio.fail_after and loop counts; times are never asserted.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from typing import TYPE_CHECKING, Final, Literal

import pytest
import trio
from support.processes import run_hvbridge

from .harness import probe_closed, roundtrip, start_backend

if TYPE_CHECKING:
    from pathlib import Path

    from .harness import Launcher

pytestmark = pytest.mark.slow

TIMEOUT: Final = 60.0


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this host")


async def expect_refused(hv_listen: str, *, source: str | None = None) -> None:
    """A client from `source` is closed at once without a byte (EOF or reset)."""
    got = await probe_closed(hv_listen, source=source)
    assert got.size == 0
    assert got.ending in ("eof", "reset"), got


async def test_allow_ipv4_cidrs(hvbridge: Launcher, nursery: trio.Nursery) -> None:
    """Only peers inside the IPv4 CIDRs get through; the others are closed, logged, never connected."""
    with trio.fail_after(TIMEOUT):
        backend = await start_backend(nursery, "tcp")
        hv = await hvbridge.forward(
            "tcp://127.0.0.1:0", backend.endpoint, "--allow", "127.0.0.2/32", "--allow", "10.0.0.0/8"
        )
        listen = hv.listening()
        await expect_refused(listen, source="127.0.0.1")
        [line] = await hv.wait_for(r'WARNING connection closed .*reason="refused by allow list"')
        assert " peer=tcp://127.0.0.1:" in line
        assert backend.accepted == 0

        await roundtrip(listen, source="127.0.0.2")
        assert backend.accepted == 1
        await expect_refused(listen, source="127.0.0.3")
        await hv.wait_for(r'reason="refused by allow list"', count=2)
        assert backend.accepted == 1


@needs_ipv6
async def test_allow_ipv6_cidrs(hvbridge: Launcher, nursery: trio.Nursery) -> None:
    """IPv6 rules admit ::1; a route whose rules do not cover ::1 refuses it."""
    with trio.fail_after(TIMEOUT):
        backend = await start_backend(nursery, "tcp6")
        table = f"""
[routes.admit]
listen = "tcp://[::1]:0"
connect = "{backend.endpoint}"
allow = ["::1/128", "fd00::/8"]

[routes.refuse]
listen = "tcp://[::1]:0"
connect = "{backend.endpoint}"
allow = ["127.0.0.0/8", "fd00::/8", "::2/128"]
"""
        hv = await hvbridge.run_table(table, listeners=2)
        await roundtrip(hv.listening("admit"))
        await expect_refused(hv.listening("refuse"))
        [line] = await hv.wait_for(r'connection closed route=refuse .*reason="refused by allow list"')
        assert " peer=tcp://[::1]:" in line
        assert backend.accepted == 1


async def test_allow_ipv4_mapped_rules(hvbridge: Launcher, nursery: trio.Nursery) -> None:
    """A rule written as ::ffff:127.0.0.2 means the IPv4 peer 127.0.0.2 and nothing else.

    hvbridge's own IPv6 listeners are IPV6_V6ONLY (trio sets it), so IPv4 clients always arrive
    as AF_INET peers; an IPv4-mapped rule must still match them, or it silently admits no one.
    """
    with trio.fail_after(TIMEOUT):
        backend = await start_backend(nursery, "tcp")
        hv = await hvbridge.forward("tcp://127.0.0.1:0", backend.endpoint, "--allow", "::ffff:127.0.0.2/128")
        listen = hv.listening()
        await roundtrip(listen, source="127.0.0.2")
        await expect_refused(listen, source="127.0.0.1")
        await hv.wait_for(r'reason="refused by allow list"')
        assert backend.accepted == 1


@pytest.mark.parametrize(("options", "expected"), [((), 0o600), (("--mode", "0660"), 0o660)])
async def test_unix_listener_mode(
    hvbridge: Launcher, nursery: trio.Nursery, tmp_path: Path, options: tuple[str, ...], expected: int
) -> None:
    """The Unix listener file gets the configured mode (0600 by default), whatever the umask."""
    with trio.fail_after(TIMEOUT):
        backend = await start_backend(nursery, "tcp")
        path = tmp_path / "listen.sock"
        old_umask = os.umask(0)  # hvbridge inherits it: the mode must not come from the umask
        try:
            hv = await hvbridge.forward(f"unix://{path}", backend.endpoint, *options)
        finally:
            os.umask(old_umask)
        assert hv.listening() == f"unix://{path}"
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == expected
        await roundtrip(f"unix://{path}")


def snapshot(directory: Path) -> dict[str, tuple[int, int, str | bytes | None]]:
    """Every entry under `directory`: inode, mode, and the content of files or target of links."""
    entries: dict[str, tuple[int, int, str | bytes | None]] = {}
    for path in directory.rglob("*"):
        st = os.lstat(path)
        content: str | bytes | None = None
        if stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            content = path.read_bytes()
        entries[str(path.relative_to(directory))] = (st.st_ino, st.st_mode, content)
    return entries


Obstacle = Literal["file", "directory", "symlink to a file", "dangling symlink", "symlink to a directory"]


@pytest.mark.parametrize(
    "obstacle", ["file", "directory", "symlink to a file", "dangling symlink", "symlink to a directory"]
)
async def test_unix_listen_path_never_deleted_or_followed(tmp_path: Path, obstacle: Obstacle) -> None:
    """Anything but a socket at the listen path: exit 1, one `Error:` line, nothing touched."""
    path = tmp_path / "listen.sock"
    target = tmp_path / "target"
    if obstacle == "file":
        path.write_bytes(b"precious\n")
    elif obstacle == "directory":
        path.mkdir()
        (path / "inside").write_bytes(b"precious\n")
    elif obstacle == "symlink to a file":
        target.write_bytes(b"precious\n")
        path.symlink_to(target)
    elif obstacle == "dangling symlink":
        path.symlink_to(target)  # following it would create a socket at `target`
    else:
        target.mkdir()
        path.symlink_to(target)
    before = snapshot(tmp_path)

    with trio.fail_after(TIMEOUT):
        result = await run_hvbridge("forward", f"unix://{path}", "tcp://127.0.0.1:9")
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    kind = "a symlink" if "symlink" in obstacle else "not a socket"
    assert re.fullmatch(rf"Error: listen unix://{re.escape(str(path))}: .*{kind}.*\n", stderr), stderr
    assert snapshot(tmp_path) == before
    if obstacle == "dangling symlink":
        assert target.name not in before  # and so, as nothing changed, not created by following
    if "symlink" in obstacle:
        assert before[path.name][2] == str(target)


async def test_unix_listen_path_live_socket_is_kept(tmp_path: Path) -> None:
    """A socket someone listens on is not taken over: exit 1, and the other listener keeps working."""
    path = tmp_path / "listen.sock"
    other = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with other:
        await other.bind(str(path))
        other.listen(4)
        with trio.fail_after(TIMEOUT):
            result = await run_hvbridge("forward", f"unix://{path}", "tcp://127.0.0.1:9")
            stderr = result.stderr.decode()
            assert result.returncode == 1, stderr
            assert re.fullmatch(rf"Error: listen unix://{re.escape(str(path))}: another process .*\n", stderr)
            client = await trio.open_unix_socket(str(path))
            accepted, _ = await other.accept()
            accepted.close()
            await client.aclose()


async def test_unix_listen_path_stale_socket_is_replaced(
    hvbridge: Launcher, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A socket file nobody listens on (left by a crash) is replaced."""
    path = tmp_path / "listen.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, with no listener behind it
    with trio.fail_after(TIMEOUT):
        backend = await start_backend(nursery, "tcp")
        await hvbridge.forward(f"unix://{path}", backend.endpoint)
        await roundtrip(f"unix://{path}")


@pytest.mark.parametrize("allow", [False, True])
async def test_non_loopback_listener_warns_without_allow(
    hvbridge: Launcher, nursery: trio.Nursery, allow: bool
) -> None:
    """Listening on 0.0.0.0 with no allow list works but logs one warning; with a list, none."""
    with trio.fail_after(TIMEOUT):
        backend = await start_backend(nursery, "tcp")
        options = ("--allow", "127.0.0.1/32") if allow else ()
        hv = await hvbridge.forward("tcp://0.0.0.0:0", backend.endpoint, *options)
        listen = hv.listening()
        assert listen.startswith("tcp://0.0.0.0:")
        port = int(listen.rpartition(":")[2])
        await roundtrip(f"tcp://127.0.0.1:{port}")
        warnings = hv.matching(r" WARNING ")
        if allow:
            assert warnings == []
        else:
            [line] = warnings
            assert re.search(
                rf"WARNING listening on a non-loopback address with no allow list; .* route=forward listen={listen}$",
                line,
            ), line


async def test_refused_peer_gets_no_backend_connection(hvbridge: Launcher, nursery: trio.Nursery) -> None:
    """A refused peer's bytes never reach the backend, even sent before the check."""
    with trio.fail_after(TIMEOUT):
        backend = await start_backend(nursery, "tcp")
        hv = await hvbridge.forward("tcp://127.0.0.1:0", backend.endpoint, "--allow", "127.0.0.2/32")
        got = await probe_closed(hv.listening(), send=b"GET / HTTP/1.0\r\n\r\n")
        assert got.size == 0
        await hv.wait_for(r'reason="refused by allow list"')
        assert backend.accepted == 0
