"""Tests for hvbridge.addresses: every text form of docs/reference.md, "Endpoints", its canonical text and its errors.

Rules: pure (no sockets); exact messages, matched whole with `^...$`; Hypothesis checks that
`parse_address(str(a)) == a` for every family and that any text parses or raises AddressError.
"""

from __future__ import annotations

import re
import uuid
from typing import Final, Literal, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvbridge.addresses import (
    VMADDR_CID_ANY,
    VMADDR_PORT_ANY,
    Address,
    HyperVAddress,
    Role,
    StdioAddress,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    VsockMuxAddress,
    family_name,
    parse_address,
)
from hvbridge.errors import AddressError
from hvbridge.hyperv.guids import VM_WILDCARDS

ZERO: Final = "00000000-0000-0000-0000-000000000000"
SSH: Final = "00000016-facb-11e6-bd58-64006a7986d3"  # vsock port 22 in the Hyper-V template
PORT_2761: Final = "00000ac9-facb-11e6-bd58-64006a7986d3"
ENDPOINTS: Final = (
    "tcp://HOST:PORT, unix:///PATH, unix:@NAME, vsock://CID:PORT, hvsock://VM/SERVICE, vsock-mux:///PATH:PORT, stdio"
)
WILDCARDS: Final = "any, wildcard, zero, children, loopback, parent, broadcast, silohost"
GUID_EXAMPLE: Final = "expected a GUID such as 00000016-facb-11e6-bd58-64006a7986d3"
HIGH_PORT: Final = (
    "vsock port %d is above 2147483647 (0x7FFFFFFF): the Linux hv_sock driver ignores connections to such"
    " ports (0x80000000 and up are the host's ephemeral ports); use a port 0..2147483647"
)
FUZZ: Final = settings(max_examples=300, deadline=None)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        # tcp: IPv4, IPv6 (compressed, lower case), names, port 0 (ephemeral on listen)
        ("tcp://127.0.0.1:2222", "tcp://127.0.0.1:2222"),
        ("tcp://0.0.0.0:0", "tcp://0.0.0.0:0"),
        ("tcp://127.0.0.1:0080", "tcp://127.0.0.1:80"),
        ("tcp://[::1]:8080", "tcp://[::1]:8080"),
        ("tcp://[0:0:0:0:0:0:0:1]:8080", "tcp://[::1]:8080"),
        ("tcp://[FE80::A]:1", "tcp://[fe80::a]:1"),
        ("tcp://[fe80::1%eth0]:22", "tcp://[fe80::1%eth0]:22"),
        ("tcp://localhost:65535", "tcp://localhost:65535"),
        ("tcp://db-1.example.com.:5432", "tcp://db-1.example.com.:5432"),
        ("tcp://my_host:22", "tcp://my_host:22"),
        # unix: absolute paths and the abstract namespace
        ("unix:///run/hvbridge/web.sock", "unix:///run/hvbridge/web.sock"),
        ("unix:////double/slash", "unix:////double/slash"),
        ("unix:///with space:and@odd", "unix:///with space:and@odd"),
        ("unix:@hvbridge", "unix:@hvbridge"),
        ("unix:@with/slash", "unix:@with/slash"),
        # vsock: integer CIDs, named CIDs, `any` on either side
        ("vsock://3:5000", "vsock://3:5000"),
        ("vsock://any:22", "vsock://any:22"),
        ("vsock://ANY:any", "vsock://any:any"),
        ("vsock://4294967295:1", "vsock://any:1"),
        ("vsock://hypervisor:1", "vsock://0:1"),
        ("vsock://local:1", "vsock://1:1"),
        ("vsock://host:1024", "vsock://2:1024"),
        ("vsock://2:4294967294", "vsock://2:4294967294"),
        ("vsock://" + "0" * 5000 + "3:007", "vsock://3:7"),
        # hvsock: GUIDs in any case and with braces, wildcards, ports through the template, names
        (f"hvsock://{ZERO}/{PORT_2761}", f"hvsock://{ZERO}/{PORT_2761}"),
        ("hvsock://any/2761", f"hvsock://{ZERO}/{PORT_2761}"),
        ("hvsock://Wildcard/22", f"hvsock://{ZERO}/{SSH}"),
        ("hvsock://zero/22", f"hvsock://{ZERO}/{SSH}"),
        ("hvsock://children/22", f"hvsock://90db8b89-0d35-4f79-8ce9-49ea0ac8b7cd/{SSH}"),
        ("hvsock://loopback/22", f"hvsock://e0e16197-dd56-4a10-9195-5ee7a155a838/{SSH}"),
        ("hvsock://PARENT/22", f"hvsock://a42e7cda-d03f-480c-9cc2-a4de20abb878/{SSH}"),
        ("hvsock://broadcast/22", f"hvsock://ffffffff-ffff-ffff-ffff-ffffffffffff/{SSH}"),
        ("hvsock://silohost/22", f"hvsock://36bd0c5c-7276-4223-88ba-7d03b654c568/{SSH}"),
        (
            "hvsock://{A42E7CDA-D03F-480C-9CC2-A4DE20ABB878}/{00000016-FACB-11E6-BD58-64006A7986D3}",
            f"hvsock://a42e7cda-d03f-480c-9cc2-a4de20abb878/{SSH}",
        ),
        (
            "hvsock://a42e7cdad03f480c9cc2a4de20abb878/0",
            f"hvsock://a42e7cda-d03f-480c-9cc2-a4de20abb878/{ZERO[:8]}-facb-11e6-bd58-64006a7986d3",
        ),
        ("hvsock://my-vm/22", f"hvsock://my-vm/{SSH}"),
        ("hvsock://My VM (2)/22", f"hvsock://My VM (2)/{SSH}"),
        ("hvsock://vm/2147483647", "hvsock://vm/7fffffff-facb-11e6-bd58-64006a7986d3"),
        (f"hvsock://my-vm/{SSH.upper()}", f"hvsock://my-vm/{SSH}"),
        # hybrid vsock
        ("vsock-mux:///run/fc/v.sock:52", "vsock-mux:///run/fc/v.sock:52"),
        ("vsock-mux:///a:b/v.sock:0", "vsock-mux:///a:b/v.sock:0"),
        # stdio (the connect command only)
        ("stdio", "stdio"),
    ],
)
def test_text_form_round_trips(text: str, canonical: str) -> None:
    address = parse_address(text)
    assert str(address) == canonical
    assert parse_address(canonical) == address


def test_port_template_both_ways() -> None:
    address = parse_address("hvsock://any/2761")
    assert isinstance(address, HyperVAddress)
    assert address.service_id == uuid.UUID(PORT_2761)
    assert address.vsock_port == 2761
    named = parse_address(f"hvsock://vm/{PORT_2761.upper()}")
    assert isinstance(named, HyperVAddress)
    assert named.vsock_port == 2761
    other = parse_address(f"hvsock://vm/{ZERO}")
    assert isinstance(other, HyperVAddress)
    assert other.vsock_port is None


def test_values_and_properties() -> None:
    assert parse_address("vsock://any:any") == VsockAddress(VMADDR_CID_ANY, VMADDR_PORT_ANY)
    assert parse_address("unix:@x") == UnixAddress("x", abstract=True)
    assert UnixAddress("x", abstract=True).sockaddr == "\0x"
    assert UnixAddress("/run/x.sock").sockaddr == "/run/x.sock"
    assert parse_address("vsock-mux:///v.sock:5") == VsockMuxAddress("/v.sock", 5)
    assert parse_address("stdio") == StdioAddress()
    # GUIDs compare as uuid.UUID, whatever case they were written in (Windows returns either).
    assert parse_address(f"hvsock://{SSH.upper()}/1") == parse_address(f"hvsock://{SSH}/1")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("LocalHost", True), ("10.0.0.1", False), ("db", False)],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert TcpAddress(host, 1).is_loopback is loopback


@pytest.mark.parametrize(
    ("text", "family"),
    [
        ("tcp://h:1", "tcp"),
        ("unix:@x", "unix"),
        ("unix:///x", "unix"),
        ("vsock://1:1", "vsock"),
        ("hvsock://vm/1", "hvsock"),
        ("vsock-mux:///x:1", "vsock-mux"),
        ("stdio", "stdio"),
    ],
)
def test_family_name(text: str, family: str) -> None:
    assert family_name(parse_address(text)) == family


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", f"unknown endpoint ''; expected one of: {ENDPOINTS}"),
        ("http://x:1", f"unknown endpoint 'http://x:1'; expected one of: {ENDPOINTS}"),
        ("STDIO", f"unknown endpoint 'STDIO'; expected one of: {ENDPOINTS}"),
        ("stdio ", f"unknown endpoint 'stdio '; expected one of: {ENDPOINTS}"),
        # tcp
        ("tcp://", "invalid TCP address 'tcp://'; expected tcp://HOST:PORT"),
        ("tcp://host", "invalid TCP address 'tcp://host'; expected tcp://HOST:PORT"),
        ("tcp://:80", "invalid TCP address 'tcp://:80'; expected tcp://HOST:PORT"),
        ("tcp://[::1]", "invalid TCP address 'tcp://[::1]'; expected tcp://[IPV6]:PORT"),
        ("tcp://[zz]:1", "invalid IPv6 address 'zz'; expected e.g. tcp://[::1]:8080"),
        ("tcp://::1:80", "IPv6 address '::1' needs brackets; expected tcp://[::1]:80"),
        ("tcp://1.2.3:80", "invalid IPv4 address '1.2.3'; expected e.g. 127.0.0.1"),
        ("tcp://256.1.1.1:80", "invalid IPv4 address '256.1.1.1'; expected e.g. 127.0.0.1"),
        ("tcp://bad_host!:80", "invalid host name 'bad_host!'; expected an IP address or a DNS name"),
        # `$` in a regex also matches before a final newline; the host name must not take one.
        ("tcp://host\n:80", "invalid host name 'host\\n'; expected an IP address or a DNS name"),
        ("tcp://h:65536", "TCP port 65536 is out of range; expected 0..65535"),
        ("tcp://h:-1", "invalid TCP port '-1'; expected an integer 0..65535"),
        ("tcp://h:http", "invalid TCP port 'http'; expected an integer 0..65535"),
        ("tcp://h:٨٠", "invalid TCP port '٨٠'; expected an integer 0..65535"),
        # int() refuses over 4300 digits with ValueError; that must be an AddressError too.
        ("tcp://h:" + "9" * 5000, "TCP port 99999999999999999999... is out of range; expected 0..65535"),
        ("vsock://1" + "0" * 5000 + ":1", "vsock CID 10000000000000000000... is out of range; expected 0..4294967295"),
        # unix
        (
            "unix:",
            "invalid Unix socket address 'unix:'; expected an absolute path as unix:///PATH"
            " or an abstract name as unix:@NAME",
        ),
        (
            "unix://relative",
            "invalid Unix socket address 'unix://relative'; expected an absolute path as unix:///PATH"
            " or an abstract name as unix:@NAME",
        ),
        ("unix:@", "invalid abstract Unix socket name '@'; expected unix:@NAME"),
        ("unix:@a\0b", "invalid abstract Unix socket name '@a\\x00b'; expected unix:@NAME"),
        ("unix:@" + "x" * 108, "abstract Unix socket name is too long; expected at most 107 bytes"),
        (
            "unix:@\ud800",
            "invalid abstract Unix socket name '\\ud800'; expected text without lone surrogate characters",
        ),
        ("unix:///", "invalid Unix socket path '/'; expected an absolute file path"),
        ("unix:///dir/", "invalid Unix socket path '/dir/'; expected an absolute file path"),
        ("unix:///a\0", "invalid Unix socket path '/a\\x00'; expected an absolute file path"),
        ("unix:///" + "x" * 107, f"Unix socket path '/{'x' * 107}' is 108 bytes; the limit is 107, use a shorter path"),
        ("unix:///\ud800", "invalid Unix socket path '/\\ud800'; expected text without lone surrogate characters"),
        # vsock
        ("vsock://3", "invalid vsock address 'vsock://3'; expected vsock://CID:PORT"),
        (
            "vsock://x:1",
            "invalid vsock CID 'x'; expected an integer 0..4294967295 or one of: any, hypervisor, local, host",
        ),
        ("vsock://3:x", "invalid vsock port 'x'; expected an integer 0..4294967294 or one of: any"),
        ("vsock://4294967296:1", "vsock CID 4294967296 is out of range; expected 0..4294967295"),
        ("vsock://3:4294967295", "vsock port 4294967295 is out of range; expected 0..4294967294"),
        ("vsock://3:99999999999", "vsock port 99999999999 is out of range; expected 0..4294967294"),
        # hvsock
        ("hvsock://", "invalid Hyper-V socket address 'hvsock://'; expected hvsock://VM/SERVICE"),
        ("hvsock://vm", "invalid Hyper-V socket address 'hvsock://vm'; expected hvsock://VM/SERVICE"),
        ("hvsock://vm/", "invalid Hyper-V socket address 'hvsock://vm/'; expected hvsock://VM/SERVICE"),
        ("hvsock:///22", "invalid Hyper-V socket address 'hvsock:///22'; expected hvsock://VM/SERVICE"),
        ("hvsock://a\x01/22", f"invalid VM 'a\\x01'; expected a VmId GUID, a VM name or one of: {WILDCARDS}"),
        ("hvsock://vm\n/22", f"invalid VM 'vm\\n'; expected a VmId GUID, a VM name or one of: {WILDCARDS}"),
        (
            "hvsock://" + "v" * 101 + "/22",
            f"invalid VM '{'v' * 101}'; expected a VmId GUID, a VM name or one of: {WILDCARDS}",
        ),
        (f"hvsock://{ZERO[:-1]}-/22", f"invalid VmId '{ZERO[:-1]}-'; {GUID_EXAMPLE}"),
        ("hvsock://vm/not-a-guid", f"invalid service GUID 'not-a-guid'; {GUID_EXAMPLE}"),
        # hv_sock ignores offers for ports above 0x7FFFFFFF, the host's ephemeral range.
        (
            "hvsock://vm/4000000000",
            f"invalid Hyper-V socket address 'hvsock://vm/4000000000': {HIGH_PORT % 4000000000}",
        ),
        (
            "hvsock://vm/2147483648",
            f"invalid Hyper-V socket address 'hvsock://vm/2147483648': {HIGH_PORT % 2147483648}",
        ),
        (
            "hvsock://vm/4294967295",
            f"invalid Hyper-V socket address 'hvsock://vm/4294967295': {HIGH_PORT % 4294967295}",
        ),
        (
            "hvsock://vm/80000000-facb-11e6-bd58-64006a7986d3",
            "invalid Hyper-V socket address 'hvsock://vm/80000000-facb-11e6-bd58-64006a7986d3':"
            f" {HIGH_PORT % 2147483648}",
        ),
        ("hvsock://vm/99999999999", "vsock port 99999999999 is out of range; expected 0..4294967295"),
        # uuid.UUID() alone reads these; a GUID is hex digits and dashes, with both braces or none.
        (
            "hvsock://vm/0000000_000000000000000000000001",
            f"invalid service GUID '0000000_000000000000000000000001'; {GUID_EXAMPLE}",
        ),
        (
            "hvsock://vm/ 000000000000000000000000000001 ",
            f"invalid service GUID ' 000000000000000000000000000001 '; {GUID_EXAMPLE}",
        ),
        (f"hvsock://vm/urn:uuid:{SSH}", f"invalid service GUID 'urn:uuid:{SSH}'; {GUID_EXAMPLE}"),
        ("hvsock://vm/" + "٣" * 32, f"invalid service GUID '{'٣' * 32}'; {GUID_EXAMPLE}"),
        (f"hvsock://vm/{{{SSH}", f"invalid service GUID '{{{SSH}'; {GUID_EXAMPLE}"),
        # hybrid vsock
        ("vsock-mux://rel:1", "invalid hybrid vsock address 'vsock-mux://rel:1'; expected vsock-mux:///PATH:PORT"),
        ("vsock-mux:///x", "invalid hybrid vsock address 'vsock-mux:///x'; expected vsock-mux:///PATH:PORT"),
        ("vsock-mux:///x:y", "invalid vsock port 'y'; expected an integer 0..4294967294"),
        (
            "vsock-mux:///" + "x" * 104 + ":52",
            f"hybrid vsock socket path '/{'x' * 104}_52' is 108 bytes; the limit is 107, use a shorter path",
        ),
    ],
)
def test_invalid_text(text: str, message: str) -> None:
    with pytest.raises(AddressError, match=f"^{re.escape(message)}$"):
        parse_address(text)


def test_not_a_string() -> None:
    with pytest.raises(AddressError, match=r"^expected an endpoint string such as 'tcp://127\.0\.0\.1:8080', got int$"):
        parse_address(cast("str", 5))


@pytest.mark.parametrize(
    ("text", "role", "message"),
    [
        ("tcp://127.0.0.1:0", "connect", "cannot connect to port 0 in tcp://127.0.0.1:0; expected a port 1..65535"),
        ("vsock://3:any", "connect", "cannot connect to port 'any' in vsock://3:any; expected a port number"),
        ("vsock://any:22", "connect", "cannot connect to CID 'any' in vsock://any:22; expected a CID such as 2 (host)"),
        ("stdio", "listen", "stdio cannot listen; it is for `hvbridge connect` only"),
    ],
)
def test_role_refuses(text: str, role: Role, message: str) -> None:
    parse_address(text)  # valid without a role
    with pytest.raises(AddressError, match=f"^{re.escape(message)}$"):
        parse_address(text, role=role)


@pytest.mark.parametrize(
    ("text", "role"),
    [
        ("tcp://127.0.0.1:0", "listen"),
        ("vsock://any:any", "listen"),
        ("vsock://2:22", "connect"),
        ("stdio", "connect"),
        ("unix:///x", "listen"),
        ("unix:@x", "connect"),
        ("hvsock://any/22", "listen"),
        ("hvsock://my-vm/22", "connect"),
        ("vsock-mux:///v.sock:52", "listen"),
        ("vsock-mux:///v.sock:52", "connect"),
    ],
)
def test_role_allows(text: str, role: Role) -> None:
    assert parse_address(text, role=role) == parse_address(text)


# ---------------------------------------------------------------------------------- Hypothesis

_SURROGATES: Final[tuple[Literal["Cs"]]] = ("Cs",)  # refused in names (test_invalid_text)
_GUID_LIKE: Final = re.compile(r"\{?[0-9a-fA-F-]{32,36}\}?")


def _fits_unix(path: str, limit: int = 107) -> bool:
    return len(path.encode()) <= limit


_path_part = st.text(st.characters(exclude_characters="/\0", exclude_categories=_SURROGATES), min_size=1, max_size=12)
_paths = st.lists(_path_part, min_size=1, max_size=6).map(lambda parts: "/" + "/".join(parts))
_hostnames = st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,20}(\.[A-Za-z0-9_-]{1,20}){0,3}\.?", fullmatch=True)
_vm_names = st.text(
    st.characters(exclude_characters="/", exclude_categories=_SURROGATES, min_codepoint=0x20), min_size=1, max_size=100
).filter(lambda name: name.lower() not in VM_WILDCARDS and not _GUID_LIKE.fullmatch(name))

addresses: st.SearchStrategy[Address] = st.one_of(
    st.builds(
        TcpAddress,
        st.one_of(st.ip_addresses().map(str), _hostnames),
        st.integers(0, 65535),
    ),
    st.builds(UnixAddress, _paths.filter(_fits_unix)),
    st.builds(
        UnixAddress,
        st.text(st.characters(exclude_characters="\0", exclude_categories=_SURROGATES), min_size=1).filter(_fits_unix),
        st.just(True),
    ),
    st.builds(VsockAddress, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.builds(HyperVAddress, st.one_of(st.uuids(), _vm_names), st.uuids()),
    st.builds(VsockMuxAddress, _paths.filter(lambda p: _fits_unix(p, 96)), st.integers(0, 2**32 - 2)),
    st.just(StdioAddress()),
)


@pytest.mark.slow
@FUZZ
@given(addresses)
def test_str_round_trips(address: Address) -> None:
    assert parse_address(str(address)) == address


_PARTS: Final = (
    "tcp://",
    "unix:",
    "unix:@",
    "unix:///",
    "vsock://",
    "hvsock://",
    "vsock-mux:///",
    "stdio",
    "[::1]",
    "127.0.0.1",
    "any",
    "host",
    ":",
    "/",
    "{",
    "}",
    "-",
    "0",
    "22",
    "65536",
    "4294967295",
    SSH,
    "\n",
    "\0",
)


@pytest.mark.slow
@FUZZ
@given(st.one_of(st.text(), st.lists(st.one_of(st.sampled_from(_PARTS), st.text(max_size=4)), max_size=8).map("".join)))
def test_any_text_parses_or_raises_address_error(text: str) -> None:
    roles: tuple[Role | None, ...] = (None, "listen", "connect")
    for role in roles:
        try:
            address = parse_address(text, role=role)
        except AddressError:
            continue
        assert parse_address(str(address)) == address
