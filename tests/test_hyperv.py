"""Tests for hvbridge.hyperv (guids, registry, vms): GUID tables, the service registry logic and the VM lookup.

Everything here is pure or runs fakes: MemoryRegistry for the registry, and recorded tool
outputs (tests/data/hyperv/, see its README: written from documented formats, not captured on
Windows) fed to the parsers and to SubprocessVmLookup through a fake Runner.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvbridge.errors import HvbridgeError
from hvbridge.hyperv.guids import (
    HV_GUID_BROADCAST,
    HV_GUID_CHILDREN,
    HV_GUID_LOOPBACK,
    HV_GUID_PARENT,
    HV_GUID_SILOHOST,
    HV_GUID_WILDCARD,
    HV_GUID_ZERO,
    MAX_VSOCK_PORT,
    VM_WILDCARDS,
    parse_guid,
    port_for_service_id,
    service_id_for_port,
    sockaddr_text,
    sockaddr_vm_id,
    vm_id_matches,
)
from hvbridge.hyperv.registry import (
    SERVICES_KEY_DISPLAY,
    MemoryRegistry,
    RegistryError,
    ServiceEntry,
    find_service,
    list_services,
    register_service,
    unregister_service,
)
from hvbridge.hyperv.vms import (
    GET_VM_SCRIPT,
    WMI_SCRIPT,
    CommandResult,
    SubprocessVmLookup,
    VmInfo,
    VmLookupError,
    VmResolver,
    decode_output,
    find_vm,
    parse_get_vm_json,
    parse_hcsdiag_list,
    parse_msvm_json,
    parse_wslinfo_vm_id,
    powershell_argv,
    run_command,
    wsl_vm_id_from_hcsdiag,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

DATA = Path(__file__).parent / "data" / "hyperv"


def recorded(name: str) -> bytes:
    """The bytes of a recorded tool output."""
    return (DATA / name).read_bytes()


# ---------------------------------------------------------------------------- GUID tables


@pytest.mark.parametrize(
    ("name", "guid"),
    [
        ("any", "00000000-0000-0000-0000-000000000000"),
        ("wildcard", "00000000-0000-0000-0000-000000000000"),
        ("zero", "00000000-0000-0000-0000-000000000000"),
        ("broadcast", "ffffffff-ffff-ffff-ffff-ffffffffffff"),
        ("children", "90db8b89-0d35-4f79-8ce9-49ea0ac8b7cd"),
        ("loopback", "e0e16197-dd56-4a10-9195-5ee7a155a838"),
        ("parent", "a42e7cda-d03f-480c-9cc2-a4de20abb878"),
        ("silohost", "36bd0c5c-7276-4223-88ba-7d03b654c568"),
    ],
)
def test_vm_wildcards(name: str, guid: str) -> None:
    assert VM_WILDCARDS[name] == uuid.UUID(guid)


def test_wildcard_constants() -> None:
    assert HV_GUID_WILDCARD == HV_GUID_ZERO == uuid.UUID(int=0)
    assert set(VM_WILDCARDS.values()) == {
        HV_GUID_ZERO,
        HV_GUID_BROADCAST,
        HV_GUID_CHILDREN,
        HV_GUID_LOOPBACK,
        HV_GUID_PARENT,
        HV_GUID_SILOHOST,
    }


@pytest.mark.parametrize(
    ("port", "guid"),
    [
        (2761, "00000ac9-facb-11e6-bd58-64006a7986d3"),
        (0, "00000000-facb-11e6-bd58-64006a7986d3"),
        (22, "00000016-facb-11e6-bd58-64006a7986d3"),
        (2**31 - 1, "7fffffff-facb-11e6-bd58-64006a7986d3"),
        (2**32 - 2, "fffffffe-facb-11e6-bd58-64006a7986d3"),
    ],
)
def test_port_guid_vectors(port: int, guid: str) -> None:
    assert service_id_for_port(port) == uuid.UUID(guid)
    assert port_for_service_id(uuid.UUID(guid)) == port


@pytest.mark.parametrize("port", [-1, 2**32 - 1, 2**32, 2**40])
def test_port_out_of_range(port: int) -> None:
    with pytest.raises(ValueError, match=rf"^vsock port {port} is out of range; expected 0\.\.4294967294$"):
        service_id_for_port(port)


@pytest.mark.parametrize(
    "guid",
    [
        "ffffffff-facb-11e6-bd58-64006a7986d3",  # VMADDR_PORT_ANY is not a port
        "00000ac9-facb-11e6-bd58-64006a7986d4",
        "999e53d4-3d5c-4c3e-8779-bed06ec056e1",
        "00000000-0000-0000-0000-000000000000",
    ],
)
def test_guid_off_template(guid: str) -> None:
    assert port_for_service_id(uuid.UUID(guid)) is None


@given(st.integers(min_value=0, max_value=MAX_VSOCK_PORT))
def test_port_roundtrip(port: int) -> None:
    assert port_for_service_id(service_id_for_port(port)) == port


@pytest.mark.parametrize(
    "text",
    [
        "00000ac9-facb-11e6-bd58-64006a7986d3",
        "00000AC9-FACB-11E6-BD58-64006A7986D3",
        "{00000AC9-FACB-11E6-BD58-64006A7986D3}",
        "00000ac9facb11e6bd5864006a7986d3",
        "{00000AC9FACB11E6BD5864006A7986D3}",
    ],
)
def test_parse_guid_forms(text: str) -> None:
    assert parse_guid(text) == uuid.UUID("00000ac9-facb-11e6-bd58-64006a7986d3")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "wsl1",
        "  {00000ac9-facb-11e6-bd58-64006a7986d3}\r\n",
        "{00000ac9-facb-11e6-bd58-64006a7986d3",
        "00000ac9-facb-11e6-bd58-64006a7986d3}",
        "00000ac9_facb_11e6_bd58_64006a7986d3",
        "urn:uuid:00000ac9-facb-11e6-bd58-64006a7986d3",
    ],
)
def test_parse_guid_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a GUID; expected e\.g\. "):
        parse_guid(text)


def test_sockaddr_helpers() -> None:
    vm, service = "E0E16197-DD56-4A10-9195-5EE7A155A838", "00000016-facb-11e6-bd58-64006a7986d3"
    assert sockaddr_vm_id((vm, service)) == HV_GUID_LOOPBACK
    assert sockaddr_text((vm, service)) == f"hvsock://{HV_GUID_LOOPBACK}/{service}"
    others: list[object] = [("127.0.0.1", 22), ("x", service), (vm,), "/run/x.sock", None]
    for other in others:
        assert sockaddr_text(other) is None
    for other in [("127.0.0.1", 22), ("nope", service), "/run/x.sock"]:
        assert sockaddr_vm_id(other) is None


def test_vm_id_matches() -> None:
    vm = uuid.UUID("3f2504e0-4f89-41d3-9a0c-0305e82c3301")
    assert vm_id_matches(vm, vm)
    assert vm_id_matches(HV_GUID_ZERO, vm)
    assert not vm_id_matches(HV_GUID_PARENT, vm)


# ---------------------------------------------------------------------------- registry

SSH = service_id_for_port(22)
INBOX = uuid.UUID("999e53d4-3d5c-4c3e-8779-bed06ec056e1")
KEY = SERVICES_KEY_DISPLAY


def test_register_list_unregister() -> None:
    registry = MemoryRegistry({"999E53D4-3D5C-4C3E-8779-BED06EC056E1": "VM Session Service"})
    entry = register_service(registry, SSH, "hvbridge ssh")
    assert entry == ServiceEntry(SSH, "hvbridge ssh", "00000016-FACB-11E6-BD58-64006A7986D3")
    assert registry.services["00000016-FACB-11E6-BD58-64006A7986D3"] == "hvbridge ssh"
    assert [(e.service_id, e.vsock_port, e.name) for e in list_services(registry)] == [
        (SSH, 22, "hvbridge ssh"),
        (INBOX, None, "VM Session Service"),
    ]
    assert unregister_service(registry, SSH) == entry
    assert list(registry.services) == ["999E53D4-3D5C-4C3E-8779-BED06EC056E1"]


def test_list_orders_and_skips() -> None:
    registry = MemoryRegistry(
        {
            "{999e53d4-3d5c-4c3e-8779-bed06ec056e1}": None,  # no ElementName
            "0000ABCD-FACB-11E6-BD58-64006A7986D3": "b",
            "00000016-facb-11e6-bd58-64006a7986d3": "a",
            "not-a-guid": "skipped",
            "0b1e2f3a-0000-4000-8000-000000000001": "c",
        }
    )
    assert [(e.vsock_port, e.name, e.key) for e in list_services(registry)] == [
        (22, "a", "00000016-facb-11e6-bd58-64006a7986d3"),
        (0xABCD, "b", "0000ABCD-FACB-11E6-BD58-64006A7986D3"),
        (None, "c", "0b1e2f3a-0000-4000-8000-000000000001"),
        (None, None, "{999e53d4-3d5c-4c3e-8779-bed06ec056e1}"),
    ]


@pytest.mark.parametrize(
    ("existing_key", "existing_name"),
    [
        ("00000016-FACB-11E6-BD58-64006A7986D3", "old"),
        ("00000016-facb-11e6-bd58-64006a7986d3", "old"),  # another case: still the same GUID
        ("{00000016-facb-11e6-bd58-64006a7986d3}", None),  # braces
    ],
)
def test_register_refuses_duplicate(existing_key: str, existing_name: str | None) -> None:
    registry = MemoryRegistry({existing_key: existing_name})
    named = " as 'old'" if existing_name else ""
    message = (
        f"service {SSH} is already registered{named} ({KEY}\\{existing_key}); unregister it first"
        f" (hvbridge hyperv unregister --service {SSH}) or use another port"
    )
    with pytest.raises(RegistryError) as info:
        register_service(registry, SSH, "new")
    assert str(info.value) == message
    assert registry.services == {existing_key: existing_name}


def test_register_race_with_another_process() -> None:
    @attrs.define
    class Racing:
        """read_services() shows nothing, then create_service() finds the key."""

        inner: MemoryRegistry

        def read_services(self) -> list[tuple[str, str | None]]:
            return []

        def create_service(self, key: str, element_name: str) -> None:
            self.inner.create_service(key, element_name)

        def delete_service(self, key: str) -> None:
            raise NotImplementedError

    registry = Racing(MemoryRegistry({"00000016-FACB-11E6-BD58-64006A7986D3": "other"}))
    with pytest.raises(RegistryError, match=r"^service 00000016-.* is already registered \("):
        register_service(registry, SSH, "new")


@pytest.mark.parametrize("name", ["", "   ", "bad\nname", "tab\there"])
def test_register_rejects_bad_names(name: str) -> None:
    registry = MemoryRegistry()
    with pytest.raises(RegistryError, match=r"^invalid service name .*; expected a non-empty name"):
        register_service(registry, SSH, name)
    assert registry.services == {}


ADMIN = (
    f"access denied; changing {KEY} needs administrator rights, run the command from an elevated prompt"
    " (Run as administrator)"
)
MISSING = (
    f"{KEY} does not exist; is Hyper-V enabled on this host?"
    " (Enable-WindowsOptionalFeature -Online -FeatureName Microsoft-Hyper-V)"
)


def test_register_without_admin_rights() -> None:
    registry = MemoryRegistry(writable=False)
    with pytest.raises(RegistryError) as info:
        register_service(registry, SSH, "ssh")
    assert str(info.value) == f"cannot register service {SSH}: {ADMIN}"
    assert isinstance(info.value, HvbridgeError)
    assert isinstance(info.value.__cause__, PermissionError)


def test_unregister_without_admin_rights() -> None:
    registry = MemoryRegistry({"00000016-FACB-11E6-BD58-64006A7986D3": "ssh"}, writable=False)
    with pytest.raises(RegistryError) as info:
        unregister_service(registry, SSH)
    assert str(info.value) == f"cannot unregister service {SSH}: {ADMIN}"
    assert registry.services  # still there


def test_registry_missing() -> None:
    registry = MemoryRegistry(exists=False)
    with pytest.raises(RegistryError) as info:
        list_services(registry)
    assert str(info.value) == f"cannot list Hyper-V services: {MISSING}"


def test_unregister_unknown() -> None:
    registry = MemoryRegistry({"999E53D4-3D5C-4C3E-8779-BED06EC056E1": "VM Session Service"})
    with pytest.raises(RegistryError) as info:
        unregister_service(registry, SSH)
    assert str(info.value) == (
        f"service {SSH} is not registered under {KEY}; `hvbridge hyperv services` lists the registered ones"
    )


def test_other_registry_errors_keep_strerror() -> None:
    @attrs.define
    class Broken:
        def read_services(self) -> list[tuple[str, str | None]]:
            return []

        def create_service(self, key: str, element_name: str) -> None:
            raise OSError(1009, "The configuration registry database is corrupt")

        def delete_service(self, key: str) -> None:
            raise NotImplementedError

    with pytest.raises(RegistryError) as info:
        register_service(Broken(), SSH, "ssh")
    assert str(info.value) == f"cannot register service {SSH}: The configuration registry database is corrupt"


def test_memory_registry_delete_missing() -> None:
    registry = MemoryRegistry()
    with pytest.raises(FileNotFoundError):
        registry.delete_service("00000016-FACB-11E6-BD58-64006A7986D3")


def test_find_service() -> None:
    registry = MemoryRegistry({"00000016-facb-11e6-bd58-64006a7986d3": "ssh"})
    assert find_service(registry, SSH) == ServiceEntry(SSH, "ssh", "00000016-facb-11e6-bd58-64006a7986d3")
    assert find_service(registry, INBOX) is None


# ---------------------------------------------------------------------------- parsers

BUILD = VmInfo("build-01", uuid.UUID("3f2504e0-4f89-41d3-9a0c-0305e82c3301"), "Running")
UBUNTU = VmInfo("Ubuntu 24.04", uuid.UUID("8c0f6c57-2f1e-4d8b-9f53-1b7e6d8a9a10"), "Off")
WATCH = VmInfo("Überwachung", uuid.UUID("d1c8b2a4-77e5-4c1e-a0b6-5f0e2c9d4b7e"), "Saved")
WSL = uuid.UUID("6c0f1a3e-9d2b-4f4e-8a77-2e1d5b9c0f42")


def test_parse_get_vm() -> None:
    assert parse_get_vm_json(decode_output(recorded("get-vm.json"))) == [BUILD, UBUNTU, WATCH]


def test_parse_get_vm_single_object() -> None:
    text = decode_output(recorded("get-vm-single.json"))
    assert parse_get_vm_json(text) == [attrs.evolve(BUILD, state="2")]


@pytest.mark.parametrize("text", ["", "\r\n", "[]", "[]\r\n"])
def test_parse_get_vm_empty(text: str) -> None:
    assert parse_get_vm_json(text) == []
    assert parse_get_vm_json(decode_output(recorded("get-vm-empty.json"))) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Get-VM : Hyper-V was unable to find a virtual machine", r"^cannot parse the output of Get-VM: "),
        ("[1, 2]", r"^unexpected output from Get-VM: expected JSON objects, got 1$"),
        ('[{"Name": "x"}]', r"^unexpected output from Get-VM: expected Name and Id strings, got "),
        ('{"Name": "x", "Id": "nope"}', r"^unexpected output from Get-VM: VM 'x' has Id 'nope'$"),
    ],
)
def test_parse_get_vm_errors(text: str, message: str) -> None:
    with pytest.raises(VmLookupError, match=message):
        parse_get_vm_json(text)


def test_parse_get_vm_state_forms() -> None:
    text = (
        '[{"Name":"a","VMId":"3f2504e0-4f89-41d3-9a0c-0305e82c3301","State":null},'
        '{"Name":"b","Id":"3f2504e0-4f89-41d3-9a0c-0305e82c3302","State":true}]'
    )
    assert [vm.state for vm in parse_get_vm_json(text)] == ["Unknown", "True"]


def test_parse_msvm() -> None:
    text = decode_output(recorded("msvm-computersystem.json"))
    assert parse_msvm_json(text) == [BUILD, UBUNTU, WATCH]


def test_parse_msvm_errors_and_states() -> None:
    with pytest.raises(VmLookupError, match=r"^unexpected output from Msvm_ComputerSystem: expected"):
        parse_msvm_json('[{"ElementName": 1}]')
    text = '{"ElementName":"a","Name":"3f2504e0-4f89-41d3-9a0c-0305e82c3301","EnabledState":12345}'
    assert parse_msvm_json(text)[0].state == "12345"


@pytest.mark.parametrize(
    ("enabled_state", "shown"),
    [(2, "Running"), (3, "Off"), (6, "Saved"), (9, "Paused"), (10, "Starting"), (4, "Stopping"), (32768, "32768")],
)
def test_parse_msvm_v2_states(enabled_state: int, shown: str) -> None:
    """root/virtualization/v2 reports a paused VM as 9 (Quiesce) and a saved one as 6 (Enabled but Offline)."""
    text = f'{{"ElementName":"a","Name":"3f2504e0-4f89-41d3-9a0c-0305e82c3301","EnabledState":{enabled_state}}}'
    assert parse_msvm_json(text)[0].state == shown


def test_parse_wslinfo() -> None:
    assert parse_wslinfo_vm_id(decode_output(recorded("wslinfo-vm-id.txt"))) == WSL
    assert parse_wslinfo_vm_id("{6C0F1A3E-9D2B-4F4E-8A77-2E1D5B9C0F42}") == WSL
    with pytest.raises(VmLookupError, match=r"^the default WSL distribution runs under WSL 1"):
        parse_wslinfo_vm_id(decode_output(recorded("wslinfo-wsl1.txt")))
    with pytest.raises(VmLookupError, match=r"^unexpected output from wslinfo --vm-id: 'Usage: "):
        parse_wslinfo_vm_id("Usage: wslinfo [--networking-mode]")


def test_parse_hcsdiag() -> None:
    text = decode_output(recorded("hcsdiag-list.txt"))
    assert parse_hcsdiag_list(text) == [
        (WSL, "Running", "WSL"),
        (uuid.UUID("a1b2c3d4-e5f6-4711-8899-aabbccddeeff"), "Running", "Docker"),
    ]
    assert wsl_vm_id_from_hcsdiag(text) == WSL
    # hcsdiag may print UTF-16 like wsl.exe does.
    assert wsl_vm_id_from_hcsdiag(decode_output(text.encode("utf-16-le"))) == WSL


def test_hcsdiag_no_or_several_wsl_vms() -> None:
    line = "    VM,   {state}, {guid}, WSL"
    stopped = line.format(state="Stopped", guid=WSL)
    with pytest.raises(VmLookupError, match=r"^no running WSL2 VM; start WSL \(wsl\.exe\) and try again$"):
        wsl_vm_id_from_hcsdiag(stopped + "\n    a, b, not-a-guid, WSL\n")
    other = uuid.UUID("a1b2c3d4-e5f6-4711-8899-aabbccddeeff")
    two = line.format(state="Running", guid=WSL) + "\n" + line.format(state="Running", guid=other)
    with pytest.raises(VmLookupError, match=r"^several running WSL VMs \(6c0f.*, a1b2.*\); give the VmId"):
        wsl_vm_id_from_hcsdiag(two)


@pytest.mark.parametrize(
    ("data", "text"),
    [
        ("wsl1\n".encode("utf-16-le"), "wsl1\n"),
        ("\ufeffwsl1".encode("utf-16-le"), "wsl1"),
        ("Über".encode("utf-16-be").join([b"\xfe\xff", b""]), "Über"),
        (b"\xef\xbb\xbf[]", "[]"),
        ("Über".encode(), "Über"),
        (b"\xff", "\ufffd"),
    ],
)
def test_decode_output(data: bytes, text: str) -> None:
    assert decode_output(data) == text


# ---------------------------------------------------------------------------- VM lookup


@attrs.define
class FakeRunner:
    """A Runner answering by program name from a table; records every argv."""

    answers: dict[str, CommandResult | BaseException]
    calls: list[list[str]] = attrs.field(factory=list)

    def __call__(self, argv: Sequence[str], timeout: float) -> CommandResult:
        assert timeout == 60.0
        self.calls.append(list(argv))
        key = argv[0]
        if key == "powershell.exe":
            script = base64.b64decode(argv[-1]).decode("utf-16-le")
            key = "Get-VM" if script == GET_VM_SCRIPT else "WMI"
            assert script in (GET_VM_SCRIPT, WMI_SCRIPT)
        answer = self.answers[key]
        if isinstance(answer, BaseException):
            raise answer
        return answer


def ok(data: bytes) -> CommandResult:
    """A successful run that printed `data`."""
    return CommandResult(0, data, b"")


def failed(stderr: bytes, code: int = 1) -> CommandResult:
    """A failed run."""
    return CommandResult(code, b"", stderr)


def test_powershell_argv_is_encoded() -> None:
    argv = powershell_argv(GET_VM_SCRIPT)
    assert argv[:-1] == ["powershell.exe", "-NoLogo", "-NoProfile", "-NonInteractive", "-EncodedCommand"]
    assert base64.b64decode(argv[-1]).decode("utf-16-le") == GET_VM_SCRIPT
    assert "Get-VM" in GET_VM_SCRIPT
    assert "Msvm_ComputerSystem" in WMI_SCRIPT


def test_lookup_uses_get_vm() -> None:
    runner = FakeRunner({"Get-VM": ok(recorded("get-vm.json"))})
    assert SubprocessVmLookup(runner).list_vms() == [BUILD, UBUNTU, WATCH]
    assert len(runner.calls) == 1


def test_lookup_falls_back_to_wmi() -> None:
    missing = b"Get-VM : The term 'Get-VM' is not recognized as the name of a cmdlet\r\nAt line:4 char:12\r\n"
    runner = FakeRunner({"Get-VM": failed(missing), "WMI": ok(recorded("msvm-computersystem.json"))})
    assert SubprocessVmLookup(runner).list_vms() == [BUILD, UBUNTU, WATCH]
    assert len(runner.calls) == 2


def test_lookup_both_fail() -> None:
    runner = FakeRunner(
        {"Get-VM": failed(b"Get-VM : You do not have the required permission\r\n"), "WMI": failed(b"", 5)}
    )
    with pytest.raises(VmLookupError) as info:
        SubprocessVmLookup(runner).list_vms()
    assert str(info.value) == (
        "cannot list Hyper-V VMs (Get-VM: exit status 1: Get-VM : You do not have the required permission;"
        " Msvm_ComputerSystem: exit status 5); this needs Hyper-V and membership in 'Hyper-V Administrators'"
        " (or an elevated prompt)"
    )


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (FileNotFoundError(2, "No such file"), "powershell.exe not found"),
        (subprocess.TimeoutExpired(["powershell.exe"], 60.0), "powershell.exe did not finish within 60 s"),
        (PermissionError(13, "Permission denied"), "cannot run powershell.exe: Permission denied"),
    ],
)
def test_lookup_cannot_run(error: BaseException, reason: str) -> None:
    runner = FakeRunner({"Get-VM": error, "WMI": error})
    with pytest.raises(VmLookupError, match=rf"^cannot list Hyper-V VMs \(Get-VM: {reason}; Msvm_"):
        SubprocessVmLookup(runner).list_vms()


def test_wsl_from_wslinfo() -> None:
    runner = FakeRunner({"wsl.exe": ok(recorded("wslinfo-vm-id.txt"))})
    assert SubprocessVmLookup(runner).wsl_vm_id() == WSL
    assert runner.calls == [["wsl.exe", "--exec", "wslinfo", "--vm-id"]]


def test_wsl_wsl1_is_final() -> None:
    runner = FakeRunner({"wsl.exe": ok(recorded("wslinfo-wsl1.txt"))})
    with pytest.raises(VmLookupError, match=r"runs under WSL 1"):
        SubprocessVmLookup(runner).wsl_vm_id()


def test_wsl_falls_back_to_hcsdiag() -> None:
    old_wslinfo = failed(b"wslinfo: unrecognized option '--vm-id'\n")
    runner = FakeRunner({"wsl.exe": old_wslinfo, "hcsdiag.exe": ok(recorded("hcsdiag-list.txt"))})
    assert SubprocessVmLookup(runner).wsl_vm_id() == WSL
    assert runner.calls[1] == ["hcsdiag.exe", "list"]


def test_wsl_all_fail() -> None:
    not_installed = failed("Windows Subsystem for Linux is not installed.\r\n".encode("utf-16-le"), 0xFFFFFFFF)
    runner = FakeRunner({"wsl.exe": not_installed, "hcsdiag.exe": FileNotFoundError(2, "x")})
    with pytest.raises(VmLookupError) as info:
        SubprocessVmLookup(runner).wsl_vm_id()
    assert str(info.value) == (
        "cannot find the WSL2 VM id (wslinfo --vm-id: exit status 4294967295: Windows Subsystem for Linux is not"
        " installed.; hcsdiag: hcsdiag.exe not found); update WSL (wsl --update) for `wslinfo --vm-id`, or run"
        " as administrator for `hcsdiag list`, or give the VmId as a GUID"
    )
    runner = FakeRunner({"wsl.exe": FileNotFoundError(2, "x"), "hcsdiag.exe": failed(b"Access is denied.\r\n")})
    with pytest.raises(VmLookupError, match=r"^cannot find the WSL2 VM id \(wslinfo: wsl.exe not found;"):
        SubprocessVmLookup(runner).wsl_vm_id()


def test_run_command_runs_an_argument_list() -> None:
    script = "import sys; print(sys.argv[1]); sys.stderr.write('e'); sys.exit(3)"
    result = run_command([sys.executable, "-c", script, "a b; $(x)"], 30.0)
    assert result == CommandResult(3, b"a b; $(x)\n", b"e")


# ---------------------------------------------------------------------------- resolver


@attrs.define
class RecordedLookup:
    """A VmLookup over recorded outputs, counting how often it is asked."""

    vms_file: str = "get-vm.json"
    wsl_file: str = "wslinfo-vm-id.txt"
    asked: int = 0

    def list_vms(self) -> list[VmInfo]:
        self.asked += 1
        return parse_get_vm_json(decode_output(recorded(self.vms_file)))

    def wsl_vm_id(self) -> uuid.UUID:
        self.asked += 1
        return parse_wslinfo_vm_id(decode_output(recorded(self.wsl_file)))


@attrs.define
class FakeClock:
    """Monotonic seconds that only move when told."""

    now: float = 100.0

    def __call__(self) -> float:
        return self.now


def test_resolver() -> None:
    lookup = RecordedLookup()
    clock = FakeClock()
    resolver = VmResolver(lookup, min_refresh=10.0, clock=clock)
    assert resolver.resolve(BUILD.vm_id) == BUILD.vm_id
    assert lookup.asked == 0
    assert resolver.resolve("build-01") == BUILD.vm_id
    assert resolver.resolve("BUILD-01") == BUILD.vm_id  # case-insensitive, and cached per casefold
    assert resolver.resolve("überwachung") == WATCH.vm_id
    assert lookup.asked == 2
    assert resolver.resolve("build-01", refresh=True) == BUILD.vm_id
    assert lookup.asked == 2  # resolved less than min_refresh ago: no new lookup
    clock.now += 10.0
    assert resolver.resolve("build-01", refresh=True) == BUILD.vm_id
    assert lookup.asked == 3
    assert resolver.resolve("WSL") == WSL
    assert resolver.resolve("wsl") == WSL
    assert lookup.asked == 4


def test_resolver_refresh_sees_new_id() -> None:
    lookup = RecordedLookup()
    resolver = VmResolver(lookup, min_refresh=0)
    assert resolver.resolve("wsl") == WSL
    lookup.wsl_file = "hcsdiag-list.txt"  # not wslinfo output: the lookup now fails
    assert resolver.resolve("wsl") == WSL  # cached
    with pytest.raises(VmLookupError):
        resolver.resolve("wsl", refresh=True)


def test_find_vm() -> None:
    vms = [BUILD, attrs.evolve(UBUNTU, name="Build-01"), WATCH]
    assert find_vm(vms, "build-01") == BUILD  # the exact match wins
    assert find_vm(vms, "Build-01").vm_id == UBUNTU.vm_id
    with pytest.raises(VmLookupError) as info:
        find_vm(vms, "BUILD-01")
    assert str(info.value) == (
        f"2 Hyper-V VMs are named 'BUILD-01' ({BUILD.vm_id}, {UBUNTU.vm_id}); use the VmId instead of the name"
    )
    with pytest.raises(VmLookupError) as info:
        find_vm(vms, "db")
    assert str(info.value) == (
        "no Hyper-V VM is named 'db' (VMs on this host: Build-01, build-01, Überwachung);"
        " `hvbridge hyperv vms` lists names and VmIds"
    )
    with pytest.raises(VmLookupError, match=r"\(VMs on this host: none\)"):
        find_vm([], "db")
