"""metrics.py: the exposition text, adding up processes, the /metrics HTTP handler and probe().

HTTP tests drive handle_request() over memory streams; serve_metrics() and probe() run on
loopback (127.0.0.1 port 0, Unix sockets in tmp_path), each bounded by trio.fail_after.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from hvbridge import __version__, metrics
from hvbridge.addresses import TcpAddress, UnixAddress, parse_address
from hvbridge.metrics import Exposition, handle_request, probe, serve_metrics
from hvbridge.relay.ends import EndReason, Transfer
from hvbridge.stats import CONNECT_LATENCY_BUCKETS, RouteStatistics, merge, merge_all, retired
from hvbridge.supervisor import RouteCounters
from hvbridge.transports import base

if TYPE_CHECKING:
    from pathlib import Path

NO_BUCKETS = (0,) * (len(CONNECT_LATENCY_BUCKETS) + 1)


def _stats() -> RouteStatistics:
    """One route's counters, with connects of 2 ms and 20 s in the latency histogram."""
    counters = RouteCounters(accepted=3, refused=1, failed=1, bytes_in=100, bytes_out=2000)
    counters.closed.update({EndReason.CLOSED.label: 1, EndReason.REFUSED_BY_ALLOW_LIST.label: 1})
    counters.live.add(Transfer())
    counters.observe_connect(0.002)
    counters.observe_connect(20.0)
    return counters.snapshot()


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_exposition_per_route() -> None:
    text = Exposition().render({"web": _stats()}, {"web": 1, "down": 0})
    samples = _samples(text)
    route = (("route", "web"),)
    assert samples["hvbridge_connections_accepted_total", route] == 3
    assert samples["hvbridge_connections_active", route] == 1
    assert samples["hvbridge_connections_refused_total", route] == 1
    assert samples["hvbridge_connections_failed_total", route] == 1
    assert samples["hvbridge_connections_closed_total", (("reason", "closed"), *route)] == 1
    assert samples["hvbridge_connections_closed_total", (("reason", "refused_by_allow_list"), *route)] == 1
    assert samples["hvbridge_relayed_bytes_total", (("direction", "client_to_backend"), *route)] == 100
    assert samples["hvbridge_relayed_bytes_total", (("direction", "backend_to_client"), *route)] == 2000
    assert samples["hvbridge_connect_duration_seconds_bucket", (("le", "0.001"), *route)] == 0
    assert samples["hvbridge_connect_duration_seconds_bucket", (("le", "0.0025"), *route)] == 1
    assert samples["hvbridge_connect_duration_seconds_bucket", (("le", "10.0"), *route)] == 1
    assert samples["hvbridge_connect_duration_seconds_bucket", (("le", "+Inf"), *route)] == 2
    assert samples["hvbridge_connect_duration_seconds_count", route] == 2
    assert samples["hvbridge_connect_duration_seconds_sum", route] == pytest.approx(20.002)
    assert samples["hvbridge_route_listeners", route] == 1
    assert samples["hvbridge_route_listeners", (("route", "down"),)] == 0
    assert samples["hvbridge_info", (("version", __version__),)] == 1
    assert samples["process_open_fds", ()] > 0


def test_exposition_text_form() -> None:
    text = Exposition().render({"web": _stats()}, {"web": 1}).decode()
    assert "# TYPE hvbridge_connections_accepted_total counter\n" in text
    assert 'hvbridge_connections_accepted_total{route="web"} 3.0\n' in text
    assert "# TYPE hvbridge_connect_duration_seconds histogram\n" in text


def test_exposition_of_a_process_group() -> None:
    text = Exposition(lambda: [os.getpid(), os.getppid()]).render({}, {})
    samples = _samples(text)
    assert samples["process_open_fds", (("pid", str(os.getpid())),)] > 0
    assert ("process_open_fds", (("pid", str(os.getppid())),)) in samples
    assert ("process_open_fds", ()) not in samples


def test_merge_adds_every_counter() -> None:
    a = _stats()
    b = RouteStatistics(1, 2, 0, 0, 5, 6, {EndReason.CLOSED.label: 2, EndReason.IDLE_TIMEOUT.label: 1})
    total = merge(a, b)
    assert total.accepted == 4
    assert total.active == 3
    assert total.refused == 1
    assert total.failed == 1
    assert total.bytes_in == 105
    assert total.bytes_out == 2006
    assert total.closed == {
        EndReason.CLOSED.label: 3,
        EndReason.REFUSED_BY_ALLOW_LIST.label: 1,
        EndReason.IDLE_TIMEOUT.label: 1,
    }
    assert total.connect_buckets == a.connect_buckets
    assert total.connect_seconds == a.connect_seconds


def test_merge_all_and_retired() -> None:
    a = _stats()
    b = RouteStatistics(1, 2, 0, 0, 5, 6, {}, NO_BUCKETS, 0.0)
    total = merge_all([{"web": a}, retired({"web": b, "ssh": b})])
    assert total["web"].accepted == 4
    assert total["web"].active == 1
    assert total["ssh"] == RouteStatistics(1, 0, 0, 0, 5, 6, {}, NO_BUCKETS, 0.0)


# ----------------------------------------------------------------------------------- HTTP


async def _render() -> bytes:
    return b"hvbridge_up 1\n"


async def _exchange(request: bytes) -> bytes:
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle_request, server, _render)
            await client.send_all(request)
            response = bytearray()
            while chunk := await client.receive_some(65536):
                response += chunk
    return bytes(response)


async def test_get_metrics() -> None:
    response = await _exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"HTTP/1.1 200 OK",
        b"Content-Type: text/plain; version=0.0.4; charset=utf-8",
        b"Content-Length: 14",
        b"Connection: close",
    ]
    assert body == b"hvbridge_up 1\n"


async def test_get_metrics_with_a_query_and_bare_newlines() -> None:
    response = await _exchange(b"GET /metrics?x=1 HTTP/1.0\n\n")
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize(
    "request_line",
    [b"GET / HTTP/1.1", b"POST /metrics HTTP/1.1", b"GET /metricsx HTTP/1.1", b"garbage"],
)
async def test_anything_else_is_404(request_line: bytes) -> None:
    response = await _exchange(request_line + b"\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 404 Not Found\r\n")


async def test_a_request_too_large_is_400() -> None:
    response = await _exchange(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (metrics.MAX_REQUEST + 1))
    assert response.startswith(b"HTTP/1.1 400 Bad Request\r\n")


async def test_a_request_cut_short_is_400() -> None:
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle_request, server, _render)
            await client.send_all(b"GET /metrics HTTP/1.1\r\n")
            await client.send_eof()
            response = await client.receive_some(65536)
    assert response.startswith(b"HTTP/1.1 400 Bad Request\r\n")


async def test_a_slow_client_is_dropped(autojump_clock: trio.abc.Clock) -> None:
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(metrics.READ_TIMEOUT + 1):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle_request, server, _render)
            await client.send_all(b"GET /metrics HTTP/1.1\r\n")
            assert await client.receive_some(65536) == b""  # closed with no answer


async def test_a_client_that_goes_away_costs_nothing() -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.aclose()
    with trio.fail_after(5):
        await handle_request(server, _render)


# ----------------------------------------------------------------------- server and probe


async def _serve(address: str, nursery: trio.Nursery, listeners: dict[str, int]) -> str:
    async def render() -> bytes:
        return Exposition().render({}, listeners)

    bound = await nursery.start(serve_metrics, parse_address(address), render)

    return base.listener_address(bound[0])


async def test_serve_and_probe_tcp(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        bound = await _serve("tcp://127.0.0.1:0", nursery, {"web": 1, "ssh": 2})
        assert await probe(parse_address(bound), ["web", "ssh"]) == []
        assert await probe(parse_address(bound), ["web", "db"]) == ["route 'db' has no listening socket"]


async def test_serve_and_probe_unix(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = tmp_path / "metrics.sock"
    with trio.fail_after(10):
        await _serve(f"unix://{path}", nursery, {"web": 0})
        assert oct(path.stat().st_mode & 0o777) == oct(0o600)
        assert await probe(UnixAddress(str(path)), ["web"]) == ["route 'web' has no listening socket"]


async def test_probe_nobody_listening(tmp_path: Path) -> None:
    with trio.fail_after(10):
        [problem] = await probe(UnixAddress(str(tmp_path / "none.sock")), ["web"])
    assert problem.startswith(f"unix://{tmp_path}/none.sock: connect unix://{tmp_path}/none.sock: ")


async def _fake_server(nursery: trio.Nursery, answer: bytes) -> TcpAddress:
    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(answer)
        await stream.aclose()

    [listener] = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return TcpAddress("127.0.0.1", listener.socket.getsockname()[1])


async def test_probe_a_server_that_says_404(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        address = await _fake_server(nursery, b"HTTP/1.1 404 Not Found\r\n\r\n")
        assert await probe(address, []) == [f"{address}: /metrics answered 'HTTP/1.1 404 Not Found'"]


async def test_probe_a_server_that_says_nonsense(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        address = await _fake_server(nursery, b"HTTP/1.1 200 OK\r\n\r\nthis is not { metrics\n")
        [problem] = await probe(address, [])
    assert problem.startswith(f"{address}: cannot parse /metrics: ")


async def test_probe_a_server_that_says_too_much(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_MAX_RESPONSE", 10)
    with trio.fail_after(10):
        address = await _fake_server(nursery, b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 100)
        assert await probe(address, []) == [f"{address}: response larger than 10 bytes"]


async def test_probe_a_server_that_never_answers(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _server = trio.testing.memory_stream_pair()

    async def connect(address: object, options: object) -> trio.abc.HalfCloseableStream:
        return client

    address = TcpAddress("127.0.0.1", 9)
    with trio.fail_after(metrics.PROBE_TIMEOUT + 1):
        assert await probe(address, [], connect) == [f"{address}: no answer within 5s"]
