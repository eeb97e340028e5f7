"""The main command group: `hvbridge -c FILE` is `hvbridge run -c FILE`, and user errors are one line each.

Driven in-process with click's CliRunner; nothing here opens a socket.
"""

from __future__ import annotations

import errno
import os
import signal
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing
from click.testing import CliRunner
from support.tables import MISTAKES_TOML, MISTAKES_YAML

from hvbridge import __version__
from hvbridge.addresses import TcpAddress
from hvbridge.cli import _connect_stdio, _interrupted, _open_target, _StdioSides, main
from hvbridge.errors import EndpointError
from hvbridge.routes import RouteOptions

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.parametrize(
    "args",
    [
        ["-c", "{missing}"],
        ["--config", "{missing}"],
        ["--config={missing}"],
        ["-v", "-c", "{missing}"],
        ["-q", "--log-format", "json", "-c", "{missing}"],
        ["run", "-c", "{missing}"],
    ],
)
def test_leading_options_mean_run(runner: CliRunner, tmp_path: Path, args: list[str]) -> None:
    missing = tmp_path / "routes.toml"
    result = runner.invoke(main, [a.format(missing=missing) for a in args])
    # Reaching load_config (a user error, exit 1) proves the arguments were routed to `run`.
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [f"Error: {missing}: no such file; expected the path of a route table file"]


def test_version_and_help_stay_with_the_group(runner: CliRunner) -> None:
    assert runner.invoke(main, ["--version"]).output == f"hvbridge, version {__version__}\n"
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "hvbridge forward LISTEN CONNECT" in result.output


def test_an_unknown_option_is_a_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--no-such-option"])
    assert result.exit_code == 2


_BOGUS_LISTEN = (
    "Error: LISTEN: unknown endpoint 'bogus'; expected one of: tcp://HOST:PORT,"
    " unix:///PATH, unix:@NAME, vsock://CID:PORT, hvsock://VM/SERVICE, vsock-mux:///PATH:PORT, stdio"
)


@pytest.mark.parametrize(
    "args",
    [
        ["-q", "forward", "bogus", "tcp://127.0.0.1:1"],
        ["-v", "forward", "bogus", "tcp://127.0.0.1:1"],
        ["-vv", "--log-format", "json", "forward", "bogus", "tcp://127.0.0.1:1"],
        ["--log-format=json", "-q", "forward", "bogus", "tcp://127.0.0.1:1"],
        ["forward", "bogus", "tcp://127.0.0.1:1", "-q", "--log-format", "text"],
        ["forward", "bogus", "tcp://127.0.0.1:1", "--idle-timeout", "30", "--connect-timeout", "2"],
    ],
)
def test_log_options_before_or_after_the_command(runner: CliRunner, args: list[str]) -> None:
    result = runner.invoke(main, args)
    # Reaching the route's validation (exit 1) proves `forward` got its arguments and options.
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [_BOGUS_LISTEN]


@pytest.mark.parametrize(
    "args",
    [
        ["-q", "run", "-c", "{missing}"],
        ["run", "-c", "{missing}", "-v"],
        ["-c", "{missing}", "check"],
        ["-v", "check", "-c", "{missing}"],
        ["--log-format", "json", "-q", "probe", "-c", "{missing}"],
        ["-v", "-c", "{missing}", "run", "--watch"],
        ["--config={missing}", "probe"],
    ],
)
def test_config_and_log_options_before_the_command(runner: CliRunner, tmp_path: Path, args: list[str]) -> None:
    missing = tmp_path / "routes.toml"
    result = runner.invoke(main, [a.format(missing=missing) for a in args])
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [f"Error: {missing}: no such file; expected the path of a route table file"]


def test_help_lists_every_command_with_its_whole_summary(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--help"], terminal_width=80)
    assert result.exit_code == 0
    commands = result.output.split("Commands:\n")[1].splitlines()
    assert [line.split()[0] for line in commands] == sorted(main.commands)
    assert not any(line.endswith("...") for line in commands)
    for name, command in main.commands.items():
        assert f"{name}  " in result.output
        assert command.short_help is not None
        assert command.short_help in result.output
    assert "hvbridge probe -c routes.toml" in result.output
    assert "hvbridge hyperv guid 22" in result.output


def test_hyperv_help_summaries_are_whole(runner: CliRunner) -> None:
    result = runner.invoke(main, ["hyperv", "--help"], terminal_width=80)
    assert result.exit_code == 0
    assert not any(line.endswith("...") for line in result.output.split("Commands:\n")[1].splitlines())


@pytest.mark.parametrize(
    ("command", "option"),
    [("forward", "--connect-timeout"), ("forward", "--idle-timeout"), ("connect", "--connect-timeout")],
)
def test_duration_options_show_a_metavar_and_an_example(runner: CliRunner, command: str, option: str) -> None:
    result = runner.invoke(main, [command, "--help"], terminal_width=200)
    line = next(line for line in result.output.splitlines() if line.strip().startswith(option))
    assert f"{option} DURATION" in line
    assert "(e.g. 5s, 500ms, 2)" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["forward", "tcp://127.0.0.1:0", "tcp://127.0.0.1:1", "--idle-timeout", "soon"],
            "Error: Invalid value for '--idle-timeout': 'soon' is not a duration; expected e.g. 5s, 500ms, 2 (seconds)",
        ),
        (
            ["connect", "tcp://127.0.0.1:1", "--connect-timeout", "0"],
            "Error: Invalid value for '--connect-timeout': '0' is no time;"
            " expected a duration greater than 0, e.g. 5s, 500ms, 2",
        ),
    ],
)
def test_a_bad_duration_option_is_a_usage_error(runner: CliRunner, args: list[str], message: str) -> None:
    result = runner.invoke(main, args)
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == message


@pytest.mark.parametrize(
    ("args", "lines"),
    [
        (
            ["forward", "tcp://127.0.0.1:0", "tcp://127.0.0.1:1", "--mode", "0660"],
            ["Error: --mode: mode applies only to unix listeners; remove it, or listen on unix:///PATH"],
        ),
        (
            ["forward", "unix:@x", "tcp://127.0.0.1:1", "--mode", "0660"],
            [
                "Error: --mode: mode cannot apply to an abstract socket (unix:@NAME has no file);"
                " remove it, or listen on unix:///PATH"
            ],
        ),
        (
            ["forward", "unix:///run/x.sock", "tcp://127.0.0.1:1", "--mode", "rw", "--allow", "10.0.0.0/8"],
            [
                "Error: --mode: got 'rw'; expected a quoted string of octal digits 0000..0777, such as \"0660\"",
                "Error: --allow: allow does not apply to a unix listener;"
                " unix listeners are guarded by mode/owner/group",
            ],
        ),
        (
            ["forward", "tcp://127.0.0.1:0", "nowhere", "--max-connections", "0"],
            [
                "Error: --max-connections: got 0; expected an integer 1..1000000",
                "Error: CONNECT: unknown endpoint 'nowhere'; expected one of: tcp://HOST:PORT, unix:///PATH,"
                " unix:@NAME, vsock://CID:PORT, hvsock://VM/SERVICE, vsock-mux:///PATH:PORT, stdio",
            ],
        ),
        (
            ["forward", "tcp://127.0.0.1:99999", "tcp://127.0.0.1:1"],
            ["Error: LISTEN: TCP port 99999 is out of range; expected 0..65535"],
        ),
    ],
)
def test_forward_errors_name_its_arguments(runner: CliRunner, args: list[str], lines: list[str]) -> None:
    result = runner.invoke(main, args)
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == lines


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["check", "-c", ""], "Error: '': an empty file name; expected the path of a route table file, or - for stdin"),
        (["check", "-c", "{tmp}"], "Error: {tmp}: is a directory; expected a route table file"),
        (
            ["check", "-c", "{tmp}/none.toml"],
            "Error: {tmp}/none.toml: no such file; expected the path of a route table file",
        ),
        (["check", "-c", "{tmp}/broken.toml"], "Error: {tmp}/broken.toml:3: invalid TOML: invalid value (column 11)"),
        (
            ["check", "-c", "{tmp}/no/r.toml"],
            "Error: {tmp}/no/r.toml: no such directory '{tmp}/no'; expected the path of a route table file",
        ),
        (
            ["check", "-c", "{tmp}/routes.conf"],
            "Error: {tmp}/routes.conf: unsupported file extension '.conf'; expected .toml, .yaml or .yml,"
            " or --format toml|yaml",
        ),
    ],
)
def test_config_file_errors_name_the_file(runner: CliRunner, tmp_path: Path, args: list[str], line: str) -> None:
    (tmp_path / "routes.conf").write_text(_TABLE)
    (tmp_path / "broken.toml").write_text('[routes.a]\nlisten = "tcp://127.0.0.1:0"\nconnect = \n')
    result = runner.invoke(main, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [line.format(tmp=tmp_path)]


_TABLE = '[routes.a]\nlisten = "tcp://127.0.0.1:2222"\nconnect = "tcp://127.0.0.1:22"\n'


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["check", "-c", "{tmp}/routes.conf", "--format", "toml"], _TABLE),
        (
            ["check", "--format", "yaml", "-c", "{tmp}/routes.conf"],
            "routes:\n  a: {listen: 'tcp://127.0.0.1:2222', connect: 'tcp://127.0.0.1:22'}\n",
        ),
        (["check", "-c", "-"], None),
        (["-c", "-", "check"], None),
    ],
)
def test_check_reads_any_file_name_with_format(
    runner: CliRunner, tmp_path: Path, args: list[str], text: str | None
) -> None:
    if text is not None:
        (tmp_path / "routes.conf").write_text(text)
    result = runner.invoke(main, [a.format(tmp=tmp_path) for a in args], input=_TABLE)
    assert result.exit_code == 0, result.output
    assert '[routes.a]\nlisten = "tcp://127.0.0.1:2222"\nconnect = "tcp://127.0.0.1:22"\n' in result.stdout


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["connect", "stdio"],
            "Error: ENDPOINT: stdio is this command's own end (stdin/stdout); expected the endpoint to relay it to,"
            " such as 'vsock://3:22' or 'tcp://127.0.0.1:22'",
        ),
        (
            ["connect", "tcp://127.0.0.1:0"],
            "Error: ENDPOINT: cannot connect to port 0 in tcp://127.0.0.1:0; expected a port 1..65535",
        ),
    ],
)
def test_connect_errors_name_its_arguments(runner: CliRunner, args: list[str], line: str) -> None:
    result = runner.invoke(main, args)
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [line]


def test_connect_retries_are_bounded(runner: CliRunner) -> None:
    result = runner.invoke(main, ["connect", "tcp://127.0.0.1:1", "--connect-retries", "-1"])
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == (
        "Error: Invalid value for '--connect-retries': -1 is not in the range 0<=x<=100."
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("tcp://127.0.0.1:8080", "tcp://0.0.0.0:8080"),
        ("tcp://localhost:8080", "tcp://LOCALHOST:8080"),
        ("vsock://any:22", "vsock://3:22"),
        ("tcp://127.0.0.1:8080", "tcp://localhost:8080"),  # the name resolves (/etc/hosts) to the same address
    ],
)
def test_check_reports_listen_endpoints_that_bind_one_address(
    runner: CliRunner, tmp_path: Path, a: str, b: str
) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(
        f'[routes.a]\nlisten = "{a}"\nconnect = "tcp://h:1"\n[routes.b]\nlisten = "{b}"\nconnect = "tcp://h:1"\n'
    )
    result = runner.invoke(main, ["check", "-c", str(path)])
    assert result.exit_code == 1, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(f"Error: {path}"), line
    assert line.endswith(
        f": routes.b.listen: '{b}' binds what routes.a.listen ('{a}') binds;"
        " expected each route to listen on its own endpoint"
    ), line
    assert result.stdout == ""


async def test_stdio_sides_say_which_side_failed() -> None:
    # stdin/stdout as memory streams: stdout's reader gone, then stdin failing.
    stdout_send, stdout_receive = trio.testing.memory_stream_pair()
    stdin_send, stdin_receive = trio.testing.memory_stream_pair()
    sides = _StdioSides(trio.StapledStream(stdout_send, stdin_receive))
    await sides.wait_send_all_might_not_block()
    await stdin_send.send_all(b"in")
    assert await sides.receive_some(10) == b"in"
    await stdout_receive.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await sides.send_all(b"out")
    await stdin_send.aclose()
    await stdin_receive.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await sides.receive_some(10)
    assert sides.failed == "stdout closed"  # the first failure is the one reported
    await sides.aclose()


class _FailingStdio(trio.abc.HalfCloseableStream):
    """stdin/stdout whose every write and EOF fails with `error`."""

    def __init__(self, error: OSError) -> None:
        self.error = error

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise self.error

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        raise self.error

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise self.error

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize(
    ("error", "method", "said"),
    [
        (OSError(errno.EPIPE, "Broken pipe"), "send_eof", "stdout closed"),
        (OSError(errno.EIO, "Input/output error"), "send_all", "stdout failed (Input/output error)"),
        (OSError(errno.EIO, "Input/output error"), "receive_some", "stdin failed (Input/output error)"),
    ],
)
async def test_stdio_sides_tell_closed_from_failed(error: OSError, method: str, said: str) -> None:
    sides = _StdioSides(_FailingStdio(error))
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "send_eof": sides.send_eof,
        "send_all": lambda: sides.send_all(b"x"),
        "receive_some": sides.receive_some,
    }
    with pytest.raises(OSError, match=error.strerror):
        await calls[method]()
    assert sides.failed == said


def test_interrupted_finds_keyboard_interrupt_in_groups() -> None:
    assert _interrupted(KeyboardInterrupt())
    assert _interrupted(BaseExceptionGroup("", [ValueError(), BaseExceptionGroup("", [KeyboardInterrupt()])]))
    assert not _interrupted(BaseExceptionGroup("", [ValueError()]))
    assert not _interrupted(ValueError())


def _fake_stdio_and_backend(
    monkeypatch: pytest.MonkeyPatch, backend: trio.abc.HalfCloseableStream
) -> trio.abc.HalfCloseableStream:
    """`connect`'s stdin/stdout as a memory stream, `backend` as what it connects to; returns the terminal's end."""
    stdio, terminal = trio.testing.memory_stream_pair()
    monkeypatch.setattr("hvbridge.transports.stdio.open_stdio_stream", lambda: stdio)

    async def connect(address: object, options: object, hv: object) -> trio.abc.HalfCloseableStream:
        return backend

    monkeypatch.setattr("hvbridge.transports.connect", connect)
    return terminal


async def test_connect_says_the_backend_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    async def reset() -> None:
        raise trio.BrokenResourceError  # as trio's own streams say "reset"

    backend = trio.StapledStream(trio.testing.MemorySendStream(), trio.testing.MemoryReceiveStream(reset))
    _fake_stdio_and_backend(monkeypatch, backend)
    failure = await _connect_stdio(TcpAddress("127.0.0.1", 22), RouteOptions())
    assert failure == "the backend tcp://127.0.0.1:22 reset the connection"


async def test_connect_ends_cleanly_when_both_ways_end(monkeypatch: pytest.MonkeyPatch) -> None:
    backend, peer = trio.testing.memory_stream_pair()
    terminal = _fake_stdio_and_backend(monkeypatch, backend)
    await terminal.send_eof()  # stdin at EOF: passed on as EOF, and the other way goes on
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            assert await peer.receive_some() == b""
            await peer.send_all(b"reply")
            await peer.send_eof()

        nursery.start_soon(serve)
        assert await _connect_stdio(TcpAddress("127.0.0.1", 22), RouteOptions()) is None
    assert await terminal.receive_some() == b"reply"


async def test_connect_timeout_names_the_option(monkeypatch: pytest.MonkeyPatch, autojump_clock: object) -> None:
    async def never(address: object, options: object, hv: object) -> trio.abc.HalfCloseableStream:
        await trio.sleep_forever()

    monkeypatch.setattr("hvbridge.transports.connect", never)
    with pytest.raises(EndpointError) as raised:
        await _open_target(TcpAddress("127.0.0.1", 22), RouteOptions(connect_timeout=2.0))
    assert str(raised.value) == "connect tcp://127.0.0.1:22: timed out after 2s (--connect-timeout)"


def test_check_warns_of_vsock_ports_hyperv_cannot_reach(runner: CliRunner, tmp_path: Path) -> None:
    """hv_sock ignores ports above 0x7FFFFFFF: `check` says so for a vsock route (other hypervisors are fine)."""
    table = tmp_path / "routes.toml"
    table.write_text(
        '[routes.high]\nlisten = "vsock://any:2147483648"\nconnect = "tcp://127.0.0.1:22"\n'
        '[routes.low]\nlisten = "vsock://any:2147483647"\nconnect = "vsock://2:22"\n'
        '[routes.auto]\nlisten = "vsock://any:any"\nconnect = "tcp://127.0.0.1:22"\n'
    )
    result = runner.invoke(main, ["check", "-c", str(table)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "Hyper-V" in line]
    assert warnings == [
        "warning: routes.high.listen: under Hyper-V, vsock port 2147483648 is above 2147483647 (0x7FFFFFFF):"
        " the Linux hv_sock driver ignores connections to such ports (0x80000000 and up are the host's"
        " ephemeral ports); use a port 0..2147483647"
    ]


async def test_connect_takes_sigint_as_an_interrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    backend, peer = trio.testing.memory_stream_pair()
    _fake_stdio_and_backend(monkeypatch, backend)

    async def connect_and_interrupt() -> None:
        async with trio.open_nursery() as nursery:

            async def interrupt_once_relaying() -> None:
                await peer.send_all(b"up")  # the relay reads it: connected, its SIGINT receiver open
                await trio.testing.wait_all_tasks_blocked()
                os.kill(os.getpid(), signal.SIGINT)

            nursery.start_soon(interrupt_once_relaying)
            await _connect_stdio(TcpAddress("127.0.0.1", 22), RouteOptions())

    with trio.fail_after(10), pytest.raises(BaseException) as raised:  # noqa: PT011 - a group or the interrupt
        await connect_and_interrupt()
    assert _interrupted(raised.value)


#: Each mistake above as `check` prints it, with its TOML and YAML line.
_MISTAKE_LINES = [
    (2, 2, "bridge.log_level: got 'loud'; expected one of: debug, info, warning, error"),
    (5, 4, "defaults.conect_timeout: unknown key; did you mean 'connect_timeout'?"),
    (8, 7, "routes.ssh.listen: TCP port 70000 is out of range; expected 0..65535"),
    (
        10,
        9,
        "routes.ssh.idle_timeout: got 'soon'; expected a duration (seconds, or a number with a unit ms, s, m or h,"
        " such as '10m'), or 0 for none",
    ),
    (
        17,
        14,
        "routes.web2.listen: 'tcp://127.0.0.1:8080' is also the listen endpoint of route 'web';"
        " expected each route to listen on its own endpoint",
    ),
]


@pytest.mark.parametrize(("name", "text"), [("routes.toml", MISTAKES_TOML), ("routes.yaml", MISTAKES_YAML)])
def test_check_lists_every_mistake_in_one_run(runner: CliRunner, tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    result = runner.invoke(main, ["check", "-c", str(path)])
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    yaml = name.endswith(".yaml")
    assert result.stderr.splitlines() == [
        f"Error: {path}:{yaml_line if yaml else toml_line}: {message}"
        for toml_line, yaml_line, message in _MISTAKE_LINES
    ]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["frobnicate"], "Error: No such command 'frobnicate'."),
        (["--no-such-option"], "Error: No such option '--no-such-option'."),
        (["forward", "tcp://127.0.0.1:0"], "Error: Missing argument 'CONNECT'."),
        (
            ["forward", "tcp://127.0.0.1:0", "tcp://127.0.0.1:1", "--max-connections", "lots"],
            "Error: Invalid value for '--max-connections': 'lots' is not a valid integer.",
        ),
        (
            ["run", "-c", "routes.toml", "--log-format", "xml"],
            "Error: Invalid value for '--log-format': 'xml' is not one of 'text', 'json'.",
        ),
    ],
)
def test_bad_usage_exits_2_with_a_usage_message(runner: CliRunner, args: list[str], line: str) -> None:
    result = runner.invoke(main, args, prog_name="hvbridge")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Usage: hvbridge"), result.stderr
    assert result.stderr.splitlines()[-1] == line
