"""The `hvbridge hyperv` command group (docs/reference.md, "Command line"): GUID <-> port, the service registry, VM ids.

This module owns the `hyperv` subcommands and what they print. The logic lives in the hyperv/ package;
here are only arguments, output and errors. The registry and the VM lookup come from a
HyperVTools object found in the click context (tests pass `obj=HyperVTools(...)` to CliRunner),
else from the real ones (winreg, PowerShell/WSL tools), so every command runs on Linux against
an in-memory registry and recorded outputs.

Errors: an HvbridgeError becomes click.ClickException (one `Error: ...` line, exit 1); bad
arguments are click usage errors (exit 2). cli.py registers the group:
`main.add_command(hyperv_group)`.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, ParamSpec, TypeVar, final

import attrs
import click

from hvbridge.cli_errors import user_errors
from hvbridge.hyperv.guids import (
    MAX_VSOCK_PORT,
    VSOCK_TEMPLATE,
    hyperv_port_problem,
    parse_guid,
    port_for_service_id,
    service_id_for_port,
)
from hvbridge.hyperv.registry import (
    SERVICES_KEY_DISPLAY,
    RegistryError,
    ServiceEntry,
    ServiceRegistry,
    list_services,
    register_service,
    unregister_service,
)
from hvbridge.hyperv.vms import WSL_VM_NAME, SubprocessVmLookup, VmLookup

if TYPE_CHECKING:
    import uuid
    from collections.abc import Sequence

P = ParamSpec("P")
R = TypeVar("R")


@final
@attrs.define(eq=False)
class HyperVTools:
    """Where the `hyperv` commands get the registry and the VM lookup from.

    Attributes:
        registry: The GuestCommunicationServices key, or None for the real one (Windows).
        lookup: The VM lookup, or None for the real one (PowerShell, wsl.exe, hcsdiag).
    """

    registry: ServiceRegistry | None = None
    lookup: VmLookup | None = None


def default_registry() -> ServiceRegistry:
    """The real registry.

    Raises:
        RegistryError: Not on Windows.
    """
    if sys.platform == "win32":  # pragma: no cover - Windows only
        from hvbridge.hyperv.registry import WinRegistry

        return WinRegistry()
    raise RegistryError(
        f"the Hyper-V service registry ({SERVICES_KEY_DISPLAY}) exists only on a Windows host; run this command there"
    )


def _tools() -> HyperVTools:
    found = click.get_current_context().find_object(HyperVTools)
    return found if found is not None else HyperVTools()


def _registry() -> ServiceRegistry:
    registry = _tools().registry
    return registry if registry is not None else default_registry()


def _lookup() -> VmLookup:
    lookup = _tools().lookup
    return lookup if lookup is not None else SubprocessVmLookup()


def _guid(ctx: click.Context, param: click.Parameter, value: str | None) -> uuid.UUID | None:
    """Parse a GUID option/argument (any case, braces optional); a bad one is exit status 2."""
    if value is None:
        return None
    try:
        return parse_guid(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a GUID; expected e.g. 00000016-facb-11e6-bd58-64006a7986d3", ctx, param
        ) from None


#: Any port the vsock template can carry (to unregister an entry whatever its port).
PORT = click.IntRange(0, MAX_VSOCK_PORT)
#: Checked by _hyperv_port, whose message says why the upper bound is 0x7FFFFFFF.
HYPERV_PORT = click.IntRange(min=0)


def _hyperv_port(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """A vsock port a Hyper-V socket can reach (0..0x7FFFFFFF); a higher one is exit status 2."""
    problem = None if value is None else hyperv_port_problem(value)
    if problem is not None:
        raise click.BadParameter(problem, ctx, param)
    return value


def _describe(entry: ServiceEntry) -> str:
    port = entry.vsock_port
    return f"{entry.service_id}" + (f" (vsock port {port})" if port is not None else "")


def _service_id(port: int | None, service: uuid.UUID | None) -> uuid.UUID:
    if (port is None) == (service is None):
        raise click.UsageError("give exactly one of --port and --service")
    if service is not None:
        return service
    assert port is not None
    return service_id_for_port(port)


@click.group("hyperv", short_help="Hyper-V helpers: service GUIDs, the registry, VM ids.")
def hyperv_group() -> None:
    """Hyper-V helpers: service GUIDs, the service registry and VM ids (Windows host).

    `guid` and `port` work anywhere; `register`, `unregister` and `services` edit or read
    HKLM\\SOFTWARE\\Microsoft\\Windows NT\\CurrentVersion\\Virtualization\\GuestCommunicationServices;
    `vms` asks Hyper-V (and WSL).
    """


@hyperv_group.command("guid", short_help="Print the Hyper-V service GUID of vsock PORT.")
@click.argument("port", type=HYPERV_PORT, callback=_hyperv_port)
def guid_command(port: int) -> None:
    """Print the Hyper-V service GUID of vsock PORT (2761 -> 00000ac9-facb-11e6-bd58-64006a7986d3)."""
    click.echo(str(service_id_for_port(port)))


@hyperv_group.command("port", short_help="Print the vsock port a service GUID stands for.")
@click.argument("service", metavar="GUID", callback=_guid)
def port_command(service: uuid.UUID) -> None:
    """Print the vsock port a service GUID stands for (the reverse of `guid`)."""
    port = port_for_service_id(service)
    if port is None:
        raise click.ClickException(
            f"{service} does not follow the vsock template {VSOCK_TEMPLATE}"
            " (PORT-facb-11e6-bd58-64006a7986d3), so it stands for no vsock port"
        )
    click.echo(str(port))


@hyperv_group.command("register", short_help="Register a service GUID so VMs may use it (admin).")
@click.option("--name", required=True, help="Friendly name (ElementName), e.g. 'hvbridge ssh'.")
@click.option(
    "--port", type=HYPERV_PORT, callback=_hyperv_port, help="Register the GUID of this vsock port (Linux guests)."
)
@click.option("--service", callback=_guid, metavar="GUID", help="Register this service GUID.")
@user_errors
def register_command(name: str, port: int | None, service: uuid.UUID | None) -> None:
    """Register a service GUID so VMs may use it (administrator; refuses a duplicate)."""
    service_id = _service_id(port, service)  # a usage error comes before the registry's
    entry = register_service(_registry(), service_id, name)
    click.echo(f"registered {_describe(entry)} as {name!r} in {SERVICES_KEY_DISPLAY}\\{entry.key}")


@hyperv_group.command("unregister")
@click.option("--port", type=PORT, help="Unregister the GUID of this vsock port.")
@click.option("--service", callback=_guid, metavar="GUID", help="Unregister this service GUID.")
@user_errors
def unregister_command(port: int | None, service: uuid.UUID | None) -> None:
    """Remove a registered service GUID (administrator)."""
    service_id = _service_id(port, service)  # a usage error comes before the registry's
    entry = unregister_service(_registry(), service_id)
    named = f" ({entry.name!r})" if entry.name is not None else ""
    click.echo(f"unregistered {_describe(entry)}{named}")


@hyperv_group.command("services", short_help="List registered services and their vsock ports.")
@user_errors
def services_command() -> None:
    """List registered services, with the vsock port where the GUID follows the template."""
    entries = list_services(_registry())
    if not entries:
        click.echo("no services are registered")
        return
    rows = [(str(e.service_id), "-" if e.vsock_port is None else str(e.vsock_port), e.name or "") for e in entries]
    _table(("SERVICE ID", "PORT", "NAME"), rows)


@hyperv_group.command("vms", short_help="List Hyper-V VMs: name, VmId and state.")
@click.option("--wsl", "with_wsl", is_flag=True, help="Also show the WSL2 VM (starts WSL if it is not running).")
@user_errors
def vms_command(with_wsl: bool) -> None:
    """List Hyper-V VMs: name, VmId and state (for hvsock://VM/... and allow = ["vm:..."])."""
    lookup = _lookup()
    rows = [(vm.name, str(vm.vm_id), vm.state) for vm in sorted(lookup.list_vms(), key=lambda v: v.name.casefold())]
    if with_wsl:
        rows.append((WSL_VM_NAME, str(lookup.wsl_vm_id()), "Running"))
    if not rows:
        click.echo("no VMs")
        return
    _table(("NAME", "VMID", "STATE"), rows)


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        click.echo("  ".join(cells).rstrip())
