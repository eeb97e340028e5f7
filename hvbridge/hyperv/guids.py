"""Hyper-V GUID and port facts: the vsock service template, the VmId wildcards, GUID text.

Pure: no trio, no sockets, no subprocess, no registry. addresses.py, the socket layer and the
allow rules all read Hyper-V names through this module, so each fact below is said once:

1. A Linux guest's AF_VSOCK port P is the Hyper-V service `{P:08x}-facb-11e6-bd58-64006a7986d3`
   (Microsoft, "Make your own integration services", the VSockTemplate GUID).
2. Ports above 0x7FFFFFFF exist in the template but a Hyper-V socket cannot reach them
   (hyperv_port_problem says why).
3. GUID text is parsed in one place, parse_guid: any case, with or without braces, with or
   without dashes; nothing else (uuid.UUID() alone also takes underscores, blanks, non-ASCII
   digits and `urn:uuid:`).
4. An allow rule's VmId admits a peer through vm_id_matches only (HV_GUID_ZERO admits every VM).
"""

from __future__ import annotations

import re
import uuid
from typing import Final

#: The Hyper-V service GUID template for AF_VSOCK ports (its first field is the port).
VSOCK_TEMPLATE: Final = uuid.UUID("00000000-facb-11e6-bd58-64006a7986d3")

#: Largest vsock port the template can carry (VMADDR_PORT_ANY, 2**32 - 1, is not a port).
MAX_VSOCK_PORT: Final = 2**32 - 2

#: Largest vsock port a Hyper-V socket can reach. The Linux hv_sock driver
#: (net/vmw_vsock/hyperv_transport.c, MAX_LISTEN_PORT) ignores connection offers for a service
#: whose port is above it, and numbers from 0x80000000 up are the host's ephemeral ports there.
MAX_HYPERV_PORT: Final = 0x7FFFFFFF

HV_GUID_ZERO: Final = uuid.UUID("00000000-0000-0000-0000-000000000000")
HV_GUID_WILDCARD: Final = HV_GUID_ZERO
HV_GUID_BROADCAST: Final = uuid.UUID("ffffffff-ffff-ffff-ffff-ffffffffffff")
HV_GUID_CHILDREN: Final = uuid.UUID("90db8b89-0d35-4f79-8ce9-49ea0ac8b7cd")
HV_GUID_LOOPBACK: Final = uuid.UUID("e0e16197-dd56-4a10-9195-5ee7a155a838")
HV_GUID_PARENT: Final = uuid.UUID("a42e7cda-d03f-480c-9cc2-a4de20abb878")
HV_GUID_SILOHOST: Final = uuid.UUID("36bd0c5c-7276-4223-88ba-7d03b654c568")

#: VmId wildcard names accepted in `hvsock://NAME/...` (docs/reference.md, "Endpoints"), lower case.
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


def hyperv_port_problem(port: int) -> str | None:
    """Why vsock port `port` cannot be used through Hyper-V sockets, or None if it can."""
    if port <= MAX_HYPERV_PORT:
        return None
    return (
        f"vsock port {port} is above {MAX_HYPERV_PORT} (0x7FFFFFFF): the Linux hv_sock driver ignores"
        " connections to such ports (0x80000000 and up are the host's ephemeral ports);"
        f" use a port 0..{MAX_HYPERV_PORT}"
    )


def port_for_service_id(service_id: uuid.UUID) -> int | None:
    """Return the vsock port a service GUID encodes, or None if it does not follow the template."""
    port = service_id.int >> 96
    if service_id.int & ((1 << 96) - 1) != VSOCK_TEMPLATE.int or port > MAX_VSOCK_PORT:
        return None
    return port


_HEX: Final = "[0-9a-fA-F]"
_GUID: Final = re.compile(
    rf"(\{{)?(?:{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}|{_HEX}{{32}})(?(1)\}})"
)


def parse_guid(text: str) -> uuid.UUID:
    """Parse a GUID as Windows prints it or a user types it: any case, with or without braces,
    with or without dashes. Blanks are not stripped: callers that read tool output strip it.

    Raises:
        ValueError: `text` is not a GUID.
    """
    if not _GUID.fullmatch(text):
        raise ValueError(f"{text!r} is not a GUID; expected e.g. 00000016-facb-11e6-bd58-64006a7986d3")
    return uuid.UUID(text)


def sockaddr_vm_id(sockaddr: object) -> uuid.UUID | None:
    """The VmId in an AF_HYPERV socket address `(vm_id, service_id)`, or None if it is not one."""
    if isinstance(sockaddr, tuple) and len(sockaddr) == 2 and isinstance(sockaddr[0], str):
        try:
            return parse_guid(sockaddr[0])
        except ValueError:
            return None
    return None


def sockaddr_text(sockaddr: object) -> str | None:
    """An AF_HYPERV socket address as endpoint text, `hvsock://VMID/SERVICE`, or None."""
    if isinstance(sockaddr, tuple) and len(sockaddr) == 2 and all(isinstance(p, str) for p in sockaddr):
        try:
            return f"hvsock://{parse_guid(sockaddr[0])}/{parse_guid(sockaddr[1])}"
        except ValueError:
            return None
    return None


def vm_id_matches(rule: uuid.UUID, peer: uuid.UUID) -> bool:
    """Whether an allow rule's VmId admits a peer's VmId (HV_GUID_ZERO admits every VM)."""
    return rule in (HV_GUID_ZERO, peer)
