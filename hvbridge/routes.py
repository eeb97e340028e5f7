"""The route table's frozen model: what a valid table is, once parsed (docs/reference.md, "Route table").

This module owns the value types every other layer passes around: RouteTable, Route, RouteOptions,
BridgeSettings and the allow-list rules. It is pure and at the bottom of the package: it never
imports trio, never reads a file and never creates a socket. config/ builds these values from text;
everything above reads them.
"""

from __future__ import annotations

import ipaddress
import uuid
from typing import Literal

import attrs

from hvbridge.addresses import Address

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
ProxyProtocol = Literal["none", "v1", "v2"]


@attrs.frozen
class CidRule:
    """`cid:N` in an allow list: a vsock peer with this CID."""

    cid: int

    def __str__(self) -> str:
        return f"cid:{self.cid}"


@attrs.frozen
class VmRule:
    """`vm:GUID` or `vm:NAME` in an allow list: a Hyper-V peer from this VM."""

    vm: uuid.UUID | str

    def __str__(self) -> str:
        return f"vm:{self.vm}"


AllowRule = ipaddress.IPv4Network | ipaddress.IPv6Network | CidRule | VmRule


@attrs.frozen
class RouteOptions:
    """Every route key except name/listen/connect; `[defaults]` may set any of them.

    Durations are seconds (floats); 0 idle_timeout means none. An empty allow list lets
    every peer in.
    """

    connect_timeout: float = 5.0
    connect_retries: int = 0
    idle_timeout: float = 0.0
    max_connections: int = 1024
    half_close: bool = True
    buffer_size: int = 64 * 1024
    allow: tuple[AllowRule, ...] = ()
    mode: int = 0o600
    owner: str | None = None
    group: str | None = None
    vsock_buffer_size: int | None = None
    connected_suspend: bool = False
    #: Send the backend a PROXY protocol header first: "v1", "v2", or "none".
    proxy_protocol: ProxyProtocol = "none"
    #: Read a PROXY protocol header from each client first (behind a load balancer).
    accept_proxy: bool = False


@attrs.frozen
class Route:
    """One `[routes.NAME]` table: accept on `listen`, relay each connection to `connect`."""

    name: str
    listen: Address
    connect: Address
    options: RouteOptions = RouteOptions()


@attrs.frozen
class BridgeSettings:
    """The process-wide `[bridge]` table."""

    log_level: LogLevel = "info"
    log_format: LogFormat = "text"
    metrics: Address | None = None
    shutdown_grace: float = 10.0
    log_file: str | None = None


@attrs.frozen
class RouteTable:
    """A whole, valid route table. `source` is the file it came from, for messages."""

    routes: tuple[Route, ...]
    bridge: BridgeSettings = BridgeSettings()
    source: str = "<memory>"
