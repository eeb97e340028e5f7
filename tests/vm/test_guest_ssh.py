"""`ssh vsock/1` in the micro-VM guest: sshd behind a vsock listener, through `hvbridge ssh-config`.

sshd listens on the guest's 127.0.0.1; `hvbridge forward vsock://any:22 tcp://...` puts it on
vsock port 22; ssh reads the block `hvbridge ssh-config` prints and reaches it as `vsock/1`
(CID 1: the vsock_loopback transport), handing the socket over (fd passing) or relaying.

Rules: see conftest.py (guest only; skipped elsewhere). The host never opens an AF_VSOCK socket.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio
from integration.conftest import processes, sshd
from support.processes import run_command, run_hvbridge

if TYPE_CHECKING:
    from pathlib import Path

    from integration.support import Processes, Sshd

pytestmark = [pytest.mark.vsock, pytest.mark.slow]
__all__ = ["processes", "sshd"]  # the fixtures this module takes from the integration suite


@pytest.mark.parametrize("fdpass", ["--fdpass", "--no-fdpass"])
async def test_ssh_vsock_1_logs_in_through_the_generated_config(
    processes: Processes, sshd: Sshd, tmp_path: Path, fdpass: str
) -> None:
    with trio.fail_after(300):
        relay = await processes.forward("vsock://any:22", f"tcp://127.0.0.1:{sshd.port}")
        done = await run_hvbridge("ssh-config", fdpass)
        assert done.returncode == 0, done.stderr.decode()
        config = tmp_path / "ssh_config"
        config.write_text(
            done.stdout.decode()
            + f"Host *\n    User {sshd.user}\n    IdentityFile {sshd.key}\n    IdentitiesOnly yes\n"
            f"    IdentityAgent none\n    BatchMode yes\n    StrictHostKeyChecking accept-new\n"
            f"    UserKnownHostsFile {tmp_path / 'known_hosts'}\n    GlobalKnownHostsFile /dev/null\n"
            "    ConnectTimeout 120\n    LogLevel ERROR\n"
        )
        login = await run_command(["ssh", "-F", str(config), "vsock/1", "echo logged in over vsock"])
        assert login.returncode == 0, login.stderr.decode()
        assert login.stdout == b"logged in over vsock\n"
        [closed] = await relay.wait_for_event("connection closed")
        assert closed.fields["peer"].startswith("vsock://1:"), closed
