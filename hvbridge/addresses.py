"""Endpoint addresses: one frozen value type per family, parse_address() and their text form.

This module owns the text form of every endpoint (docs/reference.md, "Endpoints"). It is pure: it never imports trio
and never creates sockets. Rule: for every address `a`, `parse_address(str(a)) == a`, and
`str(a)` is what logs print. Any invalid text raises AddressError whose message says what is
wrong and what is expected; nothing else escapes parse_address().
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from typing import Final, Literal, assert_never

import attrs

from hvbridge.errors import AddressError
from hvbridge.hyperv.guids import (
    VM_WILDCARDS,
    hyperv_port_problem,
    parse_guid,
    port_for_service_id,
    service_id_for_port,
)

Role = Literal["listen", "connect"]

VMADDR_CID_HYPERVISOR: Final = 0
VMADDR_CID_LOCAL: Final = 1
VMADDR_CID_HOST: Final = 2
VMADDR_CID_ANY: Final = 0xFFFFFFFF
VMADDR_PORT_ANY: Final = 0xFFFFFFFF
_MAX_U32: Final = 0xFFFFFFFF

_CID_NAMES: Final = {
    "any": VMADDR_CID_ANY,
    "hypervisor": VMADDR_CID_HYPERVISOR,
    "local": VMADDR_CID_LOCAL,
    "host": VMADDR_CID_HOST,
}
# sun_path is 108 bytes on Linux, one of which is the terminating NUL for filesystem paths.
_MAX_UNIX_PATH: Final = 107
# \Z, not $: `$` also matches before a trailing newline, which let "host\n" through.
_HOSTNAME = re.compile(r"^(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*\.?\Z")
_VM_NAME = re.compile(r"^[^/\x00-\x1f]{1,100}\Z")


@attrs.frozen
class TcpAddress:
    """`tcp://HOST:PORT`: an IPv4/IPv6 literal or a host name resolved per connection."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """True for 127.0.0.0/8, ::1 and `localhost`."""
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@attrs.frozen
class UnixAddress:
    """`unix:///abs/path`, or `unix:@name` for the Linux abstract namespace."""

    path: str
    abstract: bool = False

    def __str__(self) -> str:
        return f"unix:@{self.path}" if self.abstract else f"unix://{self.path}"

    @property
    def sockaddr(self) -> str:
        """The address to pass to bind()/connect(): abstract names start with a NUL byte."""
        return f"\0{self.path}" if self.abstract else self.path


@attrs.frozen
class VsockAddress:
    """`vsock://CID:PORT`; VMADDR_CID_ANY / VMADDR_PORT_ANY print as `any`."""

    cid: int
    port: int

    def __str__(self) -> str:
        cid = "any" if self.cid == VMADDR_CID_ANY else str(self.cid)
        port = "any" if self.port == VMADDR_PORT_ANY else str(self.port)
        return f"vsock://{cid}:{port}"


@attrs.frozen
class HyperVAddress:
    """`hvsock://VM/SERVICE`: VM is a VmId GUID or a VM name to resolve; SERVICE a GUID.

    VM wildcard names (`any`, `loopback`, ...) are turned into their GUIDs when parsed.
    """

    vm: uuid.UUID | str
    service_id: uuid.UUID

    def __str__(self) -> str:
        return f"hvsock://{self.vm}/{self.service_id}"

    @property
    def vsock_port(self) -> int | None:
        """The vsock port the service GUID encodes, if it follows the Linux-guest template."""
        return port_for_service_id(self.service_id)


@attrs.frozen
class VsockMuxAddress:
    """`vsock-mux:///abs/uds:PORT`: Firecracker / Cloud Hypervisor hybrid vsock."""

    path: str
    port: int

    def __str__(self) -> str:
        return f"vsock-mux://{self.path}:{self.port}"

    @property
    def listen_path(self) -> str:
        """Where the VMM delivers guest-initiated connections to `port`: the Unix socket `PATH_PORT`."""
        return listen_path_for(self.path, self.port)


@attrs.frozen
class StdioAddress:
    """`stdio`: standard input and output as one stream (the `connect` command only)."""

    def __str__(self) -> str:
        return "stdio"


Address = TcpAddress | UnixAddress | VsockAddress | HyperVAddress | VsockMuxAddress | StdioAddress


def parse_address(text: str, *, role: Role | None = None) -> Address:
    """Parse an endpoint's text form (docs/reference.md, "Endpoints").

    Args:
        text: e.g. `tcp://127.0.0.1:2222`, `unix:///run/x.sock`, `vsock://3:5000`.
        role: If given, also reject forms that cannot be used that way (e.g. port 0 to connect).

    Returns:
        The frozen address value; `str()` of it gives the canonical text back.

    Raises:
        AddressError: The text is not a valid endpoint (for this role).
    """
    if not isinstance(text, str):
        raise AddressError(f"expected an endpoint string such as 'tcp://127.0.0.1:8080', got {type(text).__name__}")
    address = _parse(text)
    if role is not None:
        _check_role(address, role)
    return address


def _parse(text: str) -> Address:
    if text.startswith("tcp://"):
        return _parse_tcp(text[len("tcp://") :])
    if text.startswith("unix:"):
        return _parse_unix(text[len("unix:") :])
    if text.startswith("vsock://"):
        return _parse_vsock(text[len("vsock://") :])
    if text.startswith("hvsock://"):
        return _parse_hvsock(text[len("hvsock://") :])
    if text.startswith("vsock-mux://"):
        return _parse_vsock_mux(text[len("vsock-mux://") :])
    if text == "stdio":
        return StdioAddress()
    raise AddressError(
        f"unknown endpoint {text!r}; expected one of: tcp://HOST:PORT, unix:///PATH, unix:@NAME,"
        " vsock://CID:PORT, hvsock://VM/SERVICE, vsock-mux:///PATH:PORT, stdio"
    )


def _int_in_range(text: str, low: int, high: int, what: str, names: str = "") -> int:
    if not text.isascii() or not text.isdigit():
        extra = f" or one of: {names}" if names else ""
        raise AddressError(f"invalid {what} {text!r}; expected an integer {low}..{high}{extra}")
    digits = text.lstrip("0") or "0"
    # int() refuses more than 4300 digits with a ValueError; anything this long is out of range.
    if len(digits) > len(str(high)):
        shown = text if len(text) <= 20 else f"{text[:20]}..."
        raise AddressError(f"{what} {shown} is out of range; expected {low}..{high}")
    value = int(digits)
    if not low <= value <= high:
        raise AddressError(f"{what} {value} is out of range; expected {low}..{high}")
    return value


def _parse_tcp(rest: str) -> TcpAddress:
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
        if not sep:
            raise AddressError(f"invalid TCP address {'tcp://' + rest!r}; expected tcp://[IPV6]:PORT")
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"invalid IPv6 address {host!r}; expected e.g. tcp://[::1]:8080") from None
        host = str(ip)
    else:
        host, sep, port = rest.rpartition(":")
        if not sep or not host:
            raise AddressError(f"invalid TCP address {'tcp://' + rest!r}; expected tcp://HOST:PORT")
        if ":" in host:
            hint = f"tcp://[{host}]:{port}"  # repr() keeps a message to one line whatever the text
            raise AddressError(
                f"IPv6 address {host!r} needs brackets; expected {hint if hint.isprintable() else repr(hint)}"
            )
        if re.fullmatch(r"[0-9.]+", host):
            try:
                host = str(ipaddress.IPv4Address(host))
            except ValueError:
                raise AddressError(f"invalid IPv4 address {host!r}; expected e.g. 127.0.0.1") from None
        elif not _HOSTNAME.match(host):
            raise AddressError(f"invalid host name {host!r}; expected an IP address or a DNS name")
    return TcpAddress(host, _int_in_range(port, 0, 65535, "TCP port"))


def _parse_unix(rest: str) -> UnixAddress:
    if rest.startswith("@"):
        name = rest[1:]
        if not name or "\0" in name:
            raise AddressError(f"invalid abstract Unix socket name {rest!r}; expected unix:@NAME")
        if _encoded_size(name, "abstract Unix socket name") > _MAX_UNIX_PATH:
            raise AddressError(f"abstract Unix socket name is too long; expected at most {_MAX_UNIX_PATH} bytes")
        return UnixAddress(name, abstract=True)
    if not rest.startswith("///"):
        raise AddressError(
            f"invalid Unix socket address {'unix:' + rest!r}; expected an absolute path as unix:///PATH"
            " or an abstract name as unix:@NAME"
        )
    return UnixAddress(_check_path(rest[2:], "Unix socket path"))


def _check_path(path: str, what: str) -> str:
    if "\0" in path or path.endswith("/"):
        raise AddressError(f"invalid {what} {path!r}; expected an absolute file path")
    size = _encoded_size(path, what)
    if size > _MAX_UNIX_PATH:
        raise AddressError(f"{what} {path!r} is {size} bytes; the limit is {_MAX_UNIX_PATH}, use a shorter path")
    return path


def _encoded_size(text: str, what: str) -> int:
    # surrogateescape keeps undecodable bytes of a POSIX path (os.fsdecode); any other lone
    # surrogate cannot become bytes at all, and must not escape as UnicodeEncodeError.
    try:
        return len(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        raise AddressError(f"invalid {what} {text!r}; expected text without lone surrogate characters") from None


def _parse_vsock(rest: str) -> VsockAddress:
    cid_text, sep, port_text = rest.partition(":")
    if not sep:
        raise AddressError(f"invalid vsock address {'vsock://' + rest!r}; expected vsock://CID:PORT")
    names = "any, hypervisor, local, host"
    cid = _CID_NAMES.get(cid_text.lower())
    if cid is None:
        cid = _int_in_range(cid_text, 0, _MAX_U32, "vsock CID", names)
    if port_text.lower() == "any":
        port = VMADDR_PORT_ANY
    else:
        port = _int_in_range(port_text, 0, _MAX_U32 - 1, "vsock port", "any")
    return VsockAddress(cid, port)


def _parse_guid(text: str, what: str) -> uuid.UUID:
    try:
        return parse_guid(text)
    except ValueError:
        raise AddressError(
            f"invalid {what} {text!r}; expected a GUID such as 00000016-facb-11e6-bd58-64006a7986d3"
        ) from None


def _parse_hvsock(rest: str) -> HyperVAddress:
    vm_text, sep, service_text = rest.partition("/")
    if not sep or not vm_text or not service_text:
        raise AddressError(f"invalid Hyper-V socket address {'hvsock://' + rest!r}; expected hvsock://VM/SERVICE")
    vm: uuid.UUID | str
    if vm_text.lower() in VM_WILDCARDS:
        vm = VM_WILDCARDS[vm_text.lower()]
    elif re.fullmatch(r"\{?[0-9a-fA-F-]{32,36}\}?", vm_text):
        vm = _parse_guid(vm_text, "VmId")
    elif _VM_NAME.match(vm_text):
        vm = vm_text
    else:
        raise AddressError(
            f"invalid VM {vm_text!r}; expected a VmId GUID, a VM name or one of: {', '.join(VM_WILDCARDS)}"
        )
    port: int | None
    if service_text.isascii() and service_text.isdigit():
        port = _int_in_range(service_text, 0, _MAX_U32, "vsock port")
    else:
        service_id = _parse_guid(service_text, "service GUID")
        port = port_for_service_id(service_id)
    problem = None if port is None else hyperv_port_problem(port)
    if problem is not None:
        raise AddressError(f"invalid Hyper-V socket address {'hvsock://' + rest!r}: {problem}")
    if port is not None:
        service_id = service_id_for_port(port)
    return HyperVAddress(vm, service_id)


def listen_path_for(path: str, port: int) -> str:
    """Firecracker's and Cloud Hypervisor's rule: guest connections to vsock PORT arrive on `PATH_PORT`."""
    return f"{path}_{port}"


def _parse_vsock_mux(rest: str) -> VsockMuxAddress:
    path, sep, port_text = rest.rpartition(":")
    if not sep or not path.startswith("/"):
        raise AddressError(f"invalid hybrid vsock address {'vsock-mux://' + rest!r}; expected vsock-mux:///PATH:PORT")
    port = _int_in_range(port_text, 0, _MAX_U32 - 1, "vsock port")
    # The listen side binds PATH_PORT, so that name must fit too.
    _check_path(listen_path_for(path, port), "hybrid vsock socket path")
    return VsockMuxAddress(_check_path(path, "hybrid vsock socket path"), port)


def _check_role(address: Address, role: Role) -> None:
    match address:
        case TcpAddress(port=0) if role == "connect":
            raise AddressError(f"cannot connect to port 0 in {address}; expected a port 1..65535")
        case VsockAddress() if role == "connect" and address.port == VMADDR_PORT_ANY:
            raise AddressError(f"cannot connect to port 'any' in {address}; expected a port number")
        case VsockAddress() if role == "connect" and address.cid == VMADDR_CID_ANY:
            raise AddressError(f"cannot connect to CID 'any' in {address}; expected a CID such as 2 (host)")
        case StdioAddress() if role == "listen":
            raise AddressError("stdio cannot listen; it is for `hvbridge connect` only")
        case TcpAddress() | UnixAddress() | VsockAddress() | HyperVAddress() | VsockMuxAddress() | StdioAddress():
            pass
        case _:
            assert_never(address)


def is_ephemeral(address: Address) -> bool:
    """Whether a listener on `address` gets a port of its own choosing (TCP port 0, vsock port `any`).

    Two such listeners never share a socket or collide, whatever else they have in common.
    """
    return (isinstance(address, TcpAddress) and address.port == 0) or (
        isinstance(address, VsockAddress) and address.port == VMADDR_PORT_ANY
    )


def family_name(address: Address) -> str:
    """The scheme of an address (`tcp`, `unix`, `vsock`, `hvsock`, `vsock-mux`, `stdio`)."""
    return str(address).split(":", 1)[0]
