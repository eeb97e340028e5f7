"""Tests for hvbridge.config: route tables from TOML/YAML text, their messages and their limits.

Rules: pure (no sockets); route tables are string literals, and files exist only under
tmp_path (for load_config). Error messages are matched whole (`^...$`), FILE:LINE included.
Hypothesis checks the invariant that any text or tree gives a RouteTable or a ConfigError and
nothing else, and that format_table() output parses back to the same table.
"""

from __future__ import annotations

import errno
import io
import math
import os
import re
import sys
import uuid
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import TYPE_CHECKING, Final

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvbridge import config
from hvbridge.addresses import (
    HyperVAddress,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    VsockMuxAddress,
    parse_address,
)
from hvbridge.config import (
    ROUTE_KEYS,
    Format,
    format_table,
    listen_conflicts,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
    schema,
    table_from_mapping,
)
from hvbridge.config import toml as config_toml
from hvbridge.errors import ConfigError
from hvbridge.routes import BridgeSettings, CidRule, Route, RouteOptions, RouteTable, VmRule

if TYPE_CHECKING:
    from pathlib import Path

SSH_SERVICE: Final = uuid.UUID("00000016-facb-11e6-bd58-64006a7986d3")
FUZZ: Final = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OK: Final = 'listen = "tcp://127.0.0.1:2222"\nconnect = "tcp://127.0.0.1:22"\n'
DURATION_FORMS: Final = "seconds, or a number with a unit ms, s, m or h"
ENDPOINT: Final = "an endpoint such as 'tcp://127.0.0.1:8080'"
OPTION_KEYS: Final = (
    "accept_proxy, allow, buffer_size, connect, connect_retries, connect_timeout, connected_suspend, group,"
    " half_close, idle_timeout, listen, max_connections, mode, owner, proxy_protocol, vsock_buffer_size"
)
NO_ROUTES: Final = "no routes; expected at least one [routes.NAME] table"

FULL_TOML: Final = """\
# The example of docs/reference.md, "Route table", with every key set somewhere.
[bridge]
log_level = "debug"
log_format = "json"
metrics = "tcp://127.0.0.1:9477"
shutdown_grace = "2.5s"

[defaults]
connect_timeout = "250ms"
connect_retries = 3
idle_timeout = "10m"
max_connections = 64
half_close = false
buffer_size = "128KiB"
mode = "0640"
vsock_buffer_size = "1MiB"
connected_suspend = true

[routes.ssh]
listen = "tcp://127.0.0.1:2222"
connect = "hvsock://my-vm/22"
allow = ["127.0.0.0/8", "::1"]
idle_timeout = 0

[routes.web]
listen = "unix:///run/hvbridge/web.sock"
mode = "660"
owner = "www-data"
group = 33
connect = "vsock://3:8080"

[routes."guest.sshd"]
listen = "vsock://any:22"
connect = "tcp://127.0.0.1:22"
allow = ["cid:2"]
connect_timeout = 1.5
buffer_size = 4096

[routes.fc]
listen = "tcp://[::1]:8080"
connect = "vsock-mux:///run/fc/v.sock:80"
half_close = true
"""

FULL_YAML: Final = """\
# The same tree as FULL_TOML.
bridge:
  log_level: debug
  log_format: json
  metrics: tcp://127.0.0.1:9477
  shutdown_grace: 2.5s
defaults:
  connect_timeout: 250ms
  connect_retries: 3
  idle_timeout: 10m
  max_connections: 64
  half_close: false
  buffer_size: 128KiB
  mode: "0640"
  vsock_buffer_size: 1MiB
  connected_suspend: true
routes:
  ssh:
    listen: tcp://127.0.0.1:2222
    connect: hvsock://my-vm/22
    allow: [127.0.0.0/8, "::1"]
    idle_timeout: 0
  web:
    listen: unix:///run/hvbridge/web.sock
    mode: "660"
    owner: www-data
    group: 33
    connect: vsock://3:8080
  guest.sshd:
    listen: vsock://any:22
    connect: tcp://127.0.0.1:22
    allow:
      - cid:2
    connect_timeout: 1.5
    buffer_size: 4096
  fc:
    listen: tcp://[::1]:8080
    connect: vsock-mux:///run/fc/v.sock:80
    half_close: true
"""


def full_table() -> RouteTable:
    """FULL_TOML as values, written out by hand."""
    inherited = RouteOptions(
        connect_timeout=0.25,
        connect_retries=3,
        idle_timeout=600.0,
        max_connections=64,
        half_close=False,
        buffer_size=128 * 1024,
        connected_suspend=True,
    )
    return RouteTable(
        routes=(
            Route(
                "ssh",
                TcpAddress("127.0.0.1", 2222),
                HyperVAddress("my-vm", SSH_SERVICE),
                attrs.evolve(inherited, idle_timeout=0.0, allow=(IPv4Network("127.0.0.0/8"), IPv6Network("::1/128"))),
            ),
            Route(
                "web",
                UnixAddress("/run/hvbridge/web.sock"),
                VsockAddress(3, 8080),
                attrs.evolve(
                    inherited,
                    mode=0o660,
                    owner="www-data",
                    group="33",
                    vsock_buffer_size=1024 * 1024,
                    connected_suspend=False,  # only hvsock routes inherit it
                ),
            ),
            Route(
                "guest.sshd",
                VsockAddress(0xFFFFFFFF, 22),
                TcpAddress("127.0.0.1", 22),
                attrs.evolve(
                    inherited,
                    allow=(CidRule(2),),
                    connect_timeout=1.5,
                    buffer_size=4096,
                    vsock_buffer_size=1024 * 1024,
                    connected_suspend=False,
                ),
            ),
            Route(
                "fc",
                TcpAddress("::1", 8080),
                VsockMuxAddress("/run/fc/v.sock", 80),
                attrs.evolve(inherited, half_close=True, connected_suspend=False),
            ),
        ),
        bridge=BridgeSettings("debug", "json", TcpAddress("127.0.0.1", 9477), 2.5),
        source="routes.toml",
    )


def raises(message: str) -> pytest.RaisesExc[ConfigError]:
    """pytest.raises for a ConfigError whose whole text is `message`."""
    return pytest.raises(ConfigError, match=f"^{re.escape(message)}$")


def check(text: str, fmt: Format = "toml") -> RouteTable:
    return parse_config(text, fmt=fmt, source=f"routes.{fmt}")


# -------------------------------------------------------------------------------- valid tables


def test_full_toml() -> None:
    assert check(FULL_TOML) == full_table()


def test_yaml_is_the_same_tree() -> None:
    assert check(FULL_YAML, "yaml") == attrs.evolve(full_table(), source="routes.yaml")


def test_defaults_are_inherited_and_overridden() -> None:
    table = check(
        '[defaults]\nconnect_timeout = "1s"\nidle_timeout = "1h"\n'
        f"[routes.a]\n{OK}"
        '[routes.b]\nlisten = "tcp://127.0.0.1:1"\nconnect = "tcp://h:1"\nconnect_timeout = "2s"\n'
    )
    a, b = table.routes
    assert (a.options.connect_timeout, a.options.idle_timeout) == (1.0, 3600.0)
    assert (b.options.connect_timeout, b.options.idle_timeout) == (2.0, 3600.0)
    assert a.options.max_connections == RouteOptions().max_connections


def test_minimal_table_takes_every_default() -> None:
    table = check(f"[routes.a]\n{OK}")
    assert table == RouteTable(
        (Route("a", TcpAddress("127.0.0.1", 2222), TcpAddress("127.0.0.1", 22)),), source="routes.toml"
    )


def test_options_that_do_not_apply_are_dropped_when_inherited() -> None:
    # mode/owner/group are for unix listeners with a file, vsock_buffer_size for vsock routes,
    # connected_suspend for hvsock routes: a default applies where it can, and a route it
    # cannot apply to keeps the built-in default.
    table = check(
        '[defaults]\nmode = "0660"\nowner = "root"\ngroup = "0"\nvsock_buffer_size = "256KiB"\n'
        "connected_suspend = true\n"
        f"[routes.tcp]\n{OK}"
        '[routes.unix]\nlisten = "unix:///run/x.sock"\nconnect = "tcp://h:1"\n'
        '[routes.abstract]\nlisten = "unix:@x"\nconnect = "tcp://h:1"\n'
        '[routes.mux]\nlisten = "vsock-mux:///run/v.sock:5"\nconnect = "vsock://3:5"\n'
        '[routes.hv]\nlisten = "tcp://h:2"\nconnect = "hvsock://my-vm/22"\n'
    )
    tcp, unix, abstract, mux, hv = (route.options for route in table.routes)
    assert (tcp.mode, tcp.owner, tcp.group, tcp.vsock_buffer_size) == (0o600, None, None, None)
    assert (unix.mode, unix.owner, unix.group, unix.vsock_buffer_size) == (0o660, "root", "0", None)
    assert (abstract.mode, abstract.owner, abstract.group) == (0o600, None, None)
    assert (mux.mode, mux.owner, mux.group, mux.vsock_buffer_size) == (0o660, "root", "0", 256 * 1024)
    assert [o.connected_suspend for o in (tcp, unix, abstract, mux, hv)] == [False, False, False, False, True]
    assert format_table(table).count("connected_suspend") == 1


def test_vsock_buffer_size_kept_for_a_vsock_listener_whatever_connect_is() -> None:
    table = check('[routes.g]\nlisten = "vsock://any:22"\nconnect = "tcp://127.0.0.1:22"\nvsock_buffer_size = 4096\n')
    assert table.routes[0].options.vsock_buffer_size == 4096


def test_allow_rules() -> None:
    table = check(
        '[routes.h]\nlisten = "hvsock://any/22"\nconnect = "tcp://h:1"\n'
        f'allow = ["vm:{SSH_SERVICE}", "vm:{{{str(SSH_SERVICE).upper()}}}", "vm:my vm", "vm:parent"]\n'
        '[routes.t]\nlisten = "tcp://0.0.0.0:1"\nconnect = "tcp://h:1"\n'
        'allow = ["10.0.0.0/255.0.0.0", "192.168.1.7", "fe80::/10"]\n'
    )
    assert table.routes[0].options.allow == (
        VmRule(SSH_SERVICE),
        VmRule(SSH_SERVICE),
        VmRule("my vm"),
        VmRule(uuid.UUID("a42e7cda-d03f-480c-9cc2-a4de20abb878")),
    )
    assert table.routes[1].options.allow == (
        IPv4Network("10.0.0.0/8"),
        IPv4Network("192.168.1.7/32"),
        IPv6Network("fe80::/10"),
    )


def test_listen_port_0_and_port_any_may_repeat() -> None:
    # Each bind gets its own ephemeral port, so these listeners do not collide.
    table = check(
        '[routes.a]\nlisten = "tcp://127.0.0.1:0"\nconnect = "tcp://h:1"\n'
        '[routes.b]\nlisten = "tcp://127.0.0.1:0"\nconnect = "tcp://h:1"\n'
        '[routes.c]\nlisten = "vsock://any:any"\nconnect = "tcp://h:1"\n'
        '[routes.d]\nlisten = "vsock://any:any"\nconnect = "tcp://h:1"\n'
    )
    assert [route.name for route in table.routes] == ["a", "b", "c", "d"]


def test_yaml_1_2_and_quoting() -> None:
    # `on`/`yes` stay strings in YAML 1.2 (so they are not booleans); `%YAML 1.1` opts back in.
    table = check(
        "routes:\n  on:\n    listen: tcp://127.0.0.1:1\n    connect: hvsock://yes/22\n    half_close: false\n", "yaml"
    )
    assert table.routes[0].name == "on"
    assert table.routes[0].connect == HyperVAddress("yes", SSH_SERVICE)
    table = check(
        "%YAML 1.1\n---\nroutes:\n  a:\n    listen: tcp://127.0.0.1:1\n    connect: tcp://h:1\n    half_close: off\n",
        "yaml",
    )
    assert table.routes[0].options.half_close is False


def test_yaml_plain_tags_are_accepted() -> None:
    table = check(
        "routes: !!map\n  a:\n    listen: !!str tcp://127.0.0.1:1\n    connect: ! tcp://h:1\n"
        '    allow: !!seq ["::1"]\n',
        "yaml",
    )
    assert table.routes[0].options.allow == (IPv6Network("::1/128"),)


def test_yaml_anchor_without_alias_is_fine() -> None:
    table = check("routes:\n  a: &x\n    listen: tcp://127.0.0.1:1\n    connect: &x tcp://h:1\n", "yaml")
    assert table.routes[0].connect == TcpAddress("h", 1)


def test_yaml_numeric_keys_are_names() -> None:
    table = check("routes:\n  8080:\n    listen: tcp://127.0.0.1:8080\n    connect: tcp://h:1\n", "yaml")
    assert table.routes[0].name == "8080"


def test_toml_crlf_line_ends() -> None:
    table = check(f"[routes.a]\n{OK}".replace("\n", "\r\n"))
    assert table.routes[0].name == "a"


# ------------------------------------------------------------------------------------ messages


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            f'[routes.ssh]\n{OK}conect_timeout = "5s"\n',
            "routes.toml:4: routes.ssh.conect_timeout: unknown key; did you mean 'connect_timeout'?",
            id="did-you-mean",
        ),
        pytest.param(
            f"[routes.ssh]\n{OK}zzz = 1\n",
            f"routes.toml:4: routes.ssh.zzz: unknown key; expected one of: {OPTION_KEYS}",
            id="unknown-key",
        ),
        pytest.param(
            f"[routes.ssh]\n{OK}{'x' * 65} = 1\n",
            f"routes.toml:4: routes.ssh.'{'x' * 57}'...: unknown key; expected one of: {OPTION_KEYS}",
            id="long-unknown-key",
        ),
        pytest.param(
            "[rout.x]\n",
            f"routes.toml:1: rout: unknown key; did you mean 'routes'?\nroutes.toml: routes: {NO_ROUTES}",
            id="unknown-top-level",
        ),
        pytest.param(
            '[bridge]\nlog_level = "verbose"\nlog_format = "xml"\nmetrics = "vsock://3:9477"\n'
            f'shutdown_grace = "-1s"\nlog = 1\n[routes.a]\n{OK}',
            "routes.toml:2: bridge.log_level: got 'verbose'; expected one of: debug, info, warning, error\n"
            "routes.toml:3: bridge.log_format: got 'xml'; expected one of: text, json\n"
            "routes.toml:4: bridge.metrics: got 'vsock://3:9477';"
            " expected tcp://HOST:PORT, unix:///PATH or unix:@NAME, such as 'tcp://127.0.0.1:9477'\n"
            f"routes.toml:5: bridge.shutdown_grace: got '-1s'; expected a duration ({DURATION_FORMS}, such as '10s')\n"
            "routes.toml:6: bridge.log: unknown key;"
            " expected one of: log_file, log_format, log_level, metrics, shutdown_grace",
            id="bridge",
        ),
        pytest.param(
            f'[bridge]\nmetrics = "tcp://h"\n[routes.a]\n{OK}',
            "routes.toml:2: bridge.metrics: invalid TCP address 'tcp://h';"
            " expected tcp://HOST:PORT, unix:///PATH or unix:@NAME, such as 'tcp://127.0.0.1:9477'",
            id="metrics-address",
        ),
        pytest.param(
            f'[bridge]\nmetrics = "tcp://127.0.0.1:2222"\n[routes.a]\n{OK}',
            "routes.toml:2: bridge.metrics: 'tcp://127.0.0.1:2222' is also the listen endpoint of route 'a';"
            " expected an endpoint of its own",
            id="metrics-collides",
        ),
        pytest.param(
            f'[defaults]\nidle_timeout = "forever"\nlisten = "tcp://127.0.0.1:1"\n[routes.a]\n{OK}'
            '[routes.b]\nlisten = "tcp://127.0.0.1:1"\nconnect = "tcp://h:1"\n',
            "routes.toml:2: defaults.idle_timeout: got 'forever';"
            f" expected a duration ({DURATION_FORMS}, such as '10m'), or 0 for none\n"
            "routes.toml:3: defaults.listen: listen has no default; expected it in each [routes.NAME] table",
            id="defaults-reported-once",
        ),
        pytest.param(
            '[routes.a]\nconnect = "stdio"\n',
            f"routes.toml:1: routes.a.listen: missing; expected {ENDPOINT}\n"
            f"routes.toml:2: routes.a.connect: stdio is only for `hvbridge connect`; expected {ENDPOINT}",
            id="missing-listen-and-stdio",
        ),
        pytest.param(
            '[routes.a]\nlisten = "stdio"\nconnect = "tcp://127.0.0.1:0"\n',
            f"routes.toml:2: routes.a.listen: stdio is only for `hvbridge connect`; expected {ENDPOINT}\n"
            "routes.toml:3: routes.a.connect: cannot connect to port 0 in tcp://127.0.0.1:0; expected a port 1..65535",
            id="endpoint-roles",
        ),
        pytest.param(
            "[routes.a]\nlisten = 5\nconnect = []\n",
            f"routes.toml:2: routes.a.listen: got 5; expected {ENDPOINT}\n"
            f"routes.toml:3: routes.a.connect: got a list; expected {ENDPOINT}",
            id="endpoint-types",
        ),
        pytest.param(
            f'[routes."bad name"]\n{OK}[routes.{"x" * 65}]\nlisten = "tcp://127.0.0.1:1"\nconnect = "tcp://h:1"\n',
            "routes.toml:1: routes.'bad name': invalid route name;"
            " expected 1 to 64 of the characters A-Z a-z 0-9 _ . -\n"
            f"routes.toml:4: routes.'{'x' * 57}'...: invalid route name;"
            " expected 1 to 64 of the characters A-Z a-z 0-9 _ . -",
            id="route-names",
        ),
        pytest.param(
            '[routes]\na = "x"\n',
            "routes.toml:2: routes.a: got 'x'; expected a table with listen and connect",
            id="route-not-a-table",
        ),
        pytest.param("[routes]\n", f"routes.toml:1: routes: {NO_ROUTES}", id="empty-routes"),
        pytest.param("", f"routes.toml: routes: {NO_ROUTES}", id="empty-file"),
        pytest.param("# nothing\n", f"routes.toml: routes: {NO_ROUTES}", id="comments-only"),
        pytest.param(
            "bridge = 5\ndefaults = []\nroutes = 5\n",
            "routes.toml:1: bridge: got 5; expected a table of bridge settings\n"
            "routes.toml:2: defaults: got a list; expected a table of route options\n"
            "routes.toml:3: routes: got 5; expected a table with one table per route",
            id="top-level-types",
        ),
        pytest.param(
            f"[routes.a]\n{OK}"
            'connect_timeout = "0s"\nidle_timeout = -1\nconnect_retries = 101\nmax_connections = 1.0\n'
            'half_close = "on"\nbuffer_size = "512B"\nvsock_buffer_size = "64kb"\nmode = 660\nowner = ""\n'
            "group = -1\nconnected_suspend = 1\n",
            "routes.toml:4: routes.a.connect_timeout: got '0s';"
            f" expected a duration greater than 0 ({DURATION_FORMS}, such as '5s')\n"
            "routes.toml:5: routes.a.idle_timeout: got -1;"
            f" expected a duration ({DURATION_FORMS}, such as '10m'), or 0 for none\n"
            "routes.toml:6: routes.a.connect_retries: got 101; expected an integer 0..100\n"
            "routes.toml:7: routes.a.max_connections: got 1.0; expected an integer 1..1000000\n"
            "routes.toml:8: routes.a.half_close: got 'on'; expected true or false\n"
            "routes.toml:9: routes.a.buffer_size: got '512B';"
            " expected a size 1KiB..16MiB (bytes, or a number with a unit B, KiB, MiB or GiB, such as '64KiB')\n"
            "routes.toml:10: routes.a.vsock_buffer_size: got '64kb';"
            " expected a size 1KiB..1GiB (bytes, or a number with a unit B, KiB, MiB or GiB, such as '256KiB')\n"
            "routes.toml:11: routes.a.mode: got the number 660 (octal 1224);"
            ' the mode must be a string, such as "0660"\n'
            "routes.toml:12: routes.a.owner: got ''; expected a user name or a numeric id 0..4294967294\n"
            "routes.toml:13: routes.a.group: got -1; expected a group name or a numeric id 0..4294967294\n"
            "routes.toml:14: routes.a.connected_suspend: got 1; expected true or false",
            id="every-option",
        ),
        pytest.param(
            f'[routes.a]\n{OK}idle_timeout = nan\nconnect_timeout = inf\nbuffer_size = 17000000\nmode = "1777"\n'
            "connect_retries = true\nconnect_timeout = 1979-05-27\n",
            "routes.toml:9: invalid TOML: duplicate key 'connect_timeout'; expected each key once in a table",
            id="toml-duplicate-key",
        ),
        pytest.param(
            f'[routes.a]\n{OK}idle_timeout = nan\nconnect_timeout = inf\nbuffer_size = 17000000\nmode = "1777"\n'
            "connect_retries = true\nshutdown_grace = 1979-05-27\n",
            f"routes.toml:4: routes.a.idle_timeout: got nan; expected a duration ({DURATION_FORMS},"
            " such as '10m'), or 0 for none\n"
            f"routes.toml:5: routes.a.connect_timeout: got inf; expected a duration greater than 0 ({DURATION_FORMS},"
            " such as '5s')\n"
            "routes.toml:6: routes.a.buffer_size: got 17000000;"
            " expected a size 1KiB..16MiB (bytes, or a number with a unit B, KiB, MiB or GiB, such as '64KiB')\n"
            "routes.toml:7: routes.a.mode: got '1777'; expected a quoted string of octal digits 0000..0777,"
            ' such as "0660"\n'
            "routes.toml:8: routes.a.connect_retries: got true; expected an integer 0..100\n"
            "routes.toml:9: routes.a.shutdown_grace: unknown key; expected one of: " + OPTION_KEYS,
            id="odd-values",
        ),
        pytest.param(
            f"[routes.a]\n{OK}connect_timeout = 1979-05-27\nidle_timeout = {{ a = 1 }}\n",
            "routes.toml:4: routes.a.connect_timeout: got a date;"
            f" expected a duration greater than 0 ({DURATION_FORMS}, such as '5s')\n"
            f"routes.toml:5: routes.a.idle_timeout: got a table; expected a duration ({DURATION_FORMS},"
            " such as '10m'), or 0 for none",
            id="date-and-table",
        ),
        pytest.param(
            f'[routes.a]\n{OK}allow = ["10.0.0.1/8", "banana", 5, "cid:x", "vm:", "vm:a/b", "vm:a\\u0001", "cid:3"]\n',
            "routes.toml:4: routes.a.allow: invalid rule '10.0.0.1/8': host bits are set; did you mean '10.0.0.0/8'?\n"
            "routes.toml:4: routes.a.allow: invalid rule 'banana';"
            " expected a CIDR such as '127.0.0.0/8' or '::1', cid:N or vm:GUID\n"
            "routes.toml:4: routes.a.allow: got 5 in the list;"
            " expected strings such as '127.0.0.0/8', 'cid:3' or 'vm:my-vm'\n"
            "routes.toml:4: routes.a.allow: invalid rule 'cid:x'; expected cid:N with N an integer 0..4294967295\n"
            "routes.toml:4: routes.a.allow: invalid rule 'vm:'; expected vm:GUID or vm:NAME\n"
            "routes.toml:4: routes.a.allow: invalid rule 'vm:a/b'; expected vm:GUID or vm:NAME\n"
            "routes.toml:4: routes.a.allow: invalid rule 'vm:a\\x01': invalid VM 'a\\x01'; expected a VmId GUID,"
            " a VM name or one of: any, wildcard, zero, children, loopback, parent, broadcast, silohost",
            id="allow-rules",
        ),
        pytest.param(
            f'[routes.a]\n{OK}allow = "127.0.0.1"\n',
            "routes.toml:4: routes.a.allow: got '127.0.0.1';"
            " expected a list of rules such as ['127.0.0.0/8'], ['cid:3'] or ['vm:my-vm']",
            id="allow-not-a-list",
        ),
        pytest.param(
            f"[routes.a]\n{OK}" + 'allow = ["cid:4294967296", "cid:٣"]\n',
            "routes.toml:4: routes.a.allow: invalid rule 'cid:4294967296'; expected cid:N with N an integer"
            " 0..4294967295\n"
            "routes.toml:4: routes.a.allow: invalid rule 'cid:٣'; expected cid:N with N an integer 0..4294967295",
            id="cid-rules",
        ),
        pytest.param(
            f"[routes.a]\n{OK}"
            'mode = "0660"\nowner = "x"\ngroup = 5\nvsock_buffer_size = "1MiB"\nallow = ["cid:3", "vm:x"]\n',
            "routes.toml:4: routes.a.mode: mode applies only to unix listeners; remove it, or listen on unix:///PATH\n"
            "routes.toml:5: routes.a.owner: owner applies only to unix listeners; remove it, or listen on unix:///PATH\n"
            "routes.toml:6: routes.a.group: group applies only to unix listeners; remove it, or listen on unix:///PATH\n"
            "routes.toml:7: routes.a.vsock_buffer_size: vsock_buffer_size applies only to routes with a vsock://"
            " endpoint; remove it\n"
            "routes.toml:8: routes.a.allow: rule 'cid:3' does not apply to a tcp listener;"
            " expected CIDRs such as '127.0.0.0/8' or '::1'\n"
            "routes.toml:8: routes.a.allow: rule 'vm:x' does not apply to a tcp listener;"
            " expected CIDRs such as '127.0.0.0/8' or '::1'",
            id="options-that-do-not-apply",
        ),
        pytest.param(
            '[defaults]\nallow = ["127.0.0.0/8"]\n'
            '[routes.v]\nlisten = "vsock://any:22"\nconnect = "tcp://127.0.0.1:22"\n'
            '[routes.u]\nlisten = "unix:///run/u.sock"\nconnect = "tcp://h:1"\n'
            '[routes.h]\nlisten = "hvsock://any/22"\nconnect = "tcp://h:1"\n'
            f"[routes.t]\n{OK}"
            '[routes.m]\nlisten = "unix:@m"\nconnect = "tcp://h:1"\nallow = []\n',
            "routes.toml:3: routes.v.allow: rule '127.0.0.0/8' (from defaults.allow) does not apply to a vsock"
            " listener; expected cid:N rules\n"
            "routes.toml:6: routes.u.allow: allow (from defaults.allow) does not apply to a unix listener;"
            " set allow = [] on this route\n"
            "routes.toml:9: routes.h.allow: rule '127.0.0.0/8' (from defaults.allow) does not apply to a hvsock"
            " listener; expected vm:GUID or vm:NAME rules",
            id="inherited-allow",
        ),
        pytest.param(
            '[routes.a]\nlisten = "vsock-mux:///run/v.sock:52"\nconnect = "tcp://h:1"\nallow = ["127.0.0.0/8"]\n'
            '[routes.b]\nlisten = "unix:///run/v.sock_52"\nconnect = "tcp://h:1"\n'
            '[routes.c]\nlisten = "hvsock://any/22"\nconnect = "tcp://h:1"\nallow = ["cid:1"]\n'
            '[routes.d]\nlisten = "hvsock://ANY/00000016-FACB-11E6-BD58-64006A7986D3"\nconnect = "tcp://h:1"\n'
            '[routes.e]\nlisten = "vsock://3:1"\nconnect = "tcp://h:1"\nallow = ["::1"]\n'
            '[routes.f]\nlisten = "unix:@b"\nconnect = "tcp://h:1"\nallow = ["cid:1"]\n',
            "routes.toml:4: routes.a.allow: allow does not apply to a vsock-mux listener;"
            " unix listeners are guarded by mode/owner/group\n"
            "routes.toml:6: routes.b.listen: 'unix:///run/v.sock_52' binds what routes.a.listen"
            " ('vsock-mux:///run/v.sock:52') binds;"
            " expected each route to listen on its own endpoint\n"
            "routes.toml:11: routes.c.allow: rule 'cid:1' does not apply to a hvsock listener;"
            " expected vm:GUID or vm:NAME rules\n"
            "routes.toml:13: routes.d.listen: 'hvsock://00000000-0000-0000-0000-000000000000/00000016-fa'... is also"
            " the listen endpoint of route 'c'; expected each route to listen on its own endpoint\n"
            "routes.toml:18: routes.e.allow: rule '::1/128' does not apply to a vsock listener; expected cid:N rules\n"
            "routes.toml:22: routes.f.allow: allow does not apply to a unix listener;"
            " unix listeners are guarded by mode/owner/group",
            id="listen-families",
        ),
        pytest.param(
            f"[routes.a]\n{OK}[routes.b]\n{OK}",
            "routes.toml:5: routes.b.listen: 'tcp://127.0.0.1:2222' is also the listen endpoint of route 'a';"
            " expected each route to listen on its own endpoint",
            id="duplicate-listen",
        ),
        pytest.param(
            '[routes]\nssh = { listen = "tcp://127.0.0.1:1", connect = "stdio" }\n',
            f"routes.toml:2: routes.ssh.connect: stdio is only for `hvbridge connect`; expected {ENDPOINT}",
            id="inline-table-line",
        ),
        pytest.param(
            'routes.ssh.listen = "tcp://127.0.0.1:1"\nroutes . "ssh" . connect = "stdio"\n',
            f"routes.toml:2: routes.ssh.connect: stdio is only for `hvbridge connect`; expected {ENDPOINT}",
            id="dotted-key-line",
        ),
        pytest.param(
            "x = \"\"\"\n[routes.a]\nlisten = 1\n\"\"\"\ny = '''\nz = 1\n'''\n"
            '[routes.ssh]\nlisten = "tcp://127.0.0.1:1"\nconnect = "stdio"\n',
            "routes.toml:1: x: unknown key; expected one of: bridge, defaults, routes\n"
            "routes.toml:5: y: unknown key; expected one of: bridge, defaults, routes\n"
            f"routes.toml:10: routes.ssh.connect: stdio is only for `hvbridge connect`; expected {ENDPOINT}",
            id="multi-line-strings-are-not-keys",
        ),
        pytest.param(
            '[routes."c\\u0064"]\nlisten = "tcp://127.0.0.1:1"\nconnect = "stdio"\n'
            '[routes."e\\U00000066"]\nlisten = "tcp://127.0.0.1:2"\nconnect = "stdio"\n'
            '[routes.\'g\\h\']\nlisten = "tcp://127.0.0.1:3"\nconnect = "stdio"\n',
            f"routes.toml:3: routes.cd.connect: stdio is only for `hvbridge connect`; expected {ENDPOINT}\n"
            "routes.toml:7: routes.'g\\\\h': invalid route name; expected 1 to 64 of the characters A-Z a-z 0-9 _ . -\n"
            f"routes.toml:9: routes.'g\\\\h'.connect: stdio is only for `hvbridge connect`; expected {ENDPOINT}\n"
            f"routes.toml: routes.ef.connect: stdio is only for `hvbridge connect`; expected {ENDPOINT}",
            id="quoted-keys",
        ),
    ],
)
def test_toml_problems(text: str, message: str) -> None:
    with raises(message):
        check(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "routes:\n  ssh:\n    listen: tcp://127.0.0.1:2222\n    connect: tcp://127.0.0.1:22\n"
            "    half_close: on\n    listen: tcp://127.0.0.1:1\n",
            "routes.yaml:5: routes.ssh.half_close: got 'on'; expected true or false\n"
            "routes.yaml:6: routes.ssh.listen: duplicate key (first on line 3); expected each key once",
            id="on-and-duplicate-key",
        ),
        pytest.param(
            "routes:\n  ssh:\n    listen: tcp://127.0.0.1:2222\n    connect: tcp://127.0.0.1:22\n    mode: 0660\n",
            "routes.yaml:5: routes.ssh.mode: got the number 660 (octal 1224);"
            ' the mode must be a string, such as "0660"',
            id="unquoted-mode",
        ),
        pytest.param(
            "- a\n- b\n",
            "routes.yaml: got a list; expected a table of bridge, defaults and routes",
            id="not-a-table",
        ),
        pytest.param(
            "routes:\n  ssh:\n    listen: tcp://127.0.0.1:2222\n    connect: tcp://127.0.0.1:22\n"
            "    connect_timeout: 2001-12-14\n    buffer_size: <<\n    ? [x]\n    : 1\n"
            "    ? {y: 1}\n    : 2\n    mode: 0o660\n    idle_timeout: 2001-13-40\n"
            "    group: " + "9" * 5000 + "\n    owner: null\n",
            "routes.yaml:5: routes.ssh.connect_timeout: got a date;"
            f" expected a duration greater than 0 ({DURATION_FORMS}, such as '5s')\n"
            "routes.yaml:6: routes.ssh.buffer_size: cannot read '<<': could not determine a constructor for the tag"
            " 'tag:yaml.org,2002:merge'; expected a string, number or boolean\n"
            "routes.yaml:7: routes.ssh: got a list as a key; expected plain string keys\n"
            "routes.yaml:9: routes.ssh: got a table as a key; expected plain string keys\n"
            "routes.yaml:11: routes.ssh.mode: got the number 432 (octal 660);"
            ' the mode must be a string, such as "0660"\n'
            "routes.yaml:12: routes.ssh.idle_timeout: cannot read '2001-13-40': month must be in 1..12;"
            " expected a string, number or boolean\n"
            "routes.yaml:13: routes.ssh.group: integer is too long; expected at most 4300 digits\n"
            "routes.yaml:14: routes.ssh.owner: got null; expected a user name or a numeric id 0..4294967294",
            id="odd-values",
        ),
        pytest.param(
            "routes:\n  ssh:\n    listen: tcp://127.0.0.1:2222\n    connect: tcp://127.0.0.1:22\n"
            "    buffer_size: !!binary aGVsbG8=\n",
            "routes.yaml:5: YAML tag !!binary is not supported; expected a plain value (quoted, for a string)",
            id="binary-tag",
        ),
        pytest.param(
            'routes: !!set {a}\nx: !!int ""\n',
            "routes.yaml:1: YAML tag !!set is not supported; expected a plain value (quoted, for a string)",
            id="set-tag",
        ),
        pytest.param(
            'x: !!int ""\n',
            "routes.yaml:1: YAML tag !!int is not supported; expected a plain value (quoted, for a string)",
            id="int-tag-on-an-empty-value",
        ),
        pytest.param(
            "routes:\n  a:\n    listen: !custom tcp://127.0.0.1:1\n",
            "routes.yaml:3: YAML tag !custom is not supported; expected a plain value (quoted, for a string)",
            id="custom-tag",
        ),
        pytest.param(
            "routes:\n  ssh: &a\n    listen: tcp://127.0.0.1:2222\n    connect: tcp://127.0.0.1:22\n  web: *a\n",
            "routes.yaml:5: YAML aliases (*a) are not supported; write the value out in full",
            id="alias",
        ),
        pytest.param(
            "routes: {a: [\n",
            "routes.yaml:2: invalid YAML: expected the node content, but found '<stream end>'",
            id="syntax",
        ),
        pytest.param(
            "a: 1\n---\nb: 2\n",
            "routes.yaml:2: invalid YAML: expected a single document in the stream, but found another document",
            id="two-documents",
        ),
        pytest.param(
            'routes:\n  ssh:\n    listen: "\x07"\n',
            "routes.yaml:3: invalid YAML: character U+0007 is not allowed; expected printable text",
            id="control-character",
        ),
        pytest.param("routes:\n", f"routes.yaml:1: routes: {NO_ROUTES}", id="routes-null"),
        pytest.param("", f"routes.yaml: routes: {NO_ROUTES}", id="empty"),
        pytest.param("bridge:\ndefaults:\n", f"routes.yaml: routes: {NO_ROUTES}", id="empty-tables"),
        pytest.param(
            "routes:\n  ssh:\n",
            "routes.yaml:2: routes.ssh: got null; expected a table with listen and connect",
            id="route-null",
        ),
    ],
)
def test_yaml_problems(text: str, message: str) -> None:
    with raises(message):
        check(text, "yaml")


def test_several_mistakes_in_one_error() -> None:
    text = (
        "[bridge]\n"
        'log_level = "loud"\n'  # 2
        "[defaults]\n"
        'connect_timeout = "5 s"\n'  # 4
        "[routes.ssh]\n"
        'listen = "tcp://127.0.0.1:2222"\n'
        'connect = "hvsock://my-vm/22"\n'
        'half_close = "yes"\n'  # 8
        "[routes.web]\n"
        'listen = "tcp://127.0.0.1:2222"\n'  # 10
        'conect = "vsock://3:80"\n'  # 11
    )
    with pytest.raises(ConfigError) as caught:
        check(text)
    assert [str(problem) for problem in caught.value.problems] == [
        "routes.toml:2: bridge.log_level: got 'loud'; expected one of: debug, info, warning, error",
        f"routes.toml:4: defaults.connect_timeout: got '5 s'; expected a duration greater than 0 ({DURATION_FORMS},"
        " such as '5s')",
        "routes.toml:8: routes.ssh.half_close: got 'yes'; expected true or false",
        "routes.toml:9: routes.web.connect: missing; expected an endpoint such as 'tcp://127.0.0.1:8080'",
        "routes.toml:10: routes.web.listen: 'tcp://127.0.0.1:2222' is also the listen endpoint of route 'ssh';"
        " expected each route to listen on its own endpoint",
        "routes.toml:11: routes.web.conect: unknown key; did you mean 'connect'?",
    ]
    assert str(caught.value) == "\n".join(str(problem) for problem in caught.value.problems)


def test_toml_syntax_errors() -> None:
    with raises("routes.toml:2: invalid TOML: invalid value (column 10)"):
        check("[routes.a]\nlisten = \n")
    with raises("routes.toml:3: invalid TOML: invalid value (at the end of the file)"):
        check("[routes.a]\n\nx = [")


# ------------------------------------------------------------------------------- hostile input


def test_billion_laughs_is_refused_at_the_first_alias() -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{n}: &a{n} [" + ", ".join([f"*a{n - 1}"] * 9) + "]" for n in range(1, 10)]
    # Refused at the first alias, before anything is expanded: the message says where.
    with raises("routes.yaml:2: YAML aliases (*a0) are not supported; write the value out in full"):
        check("\n".join(lines), "yaml")


def test_recursive_alias_is_refused() -> None:
    with raises("routes.yaml:1: YAML aliases (*a) are not supported; write the value out in full"):
        check("&a [*a]", "yaml")


@pytest.mark.parametrize(
    ("text", "fmt", "message"),
    [
        pytest.param(
            "routes: " + "[" * 100_000,
            "yaml",
            "routes.yaml:1: nesting is too deep; expected at most 32 levels",
            id="yaml-flow",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "".join(" " * n + "k:\n" for n in range(40)),
            "yaml",
            "routes.yaml:32: nesting is too deep; expected at most 32 levels",
            id="yaml-block",
        ),
        pytest.param(
            "x = " + "[" * 5000 + "]" * 5000,
            "toml",
            "routes.toml: invalid TOML: arrays or inline tables are nested too deep; expected a few levels at most",
            id="toml-arrays",
        ),
        pytest.param(
            "[routes]\nx = {" + "a." * 100_000 + "b = 1}\n",
            "toml",
            "routes.toml:2: a key has too many dotted parts; expected at most 8, such as routes.NAME.KEY",
            id="toml-dotted-key",
        ),
        pytest.param(
            "[" + "a . " * 9 + "b]\n",
            "toml",
            "routes.toml:1: a key has too many dotted parts; expected at most 8, such as routes.NAME.KEY",
            id="toml-table-header",
        ),
    ],
)
def test_deep_nesting(text: str, fmt: Format, message: str) -> None:
    # The message shows the bound acted (refused while composing, or before tomllib parses), which
    # is what keeps the time bounded; the time itself is not asserted.
    with raises(message):
        check(text, fmt)


def test_dots_in_strings_and_comments_are_not_key_parts() -> None:
    long_name = ".".join(["a"] * 40)
    table = check(
        f"[routes.a]  # {long_name}\n"
        f'listen = "tcp://{long_name}:1"\n'
        f"connect = 'tcp://{long_name}:2'\n"
        'allow = ["1.2.3.4", "5.6.7.8", "9.10.11.12", "13.14.15.16"]\n'
    )
    assert table.routes[0].listen == TcpAddress(long_name, 1)


@pytest.mark.slow
def test_too_many_yaml_values() -> None:
    text = "x:\n" + "- 1\n" * 30_000
    with raises("routes.yaml:19999: too many values; expected at most 20000"):
        check(text, "yaml")


def test_huge_toml_integer() -> None:
    with raises("routes.toml:2: invalid TOML: an integer is too long; expected at most 4300 digits"):
        check("[routes.a]\nconnect_retries = " + "9" * 5000 + "\n")


def test_text_too_large() -> None:
    too_large = "routes.toml: file is too large; expected at most 1 MiB (1048576 bytes)"
    with raises(too_large):
        check("#" * (1024 * 1024 + 1))
    with raises(too_large.replace("toml", "yaml")):
        check("#" + "é" * (512 * 1024), "yaml")  # under 1 Mi characters, over 1 MiB of UTF-8


# ---------------------------------------------------------------------------------------- files


def test_load_toml_yaml_and_yml(tmp_path: Path) -> None:
    toml = tmp_path / "routes.TOML"
    toml.write_text(FULL_TOML)
    assert load_config(toml) == attrs.evolve(full_table(), source=str(toml))
    for name in ("routes.yaml", "routes.yml"):
        path = tmp_path / name
        path.write_text(FULL_YAML)
        assert load_config(str(path)) == attrs.evolve(full_table(), source=str(path))


def test_load_strips_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_bytes(b"\xef\xbb\xbf" + FULL_TOML.encode())
    assert load_config(path).routes == full_table().routes


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("routes.json", "unsupported file extension '.json'; expected .toml, .yaml or .yml, or --format toml|yaml"),
        ("routes", "no file extension; expected .toml, .yaml or .yml, or --format toml|yaml"),
    ],
)
def test_load_unknown_extension(tmp_path: Path, name: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(FULL_TOML)
    with raises(f"{path}: {message}"):
        load_config(path)


@pytest.mark.parametrize(("name", "fmt"), [("routes.conf", "toml"), ("routes", "toml"), ("routes.toml", "yaml")])
def test_load_any_file_name_with_a_format(tmp_path: Path, name: str, fmt: Format) -> None:
    path = tmp_path / name
    path.write_text(FULL_TOML if fmt == "toml" else FULL_YAML)
    assert load_config(path, fmt).routes == full_table().routes


def test_load_stdin_in_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(FULL_YAML))
    assert load_config("-", "yaml").routes == full_table().routes


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "'': an empty file name; expected the path of a route table file, or - for stdin"),
        ("{tmp}", "{tmp}: is a directory; expected a route table file"),
        ("{tmp}/routes.d", "{tmp}/routes.d: is a directory; expected a route table file"),
        (
            "{tmp}/no/routes.toml",
            "{tmp}/no/routes.toml: no such directory '{tmp}/no'; expected the path of a route table file",
        ),
    ],
)
def test_load_names_the_file(tmp_path: Path, name: str, message: str) -> None:
    (tmp_path / "routes.d").mkdir()
    with raises(message.format(tmp=tmp_path)):
        load_config(name.format(tmp=tmp_path))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            f"[routes.a]\n{OK}[routes.a]\n{OK}",
            "routes.toml:4: invalid TOML: table [routes.a] is declared twice; expected each table once",
        ),
        (
            f'[routes.a]\n{OK}"connect" = "tcp://h:2"\n',
            "routes.toml:4: invalid TOML: duplicate key 'connect'; expected each key once in a table",
        ),
    ],
)
def test_toml_duplicates_named(text: str, message: str) -> None:
    with raises(message):
        check(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[routes.a]\nlisten = "unix:///run/a.sock"\nconnect = "tcp://h:1"\nmode = 0o660\n',
            'routes.toml:4: routes.a.mode: got the number 432 (octal 660); the mode must be a string, such as "0660"',
        ),
        (
            '[bridge]\nmetrics = "stdio"\n[routes.a]\nlisten = "tcp://h:2"\nconnect = "tcp://h:1"\n',
            "routes.toml:2: bridge.metrics: stdio is only for `hvbridge connect`;"
            " expected tcp://HOST:PORT, unix:///PATH or unix:@NAME, such as 'tcp://127.0.0.1:9477'",
        ),
        (
            '[bridge]\nmetrics = "bogus"\n[routes.a]\nlisten = "tcp://h:2"\nconnect = "tcp://h:1"\n',
            "routes.toml:2: bridge.metrics: unknown endpoint 'bogus';"
            " expected tcp://HOST:PORT, unix:///PATH or unix:@NAME, such as 'tcp://127.0.0.1:9477'",
        ),
        (
            '[routes.a]\nlisten = "tcp://h:2"\nconnect = "vsock://3:1"\nconnected_suspend = true\n',
            "routes.toml:4: routes.a.connected_suspend: connected_suspend applies only to routes with an hvsock://"
            " endpoint; remove it",
        ),
        (
            '[routes.a]\nlisten = "unix:@a"\nconnect = "tcp://h:1"\nmode = "0660"\nowner = "root"\n',
            "routes.toml:4: routes.a.mode: mode cannot apply to an abstract socket (unix:@NAME has no file);"
            " remove it, or listen on unix:///PATH\n"
            "routes.toml:5: routes.a.owner: owner cannot apply to an abstract socket (unix:@NAME has no file);"
            " remove it, or listen on unix:///PATH",
        ),
    ],
)
def test_smaller_mistakes_said_plainly(text: str, message: str) -> None:
    with raises(message):
        check(text)


def test_connected_suspend_kept_on_hvsock_routes() -> None:
    table = check('[routes.a]\nlisten = "hvsock://any/22"\nconnect = "tcp://h:1"\nconnected_suspend = true\n')
    assert table.routes[0].options.connected_suspend
    assert "connected_suspend = true\n" in format_table(table)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("tcp://127.0.0.1:8080", "tcp://0.0.0.0:8080"),
        ("tcp://0.0.0.0:8080", "tcp://127.0.0.1:8080"),
        ("tcp://[::1]:8080", "tcp://[::]:8080"),
        ("tcp://localhost:8080", "tcp://LOCALHOST:8080"),
        ("tcp://localhost:8080", "tcp://localhost.:8080"),
        ("vsock://any:22", "vsock://3:22"),
        ("vsock://3:22", "vsock://any:22"),
        ("unix:///run/a.sock", "unix:///run/./x/../a.sock"),
        ("hvsock://any/22", f"hvsock://{SSH_SERVICE}/22"),
        ("hvsock://my-vm/22", "hvsock://MY-VM/22"),
    ],
)
def test_listen_endpoints_compared_by_what_they_bind(a: str, b: str) -> None:
    text = f'[routes.a]\nlisten = "{a}"\nconnect = "tcp://h:1"\n[routes.b]\nlisten = "{b}"\nconnect = "tcp://h:1"\n'
    first, second = (str(parse_address(text)) for text in (a, b))
    first, second = (repr(t) if len(t) <= 60 else f"{t[:57]!r}..." for t in (first, second))  # as messages quote
    with raises(
        f"routes.toml:5: routes.b.listen: {second} binds what routes.a.listen ({first}) binds;"
        " expected each route to listen on its own endpoint"
    ):
        check(text)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("tcp://127.0.0.1:0", "tcp://0.0.0.0:0"),  # ephemeral ports never collide
        ("tcp://127.0.0.1:8080", "tcp://127.0.0.2:8080"),
        ("tcp://0.0.0.0:8080", "tcp://[::]:8080"),  # IPv6 listeners are bound IPV6_V6ONLY
        ("tcp://0.0.0.0:8080", "tcp://0.0.0.0:8081"),
        ("vsock://any:any", "vsock://any:any"),
        ("vsock://2:22", "vsock://3:22"),
        ("unix:@a", "unix:///a"),
        ("hvsock://any/22", "hvsock://any/23"),
    ],
)
def test_listen_endpoints_that_do_not_collide(a: str, b: str) -> None:
    check(f'[routes.a]\nlisten = "{a}"\nconnect = "tcp://h:1"\n[routes.b]\nlisten = "{b}"\nconnect = "tcp://h:1"\n')


def test_listen_conflicts_resolve_host_names() -> None:
    table = check(
        '[bridge]\nmetrics = "tcp://127.0.0.1:9477"\n'
        '[routes.a]\nlisten = "tcp://127.0.0.1:8080"\nconnect = "tcp://h:1"\n'
        '[routes.b]\nlisten = "tcp://web.example:8080"\nconnect = "tcp://h:1"\n'
        '[routes.c]\nlisten = "tcp://[::1]:8080"\nconnect = "tcp://h:1"\n'
        '[routes.d]\nlisten = "tcp://unresolved.example:8080"\nconnect = "tcp://h:1"\n'
        '[routes.e]\nlisten = "tcp://metrics.example:9477"\nconnect = "tcp://h:1"\n'
    )
    names = {"web.example": ["::2", "127.0.0.1"], "metrics.example": ["0.0.0.0"]}
    problems = listen_conflicts(table, lambda host: names.get(host, []))
    assert [str(p) for p in problems] == [
        "routes.toml: routes.b.listen: 'tcp://web.example:8080' binds what routes.a.listen ('tcp://127.0.0.1:8080')"
        " binds; expected each route to listen on its own endpoint",
        "routes.toml: bridge.metrics: 'tcp://127.0.0.1:9477' binds what routes.e.listen"
        " ('tcp://metrics.example:9477') binds; expected an endpoint of its own",
    ]


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    with raises(f"{path}: no such file; expected the path of a route table file"):
        load_config(path)


def test_load_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.mkdir()
    with raises(f"{path}: is a directory; expected a route table file"):
        load_config(path)


def test_load_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(FULL_TOML)

    def no_permission(*args: object, **kwargs: object) -> io.BytesIO:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    # root may read any file, so the refusal is faked where hvbridge.config opens files.
    monkeypatch.setattr(config, "open", no_permission, raising=False)
    with raises(f"{path}: permission denied; expected a file this user may read"):
        load_config(path)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="needs POSIX modes, and root reads any file"
)
def test_load_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(FULL_TOML)
    path.chmod(0)
    with raises(f"{path}: permission denied; expected a file this user may read"):
        load_config(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_load_a_fifo_without_waiting_for_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    os.mkfifo(path)
    with raises(f"{path}: not a regular file; expected a route table file"):
        load_config(path)


def test_toml_error_text_without_a_position() -> None:
    # tomllib always ends its messages with the position; anything else is passed on as it is.
    assert config_toml._toml_error("odd", "") == (None, "odd")


def test_load_other_os_errors(tmp_path: Path) -> None:
    long_name = tmp_path / ("x" * 300 + ".toml")
    with raises(f"{long_name}: cannot read the file (File name too long); expected a readable file"):
        load_config(long_name)
    with raises(f"{tmp_path}/a\0.toml: cannot read the file (embedded null byte); expected a readable file"):
        load_config(f"{tmp_path}/a\0.toml")


def test_load_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_bytes(b'[routes.a]\nlisten = "tcp://127.0.0.1:1"\nconnect = "\xff"\n')
    with raises(f"{path}:3: invalid UTF-8 (byte 0xff at offset 51); expected a UTF-8 text file"):
        load_config(path)


def test_load_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    with raises(f"{path}:2: invalid UTF-8 (byte 0x80 at offset 128); expected a UTF-8 text file"):
        load_config(path)


def test_load_too_large_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_bytes(b"#" * (3 * 1024 * 1024))
    with raises(f"{path}: file is too large; expected at most 1 MiB (1048576 bytes)"):
        load_config(path)


def test_load_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_bytes(b"")
    with raises(f"{path}: routes: {NO_ROUTES}"):
        load_config(path)


def test_load_stdin_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(FULL_TOML.encode())))
    assert load_config("-") == attrs.evolve(full_table(), source="<stdin>")


def test_load_stdin_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(FULL_TOML))
    assert load_config("-") == attrs.evolve(full_table(), source="<stdin>")


def test_load_stdin_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"[routes.a]\nx = '\xfe'\n")))
    with raises("<stdin>:2: invalid UTF-8 (byte 0xfe at offset 16); expected a UTF-8 text file"):
        load_config("-")
    monkeypatch.setattr(sys, "stdin", io.StringIO("routes: {}"))  # always TOML
    with raises("<stdin>:1: invalid TOML: expected '=' after a key in a key/value pair (column 7)"):
        load_config("-")
    monkeypatch.setattr(sys, "stdin", None)
    with raises("<stdin>: there is no standard input; expected the route table there"):
        load_config("-")


# ------------------------------------------------------------------------- table_from_mapping


def test_table_from_mapping_like_the_forward_command() -> None:
    table = table_from_mapping(
        {
            "routes": {
                "forward": {
                    "listen": "unix:///tmp/f.sock",
                    "connect": "vsock://3:22",
                    "connect_timeout": "5s",
                    "connect_retries": 2,
                    "idle_timeout": "0s",
                    "max_connections": 10,
                    "half_close": False,
                    "mode": "0600",
                }
            }
        },
        source="<command line>",
    )
    assert table == RouteTable(
        (
            Route(
                "forward",
                UnixAddress("/tmp/f.sock"),
                VsockAddress(3, 22),
                RouteOptions(connect_retries=2, max_connections=10, half_close=False),
            ),
        ),
        source="<command line>",
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, f"<x>: routes: {NO_ROUTES}"),
        ("routes", "<x>: got 'routes'; expected a table of bridge, defaults and routes"),
        ({1: 2, "routes": {}}, f"<x>: got the key 1; expected string keys\n<x>: routes: {NO_ROUTES}"),
        (
            {"routes": {"a": {"listen": "tcp://127.0.0.1:1", "connect": "tcp://h:1", "allow": ("::1", b"x")}}},
            "<x>: routes.a.allow: got a bytes in the list;"
            " expected strings such as '127.0.0.0/8', 'cid:3' or 'vm:my-vm'",
        ),
        (
            {"routes": {"a": {"listen": "tcp://127.0.0.1:1", "connect": "tcp://h:1", "idle_timeout": 10**400}}},
            f"<x>: routes.a.idle_timeout: got a very large integer; expected a duration ({DURATION_FORMS},"
            " such as '10m'), or 0 for none",
        ),
        (
            {"routes": {"a": {"listen": "x" * 100, "connect": "tcp://h:1"}}},
            f"<x>: routes.a.listen: unknown endpoint '{'x' * 100}'; expected one of: tcp://HOST:PORT, unix:///PATH,"
            " unix:@NAME, vsock://CID:PORT, hvsock://VM/SERVICE, vsock-mux:///PATH:PORT, stdio",
        ),
        (
            {"routes": {"a": {"listen": "tcp://127.0.0.1:1", "connect": "tcp://h:1", "owner": "x" * 100}}},
            "<x>: routes.a.owner: owner applies only to unix listeners; remove it, or listen on unix:///PATH",
        ),
        (
            {"routes": {"a": {"listen": "unix:@a", "connect": "tcp://h:1", "group": "a\0" + "b" * 100}}},
            f"<x>: routes.a.group: got {'a' + chr(0) + 'b' * 55!r}...; expected a group name or a numeric id"
            " 0..4294967294",
        ),
    ],
)
def test_table_from_mapping_problems(data: object, message: str) -> None:
    with raises(message):
        table_from_mapping(data, source="<x>")


def test_every_route_option_has_a_parser() -> None:
    assert set(schema._OPTION_PARSERS) == {field.name for field in attrs.fields(RouteOptions)}
    assert {"listen", "connect", *schema._OPTION_PARSERS} == ROUTE_KEYS


# -------------------------------------------------------------------------------- format_table


def test_format_table() -> None:
    assert format_table(full_table()) == (
        "[bridge]\n"
        'log_level = "debug"\n'
        'log_format = "json"\n'
        'metrics = "tcp://127.0.0.1:9477"\n'
        'shutdown_grace = "2500ms"\n'
        "\n"
        "[routes.ssh]\n"
        'listen = "tcp://127.0.0.1:2222"\n'
        'connect = "hvsock://my-vm/00000016-facb-11e6-bd58-64006a7986d3"\n'
        'connect_timeout = "250ms"\n'
        "connect_retries = 3\n"
        'idle_timeout = "0s"\n'
        "max_connections = 64\n"
        "half_close = false\n"
        'buffer_size = "128KiB"\n'
        'allow = ["127.0.0.0/8", "::1/128"]\n'
        "connected_suspend = true\n"
        "\n"
        "[routes.web]\n"
        'listen = "unix:///run/hvbridge/web.sock"\n'
        'connect = "vsock://3:8080"\n'
        'connect_timeout = "250ms"\n'
        "connect_retries = 3\n"
        'idle_timeout = "10m"\n'
        "max_connections = 64\n"
        "half_close = false\n"
        'buffer_size = "128KiB"\n'
        'mode = "0660"\n'
        'owner = "www-data"\n'
        'group = "33"\n'
        'vsock_buffer_size = "1MiB"\n'
        "\n"
        '[routes."guest.sshd"]\n'
        'listen = "vsock://any:22"\n'
        'connect = "tcp://127.0.0.1:22"\n'
        'connect_timeout = "1500ms"\n'
        "connect_retries = 3\n"
        'idle_timeout = "10m"\n'
        "max_connections = 64\n"
        "half_close = false\n"
        'buffer_size = "4KiB"\n'
        'allow = ["cid:2"]\n'
        'vsock_buffer_size = "1MiB"\n'
        "\n"
        "[routes.fc]\n"
        'listen = "tcp://[::1]:8080"\n'
        'connect = "vsock-mux:///run/fc/v.sock:80"\n'
        'connect_timeout = "250ms"\n'
        "connect_retries = 3\n"
        'idle_timeout = "10m"\n'
        "max_connections = 64\n"
        "half_close = true\n"
        'buffer_size = "128KiB"\n'
        "allow = []\n"
    )


def test_format_table_round_trips() -> None:
    table = full_table()
    assert check(format_table(table)) == table
    assert check(format_table(check(FULL_YAML, "yaml"))) == table


def test_format_table_shows_options_set_in_code() -> None:
    # A table built in code may set options that do not apply; they show, so check finds them.
    options = RouteOptions(allow=(CidRule(3),), mode=0o644, buffer_size=1000, vsock_buffer_size=5000)
    table = RouteTable(
        (
            Route("u", UnixAddress("/x"), TcpAddress("h", 1), options),
            Route("t", TcpAddress("h", 2), TcpAddress("h", 1), options),
        )
    )
    text = format_table(table)
    assert 'allow = ["cid:3"]\nmode = "0644"\nvsock_buffer_size = 5000\n' in text
    assert "buffer_size = 1000\n" in text
    with pytest.raises(ConfigError):
        check(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (5.0, "5s"),
        (90.0, "90s"),
        (120.0, "2m"),
        (7200.0, "2h"),
        (0.25, "250ms"),
        (1.5, "1500ms"),
        (0.0001, "0.0001s"),
        (1e-7, "0.0000001s"),
        (433.48199999999997, "433.48199999999997s"),  # 433482ms would read back as 433.482
        (1e20, "100000000000000000000s"),
        (2.0**53 + 2, "9007199254740994.0s"),
    ],
)
def test_duration_text(seconds: float, text: str) -> None:
    table = RouteTable(
        (Route("a", TcpAddress("h", 1), TcpAddress("h", 2), RouteOptions(idle_timeout=seconds)),),
        source="routes.toml",
    )
    assert f'idle_timeout = "{text}"\n' in format_table(table)
    assert parse_duration(text) == seconds
    assert check(format_table(table)) == table


# ------------------------------------------------------------------------------ value helpers


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (5, 5.0),
        (1.5, 1.5),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("0s", 0.0),
        ("0.1ms", 0.0001),
        ("5", 5.0),  # a bare number is seconds, in a string as in a number
        ("0.5", 0.5),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    [
        True,
        -1,
        -0.5,
        math.inf,
        math.nan,
        10**400,
        "-5s",
        "-5",
        "5 s",
        "5S",
        "1e3s",
        ".5s",
        "5.s",
        "\u0665s",
        "",
        None,
        [1],
    ],
)
def test_parse_duration_refuses(value: object) -> None:
    with pytest.raises(ValueError, match=r"^got .*; expected a duration \(seconds, or a number with a unit"):
        parse_duration(value)


def test_parse_duration_refuses_long_text() -> None:
    assert parse_duration("0." + "1" * 397 + "s") == pytest.approx(1 / 9)  # 400 characters hold any float
    with pytest.raises(ValueError, match=r"^got '0\.111.*'\.\.\.; expected a duration"):
        parse_duration("0." + "1" * 398 + "s")


@pytest.mark.parametrize(
    ("value", "size"),
    [(0, 0), (4096, 4096), ("4096", 4096), ("1B", 1), ("64KiB", 65536), ("16MiB", 16 * 1024 * 1024), ("1GiB", 2**30)],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", [False, -1, 1.5, "1.5KiB", "64kib", "64 KiB", "1KB", "-1", "", "1" * 21, None])
def test_parse_size_refuses(value: object) -> None:
    with pytest.raises(
        ValueError, match=r"^got .*; expected a size \(bytes, or a number with a unit B, KiB, MiB or GiB\)$"
    ):
        parse_size(value)


# ---------------------------------------------------------------------------------- Hypothesis


# The fuzz tests of parse_config() and table_from_mapping() on any input live in test_hostile.py;
# here, tables valid by construction round-trip through format_table().


_listens = st.sampled_from(
    [
        "tcp://127.0.0.1:{n}",
        "tcp://[::1]:{n}",
        "unix:///run/r{n}.sock",
        "unix:@r{n}",
        "vsock://any:{n}",
        "hvsock://any/{n}",
        "vsock-mux:///run/v.sock:{n}",
    ]
)
_connects = st.sampled_from(
    ["tcp://db.example:5432", "vsock://3:22", "hvsock://my-vm/22", "unix:@x", "vsock-mux:///v:1"]
)
_networks = st.tuples(st.ip_addresses(), st.integers(0, 128)).map(
    lambda pair: str(ip_network(f"{pair[0]}/{min(pair[1], pair[0].max_prefixlen)}", strict=False))
)
_durations = st.one_of(
    st.floats(0, 1e6, allow_nan=False), st.integers(0, 10**6), st.sampled_from(["1ms", "250ms", "1.5s", "10m", "2h"])
)


@st.composite
def valid_trees(draw: st.DrawFn) -> dict[str, object]:
    """Route table trees that are valid by construction, with options where they apply."""
    routes: dict[str, object] = {}
    for n in range(draw(st.integers(1, 4))):
        listen = draw(_listens).format(n=n + 1)
        connect = draw(_connects)
        route: dict[str, object] = {"listen": listen, "connect": connect}
        route["connect_timeout"] = draw(st.one_of(st.floats(1e-6, 1e6), st.sampled_from(["5s", "250ms", "1m"])))
        route["idle_timeout"] = draw(_durations)
        route["connect_retries"] = draw(st.integers(0, 100))
        route["max_connections"] = draw(st.integers(1, 1_000_000))
        route["half_close"] = draw(st.booleans())
        if "hvsock://" in listen + connect:
            route["connected_suspend"] = draw(st.booleans())
        route["buffer_size"] = draw(st.one_of(st.integers(1024, 16 * 1024 * 1024), st.sampled_from(["1KiB", "16MiB"])))
        if listen.startswith(("unix://", "vsock-mux:")):
            route["mode"] = draw(st.integers(0, 0o777)).__format__("04o")
            route["owner"] = draw(
                st.one_of(st.integers(0, 2**32 - 2), st.text(min_size=1).filter(lambda s: "\0" not in s))
            )
        elif listen.startswith("unix:@"):
            pass  # an abstract socket has no file to take a mode or an owner
        elif listen.startswith("tcp:"):
            route["allow"] = draw(st.lists(_networks, max_size=3))
        elif listen.startswith("vsock:"):
            route["allow"] = draw(st.lists(st.integers(0, 2**32 - 1).map("cid:{}".format), max_size=3))
        else:
            route["allow"] = draw(
                st.lists(st.one_of(st.uuids(), st.sampled_from(["my-vm", "loopback"])).map("vm:{}".format), max_size=3)
            )
        if listen.startswith("vsock://") or connect.startswith("vsock://"):
            route["vsock_buffer_size"] = draw(st.integers(1024, 2**30))
        routes[draw(st.from_regex(r"[A-Za-z0-9_.-]{1,8}", fullmatch=True)) + str(n)] = route
    bridge = {
        "log_level": draw(st.sampled_from(["debug", "info", "warning", "error"])),
        "shutdown_grace": draw(_durations),
    }
    return {"bridge": bridge, "routes": routes}


@pytest.mark.slow
@FUZZ
@given(valid_trees())
def test_format_table_round_trips_generated_tables(tree: dict[str, object]) -> None:
    table = table_from_mapping(tree, source="routes.toml")
    assert check(format_table(table)) == table


def test_address_text_is_canonical_in_format_table() -> None:
    table = check('[routes.a]\nlisten = "tcp://[0:0::1]:0080"\nconnect = "hvsock://LOOPBACK/2761"\n')
    assert 'listen = "tcp://[::1]:80"\n' in format_table(table)
    assert 'connect = "hvsock://e0e16197-dd56-4a10-9195-5ee7a155a838/00000ac9-facb-11e6-bd58-64006a7986d3"\n' in (
        format_table(table)
    )
    assert parse_address("tcp://[::1]:80") == table.routes[0].listen


def test_proxy_protocol_options_inherit_override_and_round_trip() -> None:
    table = check(
        '[defaults]\nproxy_protocol = "v2"\n'
        f"[routes.a]\n{OK}accept_proxy = true\n"
        '[routes.b]\nlisten = "tcp://127.0.0.1:1"\nconnect = "tcp://h:1"\nproxy_protocol = "none"\n'
    )
    a, b = table.routes
    assert (a.options.proxy_protocol, a.options.accept_proxy) == ("v2", True)
    assert (b.options.proxy_protocol, b.options.accept_proxy) == ("none", False)
    text = format_table(table)
    assert 'proxy_protocol = "v2"\naccept_proxy = true\n' in text
    assert check(text) == table


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('proxy_protocol = "v3"', "routes.toml:4: routes.ssh.proxy_protocol: got 'v3'; expected one of: none, v1, v2"),
        ('accept_proxy = "yes"', "routes.toml:4: routes.ssh.accept_proxy: got 'yes'; expected true or false"),
    ],
)
def test_proxy_protocol_option_problems(line: str, message: str) -> None:
    with raises(message):
        check(f"[routes.ssh]\n{OK}{line}\n")


# ---------------------------------------------------------------------------- [bridge] log_file

_ONE_ROUTE: Final = {"web": {"listen": "tcp://127.0.0.1:8080", "connect": "tcp://127.0.0.1:80"}}


@pytest.mark.parametrize(
    "path", ["C:\\ProgramData\\hvbridge\\hvbridge.log", "C:/logs/hvbridge.log", "\\\\server\\logs\\x.log", "/var/log/x"]
)
def test_log_file(path: str) -> None:
    table = table_from_mapping({"bridge": {"log_file": path}, "routes": _ONE_ROUTE}, source="t.toml")
    assert table.bridge.log_file == path
    text = format_table(table)
    assert parse_config(text, fmt="toml", source="t.toml") == table
    assert table_from_mapping({"routes": _ONE_ROUTE}, source="t.toml").bridge.log_file is None


@pytest.mark.parametrize(
    ("value", "shown"), [("hvbridge.log", "'hvbridge.log'"), ("C:x.log", "'C:x.log'"), ("", "''"), (5, "5")]
)
def test_log_file_must_be_absolute(value: object, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        table_from_mapping({"bridge": {"log_file": value}, "routes": _ONE_ROUTE}, source="t.toml")
    assert str(info.value) == (
        f"t.toml: bridge.log_file: got {shown}; expected an absolute file path such as"
        " 'C:\\ProgramData\\hvbridge\\hvbridge.log' or '/var/log/hvbridge.log'"
    )
