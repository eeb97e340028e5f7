"""The real `hvbridge` command line: check, --version, --help and start-up errors, as a process.

What needs no process (every user-error and usage-error line, exactly) is in test_cli.py.

Rules: localhost only (127.0.0.1 and files in tmp_path); port 0 or a port held by the test itself;
every test bounded by trio.fail_after and every loop bounded in count. Exit status 0 clean, 1 a
user error printed as `Error: ...` lines with no traceback, 2 bad usage (docs/reference.md, "Exit status").
"""

from __future__ import annotations

import socket
import tomllib
from typing import TYPE_CHECKING

import pytest
import trio
from support.processes import run_hvbridge
from support.tables import MISTAKES_TOML

from hvbridge import __version__

if TYPE_CHECKING:
    import subprocess
    from pathlib import Path

pytestmark = pytest.mark.slow


#: Problems in MISTAKES_TOML (test_cli.py checks each line in process).
MISTAKE_COUNT = 5


def _stderr_lines(done: subprocess.CompletedProcess[bytes]) -> list[str]:
    return done.stderr.decode().splitlines()


def _assert_user_error(done: subprocess.CompletedProcess[bytes], *, lines: int = 1) -> list[str]:
    """Exit 1 with exactly `lines` lines on stderr, each `Error: ...`, no traceback."""
    errors = _stderr_lines(done)
    assert done.returncode == 1, errors
    assert "Traceback" not in done.stderr.decode()
    assert len(errors) == lines, errors
    assert all(line.startswith("Error: ") for line in errors), errors
    return errors


async def test_check_prints_the_resolved_table_and_opens_nothing(tmp_path: Path) -> None:
    sock_path = tmp_path / "web.sock"
    path = tmp_path / "routes.toml"
    path.write_text(f"""\
[bridge]
log_format = "json"

[defaults]
connect_timeout = "2s"

[routes.ssh]
listen = "tcp://127.0.0.1:2222"
connect = "tcp://127.0.0.1:22"

[routes.web]
listen = "unix://{sock_path}"
connect = "vsock://3:8080"
idle_timeout = "5m"
""")
    with trio.fail_after(30):
        done = await run_hvbridge("check", "-c", str(path))
        assert done.returncode == 0, done.stderr.decode()
        assert done.stderr == b""
        printed = done.stdout.decode()
        table = tomllib.loads(printed)  # the resolved table is itself a route table...
        routes = table["routes"]
        assert (routes["ssh"]["listen"], routes["ssh"]["connect"]) == ("tcp://127.0.0.1:2222", "tcp://127.0.0.1:22")
        assert (routes["web"]["listen"], routes["web"]["connect"]) == (f"unix://{sock_path}", "vsock://3:8080")
        assert routes["ssh"]["connect_timeout"] == routes["web"]["connect_timeout"] == "2s"  # from [defaults]
        assert routes["web"]["idle_timeout"] == "5m"
        assert table["bridge"]["log_format"] == "json"
        resolved = tmp_path / "resolved.toml"
        resolved.write_text(printed)
        again = await run_hvbridge("check", "-c", str(resolved))  # ...that checks to itself
        assert again.returncode == 0, again.stderr.decode()
        assert again.stdout.decode() == printed
    assert not sock_path.exists(), "check created the Unix listener's socket file"


async def test_check_reads_toml_from_stdin() -> None:
    table = b'[routes.a]\nlisten = "tcp://127.0.0.1:0"\nconnect = "unix:///run/a.sock"\n'
    with trio.fail_after(30):
        done = await run_hvbridge("check", "-c", "-", stdin=table)
    assert done.returncode == 0, done.stderr.decode()
    assert "unix:///run/a.sock" in done.stdout.decode()


async def test_version() -> None:
    with trio.fail_after(30):
        done = await run_hvbridge("--version")
    assert done.returncode == 0
    assert done.stdout.decode() == f"hvbridge, version {__version__}\n"


async def test_help_on_every_command() -> None:
    commands = [[], ["run"], ["check"], ["forward"], ["connect"]]
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}

    async def one(command: list[str]) -> None:
        results[" ".join(command)] = await run_hvbridge(*command, "--help")

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for command in commands:
                nursery.start_soon(one, command)
    for name, done in results.items():
        assert done.returncode == 0, (name, done.stderr.decode())
        assert done.stdout.decode().startswith("Usage: "), (name, done.stdout.decode())
    assert "forward LISTEN CONNECT" in results[""].stdout.decode()


async def test_run_on_an_address_in_use_is_one_error_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        path = tmp_path / "routes.toml"
        path.write_text(f'[routes.a]\nlisten = "tcp://127.0.0.1:{port}"\nconnect = "tcp://127.0.0.1:1"\n')
        with trio.fail_after(30):
            done = await run_hvbridge("-c", str(path))
    [error] = _assert_user_error(done)
    assert f"tcp://127.0.0.1:{port}" in error
    assert "address already in use" in error


async def test_run_stops_when_any_route_cannot_listen(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        path = tmp_path / "routes.toml"
        path.write_text(f"""\
[routes.free]
listen = "unix://{tmp_path / "free.sock"}"
connect = "tcp://127.0.0.1:1"

[routes.taken]
listen = "tcp://127.0.0.1:{port}"
connect = "tcp://127.0.0.1:1"
""")
        with trio.fail_after(30):
            done = await run_hvbridge("run", "-c", str(path))
    lines = _stderr_lines(done)
    assert done.returncode == 1, lines
    assert "Traceback" not in done.stderr.decode()
    [error] = [line for line in lines if line.startswith("Error: ")]
    assert "address already in use" in error
    assert not (tmp_path / "free.sock").exists(), "the other route's socket file is left behind"


async def test_run_refuses_to_replace_a_file_that_is_not_a_socket(tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    with trio.fail_after(30):
        done = await run_hvbridge("forward", f"unix://{precious}", "tcp://127.0.0.1:1")
    [error] = _assert_user_error(done)
    assert str(precious) in error
    assert precious.read_text() == "keep me"


async def test_run_with_an_invalid_table_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(MISTAKES_TOML)
    with trio.fail_after(30):
        done = await run_hvbridge("-c", str(path))
    _assert_user_error(done, lines=MISTAKE_COUNT)


async def test_a_family_this_os_lacks_is_reported_naming_the_route(tmp_path: Path) -> None:
    if hasattr(socket, "AF_HYPERV"):
        pytest.skip("this OS has Hyper-V sockets")
    path = tmp_path / "routes.toml"
    path.write_text('[routes.vm]\nlisten = "tcp://127.0.0.1:0"\nconnect = "hvsock://my-vm/22"\n')
    with trio.fail_after(30):
        checked, ran = await run_hvbridge("check", "-c", str(path)), await run_hvbridge("-c", str(path))
    assert checked.returncode == 0, checked.stderr.decode()
    assert "routes.vm" in checked.stderr.decode()
    [error] = _assert_user_error(ran)
    assert "routes.vm" in error
    assert "AF_HYPERV" in error
