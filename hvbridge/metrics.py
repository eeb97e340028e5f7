"""Metrics: the Prometheus exposition of the supervisor's counters, and the /metrics server.

This module owns metric names, their labels and how counters from several processes add up.
It never counts anything itself: the supervisor counts (Supervisor.statistics()), and a scrape
turns one snapshot of those counters into text with prometheus_client's `generate_latest` on a
registry holding a custom collector (plus process metrics from its ProcessCollector).

Metrics, each labelled by `route`:
    hvbridge_connections_accepted_total, hvbridge_connections_active,
    hvbridge_connections_refused_total (peer not in `allow`),
    hvbridge_connections_failed_total (the backend could not be reached),
    hvbridge_connections_closed_total{reason}, hvbridge_relayed_bytes_total{direction},
    hvbridge_connect_duration_seconds (histogram of successful connects, retries included),
    hvbridge_route_listeners (listening sockets serving the route; 0 means it is down).

With `--workers N` the main process asks each worker for its snapshot on every scrape and
adds them up (merge()); a worker that has exited keeps counting through its last snapshot, so
counters never go backwards. Process metrics then carry a `pid` label, one set per process.

The HTTP side is deliberately tiny: one request per connection, `GET /metrics` answers 200,
anything else 404; the request head is bounded in size and in time, so a slow or hostile
client costs one task for at most READ_TIMEOUT.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Final, NoReturn, final

import attrs
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector

from hvbridge import __version__
from hvbridge.backend import Backend
from hvbridge.errors import EndpointError
from hvbridge.logs import event
from hvbridge.routes import RouteOptions
from hvbridge.stats import CONNECT_LATENCY_BUCKETS, Snapshot
from hvbridge.transports import base

if TYPE_CHECKING:
    from hvbridge.addresses import Address

#: Largest request head accepted (request line and headers).
MAX_REQUEST: Final = 8 * 1024
#: Seconds a client has to send its request head, and then to take the response.
READ_TIMEOUT: Final = 5.0
#: Scrapes served at once; more wait in the accept backlog.
MAX_SCRAPES: Final = 16
#: Seconds probe() waits for a whole answer.
PROBE_TIMEOUT: Final = 5.0
#: Largest response probe() reads.
_MAX_RESPONSE: Final = 16 * 1024 * 1024

Render = Callable[[], Awaitable[bytes]]


# ------------------------------------------------------------------------------- exposition


@final
@attrs.define(eq=False)
class RouteCollector:
    """A prometheus_client collector over one snapshot of route counters.

    Set `routes` and `listeners` before each scrape (render() does); collect() only reads.

    Attributes:
        routes: Counters by route name.
        listeners: Listening sockets by route name, for the routes that should be serving.
    """

    routes: Snapshot = attrs.field(factory=dict)
    listeners: Mapping[str, int] = attrs.field(factory=dict)

    def collect(self) -> Iterator[Metric]:
        """Yield every hvbridge metric family for the current snapshot."""
        info = GaugeMetricFamily("hvbridge_info", "hvbridge version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        accepted = CounterMetricFamily("hvbridge_connections_accepted", "Connections accepted.", labels=["route"])
        active = GaugeMetricFamily("hvbridge_connections_active", "Connections open now.", labels=["route"])
        refused = CounterMetricFamily(
            "hvbridge_connections_refused", "Connections closed at once: peer not in allow.", labels=["route"]
        )
        failed = CounterMetricFamily(
            "hvbridge_connections_failed", "Connections whose backend could not be reached.", labels=["route"]
        )
        closed = CounterMetricFamily(
            "hvbridge_connections_closed", "Connections ended, by reason.", labels=["route", "reason"]
        )
        relayed = CounterMetricFamily(
            "hvbridge_relayed_bytes",
            "Bytes relayed: client_to_backend or backend_to_client.",
            labels=["route", "direction"],
        )
        latency = HistogramMetricFamily(
            "hvbridge_connect_duration_seconds",
            "Time to open a backend connection (successful connects, retries included).",
            labels=["route"],
        )
        for name in sorted(self.routes):
            stats = self.routes[name]
            accepted.add_metric([name], stats.accepted)
            active.add_metric([name], stats.active)
            refused.add_metric([name], stats.refused)
            failed.add_metric([name], stats.failed)
            for reason, count in sorted(stats.closed.items()):
                closed.add_metric([name, reason], count)
            relayed.add_metric([name, "client_to_backend"], stats.bytes_in)
            relayed.add_metric([name, "backend_to_client"], stats.bytes_out)
            buckets: list[tuple[str, float]] = []
            cumulative = 0
            for bound, count in zip((*CONNECT_LATENCY_BUCKETS, float("inf")), stats.connect_buckets, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            latency.add_metric([name], buckets, stats.connect_seconds)
        yield from (accepted, active, refused, failed, closed)
        yield relayed
        yield latency
        listening = GaugeMetricFamily(
            "hvbridge_route_listeners", "Listening sockets serving the route (0: down).", labels=["route"]
        )
        for name, count in sorted(self.listeners.items()):
            listening.add_metric([name], count)
        yield listening


@final
@attrs.define(eq=False)
class ProcessGroupCollector:
    """Process metrics (CPU, memory, fds) of several processes, each labelled with its `pid`.

    Attributes:
        pids: The processes to report, read at each scrape.
    """

    pids: Callable[[], Iterable[int]]

    def collect(self) -> Iterator[Metric]:
        """Yield process_* families with one sample set per pid."""
        merged: dict[str, Metric] = {}
        for pid in self.pids():
            collector = ProcessCollector(pid=functools.partial(int, pid), registry=None)
            for family in collector.collect():
                target = merged.get(family.name)
                if target is None:
                    target = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                for sample in family.samples:
                    target.add_sample(sample.name, {**sample.labels, "pid": str(pid)}, sample.value)
        yield from merged.values()


@final
@attrs.define(eq=False)
class Exposition:
    """What /metrics answers: route counters plus process metrics, as Prometheus text.

    Args:
        pids: The processes whose process_* metrics to include, each labelled by pid; None
            means this process alone, unlabelled (the single-process case).
    """

    pids: Callable[[], Iterable[int]] | None = None
    routes: RouteCollector = attrs.field(factory=RouteCollector)
    registry: CollectorRegistry = attrs.field(factory=lambda: CollectorRegistry(auto_describe=False))

    def __attrs_post_init__(self) -> None:
        self.registry.register(self.routes)
        if self.pids is None:
            ProcessCollector(registry=self.registry)
        else:
            self.registry.register(ProcessGroupCollector(self.pids))

    def render(self, routes: Snapshot, listeners: Mapping[str, int]) -> bytes:
        """The exposition text for one snapshot."""
        self.routes.routes = routes
        self.routes.listeners = listeners
        return generate_latest(self.registry)


# ------------------------------------------------------------------------------------- HTTP


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


async def _read_head(stream: trio.abc.ReceiveStream) -> bytes | None:
    """The request head up to its blank line, or None if it is too long or cut short."""
    data = bytearray()
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > MAX_REQUEST:
            return None
        chunk = await stream.receive_some(MAX_REQUEST)
        if not chunk:
            return None
        data += chunk
    return bytes(data)


async def handle_request(stream: trio.abc.Stream, render: Render) -> None:
    """Answer one HTTP request on `stream` and close it.

    Error handling: a client that is slow, sends too much, or goes away is dropped without
    a log line (a scraper's problem is not the relay's); the stream is always closed.
    """
    try:
        with trio.fail_after(READ_TIMEOUT):
            head = await _read_head(stream)
        if head is None:
            response = _response("400 Bad Request", b"bad request\n")
        else:
            method, _, rest = head.split(b"\n", 1)[0].strip().partition(b" ")
            target = rest.partition(b" ")[0].partition(b"?")[0]
            if method == b"GET" and target == b"/metrics":
                response = _response("200 OK", await render(), CONTENT_TYPE_PLAIN_0_0_4)
            else:
                response = _response("404 Not Found", b"not found; metrics are at /metrics\n")
        with trio.fail_after(READ_TIMEOUT):
            await stream.send_all(response)
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def open_metrics_listeners(address: Address, open_listeners: base.OpenListeners) -> list[base.Listener]:
    """Bind the metrics endpoint (a Unix socket gets mode 0600).

    Raises:
        EndpointError: The address cannot be bound.
    """
    return await open_listeners(address, RouteOptions())


async def serve_metrics(
    address: Address,
    render: Render,
    *,
    listeners: list[base.Listener] | None = None,
    open_listeners: base.OpenListeners | None = None,
    task_status: trio.TaskStatus[list[base.Listener]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve `GET /metrics` on `address` (TCP or Unix) until cancelled.

    Args:
        address: Where to listen; a Unix socket gets mode 0600.
        render: Produces the exposition text for each scrape.
        listeners: Listeners already bound to `address` (open_metrics_listeners()); this
            function then owns them.
        open_listeners: Binds `address` when `listeners` is None (default: Backend().open_listeners).
        task_status: Receives the listeners once they are bound.

    Error handling: see handle_request(); accept errors are handled as by trio.serve_listeners.

    Resource handling: at most MAX_SCRAPES requests are handled at once; the listeners are
    closed when this is cancelled.

    Raises:
        EndpointError: The address cannot be bound.
    """
    if listeners is None:
        listeners = await open_metrics_listeners(address, open_listeners or Backend().open_listeners)
    limit = trio.Semaphore(MAX_SCRAPES)

    async def handler(stream: base.Stream) -> None:
        async with limit:
            await handle_request(stream, render)

    for listener in listeners:
        event(logging.INFO, "metrics listening", listen=base.listener_address(listener))
    await trio.serve_listeners(handler, listeners, task_status=task_status)


# ------------------------------------------------------------------------------------ probe


async def probe(address: Address, routes: Iterable[str], connect: base.Connect | None = None) -> list[str]:
    """Scrape /metrics at `address` and say what is wrong (the container HEALTHCHECK).

    Healthy means: the daemon answers a scrape within PROBE_TIMEOUT (its event loop is
    alive) and every route in `routes` has at least one listening socket.

    Args:
        address: The [bridge] metrics address.
        routes: The route names that must listen.
        connect: Opens the stream (default: Backend().connect).

    Returns:
        One line per problem; empty when healthy.
    """
    try:
        with trio.fail_after(PROBE_TIMEOUT):
            stream = await (connect or Backend().connect)(address, RouteOptions())
            try:
                await stream.send_all(b"GET /metrics HTTP/1.0\r\nHost: hvbridge\r\n\r\n")
                data = bytearray()
                while chunk := await stream.receive_some(65536):
                    data += chunk
                    if len(data) > _MAX_RESPONSE:
                        return [f"{address}: response larger than {_MAX_RESPONSE} bytes"]
            finally:
                await trio.aclose_forcefully(stream)
    except trio.TooSlowError:
        return [f"{address}: no answer within {PROBE_TIMEOUT:g}s"]
    except (EndpointError, trio.BrokenResourceError, OSError) as exc:
        return [f"{address}: {exc}"]
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode("latin-1")
    if " 200 " not in f"{status} ":
        return [f"{address}: /metrics answered {status!r}"]
    listening: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(body.decode("utf-8")):
            if family.name == "hvbridge_route_listeners":
                listening.update({s.labels["route"]: s.value for s in family.samples})
    except ValueError as exc:
        return [f"{address}: cannot parse /metrics: {exc}"]
    return [f"route {name!r} has no listening socket" for name in routes if listening.get(name, 0) < 1]
