"""Unmodified clients through the real `hvbridge`: curl, OpenSSH (ProxyCommand and a route), socat.

Rules: localhost only (127.0.0.1 and Unix sockets in tmp_path); port 0 everywhere except sshd,
which gets a port found free a moment before (retried on a clash); every test bounded by
trio.fail_after and every loop bounded in count. A test skips, saying why, only when its client
or server binary is missing (CI installs curl, socat, openssh-client and openssh-server).
"""

from __future__ import annotations

import os
import shlex
import shutil
from typing import TYPE_CHECKING

import pytest
import trio
from support.processes import MiB, hvbridge_argv, run_command

from .support import sha256, start_hash_server, tcp_port

if TYPE_CHECKING:
    from pathlib import Path

    from .support import HttpServer, Processes, Sshd

pytestmark = pytest.mark.slow


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (apt-get install {tool})")
    return path


async def test_curl_fetches_a_file_through_a_tcp_route(processes: Processes, http_server: HttpServer) -> None:
    curl = _need("curl")
    with trio.fail_after(30):
        relay = await processes.forward("tcp://127.0.0.1:0", http_server.endpoint)
        url = f"http://127.0.0.1:{tcp_port(relay.listening())}/file"
        done = await run_command([curl, "-sS", "--fail", "--max-time", "10", url])
        assert done.returncode == 0, done.stderr.decode()
        expected = (http_server.root / "file").read_bytes()
        assert (len(done.stdout), sha256(done.stdout)) == (len(expected), sha256(expected))
        [closed] = await relay.wait_for_event("connection closed")
        assert closed.fields["bytes_out"] != "0"
        assert closed.fields["reason"] in ("closed", "closed by client", "closed by backend"), closed


async def test_curl_fetches_a_file_through_a_unix_listener(
    processes: Processes, http_server: HttpServer, tmp_path: Path
) -> None:
    curl = _need("curl")
    with trio.fail_after(30):
        relay = await processes.forward(f"unix://{tmp_path / 'http.sock'}", http_server.endpoint)
        path = relay.listening().removeprefix("unix://")
        done = await run_command([curl, "-sS", "--fail", "--max-time", "10", "--unix-socket", path, "http://x/file"])
        assert done.returncode == 0, done.stderr.decode()
        assert sha256(done.stdout) == sha256((http_server.root / "file").read_bytes())


def _ssh_argv(sshd: Sshd, *options: str) -> list[str]:
    return [
        _need("ssh"),
        "-F",
        "/dev/null",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "IdentityAgent=none",
        "-o",
        "ConnectTimeout=15",
        "-o",
        "LogLevel=ERROR",
        "-i",
        str(sshd.key),
        *options,
    ]


async def _check_ssh_session(argv: list[str], tmp_path: Path) -> None:
    """Run `echo hello; sha256sum; cat FILE` remotely: 1 MiB up (stdin), 1 MiB down (FILE)."""
    upload = os.urandom(1 * MiB)
    download = tmp_path / "download.bin"
    download.write_bytes(os.urandom(1 * MiB))
    done = await run_command([*argv, f"echo hello; sha256sum; cat {shlex.quote(str(download))}"], stdin=upload)
    assert done.returncode == 0, done.stderr.decode()
    hello, digest, rest = done.stdout.split(b"\n", 2)
    assert hello == b"hello"
    assert digest.decode() == f"{sha256(upload).hex()}  -"
    assert sha256(rest) == sha256(download.read_bytes())
    assert b"Traceback" not in done.stderr


async def test_ssh_with_hvbridge_connect_as_proxycommand(sshd: Sshd, tmp_path: Path) -> None:
    proxy = f"{shlex.join(hvbridge_argv())} connect tcp://127.0.0.1:{sshd.port}"
    with trio.fail_after(60):
        await _check_ssh_session(_ssh_argv(sshd, "-o", f"ProxyCommand={proxy}", f"{sshd.user}@dummy"), tmp_path)


async def test_ssh_through_a_forward_route(processes: Processes, sshd: Sshd, tmp_path: Path) -> None:
    with trio.fail_after(60):
        relay = await processes.forward("tcp://127.0.0.1:0", f"tcp://127.0.0.1:{sshd.port}")
        port = tcp_port(relay.listening())
        await _check_ssh_session(_ssh_argv(sshd, "-p", str(port), f"{sshd.user}@127.0.0.1"), tmp_path)
        [closed] = await relay.wait_for_event("connection closed")
        assert int(closed.fields["bytes_in"]) > 1 * MiB
        assert int(closed.fields["bytes_out"]) > 1 * MiB


@pytest.mark.parametrize("listen", ["tcp", "unix"])
async def test_socat_as_a_client(processes: Processes, nursery: trio.Nursery, tmp_path: Path, listen: str) -> None:
    socat = _need("socat")
    with trio.fail_after(30):
        server = await start_hash_server(nursery, "tcp", "echo")
        if listen == "tcp":
            relay = await processes.forward("tcp://127.0.0.1:0", server.endpoint)
            address = f"TCP:127.0.0.1:{tcp_port(relay.listening())}"
        else:
            relay = await processes.forward(f"unix://{tmp_path / 'socat.sock'}", server.endpoint)
            address = f"UNIX-CONNECT:{relay.listening().removeprefix('unix://')}"
        data = os.urandom(8 * MiB)
        # -t 10: after stdin's EOF, wait up to 10 s (not the default 0.5 s) for the rest of the echo.
        done = await run_command([socat, "-b", "65536", "-t", "10", "-", address], stdin=data)
        assert done.returncode == 0, done.stderr.decode()
        assert (len(done.stdout), sha256(done.stdout)) == (len(data), sha256(data))
        result = await server.result()
        assert (result.received, result.received_sha256) == (len(data), sha256(data))
        [closed] = await relay.wait_for_event("connection closed")
        assert (closed.fields["bytes_in"], closed.fields["bytes_out"], closed.fields["reason"]) == (
            str(len(data)),
            str(len(data)),
            "closed",
        )
