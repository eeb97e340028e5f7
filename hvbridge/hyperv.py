"""Hyper-V socket naming: service GUIDs, the vsock port template and the VmId wildcards (pure).

This module owns the mapping between Hyper-V names and GUIDs. It never imports trio and never
creates sockets; the Windows registry and the VM-name lookup sit behind small interfaces here
so that tests drive them on Linux.

A Linux guest's AF_VSOCK port P is the Hyper-V service `{P:08x}-facb-11e6-bd58-64006a7986d3`
(Microsoft, "Make your own integration services", the VSockTemplate GUID).
"""

from __future__ import annotations

import uuid
from typing import Final

#: The Hyper-V service GUID template for AF_VSOCK ports (its first field is the port).
VSOCK_TEMPLATE: Final = uuid.UUID("00000000-facb-11e6-bd58-64006a7986d3")

#: Largest vsock port the template can carry (VMADDR_PORT_ANY, 2**32 - 1, is not a port).
MAX_VSOCK_PORT: Final = 2**32 - 2

HV_GUID_ZERO: Final = uuid.UUID("00000000-0000-0000-0000-000000000000")
HV_GUID_BROADCAST: Final = uuid.UUID("ffffffff-ffff-ffff-ffff-ffffffffffff")
HV_GUID_CHILDREN: Final = uuid.UUID("90db8b89-0d35-4f79-8ce9-49ea0ac8b7cd")
HV_GUID_LOOPBACK: Final = uuid.UUID("e0e16197-dd56-4a10-9195-5ee7a155a838")
HV_GUID_PARENT: Final = uuid.UUID("a42e7cda-d03f-480c-9cc2-a4de20abb878")
HV_GUID_SILOHOST: Final = uuid.UUID("36bd0c5c-7276-4223-88ba-7d03b654c568")

#: VmId wildcard names accepted in `hvsock://NAME/...` (SPEC 3.1), lower case.
VM_WILDCARDS: Final[dict[str, uuid.UUID]] = {
    "any": HV_GUID_ZERO,
    "wildcard": HV_GUID_ZERO,
    "zero": HV_GUID_ZERO,
    "children": HV_GUID_CHILDREN,
    "loopback": HV_GUID_LOOPBACK,
    "parent": HV_GUID_PARENT,
    "broadcast": HV_GUID_BROADCAST,
    "silohost": HV_GUID_SILOHOST,
}


def service_id_for_port(port: int) -> uuid.UUID:
    """Return the Hyper-V service GUID that stands for vsock port `port`.

    Raises:
        ValueError: `port` is outside 0..2**32-2.
    """
    if not 0 <= port <= MAX_VSOCK_PORT:
        raise ValueError(f"vsock port {port} is out of range; expected 0..{MAX_VSOCK_PORT}")
    return uuid.UUID(int=(port << 96) | VSOCK_TEMPLATE.int)


def port_for_service_id(service_id: uuid.UUID) -> int | None:
    """Return the vsock port a service GUID encodes, or None if it does not follow the template."""
    port = service_id.int >> 96
    if service_id.int & ((1 << 96) - 1) != VSOCK_TEMPLATE.int or port > MAX_VSOCK_PORT:
        return None
    return port
