"""Hyper-V VM names and VmIds (`hvsock://my-vm/22`, `hvsock://wsl/22`, `hvbridge hyperv vms`).

VmLookup is the interface. SubprocessVmLookup runs PowerShell Get-VM (falling back to the WMI
class Msvm_ComputerSystem), `wsl.exe --exec wslinfo --vm-id` and `hcsdiag list`, and parses
their output with the pure parse_*() functions below, which tests drive with recorded outputs.
Its scripts take no user data at all: every VM is listed and the name is matched here, so
nothing is ever spliced into a command line. VmResolver caches name -> VmId and re-resolves on
request (the hvsock transport does after a failed connect, and for listeners on reload, while
idle and after an accept error: VmIds change when a VM is recreated or WSL restarts).
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Final, Protocol, TypeVar, final

import attrs

from hvbridge.errors import HvbridgeError
from hvbridge.hyperv.guids import parse_guid

#: The VM name that means "the running WSL2 utility VM" in `hvsock://wsl/PORT`.
WSL_VM_NAME: Final = "wsl"


class VmLookupError(HvbridgeError):
    """A VM name could not be turned into a VmId, or the VMs could not be listed."""


@attrs.frozen
class VmInfo:
    """One Hyper-V VM: its name, VmId and state as Hyper-V reports it (e.g. `Running`)."""

    name: str
    vm_id: uuid.UUID
    state: str


class VmLookup(Protocol):
    """Where VM names and VmIds come from (Hyper-V on Windows; recorded outputs in tests)."""

    def list_vms(self) -> list[VmInfo]:
        """Every Hyper-V VM on this host.

        Raises:
            VmLookupError: The VMs cannot be listed (no Hyper-V, no rights).
        """
        ...

    def wsl_vm_id(self) -> uuid.UUID:
        """The VmId of the running WSL2 utility VM.

        Raises:
            VmLookupError: There is none, or it cannot be found out.
        """
        ...


def decode_output(data: bytes) -> str:
    """Decode a Windows tool's output: UTF-16 (wsl.exe, hcsdiag) or UTF-8, BOM or not."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    if b"\x00" in data:  # UTF-16-LE without a BOM: wsl.exe's own messages
        return data.decode("utf-16-le", "replace")
    return data.decode("utf-8-sig", "replace")


def _json_rows(text: str, source: str) -> list[dict[str, object]]:
    text = text.strip()
    if not text:  # no VMs: a pipeline of nothing prints nothing
        return []
    try:
        parsed: object = json.loads(text)
    except ValueError as exc:
        raise VmLookupError(f"cannot parse the output of {source}: {exc}; got {text[:80]!r}") from exc
    # ConvertTo-Json prints a lone object, not a one-element array.
    items = parsed if isinstance(parsed, list) else [parsed]
    rows: list[dict[str, object]] = []
    for item in items:
        if not isinstance(item, dict):
            raise VmLookupError(f"unexpected output from {source}: expected JSON objects, got {item!r}")
        rows.append({str(k): v for k, v in item.items()})
    return rows


def _state_text(value: object, names: dict[int, str]) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return names.get(value, str(value))
    return str(value) if value is not None else "Unknown"


def parse_get_vm_json(text: str) -> list[VmInfo]:
    """Parse the JSON that GET_VM_SCRIPT prints (Get-VM: Name, Id, State).

    Accepts an array or a lone object, any GUID case and braces, and a State that is a name
    or a number.

    Raises:
        VmLookupError: The text is not such JSON.
    """
    vms = []
    for row in _json_rows(text, "Get-VM"):
        name, vm_id = row.get("Name"), row.get("Id", row.get("VMId"))
        if not isinstance(name, str) or not isinstance(vm_id, str):
            raise VmLookupError(f"unexpected output from Get-VM: expected Name and Id strings, got {row!r}")
        try:
            guid = parse_guid(vm_id)
        except ValueError as exc:
            raise VmLookupError(f"unexpected output from Get-VM: VM {name!r} has Id {vm_id!r}") from exc
        vms.append(VmInfo(name, guid, _state_text(row.get("State"), {})))
    return vms


#: Msvm_ComputerSystem.EnabledState in the root/virtualization/v2 namespace WMI_SCRIPT reads:
#: the CIM_EnabledLogicalElement values (learn.microsoft.com, "Msvm_ComputerSystem class" and
#: "RequestStateChange method of the Msvm_ComputerSystem class"): a paused VM is Quiesce (9), a
#: saved one "Enabled but Offline" (6). The 327xx numbers are the retired v1 namespace's.
_ENABLED_STATES: Final = {
    0: "Unknown",
    1: "Other",
    2: "Running",
    3: "Off",
    4: "Stopping",
    5: "Not Applicable",
    6: "Saved",
    7: "In Test",
    8: "Deferred",
    9: "Paused",
    10: "Starting",
}


def parse_msvm_json(text: str) -> list[VmInfo]:
    """Parse the JSON that WMI_SCRIPT prints (Msvm_ComputerSystem: ElementName, Name, EnabledState).

    The class also lists the host itself, whose Name is the computer name rather than a GUID;
    that row is skipped.

    Raises:
        VmLookupError: The text is not such JSON.
    """
    vms = []
    for row in _json_rows(text, "Msvm_ComputerSystem"):
        name, vm_id = row.get("ElementName"), row.get("Name")
        if not isinstance(name, str) or not isinstance(vm_id, str):
            raise VmLookupError(
                f"unexpected output from Msvm_ComputerSystem: expected ElementName and Name strings, got {row!r}"
            )
        try:
            guid = parse_guid(vm_id)
        except ValueError:
            continue  # the host's own entry
        vms.append(VmInfo(name, guid, _state_text(row.get("EnabledState"), _ENABLED_STATES)))
    return vms


def parse_wslinfo_vm_id(text: str) -> uuid.UUID:
    """Parse `wslinfo --vm-id` output: the WSL2 VM's id, or `wsl1`.

    Raises:
        VmLookupError: The distribution runs under WSL 1 (no VM), or the output is no GUID.
    """
    value = text.strip()
    if value.casefold() == "wsl1":
        raise VmLookupError(
            "the default WSL distribution runs under WSL 1, which has no VM;"
            " convert it (wsl --set-version DISTRO 2) or make a WSL 2 distribution the default"
        )
    try:
        return parse_guid(value)
    except ValueError as exc:
        raise VmLookupError(f"unexpected output from wslinfo --vm-id: {value[:80]!r}") from exc


def parse_hcsdiag_list(text: str) -> list[tuple[uuid.UUID, str, str]]:
    """Parse `hcsdiag list`: one (id, state, owner) per compute system.

    The format (microsoft/WSL#4561) is a line with the id, then an indented line
    `TYPE, STATE, ID, OWNER`; the owner of the WSL2 VM is `WSL`.
    """
    systems = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 4:
            continue
        try:
            system_id = parse_guid(fields[2])
        except ValueError:
            continue
        systems.append((system_id, fields[1], fields[3]))
    return systems


def wsl_vm_id_from_hcsdiag(text: str) -> uuid.UUID:
    """The running WSL2 VM's id from `hcsdiag list` output.

    Raises:
        VmLookupError: No running compute system is owned by WSL, or several are.
    """
    found = [
        system_id
        for system_id, state, owner in parse_hcsdiag_list(text)
        if owner.casefold() == "wsl" and state.casefold() == "running"
    ]
    if not found:
        raise VmLookupError("no running WSL2 VM; start WSL (wsl.exe) and try again")
    if len(set(found)) > 1:
        ids = ", ".join(str(f) for f in found)
        raise VmLookupError(f"several running WSL VMs ({ids}); give the VmId as a GUID instead of 'wsl'")
    return found[0]


def find_vm(vms: Iterable[VmInfo], name: str) -> VmInfo:
    """The VM called `name`: an exact match, else the only case-insensitive one.

    Raises:
        VmLookupError: No VM, or several VMs, have that name.
    """
    vms = list(vms)
    matches = [vm for vm in vms if vm.name == name] or [vm for vm in vms if vm.name.casefold() == name.casefold()]
    if len(matches) == 1:
        return matches[0]
    if matches:
        ids = ", ".join(str(vm.vm_id) for vm in matches)
        raise VmLookupError(f"{len(matches)} Hyper-V VMs are named {name!r} ({ids}); use the VmId instead of the name")
    known = ", ".join(sorted(vm.name for vm in vms)) or "none"
    raise VmLookupError(
        f"no Hyper-V VM is named {name!r} (VMs on this host: {known}); `hvbridge hyperv vms` lists names and VmIds"
    )


@attrs.frozen
class CommandResult:
    """What a finished command printed and how it exited."""

    returncode: int
    stdout: bytes
    stderr: bytes


#: Runs argv (never through a shell) with a timeout in seconds. Raises OSError when the program
#: cannot be started, subprocess.TimeoutExpired when it overruns.
Runner = Callable[[Sequence[str], float], CommandResult]


def run_command(argv: Sequence[str], timeout: float) -> CommandResult:
    """The real Runner: subprocess.run with an argument list, no shell, no console window."""
    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)
    done = subprocess.run(  # a fixed argument list, no shell
        list(argv), capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout, check=False, creationflags=flags
    )
    return CommandResult(done.returncode, done.stdout, done.stderr)


_PS_PREAMBLE: Final = (
    "$ErrorActionPreference = 'Stop'\n"
    "$ProgressPreference = 'SilentlyContinue'\n"
    "[Console]::OutputEncoding = [System.Text.Encoding]::UTF8\n"
)

#: Lists every VM as a JSON array of {Name, Id, State}. It takes no input: names are matched
#: in Python, so no user text ever reaches PowerShell.
GET_VM_SCRIPT: Final = _PS_PREAMBLE + (
    "$vms = @(Get-VM | ForEach-Object { [pscustomobject]@{\n"
    "    Name = $_.Name; Id = $_.Id.ToString(); State = $_.State.ToString() } })\n"
    "ConvertTo-Json -InputObject $vms -Compress\n"
)

#: The same through WMI, for hosts without the Hyper-V PowerShell module.
WMI_SCRIPT: Final = _PS_PREAMBLE + (
    "$vms = @(Get-CimInstance -Namespace root/virtualization/v2 -ClassName Msvm_ComputerSystem |\n"
    "    ForEach-Object { [pscustomobject]@{\n"
    "        ElementName = $_.ElementName; Name = $_.Name; EnabledState = $_.EnabledState } })\n"
    "ConvertTo-Json -InputObject $vms -Compress\n"
)


def powershell_argv(script: str) -> list[str]:
    """The argv that runs `script` in Windows PowerShell, passed as -EncodedCommand.

    -EncodedCommand (base64 of UTF-16-LE) sidesteps Windows command-line quoting entirely.
    """
    encoded = base64.b64encode(script.encode("utf-16-le")).decode("ascii")
    return ["powershell.exe", "-NoLogo", "-NoProfile", "-NonInteractive", "-EncodedCommand", encoded]


#: `wslinfo --vm-id` (WSL PR microsoft/WSL#13212) run in the default distribution; no admin needed.
WSLINFO_ARGV: Final = ("wsl.exe", "--exec", "wslinfo", "--vm-id")
#: `hcsdiag list` lists compute systems with their owner; it needs administrator rights.
HCSDIAG_ARGV: Final = ("hcsdiag.exe", "list")


T = TypeVar("T")


def _first_line(result: CommandResult) -> str:
    text = decode_output(result.stderr).strip() or decode_output(result.stdout).strip()
    line = text.splitlines()[0].strip() if text else ""
    return f"exit status {result.returncode}" + (f": {line}" if line else "")


@final
@attrs.define(eq=False)
class SubprocessVmLookup:
    """VmLookup through Windows tools, run as argument lists (never a shell).

    Args:
        runner: Runs one command; tests pass one that returns recorded output.
        timeout: Seconds each command may take (PowerShell with the Hyper-V module is slow to
            start).
    """

    runner: Runner = run_command
    timeout: float = 60.0

    def _run(self, argv: Sequence[str]) -> CommandResult | str:
        try:
            return self.runner(argv, self.timeout)
        except FileNotFoundError:
            return f"{argv[0]} not found"
        except subprocess.TimeoutExpired:
            return f"{argv[0]} did not finish within {self.timeout:g} s"
        except OSError as exc:
            return f"cannot run {argv[0]}: {exc.strerror or exc}"

    def _first_answer(
        self, attempts: Sequence[tuple[str, str, Sequence[str], Callable[[str], T]]], failures: list[str]
    ) -> T | None:
        """Run each attempt in turn and parse the output of the first that succeeds.

        Args:
            attempts: (name when it cannot run, name when it fails, argv, parse) tuples.
            failures: Gets one "NAME: why" per attempt that did not succeed.

        Returns:
            The parsed output, or None if every attempt failed.
        """
        for cannot_run, failed, argv, parse in attempts:
            result = self._run(argv)
            if isinstance(result, str):
                failures.append(f"{cannot_run}: {result}")
            elif result.returncode != 0:
                failures.append(f"{failed}: {_first_line(result)}")
            else:
                return parse(decode_output(result.stdout))
        return None

    def list_vms(self) -> list[VmInfo]:
        """Every VM, from Get-VM, else from WMI Msvm_ComputerSystem.

        Raises:
            VmLookupError: Neither worked (the message has both reasons).
        """
        failures: list[str] = []
        vms = self._first_answer(
            [
                ("Get-VM", "Get-VM", powershell_argv(GET_VM_SCRIPT), parse_get_vm_json),
                ("Msvm_ComputerSystem", "Msvm_ComputerSystem", powershell_argv(WMI_SCRIPT), parse_msvm_json),
            ],
            failures,
        )
        if vms is not None:
            return vms
        raise VmLookupError(
            "cannot list Hyper-V VMs (" + "; ".join(failures) + "); this needs Hyper-V and membership"
            " in 'Hyper-V Administrators' (or an elevated prompt)"
        )

    def wsl_vm_id(self) -> uuid.UUID:
        """The WSL2 VM's id from `wslinfo --vm-id`, else from `hcsdiag list`.

        `wsl.exe --exec` starts WSL if it is not running.

        Raises:
            VmLookupError: Neither worked (the message says what to try).
        """
        failures: list[str] = []
        vm_id = self._first_answer(
            [
                ("wslinfo", "wslinfo --vm-id", WSLINFO_ARGV, parse_wslinfo_vm_id),
                ("hcsdiag", "hcsdiag list", HCSDIAG_ARGV, wsl_vm_id_from_hcsdiag),
            ],
            failures,
        )
        if vm_id is not None:
            return vm_id
        raise VmLookupError(
            "cannot find the WSL2 VM id (" + "; ".join(failures) + "); update WSL (wsl --update) for"
            " `wslinfo --vm-id`, or run as administrator for `hcsdiag list`, or give the VmId as a GUID"
        )


@final
class VmResolver:
    """VM name -> VmId, cached. GUIDs pass through; `wsl` means the WSL2 VM.

    Safe to call from several threads: the cache is a dict, and a race only repeats a lookup.

    Args:
        lookup: Where names are resolved.
        min_refresh: Seconds a resolved name stays fresh: a refresh asked for sooner returns
            the cached VmId. Every failed connect asks for one, and each costs a PowerShell
            process, so a VM that is down must not start one per client.
        clock: Monotonic seconds (tests pass a fake).
    """

    def __init__(
        self, lookup: VmLookup, *, min_refresh: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.lookup = lookup
        self.min_refresh = min_refresh
        self._clock = clock
        self._cache: dict[str, tuple[uuid.UUID, float]] = {}

    def resolve(self, vm: uuid.UUID | str, *, refresh: bool = False) -> uuid.UUID:
        """The VmId of `vm`.

        Args:
            vm: A VmId, or a VM name (`wsl` for the WSL2 VM).
            refresh: Ask Hyper-V again (after a failed connect), unless the cached VmId is
                younger than min_refresh.

        Raises:
            VmLookupError: The name cannot be resolved.
        """
        if isinstance(vm, uuid.UUID):
            return vm
        key = vm.casefold()
        cached = self._cache.get(key)
        now = self._clock()
        if cached is not None and (not refresh or now - cached[1] < self.min_refresh):
            return cached[0]
        vm_id = self.lookup.wsl_vm_id() if key == WSL_VM_NAME else find_vm(self.lookup.list_vms(), vm).vm_id
        self._cache[key] = (vm_id, now)
        return vm_id
