"""The real `hvbridge` command line: check, --version, --help, usage errors and start-up errors.

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

from hvbridge import __version__

from .support import run_hvbridge

if TYPE_CHECKING:
    import subprocess
    from pathlib import Path

pytestmark = pytest.mark.slow

MISTAKES_TOML = """\
[bridge]
log_level = "loud"

[defaults]
conect_timeout = "5s"

[routes.ssh]
listen = "tcp://127.0.0.1:70000"
connect = "tcp://127.0.0.1:22"
idle_timeout = "soon"

[routes.web]
listen = "tcp://127.0.0.1:8080"
connect = "tcp://127.0.0.1:80"

[routes.web2]
listen = "tcp://127.0.0.1:8080"
connect = "tcp://127.0.0.1:81"
"""

MISTAKES_YAML = """\
bridge:
  log_level: loud
defaults:
  conect_timeout: 5s
routes:
  ssh:
    listen: tcp://127.0.0.1:70000
    connect: tcp://127.0.0.1:22
    idle_timeout: soon
  web:
    listen: tcp://127.0.0.1:8080
    connect: tcp://127.0.0.1:80
  web2:
    listen: tcp://127.0.0.1:8080
    connect: tcp://127.0.0.1:81
"""

#: Each mistake above: where it is, a word its message must contain, its TOML and YAML lines.
MISTAKES = {
    "bridge.log_level": ("loud", 2, 2),
    "defaults.conect_timeout": ("did you mean 'connect_timeout'", 5, 4),
    "routes.ssh.listen": ("70000", 8, 7),
    "routes.ssh.idle_timeout": ("soon", 10, 9),
    "routes.web2.listen": ("tcp://127.0.0.1:8080", 17, 14),
}


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


@pytest.mark.parametrize(("name", "text"), [("routes.toml", MISTAKES_TOML), ("routes.yaml", MISTAKES_YAML)])
async def test_check_lists_every_mistake_in_one_run(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with trio.fail_after(30):
        done = await run_hvbridge("check", "-c", str(path))
    errors = _assert_user_error(done, lines=len(MISTAKES))
    assert done.stdout == b""
    yaml = name.endswith(".yaml")
    for location, (word, toml_line, yaml_line) in MISTAKES.items():
        found = [line for line in errors if f": {location}: " in line]
        assert len(found) == 1, (location, errors)
        assert found[0].startswith(f"Error: {path}:{yaml_line if yaml else toml_line}: {location}: "), found
        assert word in found[0], found


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


async def test_check_of_a_missing_file_is_one_error_line(tmp_path: Path) -> None:
    with trio.fail_after(30):
        done = await run_hvbridge("check", "-c", str(tmp_path / "nothing-here.toml"))
    [error] = _assert_user_error(done)
    assert "nothing-here.toml" in error


async def test_check_of_broken_toml_syntax_is_one_error_line_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text('[routes.a]\nlisten = "tcp://127.0.0.1:0"\nconnect = \n')
    with trio.fail_after(30):
        done = await run_hvbridge("check", "-c", str(path))
    [error] = _assert_user_error(done)
    assert error.startswith(f"Error: {path}:3"), error


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


BAD_USAGE = [
    ["frobnicate"],
    ["--no-such-option"],
    ["forward", "tcp://127.0.0.1:0"],
    ["forward", "tcp://127.0.0.1:0", "tcp://127.0.0.1:1", "--max-connections", "lots"],
    ["run", "-c", "routes.toml", "--log-format", "xml"],
]


async def test_bad_usage_exits_2_with_a_usage_message() -> None:
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}

    async def one(args: list[str]) -> None:
        results[" ".join(args)] = await run_hvbridge(*args)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for args in BAD_USAGE:
                nursery.start_soon(one, args)
    for name, done in results.items():
        stderr = done.stderr.decode()
        assert done.returncode == 2, (name, stderr)
        assert "Traceback" not in stderr, name
        assert "Usage: " in stderr, (name, stderr)
        assert [line for line in stderr.splitlines() if line.startswith("Error: ")], (name, stderr)


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
    _assert_user_error(done, lines=len(MISTAKES))


async def test_forward_with_a_bad_endpoint_is_a_user_error() -> None:
    with trio.fail_after(30):
        done = await run_hvbridge("forward", "tcp://127.0.0.1:99999", "tcp://127.0.0.1:1")
    [error] = _assert_user_error(done)
    assert "99999" in error


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
