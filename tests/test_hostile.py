"""Hostile input: fuzzed parsers, and the CLI given files meant to break it.

The invariant (h11's fuzz/README.rst): any input either parses or raises the module's own error.
parse_address() raises only AddressError, parse_config() and table_from_mapping() only
ConfigError; anything else escaping is a bug. Hypothesis drives the parsers in-process, with
text and with arbitrary nested trees such as TOML and YAML produce (dates, bytes, huge ints).

The CLI part runs `hvbridge check -c FILE` as a child process on bad files (missing, a
directory, empty, binary, invalid UTF-8, 50 MiB, deeply nested, YAML alias bombs, unsafe YAML
tags). Each must end within a bounded time with exit status 1 and only well-formed
`Error: FILE...` lines on stderr (no traceback), and its peak memory (ru_maxrss from wait4) must
stay bounded. The child also runs under RLIMIT_AS, so a runaway fails with MemoryError (a
traceback, so the test fails) instead of eating the machine.

atheris (coverage-guided, libFuzzer) checks the same invariant by hand, not in CI, from a venv
with atheris installed (it has wheels for CPython 3.11; `pip install atheris`):

    python tests/test_hostile.py -max_total_time=180 -rss_limit_mb=2048

Rules: no sockets; files only under tmp_path; every child bounded in time and memory.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import importlib
import os
import random
import signal
import string
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvbridge.addresses import Role, parse_address
from hvbridge.config import Format, format_table, parse_config, table_from_mapping
from hvbridge.errors import AddressError, ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    from hvbridge.routes import RouteTable

MiB: Final = 1024 * 1024
#: A child gets this long; none should need more than a few seconds.
CHILD_TIMEOUT: Final = 60.0
#: Address-space cap of each child: past it, allocations fail (MemoryError) instead of swapping.
CHILD_ADDRESS_SPACE: Final = 2048 * MiB
#: Peak resident memory allowed to `check` on any bad file: Python with trio, click and
#: ruamel.yaml takes about 35 MiB (measured); the rest is room for a file it then rejects.
MAX_RSS: Final = 128 * MiB
FUZZ: Final = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------- the parsers

ADDRESS_PARTS: Final = (
    "tcp://",
    "unix:",
    "unix://",
    "unix:@",
    "vsock://",
    "hvsock://",
    "vsock-mux://",
    "stdio",
    "127.0.0.1",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "localhost",
    ":",
    "/",
    "//",
    "[",
    "]",
    "@",
    "{",
    "}",
    "0",
    "65535",
    "65536",
    "4294967295",
    "-1",
    "any",
    "host",
    "local",
    "hypervisor",
    "loopback",
    "00000016-facb-11e6-bd58-64006a7986d3",
    "%eth0",
    "\x00",
    "\u0661",
    "\uff11",
    " ",
    "x" * 120,
)


@st.composite
def address_like(draw: st.DrawFn) -> str:
    """Text assembled from pieces of real endpoint forms, plus random noise."""
    parts = draw(st.lists(st.sampled_from(ADDRESS_PARTS) | st.text(max_size=8), max_size=8))
    return "".join(parts)


@FUZZ
@given(st.text() | address_like(), st.sampled_from([None, "listen", "connect"]))
def test_parse_address_raises_only_address_error(text: str, role: Role | None) -> None:
    """Any text parses (and round-trips) or raises AddressError; nothing else escapes."""
    try:
        address = parse_address(text, role=role)
    except AddressError as exc:
        message = str(exc)
    else:
        assert parse_address(str(address)) == address
        return
    assert message, "an AddressError needs a message"
    assert len(message.splitlines()) == 1, "the CLI prints each line as its own `Error:` line"


LEAVES: Final = (
    "tcp://127.0.0.1:0",
    "tcp://127.0.0.1:8080",
    "tcp://[::1]:22",
    "tcp://localhost:1",
    "unix:///tmp/hostile.sock",
    "unix:@hostile",
    "vsock://3:22",
    "vsock://any:any",
    "hvsock://any/22",
    "hvsock://my-vm/00000016-facb-11e6-bd58-64006a7986d3",
    "vsock-mux:///tmp/v.sock:5",
    "stdio",
    "5s",
    "10ms",
    "1m",
    "2h",
    "0",
    "0s",
    "-1s",
    "1e308s",
    "1e999",
    "nan",
    "inf",
    "0600",
    "0660",
    "0o777",
    "99999",
    "127.0.0.0/8",
    "::1",
    "::ffff:127.0.0.1/104",
    "10.0.0.1/8",
    "cid:3",
    "cid:x",
    "vm:00000000-0000-0000-0000-000000000000",
    "vm:my-vm",
    "64KiB",
    "1MiB",
    "1GiB",
    "debug",
    "info",
    "json",
    "text",
    "root",
    "",
    " ",
    "\x00",
)
KEYS: Final = (
    "routes",
    "bridge",
    "defaults",
    "listen",
    "connect",
    "allow",
    "mode",
    "owner",
    "group",
    "connect_timeout",
    "connect_retries",
    "idle_timeout",
    "max_connections",
    "half_close",
    "buffer_size",
    "vsock_buffer_size",
    "connected_suspend",
    "log_level",
    "log_format",
    "metrics",
    "shutdown_grace",
    "ssh",
    "web",
)

scalars: st.SearchStrategy[object] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(LEAVES),
    st.binary(max_size=8),
    st.dates(),
    st.datetimes(),
    st.times(),
)
keys: st.SearchStrategy[object] = st.one_of(
    st.sampled_from(KEYS), st.text(max_size=12), st.integers(), st.none(), st.booleans()
)
trees: st.SearchStrategy[object] = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=40,
)
route_tables: st.SearchStrategy[object] = st.fixed_dictionaries(
    {},
    optional={
        "routes": st.dictionaries(
            st.text(min_size=1, max_size=6) | st.sampled_from(KEYS),
            st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), scalars | trees, max_size=8) | trees,
            max_size=4,
        )
        | trees,
        "bridge": st.dictionaries(st.sampled_from(KEYS), scalars | trees, max_size=5) | trees,
        "defaults": st.dictionaries(st.sampled_from(KEYS), scalars | trees, max_size=5) | trees,
    },
)


def config_outcome(parse: Callable[[], RouteTable]) -> RouteTable | list[str]:
    """The table, or the problems of the ConfigError (any other exception propagates)."""
    try:
        return parse()
    except ConfigError as exc:
        return [str(p) for p in exc.problems]


@FUZZ
@given(route_tables | st.dictionaries(keys, trees, max_size=5))
def test_table_from_mapping_raises_only_config_error(tree: object) -> None:
    """Any nested tree is a RouteTable or a ConfigError; a table check accepts prints back the same."""
    assert isinstance(tree, dict)
    table = config_outcome(lambda: table_from_mapping(tree, source="<fuzz>"))
    if isinstance(table, list):
        assert table, "a ConfigError needs at least one problem"
        assert all(table)
        return
    # What `check` prints is a valid route table that means the same.
    again = parse_config(format_table(table), fmt="toml", source="<fuzz>")
    assert again.routes == table.routes
    assert again.bridge == table.bridge


def assert_table_or_config_error(text: str, fmt: Format) -> None:
    """`text` is a RouteTable that format_table() writes back as the same, or a ConfigError whose
    every problem names the file."""
    source = f"fuzz.{fmt}"
    table = config_outcome(lambda: parse_config(text, fmt=fmt, source=source))
    if isinstance(table, list):
        assert table
        assert all(p.startswith(source) for p in table), table
    else:
        assert parse_config(format_table(table), fmt="toml", source=source) == table


TOML_PARTS: Final = (
    "[routes.a]\n",
    "[routes.b]\n",
    "[defaults]\n",
    "[bridge]\n",
    "[[routes]]\n",
    'listen = "tcp://127.0.0.1:0"\n',
    'connect = "tcp://127.0.0.1:1"\n',
    'connect = "unix:///tmp/x.sock"\n',
    'allow = ["127.0.0.0/8", "::1"]\n',
    'mode = "0660"\n',
    "mode = 0o660\n",
    'idle_timeout = "1s"\n',
    "max_connections = 0\n",
    "max_connections = -1\n",
    "max_connections = 1" + "0" * 5000 + "\n",
    "half_close = true\n",
    'connect_timeout = "1e999s"\n',
    "connect_timeout = inf\n",
    "connect_timeout = nan\n",
    "listen = 1979-05-27T07:32:00Z\n",
    "listen = [1, [2, [3]]]\n",
    "listen = {a = 1}\n",
    "routes = 1\n",
    "a.b.c = 1\n",
    "x = ",
    "[",
    "]",
    "{",
    "}",
    '"',
    "'",
    "=",
    ",",
    "\n",
    "\\",
    "\x00",
    "\ufeff",
)
YAML_PARTS: Final = (
    "routes:\n",
    "  a:\n",
    "    listen: tcp://127.0.0.1:0\n",
    "    connect: tcp://127.0.0.1:1\n",
    "    allow: [127.0.0.0/8, '::1']\n",
    "    mode: '0660'\n",
    "    mode: 0o660\n",
    "    half_close: on\n",
    "    max_connections: 1" + "0" * 5000 + "\n",
    "    connect_timeout: .inf\n",
    "    listen: 2001-12-14\n",
    "    listen: !!binary aGVsbG8=\n",
    "    listen: !!python/object/apply:os.getcwd []\n",
    "    listen: &x [a]\n",
    "    connect: *x\n",
    "    <<: {listen: a}\n",
    "bridge: {log_level: debug}\n",
    "defaults: []\n",
    "- ",
    ": ",
    "? ",
    "&a ",
    "*a ",
    "!!str ",
    "!tag ",
    "%YAML 1.1\n---\n",
    "---\n",
    "...\n",
    "[",
    "]",
    "{",
    "}",
    "'",
    '"',
    "\t",
    "\n",
    "\x00",
    "\x85",
    "\ufeff",
)


@FUZZ
@given(st.text() | st.lists(st.sampled_from(TOML_PARTS) | st.text(max_size=5), max_size=20).map("".join))
def test_parse_config_toml_raises_only_config_error(text: str) -> None:
    """Any TOML text is a RouteTable (that round-trips) or a ConfigError."""
    assert_table_or_config_error(text, "toml")


@FUZZ
@given(st.text() | st.lists(st.sampled_from(YAML_PARTS) | st.text(max_size=5), max_size=20).map("".join))
def test_parse_config_yaml_raises_only_config_error(text: str) -> None:
    """Any YAML text is a RouteTable (that round-trips) or a ConfigError."""
    assert_table_or_config_error(text, "yaml")


def test_fuzzed_trees_include_the_types_toml_and_yaml_produce() -> None:
    """The tree strategy covers what real parsers hand to table_from_mapping (a guard on the test)."""
    seen: set[type] = set()

    @settings(max_examples=200, deadline=None)
    @given(scalars)
    def collect(value: object) -> None:
        seen.add(type(value))

    collect()
    assert {bool, int, float, str, bytes, datetime.date, datetime.datetime, datetime.time} <= seen


# ---------------------------------------------------------------------------------- the CLI


@attrs.frozen
class Finished:
    """How a child ended: its status, output and peak resident memory (bytes)."""

    status: int
    stdout: str
    stderr: str
    max_rss: int


#: Runs ARGV... as a grandchild under RLIMIT_AS and writes "STATUS MAXRSS_KIB" to REPORT. Needed
#: because Linux carries the pre-exec memory's high-water mark into a child's ru_maxrss: a child
#: forked from this (large) test process would report the test's size, not its own.
_MEASURE: Final = """
import os, resource, sys
report, limit, *argv = sys.argv[1:]
pid = os.fork()
if pid == 0:
    resource.setrlimit(resource.RLIMIT_AS, (int(limit), int(limit)))
    os.execv(argv[0], argv)
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as file:
    file.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


def run_bounded(args: list[str], *, stdin: bytes = b"") -> Finished:
    """Run `python -m hvbridge ARGS` to its end, bounded in time and address space.

    The child's own peak RSS comes from wait4() in a small wrapper process (see _MEASURE).
    """
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.TemporaryFile() as inp,
        tempfile.TemporaryDirectory() as scratch,
    ):
        inp.write(stdin)
        inp.seek(0)
        report = os.path.join(scratch, "report")
        argv = [sys.executable, "-m", "hvbridge", *args]
        wrapper = subprocess.Popen(
            [sys.executable, "-c", _MEASURE, report, str(CHILD_ADDRESS_SPACE), *argv],
            stdin=inp,
            stdout=out,
            stderr=err,
            start_new_session=True,  # one process group: a timeout kills both
        )
        try:
            wrapper.wait(timeout=CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(wrapper.pid, signal.SIGKILL)
            wrapper.wait()
            raise AssertionError(f"hvbridge {' '.join(args)} did not end within {CHILD_TIMEOUT:g}s") from None
        with open(report, encoding="ascii") as file:
            status, max_rss = (int(field) for field in file.read().split())
        out.seek(0)
        err.seek(0)
        return Finished(
            status,
            out.read().decode("utf-8", "replace"),
            err.read().decode("utf-8", "replace"),
            max_rss * 1024,
        )


def assert_user_error(done: Finished, path: Path | str) -> list[str]:
    """Exit 1, no traceback, and every stderr line is `Error: PATH...`; the lines."""
    assert "Traceback" not in done.stderr, done.stderr
    assert done.status == 1, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines, "no error message"
    assert done.stderr.endswith("\n")
    for line in lines:
        assert line.startswith(f"Error: {path}"), line
        assert line.isprintable(), repr(line)
        assert len(line) < 1000, f"an error line of {len(line)} characters"
    assert done.max_rss < MAX_RSS, f"peak RSS {done.max_rss / MiB:.0f} MiB"
    return lines


def _deep(opening: str, middle: str, closing: str, depth: int) -> str:
    return opening * depth + middle + closing * depth


def _billion_laughs_yaml() -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    lines.append("routes: {x: {listen: *a9, connect: *a9, allow: *a9}}")
    return "\n".join(lines) + "\n"


def _merge_bomb_yaml() -> str:
    lines = ["m0: &m0 {k0: 1, k1: 1, k2: 1, k3: 1, k4: 1, k5: 1, k6: 1, k7: 1, k8: 1}"]
    for i in range(1, 10):
        lines.append(f"m{i}: &m{i} {{" + ", ".join(f"k{j}: *m{i - 1}" for j in range(9)) + "}")
    lines.append("routes: {x: {<<: *m9, listen: tcp://127.0.0.1:0, connect: tcp://127.0.0.1:1}}")
    lines.append("defaults: *m9")
    return "\n".join(lines) + "\n"


def _huge_routes_toml() -> str:
    route = '[routes.r{0}]\nlisten = "tcp://127.0.0.1:{1}"\nconnect = "tcp://127.0.0.1:1"\n\n'
    count = 50 * MiB // len(route.format(0, 0))
    return "".join(route.format(i, i % 65536) for i in range(count))


def _huge_routes_yaml() -> str:
    route = "  r{0}: {{listen: 'tcp://127.0.0.1:{1}', connect: 'tcp://127.0.0.1:1'}}\n"
    count = 50 * MiB // len(route.format(0, 0))
    return "routes:\n" + "".join(route.format(i, i % 65536) for i in range(count))


GARBAGE: Final = random.Random(6).randbytes(256 * 1024)
DEPTH: Final = 100_000

#: name -> (file name, content); content None means "do not create the file".
BAD_FILES: Final[dict[str, tuple[str, Callable[[], bytes] | None]]] = {
    "missing": ("missing.toml", None),
    "empty toml": ("routes.toml", lambda: b""),
    "empty yaml": ("routes.yaml", lambda: b""),
    "only comments": ("routes.toml", lambda: b"# nothing here\n"),
    "yaml null document": ("routes.yaml", lambda: b"---\n...\n"),
    "yaml list document": ("routes.yaml", lambda: b"- a\n- b\n"),
    "yaml scalar document": ("routes.yml", lambda: b"hello\n"),
    "binary toml": ("routes.toml", lambda: GARBAGE),
    "binary yaml": ("routes.yaml", lambda: GARBAGE),
    "nul bytes": ("routes.toml", lambda: b'[routes.a]\nlisten = "tcp://127.0.0.1:0"\x00\n'),
    "invalid utf-8 toml": (
        "routes.toml",
        lambda: b'[routes.a]\nlisten = "tcp://127.0.0.1:0\xff\xfe"\nconnect = "tcp://127.0.0.1:1"\n',
    ),
    "invalid utf-8 yaml": ("routes.yaml", lambda: b"routes:\n  a:\n    listen: \xc3\x28\n"),
    "utf-16 toml": ("routes.toml", lambda: '[routes.a]\nlisten = "tcp://127.0.0.1:0"\n'.encode("utf-16")),
    "huge comments": ("routes.toml", lambda: b"#" + b"x" * 78 + b"\n" * (50 * MiB // 80)),
    "huge one line": ("routes.toml", lambda: b'[routes.a]\nlisten = "' + b"a" * (50 * MiB) + b'"\n'),
    "huge routes toml": ("routes.toml", lambda: _huge_routes_toml().encode()),
    "huge routes yaml": ("routes.yaml", lambda: _huge_routes_yaml().encode()),
    "deep toml arrays": ("routes.toml", lambda: _deep("x = " + "[", "1", "]", DEPTH).encode()),
    "deep toml inline tables": ("routes.toml", lambda: ("x = " + _deep("{a = ", "1", "}", DEPTH)).encode()),
    "deep toml dotted keys": ("routes.toml", lambda: ("routes." + "a." * DEPTH + "listen = 1\n").encode()),
    "deep toml table header": ("routes.toml", lambda: ("[routes." + "a." * DEPTH + "b]\nlisten = 1\n").encode()),
    "deep yaml flow lists": ("routes.yaml", lambda: ("routes: " + _deep("[", "1", "]", DEPTH)).encode()),
    "deep yaml flow mappings": ("routes.yaml", lambda: ("routes: " + _deep("{a: ", "1", "}", DEPTH)).encode()),
    "deep yaml block": (
        "routes.yaml",
        lambda: "".join(" " * i + "a:\n" for i in range(3000)).encode(),
    ),
    "yaml billion laughs": ("routes.yaml", lambda: _billion_laughs_yaml().encode()),
    "yaml merge-key bomb": ("routes.yaml", lambda: _merge_bomb_yaml().encode()),
    "yaml alias as key": ("routes.yaml", lambda: b"a: &k [1, 2]\nroutes: {*k : 1}\n"),
    "yaml recursive alias": ("routes.yaml", lambda: b"routes: &r\n  a: *r\n"),
    "yaml python tag": (
        "routes.yaml",
        lambda: b"routes:\n  a:\n    listen: !!python/object/apply:os.mkdir ['pwned-by-yaml']\n",
    ),
    "yaml duplicate keys": ("routes.yaml", lambda: b"routes: {a: {listen: x}}\nroutes: {}\n"),
    "toml huge integer": ("routes.toml", lambda: b"[defaults]\nmax_connections = 1" + b"0" * 5000 + b"\n"),
    "yaml huge integer": ("routes.yaml", lambda: b"defaults: {max_connections: 1" + b"0" * 5000 + b"}\n"),
    "long unknown key": ("routes.toml", lambda: b"[defaults]\n" + b"k" * MiB + b" = 1\n"),
    "many unknown keys": ("routes.toml", lambda: "".join(f"[x{i}]\n" for i in range(20_000)).encode()),
    "control characters": ("routes.toml", lambda: b'[routes.a]\nlisten = "\x1b[31mred\x07"\n'),
}


@attrs.frozen
class Checked:
    """One bad-file case run through `hvbridge check`: the file, its directory before, the outcome."""

    path: Path
    before: list[str]
    done: Finished | AssertionError


def _check_case(directory: Path, case: str) -> Checked:
    name, content = BAD_FILES[case]
    path = directory / name
    if content is not None:
        path.write_bytes(content())
    before = sorted(p.name for p in directory.iterdir())
    try:
        done: Finished | AssertionError = run_bounded(["check", "-c", str(path)])
    except AssertionError as exc:  # timed out: reported by the case's own test
        done = exc
    return Checked(path, before, done)


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checked]:
    """Every BAD_FILES case, run a few at a time (each child is one process, mostly startup)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = {
            case: pool.submit(_check_case, tmp_path_factory.mktemp(f"bad-{i}"), case)
            for i, case in enumerate(BAD_FILES)
        }
        return {case: future.result() for case, future in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_FILES)
def test_check_bad_file_is_a_clean_user_error(checked: dict[str, Checked], case: str) -> None:
    """`hvbridge check -c FILE`: exit 1, `Error: FILE...` lines only, bounded time and memory."""
    result = checked[case]
    if isinstance(result.done, AssertionError):
        raise result.done
    done = result.done
    print(f"{case}: status {done.status}, peak RSS {done.max_rss / MiB:.0f} MiB, {len(done.stderr)} chars on stderr")
    assert_user_error(done, result.path)
    directory = result.path.parent
    assert sorted(p.name for p in directory.iterdir()) == result.before, "check created or removed files"
    assert not (directory / "pwned-by-yaml").exists()


@pytest.mark.slow
def test_check_a_directory_is_a_clean_user_error(tmp_path: Path) -> None:
    """A directory where the route table should be is one `Error:` line."""
    path = tmp_path / "routes.toml"
    path.mkdir()
    assert_user_error(run_bounded(["check", "-c", str(path)]), path)


@pytest.mark.slow
def test_check_a_fifo_is_a_clean_user_error(tmp_path: Path) -> None:
    """A FIFO with no writer where the route table should be: one `Error:` line, never a hang."""
    path = tmp_path / "routes.toml"
    os.mkfifo(path)  # open() of a FIFO for reading blocks until a writer comes: must not hang
    done = run_bounded(["check", "-c", str(path)])
    assert_user_error(done, path)


@pytest.mark.slow
@pytest.mark.parametrize("content", [GARBAGE, b"[routes.a\n", b"\xff\xfe\x00"], ids=["binary", "toml", "utf-16"])
def test_check_stdin_garbage_is_a_clean_user_error(content: bytes) -> None:
    """`-c -` reads TOML from stdin: garbage there is an `Error: <stdin>...` line too."""
    assert_user_error(run_bounded(["check", "-c", "-"], stdin=content), "<stdin>")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["binary toml", "yaml billion laughs", "deep yaml flow lists"])
def test_run_bad_file_is_a_clean_user_error(tmp_path: Path, case: str) -> None:
    """`hvbridge -c FILE` (run) rejects the same files the same way, before opening anything."""
    name, content = BAD_FILES[case]
    assert content is not None
    path = tmp_path / name
    path.write_bytes(content())
    assert_user_error(run_bounded(["-c", str(path)]), path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "endpoint", ["tcp://\nError: forged", "tcp://a\n::1", "unix:x\u2028Error: forged", "vsock://\x85"]
)
def test_forward_with_line_breaks_in_an_endpoint_is_one_error_line(endpoint: str) -> None:
    """An endpoint with line breaks cannot forge extra `Error:` lines (each problem is one line)."""
    done = run_bounded(["forward", endpoint, "tcp://127.0.0.1:1"])
    assert "Traceback" not in done.stderr, done.stderr
    assert done.status == 1, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("Error: LISTEN: "), line


def test_garbage_is_really_not_utf8() -> None:
    """A guard on the test data: the binary case is not accidentally valid text."""
    with pytest.raises(UnicodeDecodeError):
        GARBAGE.decode("utf-8")
    assert set(string.printable.encode()) & set(GARBAGE)


# ------------------------------------------------------------------- atheris (by hand, not CI)


def _atheris_main() -> None:  # pragma: no cover - run by hand: see the module docstring
    """Coverage-guided fuzzing of the same invariant with atheris (libFuzzer) for a while."""
    atheris = importlib.import_module("atheris")

    def one_input(data: bytes) -> None:
        provider = atheris.FuzzedDataProvider(data)
        kind = provider.ConsumeIntInRange(0, 3)
        text = provider.ConsumeUnicodeNoSurrogates(8192)
        try:
            if kind == 0:
                parse_address(text)
            elif kind == 1:
                parse_address(text, role="connect")
            else:
                parse_config(text, fmt="toml" if kind == 2 else "yaml", source="fuzz")
        except (AddressError, ConfigError):
            pass

    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":  # pragma: no cover
    _atheris_main()
