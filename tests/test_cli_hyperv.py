"""Tests for the `hvbridge hyperv` command group (hvbridge.cli_hyperv), run on Linux.

The group is invoked directly with click's CliRunner; HyperVTools in the context object swaps
in an in-memory registry and a VM lookup over recorded outputs (tests/data/hyperv/). Each test
checks the exit status and the exact stdout or `Error: ...` line.
"""

from __future__ import annotations

import re
import shutil
import sys
import uuid

import attrs
import pytest
from click.testing import CliRunner, Result

from hvbridge.cli_hyperv import HyperVTools, hyperv_group
from hvbridge.hyperv.registry import SERVICES_KEY_DISPLAY, MemoryRegistry
from hvbridge.hyperv.vms import VmInfo, VmLookupError

KEY = SERVICES_KEY_DISPLAY
SSH_KEY = "00000016-FACB-11E6-BD58-64006A7986D3"
INBOX_KEY = "999E53D4-3D5C-4C3E-8779-BED06EC056E1"
HIGH_PORT = (
    "vsock port %d is above 2147483647 (0x7FFFFFFF): the Linux hv_sock driver ignores connections to such"
    " ports (0x80000000 and up are the host's ephemeral ports); use a port 0..2147483647"
)
VM_A = uuid.UUID("3f2504e0-4f89-41d3-9a0c-0305e82c3301")
VM_B = uuid.UUID("8c0f6c57-2f1e-4d8b-9f53-1b7e6d8a9a10")
WSL = uuid.UUID("6c0f1a3e-9d2b-4f4e-8a77-2e1d5b9c0f42")


@attrs.define
class FakeLookup:
    """A VmLookup with fixed answers, or a fixed error."""

    vms: list[VmInfo] = attrs.field(factory=list)
    wsl: uuid.UUID | None = None

    def list_vms(self) -> list[VmInfo]:
        return list(self.vms)

    def wsl_vm_id(self) -> uuid.UUID:
        if self.wsl is None:
            raise VmLookupError("no running WSL2 VM; start WSL (wsl.exe) and try again")
        return self.wsl


@pytest.fixture
def runner() -> CliRunner:
    """A click test runner."""
    return CliRunner()


@pytest.fixture
def registry() -> MemoryRegistry:
    """A registry holding one inbox service, as a fresh host has."""
    return MemoryRegistry({INBOX_KEY: "VM Session Service"})


def run(runner: CliRunner, args: list[str], tools: HyperVTools | None = None) -> Result:
    """Invoke `hvbridge hyperv ARGS`."""
    return runner.invoke(hyperv_group, args, obj=tools)


def error_line(result: Result) -> str:
    """The last stderr line (click's `Error: ...`)."""
    return result.stderr.rstrip("\n").splitlines()[-1]


# ---------------------------------------------------------------------------- guid / port


@pytest.mark.parametrize(
    ("port", "guid"),
    [
        ("2761", "00000ac9-facb-11e6-bd58-64006a7986d3"),
        ("0", "00000000-facb-11e6-bd58-64006a7986d3"),
        ("2147483647", "7fffffff-facb-11e6-bd58-64006a7986d3"),
    ],
)
def test_guid_and_back(runner: CliRunner, port: str, guid: str) -> None:
    result = run(runner, ["guid", port])
    assert (result.exit_code, result.stdout, result.stderr) == (0, guid + "\n", "")
    result = run(runner, ["port", guid.upper()])
    assert (result.exit_code, result.stdout) == (0, port + "\n")
    result = run(runner, ["port", "{" + guid + "}"])
    assert (result.exit_code, result.stdout) == (0, port + "\n")


@pytest.mark.parametrize(
    ("port", "message"),
    [
        ("2147483648", "^Error: Invalid value for 'PORT': " + re.escape(HIGH_PORT % 2147483648) + "$"),
        ("4000000000", "^Error: Invalid value for 'PORT': " + re.escape(HIGH_PORT % 4000000000) + "$"),
        ("4294967295", "^Error: Invalid value for 'PORT': " + re.escape(HIGH_PORT % 4294967295) + "$"),
        ("-1", r"^Error: No such option"),  # the wording varies across click versions
        ("ssh", r"^Error: Invalid value for 'PORT': 'ssh' is not a valid integer"),
    ],
)
def test_guid_rejects_bad_ports(runner: CliRunner, port: str, message: str) -> None:
    result = run(runner, ["guid", port])
    assert result.exit_code == 2
    assert re.match(message, error_line(result))


def test_port_of_a_high_template_guid(runner: CliRunner) -> None:
    """`port` still decodes a GUID above 0x7FFFFFFF, e.g. a host ephemeral port seen in a log."""
    result = run(runner, ["port", "fffffffe-facb-11e6-bd58-64006a7986d3"])
    assert (result.exit_code, result.stdout) == (0, "4294967294\n")


def test_register_refuses_a_port_hyperv_cannot_reach(runner: CliRunner, registry: MemoryRegistry) -> None:
    result = run(runner, ["register", "--name", "x", "--port", "4000000000"], HyperVTools(registry=registry))
    assert result.exit_code == 2
    assert error_line(result) == f"Error: Invalid value for '--port': {HIGH_PORT % 4000000000}"
    assert list(registry.services) == [INBOX_KEY]


def test_unregister_takes_any_template_port(runner: CliRunner, registry: MemoryRegistry) -> None:
    """An entry for a port above 0x7FFFFFFF (made by hand or an older release) can still be removed."""
    registry.services["FFFFFFFE-FACB-11E6-BD58-64006A7986D3"] = "old"
    result = run(runner, ["unregister", "--port", "4294967294"], HyperVTools(registry=registry))
    assert (result.exit_code, result.stderr) == (0, "")
    assert list(registry.services) == [INBOX_KEY]


def test_port_of_a_non_template_guid(runner: CliRunner) -> None:
    result = run(runner, ["port", "999e53d4-3d5c-4c3e-8779-bed06ec056e1"])
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: 999e53d4-3d5c-4c3e-8779-bed06ec056e1 does not follow the vsock template"
        " 00000000-facb-11e6-bd58-64006a7986d3 (PORT-facb-11e6-bd58-64006a7986d3), so it stands for no vsock port\n"
    )


def test_port_rejects_bad_guid(runner: CliRunner) -> None:
    result = run(runner, ["port", "22"])
    assert result.exit_code == 2
    assert error_line(result) == (
        "Error: Invalid value for 'GUID': '22' is not a GUID; expected e.g. 00000016-facb-11e6-bd58-64006a7986d3"
    )


# ---------------------------------------------------------------------------- registry


def test_register_list_unregister(runner: CliRunner, registry: MemoryRegistry) -> None:
    tools = HyperVTools(registry=registry)
    result = run(runner, ["register", "--name", "hvbridge ssh", "--port", "22"], tools)
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout == (
        f"registered 00000016-facb-11e6-bd58-64006a7986d3 (vsock port 22) as 'hvbridge ssh' in {KEY}\\{SSH_KEY}\n"
    )
    assert registry.services[SSH_KEY] == "hvbridge ssh"

    result = run(runner, ["services"], tools)
    assert result.exit_code == 0
    assert result.stdout == (
        "SERVICE ID                            PORT  NAME\n"
        "00000016-facb-11e6-bd58-64006a7986d3  22    hvbridge ssh\n"
        "999e53d4-3d5c-4c3e-8779-bed06ec056e1  -     VM Session Service\n"
    )

    result = run(runner, ["unregister", "--port", "22"], tools)
    assert (result.exit_code, result.stdout) == (
        0,
        "unregistered 00000016-facb-11e6-bd58-64006a7986d3 (vsock port 22) ('hvbridge ssh')\n",
    )
    assert list(registry.services) == [INBOX_KEY]


def test_register_by_service_guid(runner: CliRunner, registry: MemoryRegistry) -> None:
    tools = HyperVTools(registry=registry)
    guid = "{0B1E2F3A-0000-4000-8000-000000000001}"
    result = run(runner, ["register", "--name", "demo", "--service", guid], tools)
    assert result.exit_code == 0
    assert result.stdout == (
        f"registered 0b1e2f3a-0000-4000-8000-000000000001 as 'demo' in {KEY}\\0B1E2F3A-0000-4000-8000-000000000001\n"
    )
    result = run(runner, ["unregister", "--service", "0b1e2f3a-0000-4000-8000-000000000001"], tools)
    assert (result.exit_code, result.stdout) == (0, "unregistered 0b1e2f3a-0000-4000-8000-000000000001 ('demo')\n")


def test_register_refuses_duplicate(runner: CliRunner, registry: MemoryRegistry) -> None:
    registry.services[SSH_KEY.lower()] = "old ssh"
    result = run(runner, ["register", "--name", "new", "--port", "22"], HyperVTools(registry=registry))
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        "Error: service 00000016-facb-11e6-bd58-64006a7986d3 is already registered as 'old ssh'"
        f" ({KEY}\\{SSH_KEY.lower()}); unregister it first (hvbridge hyperv unregister --service"
        " 00000016-facb-11e6-bd58-64006a7986d3) or use another port\n"
    )
    assert registry.services[SSH_KEY.lower()] == "old ssh"


def test_register_needs_admin(runner: CliRunner) -> None:
    registry = MemoryRegistry(writable=False)
    result = run(runner, ["register", "--name", "ssh", "--port", "22"], HyperVTools(registry=registry))
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: cannot register service 00000016-facb-11e6-bd58-64006a7986d3: access denied; changing"
        f" {KEY} needs administrator rights, run the command from an elevated prompt (Run as administrator)\n"
    )


@pytest.mark.parametrize(
    "args",
    [
        ["register", "--name", "x"],
        ["register", "--name", "x", "--port", "22", "--service", "00000016-facb-11e6-bd58-64006a7986d3"],
        ["unregister"],
    ],
)
def test_exactly_one_of_port_and_service(runner: CliRunner, registry: MemoryRegistry, args: list[str]) -> None:
    result = run(runner, args, HyperVTools(registry=registry))
    assert result.exit_code == 2
    assert error_line(result) == "Error: give exactly one of --port and --service"


@pytest.mark.skipif(sys.platform == "win32", reason="off Windows the real registry is missing")
@pytest.mark.parametrize("command", [["register", "--name", "x"], ["unregister"]])
def test_usage_error_comes_before_the_missing_registry(runner: CliRunner, command: list[str]) -> None:
    both = ["--port", "22", "--service", "00000016-facb-11e6-bd58-64006a7986d3"]
    result = run(runner, [*command, *both])
    assert result.exit_code == 2
    assert error_line(result) == "Error: give exactly one of --port and --service"


def test_register_needs_a_name(runner: CliRunner, registry: MemoryRegistry) -> None:
    result = run(runner, ["register", "--port", "22"], HyperVTools(registry=registry))
    assert result.exit_code == 2
    assert error_line(result) == "Error: Missing option '--name'."
    result = run(runner, ["register", "--port", "22", "--name", " "], HyperVTools(registry=registry))
    assert result.exit_code == 1
    assert result.stderr == ("Error: invalid service name ' '; expected a non-empty name without control characters\n")


def test_unregister_unknown(runner: CliRunner, registry: MemoryRegistry) -> None:
    result = run(runner, ["unregister", "--port", "2222"], HyperVTools(registry=registry))
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: service 000008ae-facb-11e6-bd58-64006a7986d3 is not registered under {KEY};"
        " `hvbridge hyperv services` lists the registered ones\n"
    )


def test_services_empty_and_missing(runner: CliRunner) -> None:
    result = run(runner, ["services"], HyperVTools(registry=MemoryRegistry()))
    assert (result.exit_code, result.stdout) == (0, "no services are registered\n")
    result = run(runner, ["services"], HyperVTools(registry=MemoryRegistry(exists=False)))
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: cannot list Hyper-V services: {KEY} does not exist; is Hyper-V enabled on this host?"
        " (Enable-WindowsOptionalFeature -Online -FeatureName Microsoft-Hyper-V)\n"
    )


@pytest.mark.skipif(sys.platform == "win32", reason="the real registry exists there")
def test_default_registry_off_windows(runner: CliRunner) -> None:
    result = run(runner, ["services"])
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: the Hyper-V service registry ({KEY}) exists only on a Windows host; run this command there\n"
    )


# ---------------------------------------------------------------------------- vms


def test_vms(runner: CliRunner) -> None:
    lookup = FakeLookup([VmInfo("zeta", VM_B, "Off"), VmInfo("Build-01", VM_A, "Running")], wsl=WSL)
    result = run(runner, ["vms"], HyperVTools(lookup=lookup))
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout == (
        f"NAME      VMID                                  STATE\nBuild-01  {VM_A}  Running\nzeta      {VM_B}  Off\n"
    )
    result = run(runner, ["vms", "--wsl"], HyperVTools(lookup=lookup))
    assert result.stdout.splitlines()[-1] == f"wsl       {WSL}  Running"


def test_vms_empty_and_errors(runner: CliRunner) -> None:
    result = run(runner, ["vms"], HyperVTools(lookup=FakeLookup()))
    assert (result.exit_code, result.stdout) == (0, "no VMs\n")
    result = run(runner, ["vms", "--wsl"], HyperVTools(lookup=FakeLookup()))
    assert result.exit_code == 1
    assert result.stderr == "Error: no running WSL2 VM; start WSL (wsl.exe) and try again\n"


@pytest.mark.skipif(
    sys.platform == "win32" or shutil.which("powershell.exe") is not None, reason="PowerShell is reachable here"
)
def test_default_lookup_without_powershell(runner: CliRunner) -> None:
    result = run(runner, ["vms"])
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: cannot list Hyper-V VMs (Get-VM: powershell.exe not found; Msvm_ComputerSystem: powershell.exe"
        " not found); this needs Hyper-V and membership in 'Hyper-V Administrators' (or an elevated prompt)\n"
    )


def test_help_lists_commands(runner: CliRunner) -> None:
    result = run(runner, ["--help"])
    assert result.exit_code == 0
    commands = result.stdout.split("Commands:")[1].split()
    for name in ("guid", "port", "register", "unregister", "services", "vms"):
        assert name in commands
