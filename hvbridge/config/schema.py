"""The route table's schema: narrowing a parsed tree to a RouteTable, with its defaults.

Rules:
1. A value inherited from [defaults] is checked once, where it is written; a route only sees
   the valid defaults. mode/owner/group and vsock_buffer_size inherited by a route they do not
   apply to are dropped; written on that route, they are an error. An allow list is never
   dropped, since dropping a filter would let peers in.
2. Parsed data is `object` and narrowed with isinstance by one small parser per key. cattrs is
   not used: its structuring errors name Python types and carry no line numbers, and every
   message docs/reference.md, "Validation" promises ("did you mean", host bits set, reported
   once at defaults.KEY) would need a hand-written hook per key anyway.
3. Adding a route key: a field on routes.RouteOptions, a parser in _OPTION_PARSERS, a line in
   writer._route_items; ROUTE_KEYS follows the attrs fields.
"""

from __future__ import annotations

import difflib
import ipaddress
import ntpath
import posixpath
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final, TypeVar, cast, get_args

import attrs

from hvbridge.addresses import (
    Address,
    HyperVAddress,
    StdioAddress,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    VsockMuxAddress,
    family_name,
    parse_address,
)
from hvbridge.config.binds import ListenBinds, overlap_message
from hvbridge.config.problems import ROUTE_NAME, Invalid, KeyPath, Report, describe, quote
from hvbridge.config.units import DURATION_FORMS, GIB, KIB, MIB, format_size, parse_duration, parse_size
from hvbridge.errors import AddressError
from hvbridge.routes import (
    AllowRule,
    BridgeSettings,
    CidRule,
    LogFormat,
    LogLevel,
    ProxyProtocol,
    Route,
    RouteOptions,
    RouteTable,
    VmRule,
)

if TYPE_CHECKING:
    import uuid
    from collections.abc import Collection, Iterator, Sequence

    from hvbridge.addresses import Role

ROUTE_KEYS: Final = frozenset({"listen", "connect"} | {f.name for f in attrs.fields(RouteOptions)})


_T = TypeVar("_T")


_TOP_KEYS: Final = ("bridge", "defaults", "routes")


_MODE = re.compile(r"[0-7]{1,4}")


_MAX_ID: Final = 2**32 - 2


_MAX_CID: Final = 2**32 - 1


_ENDPOINT_EXAMPLE: Final = "an endpoint such as 'tcp://127.0.0.1:8080'"


def table_from_data(data: object, report: Report) -> RouteTable:
    root = {} if data is None else _as_table(data, (), report, "a table of bridge, defaults and routes")
    if root is None:
        raise report.error()
    for key in root:
        if key not in _TOP_KEYS:
            report.add((key,), _unknown_key(key, _TOP_KEYS))
    bridge = _bridge(root.get("bridge"), report)
    defaults = _defaults(root.get("defaults"), report)
    listeners = ListenBinds()
    routes = _routes(root.get("routes"), defaults, listeners, report)
    if bridge.metrics is not None:
        other = listeners.find(bridge.metrics)
        if other is not None:
            report.add(("bridge", "metrics"), overlap_message(bridge.metrics, other, "an endpoint of its own"))
    if report.problems:
        raise report.error()
    return RouteTable(routes=routes, bridge=bridge, source=report.source)


def _as_table(value: object, path: KeyPath, report: Report, expected: str) -> dict[str, object] | None:
    if not isinstance(value, Mapping):
        report.add(path, f"got {describe(value)}; expected {expected}")
        return None
    table: dict[str, object] = {}
    for key, item in value.items():
        if isinstance(key, str):
            table[key] = item
        else:
            report.add(path, f"got the key {describe(key)}; expected string keys")
    return table


def _parse_keys(
    table: Mapping[str, object],
    path: KeyPath,
    parsers: Mapping[str, Callable[[object], object]],
    report: Report,
    *,
    handled: Collection[str] = (),
    refused: Mapping[str, str] | None = None,
) -> dict[str, object]:
    """Run each key's parser; report unknown keys and invalid values; return the valid values."""
    values: dict[str, object] = {}
    for key, value in table.items():
        if key in handled:
            continue
        parser = parsers.get(key)
        if parser is None:
            why = (refused or {}).get(key)
            report.add((*path, key), why or _unknown_key(key, [*parsers, *handled]))
            continue
        try:
            values[key] = parser(value)
        except Invalid as exc:
            for message in exc.messages:
                report.add((*path, key), message)
    return values


def _unknown_key(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1) if len(key) <= 64 else []
    if close:
        return f"unknown key; did you mean '{close[0]}'?"
    return f"unknown key; expected one of: {', '.join(sorted(known))}"


def _pick(values: Mapping[str, object], key: str, default: _T) -> _T:
    # The key's parser made the value, with the type of the field `default` comes from.
    return cast("_T", values.get(key, default))


def _bridge(value: object, report: Report) -> BridgeSettings:
    default = BridgeSettings()
    table = {} if value is None else _as_table(value, ("bridge",), report, "a table of bridge settings")
    if table is None:
        return default
    values = _parse_keys(table, ("bridge",), _BRIDGE_PARSERS, report)
    return BridgeSettings(
        log_level=_pick(values, "log_level", default.log_level),
        log_format=_pick(values, "log_format", default.log_format),
        log_file=_pick(values, "log_file", default.log_file),
        metrics=_pick(values, "metrics", default.metrics),
        shutdown_grace=_pick(values, "shutdown_grace", default.shutdown_grace),
    )


def _defaults(value: object, report: Report) -> dict[str, object]:
    table = {} if value is None else _as_table(value, ("defaults",), report, "a table of route options")
    if table is None:
        return {}
    why = "has no default; expected it in each [routes.NAME] table"
    refused = {"listen": f"listen {why}", "connect": f"connect {why}"}
    return _parse_keys(table, ("defaults",), _OPTION_PARSERS, report, refused=refused)


def _routes(value: object, defaults: Mapping[str, object], listeners: ListenBinds, report: Report) -> tuple[Route, ...]:
    table = {} if value is None else _as_table(value, ("routes",), report, "a table with one table per route")
    if table is None:
        return ()
    if not table:
        report.add(("routes",), "no routes; expected at least one [routes.NAME] table")
        return ()
    routes = []
    for name, body in table.items():
        if not ROUTE_NAME.fullmatch(name):
            report.add(("routes", name), "invalid route name; expected 1 to 64 of the characters A-Z a-z 0-9 _ . -")
        route = _route(name, body, defaults, listeners, report)
        if route is not None:
            routes.append(route)
    return tuple(routes)


def _route(
    name: str, body: object, defaults: Mapping[str, object], listeners: ListenBinds, report: Report
) -> Route | None:
    path = ("routes", name)
    table = _as_table(body, path, report, "a table with listen and connect")
    if table is None:
        return None
    before = len(report.problems)
    values = _parse_keys(table, path, _OPTION_PARSERS, report, handled=("listen", "connect"))
    listen = _endpoint(table, path, "listen", report)
    connect = _endpoint(table, path, "connect", report)
    # Invalid defaults were reported at defaults.KEY; a route only inherits the valid ones.
    options = {key: value for key, value in defaults.items() if key not in table} | values
    if listen is not None:
        other = listeners.claim(name, listen)
        if other is not None:
            report.add((*path, "listen"), overlap_message(listen, other, "each route to listen on its own endpoint"))
        _check_applies(listen, connect, options, set(values), path, report)
    if len(report.problems) > before or listen is None or connect is None:
        return None
    return Route(name, listen, connect, _route_options(options))


def _endpoint(table: Mapping[str, object], path: KeyPath, role: Role, report: Report) -> Address | None:
    if role not in table:
        report.add((*path, role), f"missing; expected {_ENDPOINT_EXAMPLE}")
        return None
    try:
        return _parse_endpoint(table[role], role)
    except Invalid as exc:
        report.add((*path, role), exc.messages[0])
        return None


def _check_applies(
    listen: Address,
    connect: Address | None,
    options: dict[str, object],
    explicit: set[str],
    path: KeyPath,
    report: Report,
) -> None:
    """Cross-check the options against the route's endpoints (docs/reference.md, "Who may connect")."""
    unix_listener = isinstance(listen, UnixAddress | VsockMuxAddress)
    abstract = isinstance(listen, UnixAddress) and listen.abstract
    for key in ("mode", "owner", "group"):
        if key in options and (abstract or not unix_listener):
            if key in explicit and abstract:
                why = f"{key} cannot apply to an abstract socket (unix:@NAME has no file); remove it, or listen on unix:///PATH"
                report.add((*path, key), why)
            elif key in explicit:
                report.add((*path, key), f"{key} applies only to unix listeners; remove it, or listen on unix:///PATH")
            del options[key]
    uses_hvsock = isinstance(listen, HyperVAddress) or isinstance(connect, HyperVAddress)
    if "connected_suspend" in options and connect is not None and not uses_hvsock:
        if "connected_suspend" in explicit:
            report.add(
                (*path, "connected_suspend"),
                "connected_suspend applies only to routes with an hvsock:// endpoint; remove it",
            )
        del options["connected_suspend"]
    uses_vsock = isinstance(listen, VsockAddress) or isinstance(connect, VsockAddress)
    # Without a valid connect endpoint nothing can be said (its problem is reported already).
    if "vsock_buffer_size" in options and connect is not None and not uses_vsock:
        if "vsock_buffer_size" in explicit:
            report.add(
                (*path, "vsock_buffer_size"),
                "vsock_buffer_size applies only to routes with a vsock:// endpoint; remove it",
            )
        del options["vsock_buffer_size"]
    rules = _pick(options, "allow", RouteOptions().allow)
    origin = "" if "allow" in explicit else " (from defaults.allow)"
    for message in _allow_misfits(listen, rules, origin):
        report.add((*path, "allow"), message)


# What an allow list may hold, per listener family that can tell its peers apart (docs/reference.md, "Who may connect").
_ALLOW_FITS: Final[dict[type, tuple[tuple[type, ...], str]]] = {
    TcpAddress: ((ipaddress.IPv4Network, ipaddress.IPv6Network), "CIDRs such as '127.0.0.0/8' or '::1'"),
    VsockAddress: ((CidRule,), "cid:N rules"),
    HyperVAddress: ((VmRule,), "vm:GUID or vm:NAME rules"),
}


def _allow_misfits(listen: Address, rules: tuple[AllowRule, ...], origin: str) -> Iterator[str]:
    if not rules:
        return
    family = family_name(listen)
    if isinstance(listen, UnixAddress | VsockMuxAddress):
        if origin:
            yield f"allow{origin} does not apply to a {family} listener; set allow = [] on this route"
        else:
            yield f"allow does not apply to a {family} listener; unix listeners are guarded by mode/owner/group"
        return
    fits, wanted = _ALLOW_FITS[type(listen)]  # stdio cannot be a route's listen endpoint
    for rule in rules:
        if not isinstance(rule, fits):
            yield f"rule {quote(str(rule))}{origin} does not apply to a {family} listener; expected {wanted}"


def _route_options(values: Mapping[str, object]) -> RouteOptions:
    default = RouteOptions()
    return RouteOptions(
        connect_timeout=_pick(values, "connect_timeout", default.connect_timeout),
        connect_retries=_pick(values, "connect_retries", default.connect_retries),
        idle_timeout=_pick(values, "idle_timeout", default.idle_timeout),
        max_connections=_pick(values, "max_connections", default.max_connections),
        half_close=_pick(values, "half_close", default.half_close),
        buffer_size=_pick(values, "buffer_size", default.buffer_size),
        allow=_pick(values, "allow", default.allow),
        mode=_pick(values, "mode", default.mode),
        owner=_pick(values, "owner", default.owner),
        group=_pick(values, "group", default.group),
        vsock_buffer_size=_pick(values, "vsock_buffer_size", default.vsock_buffer_size),
        connected_suspend=_pick(values, "connected_suspend", default.connected_suspend),
        proxy_protocol=_pick(values, "proxy_protocol", default.proxy_protocol),
        accept_proxy=_pick(values, "accept_proxy", default.accept_proxy),
    )


def _parse_endpoint(value: object, role: Role) -> Address:
    if not isinstance(value, str):
        raise Invalid(f"got {describe(value)}; expected {_ENDPOINT_EXAMPLE}")
    try:
        if isinstance(parse_address(value), StdioAddress):
            raise Invalid(f"stdio is only for `hvbridge connect`; expected {_ENDPOINT_EXAMPLE}")
        return parse_address(value, role=role)
    except AddressError as exc:
        raise Invalid(str(exc)) from None


def _parse_log_file(value: object) -> str:
    # Absolute in either form: a scheduled task or service starts in C:\Windows\System32 and a
    # unit in /, so a relative path would land there. ntpath also reads C:/x and \\server\share.
    if not isinstance(value, str) or "\0" in value or not (posixpath.isabs(value) or ntpath.isabs(value)):
        raise Invalid(
            f"got {describe(value)}; expected an absolute file path such as"
            " 'C:\\ProgramData\\hvbridge\\hvbridge.log' or '/var/log/hvbridge.log'"
        )
    return value


def _parse_metrics(value: object) -> Address:
    expected = "expected tcp://HOST:PORT, unix:///PATH or unix:@NAME, such as 'tcp://127.0.0.1:9477'"
    try:
        address = _parse_endpoint(value, "listen")
    except Invalid as exc:
        # The endpoint parser lists every family; metrics speaks only HTTP over TCP or Unix.
        what = exc.messages[0].partition(";")[0]
        raise Invalid(f"{what}; {expected}") from None
    if not isinstance(address, TcpAddress | UnixAddress):
        raise Invalid(f"got {quote(str(address))}; {expected}")
    return address


def _duration_parser(expected: str, *, positive: bool = False) -> Callable[[object], float]:
    def parse(value: object) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError:
            seconds = None
        if seconds is None or (positive and seconds == 0):
            raise Invalid(f"got {describe(value)}; expected {expected}")
        return seconds

    return parse


def _int_parser(low: int, high: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return value
        raise Invalid(f"got {describe(value)}; expected an integer {low}..{high}")

    return parse


def _size_parser(low: int, high: int, example: str) -> Callable[[object], int]:
    expected = (
        f"a size {format_size(low)}..{format_size(high)}"
        f" (bytes, or a number with a unit B, KiB, MiB or GiB, such as '{example}')"
    )

    def parse(value: object) -> int:
        try:
            size = parse_size(value)
        except ValueError:
            size = None
        if size is None or not low <= size <= high:
            raise Invalid(f"got {describe(value)}; expected {expected}")
        return size

    return parse


def _parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise Invalid(f"got {describe(value)}; expected true or false")


def _choice_parser(choices: tuple[str, ...]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if isinstance(value, str) and value in choices:
            return value
        raise Invalid(f"got {describe(value)}; expected one of: {', '.join(choices)}")

    return parse


def _parse_mode(value: object) -> int:
    if isinstance(value, str) and _MODE.fullmatch(value) and int(value, 8) <= 0o777:
        return int(value, 8)
    expected = 'a quoted string of octal digits 0000..0777, such as "0660"'
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**18:
        # TOML's 0o660 arrives as the number 432, YAML 1.2's unquoted 0660 as 660: say what was
        # read, in octal too, and that the mode must be a string.
        raise Invalid(f'got the number {value} (octal {value:o}); the mode must be a string, such as "0660"')
    raise Invalid(f"got {describe(value)}; expected {expected}")


def _id_parser(what: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if isinstance(value, str) and value and "\0" not in value:
            return value
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_ID:
            return str(value)
        raise Invalid(f"got {describe(value)}; expected a {what} name or a numeric id 0..{_MAX_ID}")

    return parse


def _parse_allow(value: object) -> tuple[AllowRule, ...]:
    if not isinstance(value, list | tuple):
        raise Invalid(
            f"got {describe(value)}; expected a list of rules such as ['127.0.0.0/8'], ['cid:3'] or ['vm:my-vm']"
        )
    rules: list[AllowRule] = []
    messages: list[str] = []
    for item in value:
        try:
            rules.append(_parse_rule(item))
        except Invalid as exc:
            messages += exc.messages
    if messages:
        raise Invalid(*messages)
    return tuple(rules)


def _parse_rule(item: object) -> AllowRule:
    if not isinstance(item, str):
        raise Invalid(
            f"got {describe(item)} in the list; expected strings such as '127.0.0.0/8', 'cid:3' or 'vm:my-vm'"
        )
    if item.startswith("cid:"):
        digits = item[len("cid:") :]
        if digits.isascii() and digits.isdigit() and len(digits) <= 10 and int(digits) <= _MAX_CID:
            return CidRule(int(digits))
        raise Invalid(f"invalid rule {quote(item)}; expected cid:N with N an integer 0..{_MAX_CID}")
    if item.startswith("vm:"):
        return VmRule(_parse_vm(item))
    try:
        return ipaddress.ip_network(item)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(item, strict=False)
    except ValueError:
        raise Invalid(
            f"invalid rule {quote(item)}; expected a CIDR such as '127.0.0.0/8' or '::1', cid:N or vm:GUID"
        ) from None
    raise Invalid(f"invalid rule {quote(item)}: host bits are set; did you mean '{loose}'?")


def _parse_vm(item: str) -> uuid.UUID | str:
    text = item[len("vm:") :]
    if not text or "/" in text:
        raise Invalid(f"invalid rule {quote(item)}; expected vm:GUID or vm:NAME")
    # A VM is spelled as in hvsock://VM/SERVICE; let addresses.py read it the same way.
    try:
        address = parse_address(f"hvsock://{text}/0")
    except AddressError as exc:
        raise Invalid(f"invalid rule {quote(item)}: {exc}") from None
    assert isinstance(address, HyperVAddress)
    return address.vm


_OPTION_PARSERS: Final[dict[str, Callable[[object], object]]] = {
    "connect_timeout": _duration_parser(f"a duration greater than 0 ({DURATION_FORMS}, such as '5s')", positive=True),
    "connect_retries": _int_parser(0, 100),
    "idle_timeout": _duration_parser(f"a duration ({DURATION_FORMS}, such as '10m'), or 0 for none"),
    "max_connections": _int_parser(1, 1_000_000),
    "half_close": _parse_bool,
    "buffer_size": _size_parser(KIB, 16 * MIB, "64KiB"),
    "allow": _parse_allow,
    "mode": _parse_mode,
    "owner": _id_parser("user"),
    "group": _id_parser("group"),
    "vsock_buffer_size": _size_parser(KIB, GIB, "256KiB"),
    "connected_suspend": _parse_bool,
    "proxy_protocol": _choice_parser(get_args(ProxyProtocol)),
    "accept_proxy": _parse_bool,
}


_BRIDGE_PARSERS: Final[dict[str, Callable[[object], object]]] = {
    "log_level": _choice_parser(get_args(LogLevel)),
    "log_format": _choice_parser(get_args(LogFormat)),
    "log_file": _parse_log_file,
    "metrics": _parse_metrics,
    "shutdown_grace": _duration_parser(f"a duration ({DURATION_FORMS}, such as '10s')"),
}
