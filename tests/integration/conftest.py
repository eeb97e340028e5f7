"""Fixtures for the integration tests: hvbridge and helper servers as real child processes.

Rules (see support.py): loopback only (127.0.0.1, ::1, Unix sockets in tmp_path), port 0 with the
bound port read from the `listening` log line, every wait bounded by trio.fail_after, every loop
bounded in count. Every hvbridge a test starts is sent SIGTERM at teardown and must exit 0 within
a few seconds; the stderr of every child is printed at teardown, so a failing test shows it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from support.processes import START_TIMEOUT, STOP_TIMEOUT, LineReader, MiB, run_command

from .support import HttpServer, Processes, Sshd, free_port

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

SSHD = Path("/usr/sbin/sshd")


@pytest.fixture
async def processes(tmp_path: Path) -> AsyncIterator[Processes]:
    """Start hvbridge and helper processes; at teardown stop them, hvbridge must exit 0."""
    async with trio.open_nursery() as nursery:
        children = Processes(nursery, tmp_path)
        try:
            yield children
        finally:
            with trio.fail_after(4 * STOP_TIMEOUT):
                problems = await children.close()
            nursery.cancel_scope.deadline = trio.current_time() + STOP_TIMEOUT  # output readers
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
async def http_server(processes: Processes, tmp_path: Path) -> HttpServer:
    """An HTTP server on 127.0.0.1 (port 0) serving `file`: 3 MiB of random bytes."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "file").write_bytes(os.urandom(3 * MiB))
    server = await processes.daemon(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(root)],
        read="stdout",
    )
    with trio.fail_after(START_TIMEOUT):
        [line] = await server.output.wait_for(r"^Serving HTTP on 127\.0\.0\.1 port \d+ ")
    port = int(line.split(" port ")[1].split()[0])
    return HttpServer(f"tcp://127.0.0.1:{port}", root)


def _sshd_config(tmp_path: Path, port: int) -> str:
    return f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {tmp_path / "host_ed25519"}
AuthorizedKeysFile {tmp_path / "authorized_keys"}
PidFile none
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding no
X11Forwarding no
PrintMotd no
LogLevel INFO
"""


def _sshd_prerequisites() -> None:
    if not SSHD.is_file():
        pytest.skip(f"{SSHD} is missing: install openssh-server")
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing: install openssh-client")
    # The privilege separation directory; without root, sshd runs without privilege separation.
    with contextlib.suppress(PermissionError):
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)


def _has_line(reader: LineReader, text: str) -> bool:
    return any(text in line for line in reader.lines)


def _ended_or_has_line(reader: LineReader, text: str) -> bool:
    return reader.closed or _has_line(reader, text)


@pytest.fixture
async def sshd(processes: Processes, tmp_path: Path) -> Sshd:
    """`sshd -D -e` on 127.0.0.1 with its own host key and an authorized key made here."""
    _sshd_prerequisites()
    with trio.fail_after(START_TIMEOUT):
        for name in ("host_ed25519", "client_ed25519"):
            made = await run_command(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)])
            assert made.returncode == 0, made.stderr.decode()
    (tmp_path / "authorized_keys").write_bytes((tmp_path / "client_ed25519.pub").read_bytes())
    user = pwd.getpwuid(os.getuid()).pw_name
    config = tmp_path / "sshd_config"
    for _ in range(5):
        port = free_port()
        config.write_text(_sshd_config(tmp_path, port))
        server = await processes.daemon([str(SSHD), "-D", "-e", "-f", str(config)])
        ready = f"Server listening on 127.0.0.1 port {port}"
        with trio.fail_after(START_TIMEOUT):
            await server.output.wait_until(
                functools.partial(_ended_or_has_line, server.output, ready),
                "sshd to listen",
            )
        if _has_line(server.output, ready):
            return Sshd(port, user, tmp_path / "client_ed25519")
        await server.stop()
        if "Address already in use" not in server.output.text:
            pytest.fail(f"sshd did not start:\n{server.output.text}", pytrace=False)
    pytest.fail("sshd found no free port in 5 attempts", pytrace=False)
