"""The Hyper-V service registry: the GuestCommunicationServices key (`hvbridge hyperv register`).

ServiceRegistry is the interface; WinRegistry is the real one (winreg, Windows only) and
MemoryRegistry an in-memory stand-in with the same rules, so tests drive all of the logic on
Linux. register_service()/unregister_service()/list_services() hold the rules: GUIDs compare
as uuid.UUID, a duplicate is refused, an OSError becomes a RegistryError that says what to do.
"""

from __future__ import annotations

import sys
import uuid
from typing import Final, Protocol, final

import attrs

from hvbridge.errors import HvbridgeError
from hvbridge.hyperv.guids import parse_guid, port_for_service_id

#: Where Hyper-V looks for registered services (one subkey per service GUID), under HKLM.
SERVICES_KEY: Final = r"SOFTWARE\Microsoft\Windows NT\CurrentVersion\Virtualization\GuestCommunicationServices"
SERVICES_KEY_DISPLAY: Final = "HKLM\\" + SERVICES_KEY


class RegistryError(HvbridgeError):
    """The Hyper-V service registry could not be read or changed as asked."""


@attrs.frozen
class ServiceEntry:
    """One registered Hyper-V service.

    Attributes:
        service_id: The service GUID (the subkey's name).
        name: Its ElementName, or None when the subkey has none.
        key: The subkey's name exactly as the registry stores it.
    """

    service_id: uuid.UUID
    name: str | None
    key: str

    @property
    def vsock_port(self) -> int | None:
        """The vsock port the GUID encodes, if it follows the Linux-guest template."""
        return port_for_service_id(self.service_id)


class ServiceRegistry(Protocol):
    """The GuestCommunicationServices key: one subkey per service GUID, with an ElementName.

    Implementations raise OSError as winreg does: PermissionError without administrator
    rights, FileNotFoundError when the key (or subkey) does not exist.
    """

    def read_services(self) -> list[tuple[str, str | None]]:
        """Every subkey as (subkey name, ElementName or None)."""
        ...

    def create_service(self, key: str, element_name: str) -> None:
        """Create subkey `key` with the REG_SZ value ElementName."""
        ...

    def delete_service(self, key: str) -> None:
        """Delete subkey `key` (named exactly as read_services() returned it)."""
        ...


def _registry_error(exc: OSError, action: str) -> RegistryError:
    if isinstance(exc, PermissionError):
        return RegistryError(
            f"{action}: access denied; changing {SERVICES_KEY_DISPLAY} needs administrator rights,"
            " run the command from an elevated prompt (Run as administrator)"
        )
    if isinstance(exc, FileNotFoundError):
        return RegistryError(
            f"{action}: {SERVICES_KEY_DISPLAY} does not exist; is Hyper-V enabled on this host?"
            " (Enable-WindowsOptionalFeature -Online -FeatureName Microsoft-Hyper-V)"
        )
    return RegistryError(f"{action}: {exc.strerror or exc}")


def list_services(registry: ServiceRegistry) -> list[ServiceEntry]:
    """The registered services, vsock-template ones first (by port), then the rest by GUID.

    Subkeys whose names are not GUIDs are skipped: Hyper-V cannot use them either.

    Raises:
        RegistryError: The key cannot be read (it says why and what to do).
    """
    try:
        raw = registry.read_services()
    except OSError as exc:
        raise _registry_error(exc, "cannot list Hyper-V services") from exc
    entries = []
    for key, name in raw:
        try:
            entries.append(ServiceEntry(parse_guid(key), name, key))
        except ValueError:
            continue
    return sorted(entries, key=_service_order)


def _service_order(entry: ServiceEntry) -> tuple[int, int, str]:
    port = entry.vsock_port
    return (0, port, "") if port is not None else (1, 0, str(entry.service_id))


def find_service(registry: ServiceRegistry, service_id: uuid.UUID) -> ServiceEntry | None:
    """The registered entry for `service_id` (compared as a UUID), or None."""
    for entry in list_services(registry):
        if entry.service_id == service_id:
            return entry
    return None


def register_service(registry: ServiceRegistry, service_id: uuid.UUID, name: str) -> ServiceEntry:
    """Register `service_id` under GuestCommunicationServices with ElementName `name`.

    The subkey is named like Windows' own entries: the GUID in upper case, without braces.

    Raises:
        RegistryError: The name is empty, the GUID is already registered, or the registry
            refused (no administrator rights, Hyper-V missing).
    """
    if not name.strip() or any(ord(c) < 32 for c in name):
        raise RegistryError(f"invalid service name {name!r}; expected a non-empty name without control characters")
    existing = find_service(registry, service_id)
    if existing is not None:
        raise RegistryError(_duplicate_message(existing))
    key = str(service_id).upper()
    try:
        registry.create_service(key, name)
    except FileExistsError as exc:  # created by someone else since we looked
        raise RegistryError(_duplicate_message(ServiceEntry(service_id, None, key))) from exc
    except OSError as exc:
        raise _registry_error(exc, f"cannot register service {service_id}") from exc
    return ServiceEntry(service_id, name, key)


def _duplicate_message(entry: ServiceEntry) -> str:
    named = f" as {entry.name!r}" if entry.name is not None else ""
    return (
        f"service {entry.service_id} is already registered{named} ({SERVICES_KEY_DISPLAY}\\{entry.key});"
        f" unregister it first (hvbridge hyperv unregister --service {entry.service_id}) or use another port"
    )


def unregister_service(registry: ServiceRegistry, service_id: uuid.UUID) -> ServiceEntry:
    """Delete the registry entry of `service_id` and return what it was.

    Raises:
        RegistryError: No such entry, or the registry refused (no administrator rights).
    """
    entry = find_service(registry, service_id)
    if entry is None:
        raise RegistryError(
            f"service {service_id} is not registered under {SERVICES_KEY_DISPLAY};"
            " `hvbridge hyperv services` lists the registered ones"
        )
    try:
        registry.delete_service(entry.key)
    except OSError as exc:
        raise _registry_error(exc, f"cannot unregister service {service_id}") from exc
    return entry


@final
@attrs.define(eq=False)
class MemoryRegistry:
    """A ServiceRegistry in memory, with the real one's rules: subkey names are compared
    case-insensitively, and errors are the OSErrors winreg raises.

    Attributes:
        services: subkey name -> ElementName (None: the subkey has no ElementName).
        writable: False makes create/delete raise PermissionError (no administrator rights).
        exists: False makes every call raise FileNotFoundError (Hyper-V not installed).
    """

    services: dict[str, str | None] = attrs.field(factory=dict)
    writable: bool = True
    exists: bool = True

    def _check(self, write: bool) -> None:
        if not self.exists:
            raise FileNotFoundError(2, "The system cannot find the file specified")
        if write and not self.writable:
            raise PermissionError(13, "Access is denied")

    def _find(self, key: str) -> str | None:
        return next((k for k in self.services if k.casefold() == key.casefold()), None)

    def read_services(self) -> list[tuple[str, str | None]]:
        """Every subkey as (subkey name, ElementName or None)."""
        self._check(write=False)
        return list(self.services.items())

    def create_service(self, key: str, element_name: str) -> None:
        """Create subkey `key`; FileExistsError if it exists (the real registry would open it)."""
        self._check(write=True)
        if self._find(key) is not None:
            raise FileExistsError(17, "The key already exists", key)
        self.services[key] = element_name

    def delete_service(self, key: str) -> None:
        """Delete subkey `key`; FileNotFoundError if it does not exist."""
        self._check(write=True)
        found = self._find(key)
        if found is None:
            raise FileNotFoundError(2, "The system cannot find the file specified", key)
        del self.services[found]


if sys.platform == "win32":  # pragma: no cover - Windows only; MemoryRegistry stands in on Linux
    import winreg

    @final
    class WinRegistry:
        """The real GuestCommunicationServices key, through winreg (64-bit view)."""

        def read_services(self) -> list[tuple[str, str | None]]:
            """Every subkey as (subkey name, ElementName or None)."""
            result: list[tuple[str, str | None]] = []
            access = winreg.KEY_READ | winreg.KEY_WOW64_64KEY
            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, SERVICES_KEY, 0, access) as parent:
                index = 0
                while True:
                    try:
                        key = winreg.EnumKey(parent, index)
                    except OSError:  # ERROR_NO_MORE_ITEMS
                        break
                    index += 1
                    name: str | None = None
                    with winreg.OpenKey(parent, key, 0, access) as child:
                        try:
                            value, kind = winreg.QueryValueEx(child, "ElementName")
                        except FileNotFoundError:
                            pass
                        else:
                            if kind in (winreg.REG_SZ, winreg.REG_EXPAND_SZ) and isinstance(value, str):
                                name = value
                    result.append((key, name))
            return result

        def create_service(self, key: str, element_name: str) -> None:
            """Create subkey `key` with ElementName (REG_SZ)."""
            access = winreg.KEY_WRITE | winreg.KEY_WOW64_64KEY
            with winreg.CreateKeyEx(winreg.HKEY_LOCAL_MACHINE, SERVICES_KEY + "\\" + key, 0, access) as child:
                winreg.SetValueEx(child, "ElementName", 0, winreg.REG_SZ, element_name)

        def delete_service(self, key: str) -> None:
            """Delete subkey `key`."""
            access = winreg.KEY_WRITE | winreg.KEY_WOW64_64KEY
            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, SERVICES_KEY, 0, access) as parent:
                winreg.DeleteKeyEx(parent, key, winreg.KEY_WOW64_64KEY, 0)
