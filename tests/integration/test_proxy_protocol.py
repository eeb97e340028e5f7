"""PROXY protocol headers from and to the real `hvbridge`, checked by real nginx and HAProxy.

nginx (`listen ... proxy_protocol`) and HAProxy (`bind ... accept-proxy`) answer each request
with the client address they read from hvbridge's header; HAProxy's `send-proxy` and
`send-proxy-v2` feed a route with `accept_proxy = true`.

Rules: localhost only (127.0.0.1 and Unix sockets in tmp_path); hvbridge binds port 0, nginx and
HAProxy (which cannot report theirs) get ports found free a moment before, retried on a clash;
every test bounded by trio.fail_after and every loop bounded in count. A test skips, saying why,
only when nginx, haproxy or curl is missing (CI installs nginx-light, haproxy and curl).
"""

from __future__ import annotations

import re
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest
import trio
from support.processes import START_TIMEOUT, run_command

from .support import free_port, tcp_port

if TYPE_CHECKING:
    from .support import Daemon, Hvbridge, Processes

pytestmark = pytest.mark.slow

NGINX: Final = Path("/usr/sbin/nginx")
HAPROXY: Final = Path("/usr/sbin/haproxy")
ATTEMPTS: Final = 5


def _need(path: Path | str, package: str) -> str:
    found = shutil.which(str(path))
    if found is None:
        pytest.skip(f"{path} is not installed (apt-get install {package})")
    return found


async def _wait_accepting(server: Daemon, path: Path) -> bool:
    """Wait until `path` accepts connections (True), or the server exits first (False)."""
    for _ in range(int(START_TIMEOUT / 0.05)):
        if server.process.returncode is not None or server.output.closed:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except OSError:
                await trio.sleep(0.05)
                continue
            return True
    raise AssertionError(f"{server.argv[0]} did not accept on {path} within {START_TIMEOUT:g}s")


def _write(config: Path, text: str, stale: Path) -> None:
    config.write_text(text)
    stale.unlink(missing_ok=True)


async def _start(processes: Processes, argv: list[str], config: Path, text: str, ready: Path) -> int:
    """Write `text` (with {port}) to `config`, start `argv`; retry on a port clash. The port."""
    for _ in range(ATTEMPTS):
        port = free_port()
        _write(config, text.replace("{port}", str(port)), ready)
        server = await processes.daemon(argv)
        with trio.fail_after(START_TIMEOUT):
            if await _wait_accepting(server, ready):
                return port
        await server.stop()
        if "in use" not in server.output.text:
            pytest.fail(f"{argv[0]} did not start:\n{server.output.text}", pytrace=False)
    pytest.fail(f"{argv[0]} found no free port in {ATTEMPTS} attempts", pytrace=False)


async def _nginx(processes: Processes, tmp_path: Path) -> tuple[int, Path]:
    """nginx answering `ADDRESS:PORT` from the PROXY header, on a TCP port and a Unix socket."""
    nginx = _need(NGINX, "nginx-light")
    root = tmp_path / "nginx"
    root.mkdir()
    sock = root / "nginx.sock"
    config = root / "nginx.conf"
    text = f"""\
pid {root}/nginx.pid;
worker_processes 1;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen 127.0.0.1:{{port}} proxy_protocol;
        listen unix:{sock} proxy_protocol;
        default_type text/plain;
        return 200 "$proxy_protocol_addr:$proxy_protocol_port";
    }}
}}
"""
    argv = [nginx, "-p", str(root), "-c", str(config), "-e", "stderr", "-g", "daemon off;"]
    return await _start(processes, argv, config, text, sock), sock


_HAPROXY_GLOBAL: Final = """\
global
    pidfile {root}/haproxy.pid
defaults
    timeout connect 5s
    timeout client 10s
    timeout server 10s
"""


async def _haproxy(processes: Processes, tmp_path: Path, body: str) -> tuple[int, Path]:
    """HAProxy running `body` after a global section; `{port}` and `{sock}` are its listeners."""
    haproxy = _need(HAPROXY, "haproxy")
    root = tmp_path / "haproxy"
    root.mkdir()
    sock = root / "haproxy.sock"
    config = root / "haproxy.cfg"
    text = _HAPROXY_GLOBAL.replace("{root}", str(root)) + body.replace("{sock}", str(sock))
    return await _start(processes, [haproxy, "-db", "-f", str(config)], config, text, sock), sock


async def _curl(*args: str) -> str:
    curl = _need("curl", "curl")
    done = await run_command([curl, "-sS", "--fail", "--max-time", "10", *args])
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def _peer_port(relay: Hvbridge) -> int:
    [closed] = relay.events("connection closed")
    match = re.fullmatch(r"tcp://127\.0\.0\.1:(\d+)", closed.fields["peer"])
    assert match, closed
    return int(match[1])


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("backend", ["tcp", "unix"])
async def test_nginx_reads_the_client_address_from_hvbridge(
    processes: Processes, tmp_path: Path, version: str, backend: str
) -> None:
    with trio.fail_after(60):
        port, sock = await _nginx(processes, tmp_path)
        target = f"tcp://127.0.0.1:{port}" if backend == "tcp" else f"unix://{sock}"
        relay = await processes.forward("tcp://127.0.0.1:0", target, "--proxy-protocol", version)
        body = await _curl(f"http://127.0.0.1:{tcp_port(relay.listening())}/")
        await relay.wait_for_event("connection closed")
        # nginx saw curl's own address and port, not hvbridge's connection to it.
        assert body == f"127.0.0.1:{_peer_port(relay)}"


_HAPROXY_ANSWER: Final = """\
frontend answer
    mode http
    bind 127.0.0.1:{port} accept-proxy
    bind unix@{sock} accept-proxy
    http-request return status 200 content-type text/plain lf-string "%[src]:%[src_port]"
"""


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("backend", ["tcp", "unix"])
async def test_haproxy_reads_the_client_address_from_hvbridge(
    processes: Processes, tmp_path: Path, version: str, backend: str
) -> None:
    with trio.fail_after(60):
        port, sock = await _haproxy(processes, tmp_path, _HAPROXY_ANSWER)
        target = f"tcp://127.0.0.1:{port}" if backend == "tcp" else f"unix://{sock}"
        relay = await processes.forward("tcp://127.0.0.1:0", target, "--proxy-protocol", version)
        body = await _curl(f"http://127.0.0.1:{tcp_port(relay.listening())}/")
        await relay.wait_for_event("connection closed")
        assert body == f"127.0.0.1:{_peer_port(relay)}"


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_nginx_accepts_the_header_for_a_unix_client(processes: Processes, tmp_path: Path, version: str) -> None:
    # A Unix client: v2 sends AF_UNIX addresses, v1 `PROXY UNKNOWN`. nginx takes both and,
    # having no IP address to show, answers with empty fields. (HAProxy 2.6 refuses a v2
    # PROXY command with a Unix or UNSPEC family: the spec lets a receiver reject those.)
    with trio.fail_after(60):
        port, _ = await _nginx(processes, tmp_path)
        listen = f"unix://{tmp_path / 'in.sock'}"
        relay = await processes.forward(listen, f"tcp://127.0.0.1:{port}", "--proxy-protocol", version)
        body = await _curl("--unix-socket", str(tmp_path / "in.sock"), "http://x/")
        [closed] = await relay.wait_for_event("connection closed")
        assert closed.fields["reason"] in ("closed", "closed by client", "closed by backend"), closed
        assert body == ":", body


@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
async def test_haproxy_feeds_accept_proxy_and_hvbridge_passes_the_client_on(
    processes: Processes, tmp_path: Path, send: str
) -> None:
    # curl -> HAProxy (send-proxy[-v2]) -> hvbridge (accept_proxy, proxy_protocol v1) -> nginx:
    # nginx answers with curl's own address, which hvbridge also logs as the peer.
    with trio.fail_after(60):
        nginx_port, _ = await _nginx(processes, tmp_path)
        relay = await processes.run_table(
            f"""\
[routes.behind-lb]
listen = "tcp://127.0.0.1:0"
connect = "tcp://127.0.0.1:{nginx_port}"
accept_proxy = true
proxy_protocol = "v1"
allow = ["127.0.0.0/8"]
"""
        )
        hv_port = tcp_port(relay.listening("behind-lb"))
        lb_port, _ = await _haproxy(
            processes,
            tmp_path,
            f"""\
frontend lb
    mode tcp
    bind 127.0.0.1:{{port}}
    bind unix@{{sock}}
    default_backend hv
backend hv
    mode tcp
    server hv 127.0.0.1:{hv_port} {send}
""",
        )
        body = await _curl(f"http://127.0.0.1:{lb_port}/")
        curl_port = int(body.rpartition(":")[2])
        assert body == f"127.0.0.1:{curl_port}"
        # (The readiness probe on HAProxy's Unix socket made a connection of its own.)
        [closed] = await relay.wait_for_event("connection closed", peer=f"tcp://127.0.0.1:{curl_port}")
        # `via` is HAProxy's own connection to hvbridge, another port.
        assert closed.fields["via"].startswith("tcp://127.0.0.1:")
        assert closed.fields["via"] != closed.fields["peer"]


async def test_a_client_without_a_header_is_refused_and_logged(processes: Processes, tmp_path: Path) -> None:
    with trio.fail_after(60):
        nginx_port, _ = await _nginx(processes, tmp_path)
        relay = await processes.forward("tcp://127.0.0.1:0", f"tcp://127.0.0.1:{nginx_port}", "--accept-proxy")
        curl = _need("curl", "curl")
        done = await run_command([curl, "-sS", "--max-time", "10", f"http://127.0.0.1:{tcp_port(relay.listening())}/"])
        assert done.returncode != 0
        [closed] = await relay.wait_for_event("connection closed")
        assert closed.fields["reason"].startswith("refused: bad PROXY header: no PROXY protocol header"), closed
