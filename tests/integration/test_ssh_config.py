"""`ssh unix/PATH` through the block `hvbridge ssh-config` prints, with the real OpenSSH client and server.

sshd listens on 127.0.0.1; the real `hvbridge forward` relays a Unix socket in tmp_path to it;
ssh reads only the generated config (plus key and known_hosts lines) and reaches sshd through
`hvbridge connect unix/PATH 22`, relaying or handing ssh the socket (ProxyUseFdpass).

Rules: localhost only; every test bounded by trio.fail_after and every loop bounded in count;
skips, saying why, only when OpenSSH is missing (CI installs openssh-client and openssh-server).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from support.processes import START_TIMEOUT, run_hvbridge

if TYPE_CHECKING:
    from .support import Processes, Sshd

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="fd passing and /proc: Linux")]


def _children(pid: int) -> list[str]:
    """The command lines of the processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # exited meanwhile
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == pid:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


async def _write_config(tmp_path: Path, sshd: Sshd, *options: str) -> Path:
    done = await run_hvbridge("ssh-config", *options)
    assert done.returncode == 0, done.stderr.decode()
    config = tmp_path / "ssh_config"
    config.write_text(
        done.stdout.decode()
        + f"""\
Host *
    User {sshd.user}
    IdentityFile {sshd.key}
    IdentitiesOnly yes
    IdentityAgent none
    BatchMode yes
    StrictHostKeyChecking accept-new
    UserKnownHostsFile {tmp_path / "known_hosts"}
    GlobalKnownHostsFile /dev/null
    LogLevel ERROR
"""
    )
    return config


@pytest.mark.parametrize("fdpass", [True, False], ids=["fdpass", "relay"])
async def test_ssh_unix_path_logs_in_through_the_generated_config(
    processes: Processes, sshd: Sshd, tmp_path: Path, fdpass: bool
) -> None:
    with trio.fail_after(60):
        sock = tmp_path / "sshd.sock"
        await processes.forward(f"unix://{sock}", f"tcp://127.0.0.1:{sshd.port}")
        config = await _write_config(tmp_path, sshd, "--fdpass" if fdpass else "--no-fdpass")
        assert ("ProxyUseFdpass yes" in config.read_text()) == fdpass
        host = f"unix{sock}"  # ssh lowercases host names: tmp_path has no capitals
        assert host == host.lower()
        ssh = await trio.lowlevel.open_process(
            ["ssh", "-F", str(config), host, "echo ready; cat"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert ssh.stdin is not None
        assert ssh.stdout is not None
        assert ssh.stderr is not None
        try:
            with trio.fail_after(START_TIMEOUT):
                received = b""
                for _ in range(1000):
                    piece = await ssh.stdout.receive_some()
                    received += piece
                    if b"ready\n" in received or not piece:
                        break
            errors = b"" if b"ready\n" in received else await ssh.stderr.receive_some()
            assert received == b"ready\n", errors.decode()
            children = _children(ssh.pid)
            if fdpass:
                # ssh holds the socket itself: the ProxyCommand has exited.
                assert children == [], children
            else:
                assert len(children) == 1
                assert f" connect {host} 22" in children[0], children
            await ssh.stdin.send_all(b"over the socket\n")
            assert await ssh.stdout.receive_some() == b"over the socket\n"
            await ssh.stdin.aclose()
            assert await ssh.wait() == 0
        finally:
            if ssh.returncode is None:
                ssh.kill()
                await ssh.wait()
    # The host key is remembered under the name ssh was given.
    assert (tmp_path / "known_hosts").read_text().startswith(f"{host} ")


async def test_ssh_config_names_every_host_form_and_the_port() -> None:
    with trio.fail_after(30):
        done = await run_hvbridge("ssh-config", "--fdpass")
    assert done.returncode == 0, done.stderr.decode()
    lines = done.stdout.decode().splitlines()
    assert "Host vsock/* vsock-mux/* hvsock/* unix/*" in lines
    proxy = next(line for line in lines if line.strip().startswith("ProxyCommand "))
    assert proxy.endswith(" connect --fdpass %h %p")
    command = proxy.split("ProxyCommand ", 1)[1].split(" connect ")[0]
    assert Path(command.split()[0]).is_file(), command  # noqa: ASYNC240 - a stat, once
