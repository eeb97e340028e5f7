"""format_table(): a route table as TOML.

Rule: format_table() writes TOML that parses back to the same table (durations and sizes are
written so that they read back exactly; units.py holds both directions).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from hvbridge.addresses import (
    HyperVAddress,
    UnixAddress,
    VsockMuxAddress,
)
from hvbridge.config.toml import BARE_KEY
from hvbridge.config.units import format_duration, format_size
from hvbridge.routes import (
    Route,
    RouteOptions,
    RouteTable,
)

if TYPE_CHECKING:
    from collections.abc import Iterator


def format_table(table: RouteTable) -> str:
    """The resolved table as TOML, as `hvbridge check` prints it.

    Every route has every option spelled out (options that do not apply to a route, such as
    `mode` on a TCP listener, are left out), so parse_config() of the result gives the same
    table back.

    Args:
        table: A route table.

    Returns:
        TOML text ending in a newline.
    """
    bridge = table.bridge
    lines = [
        "[bridge]",
        f"log_level = {_toml_string(bridge.log_level)}",
        f"log_format = {_toml_string(bridge.log_format)}",
    ]
    if bridge.log_file is not None:
        lines.append(f"log_file = {_toml_string(bridge.log_file)}")
    if bridge.metrics is not None:
        lines.append(f"metrics = {_toml_string(str(bridge.metrics))}")
    lines.append(f"shutdown_grace = {_toml_string(format_duration(bridge.shutdown_grace))}")
    for route in table.routes:
        lines += ["", f"[routes.{_toml_key(route.name)}]"]
        lines += [f"{key} = {value}" for key, value in _route_items(route)]
    return "\n".join(lines) + "\n"


def _toml_string(text: str) -> str:
    # JSON string escapes are TOML basic-string escapes, except that TOML also forbids DEL.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(name: str) -> str:
    return name if re.fullmatch(BARE_KEY, name) else _toml_string(name)


def _toml_size(size: int) -> str:
    text = format_size(size)
    return _toml_string(text) if text.endswith("B") else text


def _route_items(route: Route) -> Iterator[tuple[str, str]]:
    options = route.options
    unix_listener = isinstance(route.listen, UnixAddress | VsockMuxAddress) and not (
        isinstance(route.listen, UnixAddress) and route.listen.abstract
    )
    default = RouteOptions()
    yield "listen", _toml_string(str(route.listen))
    yield "connect", _toml_string(str(route.connect))
    yield "connect_timeout", _toml_string(format_duration(options.connect_timeout))
    yield "connect_retries", str(options.connect_retries)
    yield "idle_timeout", _toml_string(format_duration(options.idle_timeout))
    yield "max_connections", str(options.max_connections)
    yield "half_close", _toml_bool(options.half_close)
    yield "buffer_size", _toml_size(options.buffer_size)
    # Options that do not apply to this route are left out (they would be errors), unless a
    # table built in code set them anyway: then they show, and parsing the text reports them.
    if options.allow or not unix_listener:
        yield "allow", "[" + ", ".join(_toml_string(str(rule)) for rule in options.allow) + "]"
    if unix_listener or options.mode != default.mode:
        yield "mode", _toml_string(f"{options.mode:04o}")
    if options.owner is not None:
        yield "owner", _toml_string(options.owner)
    if options.group is not None:
        yield "group", _toml_string(options.group)
    if options.vsock_buffer_size is not None:
        yield "vsock_buffer_size", _toml_size(options.vsock_buffer_size)
    if HyperVAddress in (type(route.listen), type(route.connect)) or options.connected_suspend:
        yield "connected_suspend", _toml_bool(options.connected_suspend)
    if options.proxy_protocol != default.proxy_protocol:
        yield "proxy_protocol", _toml_string(options.proxy_protocol)
    if options.accept_proxy:
        yield "accept_proxy", "true"


def _toml_bool(value: bool) -> str:
    return "true" if value else "false"
