"""Listen endpoints compared by what they bind, not by their text.

Rule: two listen endpoints collide when they bind the same thing; ephemeral listeners (TCP port
0, vsock port `any`) never collide, each bind getting its own.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, assert_never

import attrs

from hvbridge.addresses import (
    VMADDR_CID_ANY,
    Address,
    HyperVAddress,
    StdioAddress,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    VsockMuxAddress,
    is_ephemeral,
)
from hvbridge.config.problems import quote, show_key
from hvbridge.errors import Problem
from hvbridge.hyperv.guids import HV_GUID_ZERO

if TYPE_CHECKING:
    from collections.abc import Sequence

    from hvbridge.routes import (
        RouteTable,
    )


#: A host name -> the IP addresses (text) a listener on it binds; [] when it does not resolve.
Resolve = Callable[[str], "Sequence[str]"]


# (family, port or service, host/CID/path/VM, wildcard): one thing a listener binds.
_BindKey = tuple[str, object, object, bool]


def _bind_keys(address: Address, resolve: Resolve | None) -> list[_BindKey]:
    """What a listener on `address` binds; [] when each bind gets its own (port 0, port any)."""
    if is_ephemeral(address):
        return []
    match address:
        case StdioAddress():
            return []
        case TcpAddress(host=host, port=port):
            hosts = [host]
            if _ip_literal(host) is None:
                hosts = list(resolve(host)) if resolve is not None else []
                if not hosts:  # not resolved (here): its name, in any case, stands for it
                    return [("name", port, host.casefold().rstrip("."), False)]
            keys: list[_BindKey] = []
            for text in hosts:
                ip = _ip_literal(text)
                if ip is not None:
                    keys.append((f"ipv{ip.version}", port, ip, ip.is_unspecified))
            return keys
        case VsockAddress(cid=cid, port=port):
            return [("vsock", port, cid, cid == VMADDR_CID_ANY)]
        case UnixAddress(abstract=True):
            return [("unix-abstract", 0, address.path, False)]
        case UnixAddress():
            return [("unix", 0, os.path.normpath(address.path), False)]
        case VsockMuxAddress():  # the listen side binds PATH_PORT (docs/reference.md, "Endpoints")
            return [("unix", 0, os.path.normpath(address.listen_path), False)]
        case HyperVAddress(vm=vm, service_id=service):
            return [("hvsock", service, vm.casefold() if isinstance(vm, str) else vm, vm == HV_GUID_ZERO)]
        case _:
            assert_never(address)


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None


@attrs.define
class ListenBinds:
    """The listen endpoints seen so far, by what they bind: finds two that would collide.

    Endpoints are compared by what they bind, not by their text: a wildcard address
    (0.0.0.0, ::, vsock `any`, hvsock `any`) collides with every address of its family on the
    same port, host names are compared without case (or by the addresses `resolve` gives),
    and Unix paths after normalization. Port 0 and vsock port `any` never collide. IPv6
    wildcards do not take IPv4: listeners are bound IPV6_V6ONLY.

    Attributes:
        resolve: Host name -> the addresses it binds (blocking); None compares names as text.
    """

    resolve: Resolve | None = None
    _exact: dict[_BindKey, tuple[str, Address]] = attrs.field(factory=dict, init=False)
    _wild: dict[tuple[str, object], tuple[str, Address]] = attrs.field(factory=dict, init=False)
    _any: dict[tuple[str, object], tuple[str, Address]] = attrs.field(factory=dict, init=False)

    def find(self, address: Address) -> tuple[str, Address] | None:
        """The (owner, endpoint) seen before that `address` collides with, or None."""
        for key in _bind_keys(address, self.resolve):
            family, port, _, wildcard = key
            other = self._exact.get(key) or self._wild.get((family, port))
            if other is None and wildcard:
                other = self._any.get((family, port))
            if other is not None:
                return other
        return None

    def claim(self, owner: str, address: Address) -> tuple[str, Address] | None:
        """Record `owner`'s endpoint, unless it collides: then return the one it collides with."""
        other = self.find(address)
        if other is not None:
            return other
        for key in _bind_keys(address, self.resolve):
            family, port, _, wildcard = key
            self._exact.setdefault(key, (owner, address))
            self._any.setdefault((family, port), (owner, address))
            if wildcard:
                self._wild.setdefault((family, port), (owner, address))
        return None


def overlap_message(address: Address, other: tuple[str, Address], expected: str) -> str:
    name, endpoint = other
    if endpoint == address:
        return f"{quote(str(address))} is also the listen endpoint of route {name!r}; expected {expected}"
    return (
        f"{quote(str(address))} binds what routes.{show_key(name)}.listen ({quote(str(endpoint))}) binds;"
        f" expected {expected}"
    )


def listen_conflicts(table: RouteTable, resolve: Resolve) -> list[Problem]:
    """Listen endpoints of `table` that collide once host names are resolved (parsing compares text).

    Args:
        table: A valid table (literal overlaps were reported when it was parsed).
        resolve: Host name -> the IP addresses a listener on it binds (e.g. getaddrinfo).

    Returns:
        One problem per route whose listen endpoint collides with an earlier route's, or with
        bridge.metrics; empty if none do.
    """
    binds = ListenBinds(resolve)
    problems = []
    for route in table.routes:
        other = binds.claim(route.name, route.listen)
        if other is not None:
            message = overlap_message(route.listen, other, "each route to listen on its own endpoint")
            problems.append(Problem(table.source, None, f"routes.{show_key(route.name)}.listen", message))
    if table.bridge.metrics is not None:
        other = binds.find(table.bridge.metrics)
        if other is not None:
            message = overlap_message(table.bridge.metrics, other, "an endpoint of its own")
            problems.append(Problem(table.source, None, "bridge.metrics", message))
    return problems
