"""AF_VSOCK over a real kernel transport (vsock_loopback in the micro-VM guest), end to end.

Rules: see conftest.py. In short: guest only (skipped elsewhere, and vsock_client() refuses);
one hvbridge process for the session; real TCP backends and real AF_VSOCK clients; every test
bounded by trio.fail_after; hvbridge must survive every test.
"""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Final

import pytest
import trio
from integration.support import exchange, expect_closed, mib_per_s, open_stream, receive_into
from support.processes import MiB, run_hvbridge

from hvbridge.addresses import VMADDR_CID_ANY, VMADDR_PORT_ANY, VsockAddress
from hvbridge.errors import BackendUnavailable
from hvbridge.routes import RouteOptions
from hvbridge.transports import vsock
from hvbridge.transports.base import peer_address

from .guest import (
    FIGURES,
    PORT_ALLOW_LOCAL,
    PORT_ALLOW_OTHER,
    PORT_BULK,
    PORT_NOBODY,
    GuestBridge,
    require_guest,
    serve_backend,
    vsock_client,
)

pytestmark = [pytest.mark.vsock, pytest.mark.slow]

#: Per-test bound: the guest runs under TCG, ~20x slower than the host.
LIMIT: Final = 120.0
BULK: Final = 16 * MiB
SMALL: Final = 256 * 1024
VMADDR_CID_LOCAL: Final = 1


# ------------------------------------------------------------------ transports/vsock.py on a real transport


async def test_the_local_cid_of_a_loopback_only_guest_is_1() -> None:
    require_guest()
    # IOCTL_VM_SOCKETS_GET_LOCAL_CID on /dev/vsock: with no guest or host transport the kernel
    # reports the loopback transport's CID, VMADDR_CID_LOCAL.
    assert vsock.local_cid() == VMADDR_CID_LOCAL
    assert vsock.describe_local_cid() == "local vsock CID: 1"


async def test_listen_any_connect_local_with_kernel_timeout_and_buffers() -> None:
    require_guest()
    with trio.fail_after(LIMIT):
        listener = await vsock.open_vsock_listener(
            VsockAddress(VMADDR_CID_ANY, VMADDR_PORT_ANY), RouteOptions(vsock_buffer_size=MiB)
        )
        async with listener:
            cid, port = listener.socket.getsockname()
            assert (cid, port != VMADDR_PORT_ANY) == (VMADDR_CID_ANY, True)
            client = await vsock.connect_vsock(
                VsockAddress(VMADDR_CID_LOCAL, port), RouteOptions(connect_timeout=9.5, vsock_buffer_size=2 * MiB)
            )
            server = await listener.accept()
            async with client, server:
                # The kernel holds the route's connect timeout, not its 2 s default.
                assert 9.5 <= vsock.get_connect_timeout(client.socket) <= 9.52
                sol = vsock.SOL_VSOCK_OPTIONS
                assert client.socket.getsockopt(sol, vsock.SO_VM_SOCKETS_BUFFER_SIZE) == 2 * MiB
                # Accepted connections inherit the listener's buffer size.
                assert isinstance(server, trio.SocketStream)
                assert server.socket.getsockopt(sol, vsock.SO_VM_SOCKETS_BUFFER_SIZE) == MiB
                # What the supervisor's allow list sees: (AF_VSOCK, (peer CID, peer port)).
                peer = peer_address(server)
                assert peer is not None
                assert peer[0] == socket.AF_VSOCK
                assert peer[1] == (VMADDR_CID_LOCAL, client.socket.getsockname()[1])
                await client.send_all(b"over vsock")
                await client.send_eof()
                assert await server.receive_some(100) == b"over vsock"
                assert await server.receive_some(100) == b""  # half-close arrived as EOF
                await server.send_all(b"and back")
                await server.send_eof()
                assert await client.receive_some(100) == b"and back"
                assert await client.receive_some(100) == b""


async def test_connect_to_a_port_nobody_listens_on_is_backend_unavailable() -> None:
    require_guest()
    with trio.fail_after(LIMIT), pytest.raises(BackendUnavailable) as info:
        await vsock.connect_vsock(VsockAddress(VMADDR_CID_LOCAL, PORT_NOBODY), RouteOptions())
    assert info.value.message == (
        f"backend unavailable (connection reset: nothing listens on port {PORT_NOBODY} at CID 1; start the service)"
    )


async def test_connect_to_a_cid_no_transport_reaches_is_backend_unavailable() -> None:
    require_guest()
    with trio.fail_after(LIMIT), pytest.raises(BackendUnavailable) as info:
        await vsock.connect_vsock(VsockAddress(12345, 22), RouteOptions())
    assert info.value.message.startswith("backend unavailable (no vsock transport reaches CID 12345:")
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == 19  # ENODEV


# ---------------------------------------------------------------- the hvbridge process over vsock


async def test_tcp_to_vsock_to_tcp_16_mib_each_way(bridge: GuestBridge, nursery: trio.Nursery) -> None:
    with trio.fail_after(3 * LIMIT):
        backend = await serve_backend(nursery, bridge.backends["vsock-to-tcp"], "concurrent", BULK)
        client = await open_stream(bridge.listening("tcp-to-vsock"))
        async with client:
            outcome = await exchange(client, send=BULK, reply=BULK, trailer=32)
        result = await backend.result()
    assert result.error is None
    assert (result.received, outcome.received) == (BULK, BULK)
    assert result.received_sha256 == outcome.sent_sha256, "client -> backend bytes differ"
    assert outcome.received_sha256 == result.sent_sha256, "backend -> client bytes differ"
    assert outcome.trailer == result.received_sha256
    FIGURES.append(
        f"tcp -> hvbridge -> vsock -> hvbridge -> tcp, {BULK // MiB} MiB each way at once: {outcome.elapsed:.1f} s,"
        f" {mib_per_s(2 * BULK, outcome.elapsed):.1f} MiB/s in total"
    )
    bridge.check_running()


async def test_half_close_client_first_over_vsock(bridge: GuestBridge, nursery: trio.Nursery) -> None:
    # The client's EOF crosses vsock as a write shutdown; only then does the backend answer.
    with trio.fail_after(LIMIT):
        backend = await serve_backend(nursery, bridge.backends["vsock-to-tcp"], "reply_after_eof", SMALL)
        client = await open_stream(bridge.listening("tcp-to-vsock"))
        async with client:
            outcome = await exchange(client, send=SMALL, reply=SMALL, trailer=32)
        result = await backend.result()
    assert result.error is None
    assert (result.received_sha256, outcome.trailer) == (outcome.sent_sha256, outcome.sent_sha256)
    assert outcome.received_sha256 == result.sent_sha256
    bridge.check_running()


async def test_half_close_backend_first_over_vsock(bridge: GuestBridge, nursery: trio.Nursery) -> None:
    # The backend sends everything and its EOF first; the client reads to EOF, and only then
    # sends its own bytes, which must still reach the backend through the half-open vsock.
    with trio.fail_after(LIMIT):
        backend = await serve_backend(nursery, bridge.backends["vsock-to-tcp"], "reply_first", SMALL)
        client = await open_stream(bridge.listening("tcp-to-vsock"))
        async with client:
            reply = hashlib.sha256()
            assert await receive_into(client, reply, SMALL) == SMALL
            data = os.urandom(SMALL)
            await client.send_all(data)
            await client.send_eof()
            assert await expect_closed(client) == "eof"
        result = await backend.result()
    assert result.error is None
    assert reply.digest() == result.sent_sha256
    assert (result.received, result.received_sha256) == (SMALL, hashlib.sha256(data).digest())
    bridge.check_running()


async def test_a_vsock_port_nobody_listens_on_closes_the_client_promptly(
    bridge: GuestBridge, nursery: trio.Nursery
) -> None:
    with trio.fail_after(LIMIT):
        client = await open_stream(bridge.listening("no-listener"))
        async with client:
            peer = f"tcp://127.0.0.1:{client.socket.getsockname()[1]}"
            start = trio.current_time()
            how = await expect_closed(client)
            elapsed = trio.current_time() - start
        [closed] = await bridge.wait_for_event("connection closed", route="no-listener", peer=peer)
    assert how == "reset", "a failed connect must look like a failure to the client"
    # The route allows 30 s to connect; the vsock RST ends it at once (TCG included).
    assert elapsed < 10.0
    assert closed.fields["reason"] == (
        f"connect failed: backend unavailable (connection reset: nothing listens on port {PORT_NOBODY} at CID 1;"
        " start the service)"
    )
    FIGURES.append(f"client closed after a refused vsock connect in {elapsed * 1000:.0f} ms")
    # The relay keeps serving: the same process relays the next connection over vsock.
    with trio.fail_after(LIMIT):
        await serve_backend(nursery, bridge.backends["vsock-to-tcp"], "echo")
        client = await open_stream(bridge.listening("tcp-to-vsock"))
        async with client:
            outcome = await exchange(client, send=SMALL, reply=SMALL)
    assert outcome.received_sha256 == outcome.sent_sha256
    bridge.check_running()


async def test_a_vsock_listener_on_port_any(bridge: GuestBridge, nursery: trio.Nursery) -> None:
    listen = bridge.listening("any-port")
    assert listen.startswith("vsock://any:"), listen
    port_text = listen.rpartition(":")[2]
    assert port_text.isdigit(), f"the bound port is logged, not 'any': {listen}"
    with trio.fail_after(LIMIT):
        await serve_backend(nursery, bridge.backends["any-port"], "echo")
        client = await vsock_client(VMADDR_CID_LOCAL, int(port_text))
        async with client:
            outcome = await exchange(client, send=SMALL, reply=SMALL)
    assert outcome.received_sha256 == outcome.sent_sha256
    bridge.check_running()


async def test_allow_by_cid_lets_cid_1_in(bridge: GuestBridge, nursery: trio.Nursery) -> None:
    with trio.fail_after(LIMIT):
        backend = await serve_backend(nursery, bridge.backends["allow-cid-1"], "echo")
        client = await vsock_client(VMADDR_CID_LOCAL, PORT_ALLOW_LOCAL)
        async with client:
            peer = f"vsock://1:{client.socket.getsockname()[1]}"
            outcome = await exchange(client, send=SMALL, reply=SMALL)
        [closed] = await bridge.wait_for_event("connection closed", route="allow-cid-1", peer=peer)
    assert outcome.received_sha256 == outcome.sent_sha256
    assert len(backend.results) == 1
    assert closed.fields["reason"] == "closed"
    bridge.check_running()


async def test_allow_by_cid_turns_other_cids_away(bridge: GuestBridge, nursery: trio.Nursery) -> None:
    with trio.fail_after(LIMIT):
        backend = await serve_backend(nursery, bridge.backends["allow-cid-99"], "echo")
        client = await vsock_client(VMADDR_CID_LOCAL, PORT_ALLOW_OTHER)
        async with client:
            peer = f"vsock://1:{client.socket.getsockname()[1]}"
            # vsock has no RST for an accepted connection: the client sees it end, no data.
            await expect_closed(client)
        [closed] = await bridge.wait_for_event("connection closed", route="allow-cid-99", peer=peer)
    assert closed.level == "WARNING"
    assert closed.fields["reason"] == "refused by allow list"
    assert backend.results == [], "a refused peer must never reach the backend"
    # Turning a peer away harms nothing else: the process still relays over vsock.
    with trio.fail_after(LIMIT):
        await serve_backend(nursery, bridge.backends["allow-cid-1"], "echo")
        client = await vsock_client(VMADDR_CID_LOCAL, PORT_ALLOW_LOCAL)
        async with client:
            outcome = await exchange(client, send=SMALL, reply=SMALL)
    assert outcome.received_sha256 == outcome.sent_sha256
    bridge.check_running()


async def test_hvbridge_connect_relays_stdio_over_vsock(bridge: GuestBridge, nursery: trio.Nursery) -> None:
    # `hvbridge connect vsock://1:PORT` as an ssh ProxyCommand would run it: stdin to the
    # vsock service (route vsock-to-tcp), its answer to stdout, exit 0 when both are done.
    data = os.urandom(SMALL)
    with trio.fail_after(2 * LIMIT):
        backend = await serve_backend(nursery, bridge.backends["vsock-to-tcp"], "reply_after_eof", SMALL)
        start = trio.current_time()
        done = await run_hvbridge("connect", f"vsock://1:{PORT_BULK}", stdin=data)
        elapsed = trio.current_time() - start
        assert done.returncode == 0, done.stderr.decode()
        assert len(done.stdout) == SMALL + 32, done.stderr.decode()
        result = await backend.result()
    assert result.received_sha256 == hashlib.sha256(data).digest()
    assert hashlib.sha256(done.stdout[:SMALL]).digest() == result.sent_sha256
    assert done.stdout[SMALL:] == hashlib.sha256(data).digest()
    FIGURES.append(f"`hvbridge connect vsock://1:{PORT_BULK}` round trip (start-up included): {elapsed:.1f} s")
    bridge.check_running()
