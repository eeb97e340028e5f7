"""The main command group: `hvbridge -c FILE` is `hvbridge run -c FILE`, and user errors are one line each.

Driven in-process with click's CliRunner; nothing here opens a socket.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from click.testing import CliRunner

from hvbridge import __version__
from hvbridge.cli import main

if TYPE_CHECKING:
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
