"""The relays under test: how to start each in front of the benchmark server, and measure it.

Every relay listens on loopback (a free TCP port or a Unix path in the run's directory) and
forwards to the benchmark server. `direct` is no relay at all: the client talks to the server.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from peer import Address

Family = Literal["tcp", "unix"]
#: How to start each hvbridge variant; {python} and {config} are filled in. `-q`: no log line
#: per connection (socat and HAProxy as configured here log nothing either).
HVBRIDGE_COMMANDS: Final = {
    "hvbridge": "{python} -m hvbridge run -q -c {config}",
    # --workers 2: two relay processes share the listening socket (the connection-rate target).
    "hvbridge-2w": "{python} -m hvbridge run --workers 2 -q -c {config}",
    # The recv_into path for every connection: what the splice fast path wins.
    "hvbridge-recv": (
        "{python} -c 'import sys, hvbridge.relay.splice; hvbridge.relay.splice.enabled = False;"
        ' sys.argv[0] = "hvbridge"; from hvbridge.cli import main; main()\' run -q -c {config}'
    ),
}
RELAYS: Final = ("direct", *HVBRIDGE_COMMANDS, "socat", "haproxy", "haproxy-splice")
#: Relays only run when asked for with --relays: `python-floor` (floor.py) is the least a
#: Python relay does per connection, for the connection-rate test only.
EXTRA_RELAYS: Final = ("python-floor",)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_connectable(address: Address, process: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    """Wait until `address` accepts a connection (and say why not if the process died)."""
    deadline = time.monotonic() + timeout
    while True:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(address)
                probe.sendall(b"ECHO\n")  # a clean, valid connection for the server
                return
            except OSError:
                pass
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"relay exited with status {process.returncode}; see its log")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing accepts on {address} after {timeout:g}s")
        time.sleep(0.05)


def tree_pss_kib(pid: int) -> int:
    """Proportional set size (KiB) of `pid` and all its descendants (socat forks per connection)."""
    total = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
            for task in Path(f"/proc/{current}/task").iterdir():
                stack.extend(int(child) for child in (task / "children").read_text().split())
    return total


def stop_relay(process: subprocess.Popen[bytes] | subprocess.Popen[str], listen: object, *, timeout: float) -> None:
    """Terminate a relay process (kill it after `timeout` s) and remove its Unix socket file, if any."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if isinstance(listen, str):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listen)


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of `pid`, its live descendants and its reaped children."""
    ticks = 0
    stack = [(pid, True)]
    while stack:
        current, root = stack.pop()
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{current}/stat").read_text().rpartition(")")[2].split()
            # Fields 14-17 of stat(5), counted after the ")" that ends the command name.
            ticks += int(fields[11]) + int(fields[12])
            if root:
                ticks += int(fields[13]) + int(fields[14])
            for task in Path(f"/proc/{current}/task").iterdir():
                stack.extend((int(child), False) for child in (task / "children").read_text().split())
    return ticks / os.sysconf("SC_CLK_TCK")


class Relay:
    """One relay process in front of the benchmark server, for one address family."""

    def __init__(self, name: str, family: Family, server: Address, workdir: Path, hvbridge_command: str) -> None:
        """`hvbridge_command` starts relays whose name begins with `hvbridge` (variants)."""
        self.name = name
        self.family = family
        self.server = server
        self.workdir = workdir
        self.hvbridge_command = hvbridge_command
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{name}-{family}.log"
        self.listen: Address = server
        if name != "direct":
            self.listen = str(workdir / f"{name}.sock") if family == "unix" else ("127.0.0.1", free_port())

    def __enter__(self) -> Relay:
        if self.name == "direct":
            return self
        argv = self._argv()
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        wait_connectable(self.listen, self.process)
        self.settle()  # workers may still be starting: imports cost CPU
        return self

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until the relay's processes stop using CPU (startup, tearing down connections)."""
        deadline = time.monotonic() + timeout
        cpu = self.cpu_seconds()
        while time.monotonic() < deadline:
            time.sleep(0.3)
            cpu, before = self.cpu_seconds(), cpu
            if cpu - before < 0.02:
                return

    def __exit__(self, *exc_info: object) -> None:
        if self.process is None:
            return
        # socat's per-connection children may outlive their parent for a moment.
        stop_relay(self.process, self.listen, timeout=10)

    @property
    def pid(self) -> int | None:
        """The relay's process id (None for direct)."""
        return self.process.pid if self.process is not None else None

    def memory_kib(self) -> int:
        """PSS of the relay's process tree, KiB."""
        assert self.pid is not None
        return tree_pss_kib(self.pid)

    def cpu_seconds(self) -> float:
        """CPU time the relay has used so far (0 for direct)."""
        return tree_cpu_seconds(self.pid) if self.pid is not None else 0.0

    def _endpoint(self, address: Address, scheme: Literal["hvbridge", "socat-listen", "socat-connect"]) -> str:
        if isinstance(address, str):
            return {
                "hvbridge": f"unix://{address}",
                "socat-listen": f"UNIX-LISTEN:{address},fork,backlog=4096",
                "socat-connect": f"UNIX-CONNECT:{address}",
            }[scheme]
        host, port = address
        return {
            "hvbridge": f"tcp://{host}:{port}",
            "socat-listen": f"TCP-LISTEN:{port},bind={host},reuseaddr,fork,backlog=4096,nodelay",
            "socat-connect": f"TCP:{host}:{port},nodelay",
        }[scheme]

    def _argv(self) -> list[str]:
        if self.name.startswith("hvbridge"):
            config = self.workdir / f"{self.name}-{self.family}.toml"
            config.write_text(
                "[defaults]\nmax_connections = 10000\n\n[routes.bench]\n"
                f'listen = "{self._endpoint(self.listen, "hvbridge")}"\n'
                f'connect = "{self._endpoint(self.server, "hvbridge")}"\n'
            )
            command = self.hvbridge_command.format(python=shlex.quote(sys.executable), config=shlex.quote(str(config)))
            return shlex.split(command)
        if self.name == "python-floor":
            return [
                sys.executable,
                str(Path(__file__).with_name("floor.py")),
                *map(_floor_address, (self.listen, self.server)),
            ]
        if self.name == "socat":
            return [
                "socat",
                "-b",
                "262144",
                "-t",
                "10",
                self._endpoint(self.listen, "socat-listen"),
                self._endpoint(self.server, "socat-connect"),
            ]
        if self.name.startswith("haproxy"):
            config = self.workdir / f"{self.name}-{self.family}.cfg"
            config.write_text(self._haproxy_config())
            return ["haproxy", "-db", "-f", str(config)]
        raise ValueError(self.name)

    def _haproxy_config(self) -> str:
        if isinstance(self.listen, str):
            bind = f"bind {self.listen} mode 600"
        else:
            bind = f"bind {self.listen[0]}:{self.listen[1]}"
        if isinstance(self.server, str):
            server = f"server s {self.server}"
        else:
            server = f"server s {self.server[0]}:{self.server[1]}"
        # 9,900 connections take 19,800 descriptors of the 20,000 a process may have here; the
        # splice variant's pipes (2 descriptors each, pooled) must fit in what is left.
        splice = "    option splice-auto\n" if self.name == "haproxy-splice" else ""
        return (
            "global\n"
            "    maxconn 9900\n"
            "    maxpipes 32\n"
            "defaults\n"
            "    mode tcp\n"
            "    maxconn 9900\n"
            "    timeout connect 5s\n"
            "    timeout client 1h\n"
            "    timeout server 1h\n"
            f"{splice}"
            "frontend bench\n"
            f"    {bind}\n"
            "    default_backend server\n"
            "backend server\n"
            f"    {server}\n"
        )


def _floor_address(address: Address) -> str:
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"
