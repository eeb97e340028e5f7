"""PROXY protocol headers: exact bytes against HAProxy's proxy-protocol.txt, and the parser's bounds."""

from __future__ import annotations

import contextlib
import socket
import string
import struct
import uuid
from typing import Final

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvbridge import proxyproto
from hvbridge.proxyproto import ProxyHeader, ProxyProtocolError, build, describe, parse, read_size

SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
TCP4 = ProxyHeader("TCP4", "192.168.0.1", 56324, "192.168.0.11", 443)
TCP6 = ProxyHeader("TCP6", "2001:db8::1", 1, "::1", 65535)


def test_v1_tcp4_is_the_spec_example() -> None:
    assert build(TCP4, "v1") == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"


def test_v1_tcp6() -> None:
    assert build(TCP6, "v1") == b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n"


@pytest.mark.parametrize("header", [ProxyHeader("UNIX", "/a", 0, "/b", 0), ProxyHeader(), ProxyHeader(local=True)])
def test_v1_without_ip_addresses_is_unknown(header: ProxyHeader) -> None:
    assert build(header, "v1") == b"PROXY UNKNOWN\r\n"


def test_v2_tcp4() -> None:
    expected = SIG + b"\x21\x11\x00\x0c" + b"\xc0\xa8\x00\x01" + b"\xc0\xa8\x00\x0b" + b"\xdc\x04" + b"\x01\xbb"
    assert build(TCP4, "v2") == expected


def test_v2_tcp6() -> None:
    expected = (
        SIG
        + b"\x21\x21\x00\x24"
        + b"\x20\x01\x0d\xb8"
        + b"\x00" * 11
        + b"\x01"
        + b"\x00" * 15
        + b"\x01"
        + b"\x00\x01\xff\xff"
    )
    assert build(TCP6, "v2") == expected


def test_v2_unix_has_two_108_byte_addresses() -> None:
    header = ProxyHeader("UNIX", "", 0, "/run/x.sock", 0)
    expected = SIG + b"\x21\x31\x00\xd8" + b"\x00" * 108 + b"/run/x.sock" + b"\x00" * (108 - 11)
    assert build(header, "v2") == expected


def test_v2_unspec_with_tlvs() -> None:
    header = ProxyHeader(tlvs=((0xE0, b"web"), (0xE1, bytes(range(16)))))
    expected = SIG + b"\x21\x00\x00\x19" + b"\xe0\x00\x03web" + b"\xe1\x00\x10" + bytes(range(16))
    assert build(header, "v2") == expected


def test_v2_local() -> None:
    assert build(ProxyHeader(local=True), "v2") == SIG + b"\x20\x00\x00\x00"


def test_describe_tcp4_with_route_tlv() -> None:
    header = describe((socket.AF_INET, ("10.0.0.1", 1234)), (socket.AF_INET, ("127.0.0.1", 80)), "web")
    assert build(header, "v1") == b"PROXY TCP4 10.0.0.1 127.0.0.1 1234 80\r\n"
    assert build(header, "v2") == (
        SIG + b"\x21\x11\x00\x12" + bytes([10, 0, 0, 1, 127, 0, 0, 1]) + b"\x04\xd2\x00\x50" + b"\xe0\x00\x03web"
    )


def test_describe_ipv4_mapped_peer_is_tcp4() -> None:
    header = describe(
        (socket.AF_INET6, ("::ffff:10.0.0.1", 5, 0, 0)), (socket.AF_INET6, ("::ffff:127.0.0.1", 80, 0, 0)), "r"
    )
    assert (header.family, header.source, header.destination) == ("TCP4", "10.0.0.1", "127.0.0.1")


def test_describe_tcp6() -> None:
    header = describe((socket.AF_INET6, ("::1", 5, 0, 0)), (socket.AF_INET6, ("::1", 80, 0, 0)), "r")
    assert build(header, "v1") == b"PROXY TCP6 ::1 ::1 5 80\r\n"


def test_describe_unix_peer() -> None:
    header = describe((socket.AF_UNIX, ""), (socket.AF_UNIX, "/run/l.sock"), "u")
    assert build(header, "v2") == (
        SIG + b"\x21\x31\x00\xdc" + b"\x00" * 108 + b"/run/l.sock" + b"\x00" * 97 + b"\xe0\x00\x01u"
    )
    abstract = describe((socket.AF_UNIX, b"\0peer"), (socket.AF_UNIX, b"\0me"), "u")
    assert (abstract.source, abstract.destination) == ("\0peer", "\0me")


def test_describe_vsock_peer_is_unspec_with_cid_and_port() -> None:
    family = getattr(socket, "AF_VSOCK", 40)
    if not hasattr(socket, "AF_VSOCK"):
        pytest.skip("AF_VSOCK needs Linux")
    header = describe((family, (3, 1025)), (family, (2, 22)), "ssh")
    assert build(header, "v2") == (
        SIG + b"\x21\x00\x00\x19" + b"\xe0\x00\x03ssh" + b"\xe1\x00\x10" + struct.pack("!IIII", 3, 1025, 2, 22)
    )
    assert build(header, "v1") == b"PROXY UNKNOWN\r\n"


def test_hyperv_tlv_is_vm_id_then_service_id() -> None:
    vm = "{12345678-1234-5678-9abc-def012345678}"
    service = "00000016-facb-11e6-bd58-64006a7986d3"
    kind, value = proxyproto.hyperv_tlv(vm, service)
    assert kind == 0xE2
    assert value == bytes.fromhex("12345678123456789abcdef012345678") + bytes.fromhex(
        "00000016facb11e6bd5864006a7986d3"
    )
    assert uuid.UUID(bytes=value[:16]) == uuid.UUID(vm)


def test_describe_without_addresses_is_unspec() -> None:
    assert build(describe(None, None, "r"), "v2") == SIG + b"\x21\x00\x00\x04\xe0\x00\x01r"


# -- parsing -----------------------------------------------------------------------------


def test_parse_v1_keeps_what_follows() -> None:
    data = b"PROXY TCP4 1.2.3.4 5.6.7.8 10 20\r\nGET /"
    header, size = parse(data) or (None, 0)
    assert header == ProxyHeader("TCP4", "1.2.3.4", 10, "5.6.7.8", 20)
    assert data[size:] == b"GET /"


def test_parse_v1_unknown_ignores_the_rest_of_the_line() -> None:
    assert parse(b"PROXY UNKNOWN ffff::1 whatever\r\nx") == (ProxyHeader(), 32)
    assert parse(b"PROXY UNKNOWN\r\n") == (ProxyHeader(), 15)


def test_parse_v2_with_tlvs_and_local() -> None:
    data = build(ProxyHeader("TCP6", "::1", 1, "::2", 2, ((0xE0, b"r"), (0x01, b"h2"))), "v2")
    assert parse(data + b"rest") == (ProxyHeader("TCP6", "::1", 1, "::2", 2, ((0xE0, b"r"), (0x01, b"h2"))), len(data))
    local = SIG + b"\x20\x11\x00\x0c" + bytes(12)
    assert parse(local) == (ProxyHeader(local=True), 28)
    assert ProxyHeader(local=True).peer() is None


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\n", "no PROXY protocol header"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "expected 'PROXY TCP4"),
        (b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "not an 4 address"),
        (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "not an 6 address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "not an 6 address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "not a port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "not a port"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "expected 'PROXY TCP4"),
        (b"PROXY TCP4 1.2.3.4\n", "CRLF"),
        (b"PROXY \xff\r\n", "not ASCII"),
        (b"PROXY UNKNOWN" + b" " * 100, "no CRLF within 107 bytes"),
        (SIG + b"\x11\x11\x00\x0c" + bytes(12), "version 1"),
        (SIG + b"\x22\x11\x00\x0c" + bytes(12), "unknown command"),
        (SIG + b"\x21\x12\x00\x0c" + bytes(12), "expected a stream"),
        (SIG + b"\x21\x11\x00\x04" + bytes(4), "too short for TCP4"),
        (SIG + b"\x21\x11\x08\x01", "reads at most 2048"),
        (SIG + b"\x21\x00\x00\x04\xe0\x00\x05r", "TLV 0xe0 says 5 bytes, 1 follow"),
        (SIG + b"\x21\x00\x00\x02\xe0\x00", "cut short"),
    ],
)
def test_parse_refuses(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyProtocolError, match=reason.replace("(", r"\(")):
        parse(data)


@pytest.mark.parametrize("data", [b"", b"PRO", b"PROXY TCP4 1.2", SIG[:5], SIG + b"\x21\x11\x00\x0c" + bytes(11)])
def test_parse_asks_for_more(data: bytes) -> None:
    assert parse(data) is None


def test_read_size_is_exact_once_the_v2_length_is_known() -> None:
    assert read_size(b"") == 107
    assert read_size(b"PROXY ") == 101
    assert read_size(SIG + b"\x21\x11\x00\x0c") == 12
    assert read_size(SIG + b"\x21\x11\xff\xff") == 2048  # then parse() refuses it


# -- property tests ------------------------------------------------------------------------

# No deadline: the suite shares its CPU with coverage and other test runs.
PROPERTY: Final = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

_ports = st.integers(0, 65535)
_tlvs = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4).map(tuple)
_paths = st.text(string.ascii_letters + "/._-", max_size=100)
_headers = st.one_of(
    st.builds(
        ProxyHeader,
        st.just("TCP4"),
        st.ip_addresses(v=4).map(str),
        _ports,
        st.ip_addresses(v=4).map(str),
        _ports,
        _tlvs,
    ),
    st.builds(
        ProxyHeader,
        st.just("TCP6"),
        st.ip_addresses(v=6).map(str),
        _ports,
        st.ip_addresses(v=6).map(str),
        _ports,
        _tlvs,
    ),
    st.builds(ProxyHeader, st.just("UNIX"), _paths, st.just(0), _paths, st.just(0), _tlvs),
    st.builds(ProxyHeader, tlvs=_tlvs),
    st.builds(ProxyHeader, tlvs=_tlvs, local=st.just(True)),
)


@PROPERTY
@given(_headers, st.binary(max_size=64))
def test_every_v2_header_parses_back(header: ProxyHeader, rest: bytes) -> None:
    data = build(header, "v2")
    assert parse(data + rest) == (header, len(data))


@PROPERTY
@given(_headers, st.binary(max_size=64))
def test_every_v1_header_parses_back(header: ProxyHeader, rest: bytes) -> None:
    data = build(header, "v1")
    assert len(data) <= proxyproto.V1_MAX
    parsed, size = parse(data + rest) or (None, 0)
    assert size == len(data)
    if header.family in ("TCP4", "TCP6") and not header.local:
        assert parsed == attrs_without_tlvs(header)
    else:
        assert parsed == ProxyHeader()


def attrs_without_tlvs(header: ProxyHeader) -> ProxyHeader:
    return ProxyHeader(header.family, header.source, header.source_port, header.destination, header.destination_port)


def _read_like_the_supervisor(stream: bytes, chunk: int) -> tuple[ProxyHeader, int] | None:
    """Feed `stream` as the supervisor does: ask read_size(), take at most `chunk` of it."""
    data = b""
    while True:
        want = read_size(data)
        assert want > 0, "read_size() asked for nothing while parse() wanted more"
        piece = stream[len(data) : len(data) + min(want, chunk)]
        if not piece:
            return None  # EOF before a whole header
        data += piece
        assert len(data) <= proxyproto.MAX_HEADER
        found = parse(data)
        if found is not None:
            return found


@PROPERTY
@given(st.binary(max_size=3000), st.integers(1, 200))
def test_no_input_crashes_the_parser_or_reads_past_the_bound(stream: bytes, chunk: int) -> None:
    try:
        found = _read_like_the_supervisor(stream, chunk)
    except ProxyProtocolError:
        return
    if found is not None:
        assert found[1] <= proxyproto.MAX_HEADER


@PROPERTY
@given(_headers, st.sampled_from(["v1", "v2"]), st.binary(max_size=200), st.integers(1, 50))
def test_reading_in_pieces_finds_the_header(header: ProxyHeader, version: str, rest: bytes, chunk: int) -> None:
    data = build(header, "v1" if version == "v1" else "v2")
    found = _read_like_the_supervisor(data + rest, chunk)
    assert found is not None
    assert found[1] == len(data)


@PROPERTY
@given(st.sampled_from([SIG, b"PROXY TCP4 "]), st.binary(max_size=2200))
def test_prefixed_garbage_never_crashes(prefix: bytes, tail: bytes) -> None:
    with contextlib.suppress(ProxyProtocolError):
        _read_like_the_supervisor(prefix + tail, 64)


def test_peer_gives_a_getpeername_style_address() -> None:
    assert TCP4.peer() == (socket.AF_INET, ("192.168.0.1", 56324))
    assert TCP6.peer() == (socket.AF_INET6, ("2001:db8::1", 1, 0, 0))
    assert ProxyHeader("UNIX", "/c", 0, "/l", 0).peer() == (socket.AF_UNIX, "/c")
    assert ProxyHeader().peer() is None


def test_build_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="at most 108 bytes"):
        build(ProxyHeader("UNIX", "/" * 109, 0, "/l", 0), "v2")
    with pytest.raises(ValueError, match="at most 65535 bytes"):
        build(ProxyHeader(tlvs=((0xE0, bytes(0xFFFF)),)), "v2")


def test_a_local_command_ignores_an_unknown_family() -> None:
    assert parse(SIG + b"\x20\x12\x00\x00") == (ProxyHeader(local=True), 16)


def test_a_lone_cr_inside_a_v1_line_is_refused() -> None:
    with pytest.raises(ProxyProtocolError, match="CRLF"):
        parse(b"PROXY TCP4\r1.2.3.4 5.6.7.8 1 2\r\n")


def test_describe_drops_a_unix_path_too_long_for_the_header() -> None:
    header = describe((socket.AF_UNIX, "/" * 200), (socket.AF_UNIX, "/l"), "u")
    assert (header.source, header.destination) == ("", "/l")
