"""The PROXY protocol (HAProxy's proxy-protocol.txt), v1 and v2: build and parse headers.

Sans-IO: bytes in, bytes out; no sockets are opened and nothing waits here. The supervisor
sends a built header to a route's backend before the first byte of the client's data, and
reads an incoming one (`accept_proxy`) by asking `read_size()` how much to read next and
feeding what arrived to `parse()`.

What a header says about each kind of client:

- TCP clients: v1 `TCP4`/`TCP6`, v2 family 0x11/0x21, source = the client, destination = the
  listener's own address.
- Unix clients: v2 family 0x31 (AF_UNIX, STREAM) with two 108-byte NUL-padded addresses;
  v1 has no Unix form and says `PROXY UNKNOWN`.
- vsock and Hyper-V clients: v2 command PROXY with family 0x00 (AF_UNSPEC, no addresses) and
  TLVs in the range reserved for applications (0xE0..0xEF); v1 says `PROXY UNKNOWN`.

hvbridge's TLVs (every number big-endian):

- 0xE0 `TLV_ROUTE`: the route's name, UTF-8 (every v2 header hvbridge sends carries it).
- 0xE1 `TLV_VSOCK`: 16 bytes, the client's CID, the client's port, the listener's CID, the
  listener's port, each an unsigned 32-bit integer.
- 0xE2 `TLV_HYPERV`: 32 bytes, the client's VmId and the ServiceId it connected to, each a GUID
  in RFC 4122 byte order (the 16 bytes of `uuid.UUID(...).bytes`).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import uuid
from typing import Final, Literal

import attrs

from hvbridge.errors import HvbridgeError

Family = Literal["TCP4", "TCP6", "UNIX", "UNKNOWN"]
Version = Literal["v1", "v2"]

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX: Final = b"PROXY "
#: The longest v1 header, CRLF included (the spec's bound).
V1_MAX: Final = 107
#: The most bytes after v2's 16-byte fixed part that hvbridge accepts (addresses and TLVs).
V2_MAX_PAYLOAD: Final = 2048
#: The most bytes reading one header can take: reading never asks for more than this.
MAX_HEADER: Final = 16 + V2_MAX_PAYLOAD

TLV_ROUTE: Final = 0xE0
TLV_VSOCK: Final = 0xE1
TLV_HYPERV: Final = 0xE2

_V2_COMMAND_LOCAL: Final = 0x20
_V2_COMMAND_PROXY: Final = 0x21
_V2_FAMILIES: Final[dict[int, Family]] = {0x00: "UNKNOWN", 0x11: "TCP4", 0x21: "TCP6", 0x31: "UNIX"}
_V2_FAMILY_BYTES: Final[dict[Family, int]] = {family: byte for byte, family in _V2_FAMILIES.items()}
_V2_ADDRESS_SIZES: Final[dict[Family, int]] = {"UNKNOWN": 0, "TCP4": 12, "TCP6": 36, "UNIX": 216}
_UNIX_ADDRESS_SIZE: Final = 108


class ProxyProtocolError(HvbridgeError):
    """An incoming PROXY protocol header is missing, malformed or too long."""


@attrs.frozen
class ProxyHeader:
    """What one PROXY header says.

    Attributes:
        family: TCP4, TCP6, UNIX, or UNKNOWN (v1 UNKNOWN, v2 AF_UNSPEC: no addresses).
        source: The client: an IP address (text) or a Unix socket path.
        source_port: The client's TCP port (0 for other families).
        destination: The address the client connected to, as `source`.
        destination_port: Its TCP port.
        tlvs: v2 (type, value) pairs in order; v1 headers have none.
        local: A v2 LOCAL command (the proxy's own connection, e.g. a health check).
    """

    family: Family = "UNKNOWN"
    source: str = ""
    source_port: int = 0
    destination: str = ""
    destination_port: int = 0
    tlvs: tuple[tuple[int, bytes], ...] = ()
    local: bool = False

    def peer(self) -> tuple[int, object] | None:
        """The source as a `(family, sockaddr)` like getpeername() gives, or None if none."""
        if self.local:
            return None
        if self.family == "TCP4":
            return socket.AF_INET, (self.source, self.source_port)
        if self.family == "TCP6":
            return socket.AF_INET6, (self.source, self.source_port, 0, 0)
        if self.family == "UNIX":
            return socket.AF_UNIX, self.source
        return None


def build(header: ProxyHeader, version: Version) -> bytes:
    """The header's bytes in PROXY protocol `version`; v1 leaves the TLVs out."""
    if version == "v1":
        if header.local or header.family not in ("TCP4", "TCP6"):
            return b"PROXY UNKNOWN\r\n"
        return (
            f"PROXY {header.family} {header.source} {header.destination}"
            f" {header.source_port} {header.destination_port}\r\n"
        ).encode("ascii")
    if header.local:
        addresses = b""
        command, family_byte = _V2_COMMAND_LOCAL, 0x00
    else:
        addresses = _v2_addresses(header)
        command, family_byte = _V2_COMMAND_PROXY, _V2_FAMILY_BYTES[header.family]
    tlvs = b"".join(struct.pack("!BH", kind, len(value)) + value for kind, value in header.tlvs)
    payload = addresses + tlvs
    if len(payload) > 0xFFFF:
        raise ValueError(f"a PROXY v2 header holds at most 65535 bytes after its fixed part, not {len(payload)}")
    return V2_SIGNATURE + struct.pack("!BBH", command, family_byte, len(payload)) + payload


def _v2_addresses(header: ProxyHeader) -> bytes:
    match header.family:
        case "TCP4" | "TCP6":
            return (
                ipaddress.ip_address(header.source).packed
                + ipaddress.ip_address(header.destination).packed
                + struct.pack("!HH", header.source_port, header.destination_port)
            )
        case "UNIX":
            return _unix_address(header.source) + _unix_address(header.destination)
        case _:
            return b""


def _unix_address(path: str) -> bytes:
    raw = path.encode("utf-8", "surrogateescape")
    if len(raw) > _UNIX_ADDRESS_SIZE:
        raise ValueError(f"a Unix socket address holds at most {_UNIX_ADDRESS_SIZE} bytes, not {len(raw)}")
    return raw.ljust(_UNIX_ADDRESS_SIZE, b"\0")


def read_size(data: bytes) -> int:
    """How many more bytes to ask the stream for, given the `data` received so far.

    Never more than what keeps the total within MAX_HEADER; once a v2 header's length is
    known, exactly what completes it. A v1 header ends at CRLF, so a read may take bytes
    past it: parse() says where the header ends and the caller keeps the rest.
    """
    if len(data) >= 16 and data.startswith(V2_SIGNATURE):
        length = int.from_bytes(data[14:16], "big")
        return max(0, 16 + min(length, V2_MAX_PAYLOAD) - len(data))
    return max(0, V1_MAX - len(data))


def parse(data: bytes) -> tuple[ProxyHeader, int] | None:
    """Parse the header at the start of `data`: (header, its length), or None to read more.

    Raises:
        ProxyProtocolError: `data` does not start with a valid header, or the header is
            longer than hvbridge accepts. The message says why.
    """
    if not data:
        return None
    head = data[: len(V2_SIGNATURE)]
    if V2_SIGNATURE.startswith(head):
        return _parse_v2(data)
    if V1_PREFIX.startswith(data[: len(V1_PREFIX)]):
        return _parse_v1(data)
    raise ProxyProtocolError(f"no PROXY protocol header: the connection starts with {bytes(data[:16])!r}")


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    window = data[:V1_MAX]
    end = window.find(b"\r\n")
    if end < 0:
        stray = window.find(b"\n")
        if stray >= 0 or window.find(b"\r", 0, len(window) - 1) >= 0:
            raise ProxyProtocolError("PROXY v1 header: CR and LF must come together, as CRLF at its end")
        if len(data) >= V1_MAX:
            raise ProxyProtocolError(f"PROXY v1 header: no CRLF within {V1_MAX} bytes")
        return None
    if len(window) < len(V1_PREFIX):  # pragma: no cover - "PROXY " holds no CRLF
        return None
    line = window[len(V1_PREFIX) : end]
    if b"\n" in line or b"\r" in line:
        raise ProxyProtocolError("PROXY v1 header: CR and LF must come together, as CRLF at its end")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 header: not ASCII text") from None
    fields = text.split(" ")
    if fields[0] == "UNKNOWN":  # the rest of the line is to be ignored
        return ProxyHeader(), end + 2
    if fields[0] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(
            f"PROXY v1 header: unknown protocol {fields[0][:16]!r}; expected TCP4, TCP6 or UNKNOWN"
        )
    if len(fields) != 5:
        raise ProxyProtocolError(
            "PROXY v1 header: expected 'PROXY TCP4|TCP6 SOURCE DESTINATION SOURCE-PORT DESTINATION-PORT'"
        )
    family: Family = "TCP4" if fields[0] == "TCP4" else "TCP6"
    return (
        ProxyHeader(
            family=family,
            source=_v1_address(fields[1], family),
            destination=_v1_address(fields[2], family),
            source_port=_v1_port(fields[3]),
            destination_port=_v1_port(fields[4]),
        ),
        end + 2,
    )


def _v1_address(text: str, family: Family) -> str:
    try:
        address = ipaddress.IPv4Address(text) if family == "TCP4" else ipaddress.IPv6Address(text)
    except ValueError:
        address = None
    if address is None or "%" in text:
        raise ProxyProtocolError(f"PROXY v1 header: {text[:48]!r} is not an {family[3]} address")
    return str(address)


def _v1_port(text: str) -> int:
    if text.isascii() and text.isdigit() and len(text) <= 5 and (text == "0" or not text.startswith("0")):
        port = int(text)
        if port <= 0xFFFF:
            return port
    raise ProxyProtocolError(f"PROXY v1 header: {text[:16]!r} is not a port 0..65535")


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    if len(data) < 16:
        return None
    command, family_byte, length = struct.unpack_from("!BBH", data, 12)
    if command >> 4 != 2:
        raise ProxyProtocolError(f"PROXY v2 header: version {command >> 4}; expected 2")
    if command not in (_V2_COMMAND_LOCAL, _V2_COMMAND_PROXY):
        raise ProxyProtocolError(f"PROXY v2 header: unknown command {command & 0x0F}; expected LOCAL or PROXY")
    if length > V2_MAX_PAYLOAD:
        raise ProxyProtocolError(
            f"PROXY v2 header: {length} bytes of addresses and TLVs; hvbridge reads at most {V2_MAX_PAYLOAD}"
        )
    if len(data) < 16 + length:
        return None
    payload = data[16 : 16 + length]
    local = command == _V2_COMMAND_LOCAL
    family = _V2_FAMILIES.get(family_byte)
    if family is None:
        if not local:
            raise ProxyProtocolError(
                f"PROXY v2 header: family and protocol 0x{family_byte:02x}; expected a stream"
                " (TCP over IPv4 or IPv6, or Unix) or UNSPEC"
            )
        family = "UNKNOWN"  # LOCAL: the receiver ignores the addresses, whatever they are
    size = _V2_ADDRESS_SIZES[family]
    if len(payload) < size:
        raise ProxyProtocolError(f"PROXY v2 header: {len(payload)} bytes is too short for {family} addresses ({size})")
    header = _v2_header(family, payload[:size])
    tlvs = _v2_tlvs(payload[size:])
    header = ProxyHeader(local=True, tlvs=tlvs) if local else attrs.evolve(header, tlvs=tlvs)
    return header, 16 + length


def _v2_header(family: Family, raw: bytes) -> ProxyHeader:
    match family:
        case "TCP4" | "TCP6":
            size = 4 if family == "TCP4" else 16
            source_port, destination_port = struct.unpack_from("!HH", raw, 2 * size)
            return ProxyHeader(
                family=family,
                source=str(ipaddress.ip_address(raw[:size])),
                destination=str(ipaddress.ip_address(raw[size : 2 * size])),
                source_port=source_port,
                destination_port=destination_port,
            )
        case "UNIX":
            return ProxyHeader(
                family=family,
                source=_unix_path(raw[:_UNIX_ADDRESS_SIZE]),
                destination=_unix_path(raw[_UNIX_ADDRESS_SIZE:]),
            )
        case _:
            return ProxyHeader()


def _unix_path(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "surrogateescape")


def _v2_tlvs(raw: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(raw):
        if len(raw) - offset < 3:
            raise ProxyProtocolError("PROXY v2 header: a TLV is cut short (fewer than 3 bytes for type and length)")
        kind, size = struct.unpack_from("!BH", raw, offset)
        offset += 3
        if len(raw) - offset < size:
            raise ProxyProtocolError(f"PROXY v2 header: TLV 0x{kind:02x} says {size} bytes, {len(raw) - offset} follow")
        tlvs.append((kind, bytes(raw[offset : offset + size])))
        offset += size
    return tuple(tlvs)


# -- a header for an accepted connection -------------------------------------------------


def describe(peer: tuple[int, object] | None, local: tuple[int, object] | None, route: str) -> ProxyHeader:
    """The header for a client `peer` accepted on `local` (both getpeername()-style) on `route`.

    TCP peers become TCP4/TCP6 (IPv4-mapped IPv6 on both ends: TCP4), Unix peers UNIX, vsock
    and Hyper-V peers UNKNOWN with their TLV. Every header carries the route name TLV.
    """
    tlvs: list[tuple[int, bytes]] = [(TLV_ROUTE, route.encode("utf-8"))]
    if peer is None or local is None:
        return ProxyHeader(tlvs=tuple(tlvs))
    family, sockaddr = peer
    _, local_sockaddr = local
    if (
        family in (socket.AF_INET, socket.AF_INET6)
        and isinstance(sockaddr, tuple)
        and isinstance(local_sockaddr, tuple)
    ):
        source = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
        destination = ipaddress.ip_address(str(local_sockaddr[0]).partition("%")[0])
        if isinstance(source, ipaddress.IPv6Address) and isinstance(destination, ipaddress.IPv6Address):
            mapped = source.ipv4_mapped, destination.ipv4_mapped
            if mapped[0] is not None and mapped[1] is not None:
                source, destination = mapped[0], mapped[1]
        if source.version != destination.version:  # pragma: no cover - a socket has one family
            return ProxyHeader(tlvs=tuple(tlvs))
        return ProxyHeader(
            family="TCP4" if source.version == 4 else "TCP6",
            source=str(source),
            source_port=int(sockaddr[1]),
            destination=str(destination),
            destination_port=int(local_sockaddr[1]),
            tlvs=tuple(tlvs),
        )
    if family == socket.AF_UNIX:
        return ProxyHeader(
            family="UNIX",
            source=_unix_text(sockaddr),
            destination=_unix_text(local_sockaddr),
            tlvs=tuple(tlvs),
        )
    if family == getattr(socket, "AF_VSOCK", -1) and isinstance(sockaddr, tuple) and isinstance(local_sockaddr, tuple):
        values = (sockaddr[0], sockaddr[1], local_sockaddr[0], local_sockaddr[1])
        tlvs.append((TLV_VSOCK, struct.pack("!IIII", *(int(v) & 0xFFFFFFFF for v in values))))
    elif family == getattr(socket, "AF_HYPERV", -1) and isinstance(sockaddr, tuple):  # pragma: no cover - Windows only
        tlvs.append(hyperv_tlv(str(sockaddr[0]), str(sockaddr[1])))
    return ProxyHeader(tlvs=tuple(tlvs))


def hyperv_tlv(vm_id: str, service_id: str) -> tuple[int, bytes]:
    """The TLV_HYPERV TLV for a Hyper-V client (GUID text, braces allowed)."""
    return TLV_HYPERV, uuid.UUID(vm_id.strip("{}")).bytes + uuid.UUID(service_id.strip("{}")).bytes


def _unix_text(sockaddr: object) -> str:
    if isinstance(sockaddr, bytes):  # Linux abstract names: b"\0name"
        return sockaddr[:_UNIX_ADDRESS_SIZE].decode("utf-8", "surrogateescape")
    if isinstance(sockaddr, str) and len(sockaddr.encode("utf-8", "surrogateescape")) <= _UNIX_ADDRESS_SIZE:
        return sockaddr
    return ""
