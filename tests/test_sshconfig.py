"""ssh's `%h %p` forms, the ssh_config block, and handing a socket to ssh (ProxyUseFdpass)."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from hvbridge import sshconfig
from hvbridge.addresses import parse_address
from hvbridge.errors import AddressError


@pytest.mark.parametrize(
    ("host", "port", "endpoint"),
    [
        ("vsock/3", "22", "vsock://3:22"),
        ("vsock/3", None, "vsock://3:22"),
        ("vsock/3", "2222", "vsock://3:2222"),
        ("vsock-mux/run/fc.sock", "22", "vsock-mux:///run/fc.sock:22"),
        ("hvsock/my-vm", "22", "hvsock://my-vm/22"),
        ("unix/run/x.sock", "22", "unix:///run/x.sock"),
        ("unix//run/x.sock", "2222", "unix:///run/x.sock"),
        ("tcp://127.0.0.1:22", None, "tcp://127.0.0.1:22"),
        ("stdio", None, "stdio"),
    ],
)
def test_endpoint_for_ssh_forms(host: str, port: str | None, endpoint: str) -> None:
    assert sshconfig.endpoint_for(host, port) == endpoint
    parse_address(endpoint)  # every form is an endpoint hvbridge reads


def test_the_hyperv_form_means_the_vsock_port_service() -> None:
    address = parse_address(sshconfig.endpoint_for("hvsock/my-vm", "22"), role="connect")
    assert str(address) == "hvsock://my-vm/00000016-facb-11e6-bd58-64006a7986d3"


@pytest.mark.parametrize(
    ("host", "port", "message"),
    [
        ("tcp://127.0.0.1:22", "22", "a PORT goes only with ssh's host forms"),
        ("vsock/3", "ssh", "invalid port 'ssh'; expected a number such as 22"),
    ],
)
def test_endpoint_for_refuses(host: str, port: str, message: str) -> None:
    with pytest.raises(AddressError, match=message):
        sshconfig.endpoint_for(host, port)


def test_render_with_and_without_fdpass() -> None:
    text = sshconfig.render("/usr/bin/hvbridge", fdpass=True)
    assert "Host vsock/* vsock-mux/* hvsock/* unix/*\n" in text
    assert "    ProxyCommand /usr/bin/hvbridge connect --fdpass %h %p\n    ProxyUseFdpass yes\n" in text
    assert "    CheckHostIP no\n" in text
    plain = sshconfig.render("hv", fdpass=False)
    assert "    ProxyCommand hv connect %h %p\n" in plain
    assert "ProxyUseFdpass" not in plain


def test_hvbridge_command_falls_back_to_python_m(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/nowhere/__main__.py"])
    assert sshconfig.hvbridge_command().endswith(" -m hvbridge")


@pytest.mark.skipif(not sshconfig.fdpass_supported(), reason="SCM_RIGHTS fd passing as ssh does it: Linux")
def test_pass_fd_sends_one_byte_and_a_working_socket() -> None:
    ssh_end, proxy_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    connected, peer = socket.socketpair()
    connected.setblocking(False)
    with ssh_end, proxy_end, connected, peer:
        sshconfig.pass_fd(proxy_end, connected.fileno())
        data, fds, _, _ = socket.recv_fds(ssh_end, 16, 4)
        assert data == b"\0"
        assert len(fds) == 1
        with socket.socket(fileno=fds[0]) as received:
            assert received.getblocking()
            received.sendall(b"through the passed fd")
            assert peer.recv(64) == b"through the passed fd"


def test_stdout_socket_is_none_for_a_pipe() -> None:
    read, write = os.pipe()
    try:
        assert sshconfig.stdout_socket(write) is None
    finally:
        os.close(read)
        os.close(write)
    left, right = socket.socketpair()
    with left, right:
        sock = sshconfig.stdout_socket(left.fileno())
        assert sock is not None
        sock.close()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with tcp:
        assert sshconfig.stdout_socket(tcp.fileno()) is None


def test_connect_refuses_a_port_after_a_plain_endpoint() -> None:
    from click.testing import CliRunner

    from hvbridge.cli import main

    result = CliRunner().invoke(main, ["connect", "tcp://127.0.0.1:1", "22"])
    assert result.exit_code == 1
    assert "Error: a PORT goes only with ssh's host forms" in result.output


@pytest.mark.parametrize(("flag", "fdpass"), [("--fdpass", True), ("--no-fdpass", False)])
def test_ssh_config_command(flag: str, fdpass: bool) -> None:
    from click.testing import CliRunner

    from hvbridge.cli import main

    result = CliRunner().invoke(main, ["ssh-config", flag])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("# hvbridge: ssh vsock/CID")
    assert ("ProxyUseFdpass yes" in result.output) == fdpass
