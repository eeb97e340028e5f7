"""Route tables: the TOML/YAML text of docs/reference.md, "Route table" in, a frozen RouteTable or a ConfigError out.

This module owns the route table's schema, its defaults and every message about a bad file.
It is pure: it never imports trio and never creates sockets. parse_config() reports every
problem in one pass, each as `FILE:LINE: routes.NAME.KEY: what is wrong; what is expected`.

Rules kept here:
- Any text given to parse_config() gives a RouteTable or a ConfigError, never another
  exception, and in bounded time and memory, whoever wrote the file: files over 1 MiB are refused; YAML
  aliases (billion laughs) and explicit YAML tags other than !!str/!!seq/!!map are refused,
  and YAML depth and node count are bounded while ruamel.yaml composes; TOML dotted keys of
  many parts (quadratic in tomllib) are refused before parsing, and TOML nested too deep for
  tomllib's recursion is reported, not raised.
- A value inherited from [defaults] is checked once, where it is written; a route only sees
  the valid defaults. mode/owner/group and vsock_buffer_size inherited by a route they do not
  apply to are dropped; written on that route, they are an error. An allow list is never
  dropped, since dropping a filter would let peers in.
- Parsed data is `object` and narrowed with isinstance by one small parser per key. cattrs is
  not used: its structuring errors name Python types and carry no line numbers, and every
  message docs/reference.md, "Validation" promises ("did you mean", host bits set, reported once at defaults.KEY)
  would need a hand-written hook per key anyway.
- Line numbers: YAML from ruamel.yaml's node marks; tomllib has no positions, so a light scan
  of the text finds each `[table]` header and `KEY =` line (best effort; a problem whose key
  has no line of its own takes the line of its table, else it has none).
- format_table() writes TOML that parses back to the same table (durations and sizes are
  written so that they read back exactly).
"""

from __future__ import annotations

import codecs
import decimal
import difflib
import ipaddress
import json
import math
import ntpath
import os
import posixpath
import re
import stat
import sys
import tomllib
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, BinaryIO, Final, Literal, TextIO, TypeVar, assert_never, cast, get_args

import attrs
from ruamel.yaml import YAML
from ruamel.yaml.composer import Composer
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import AliasEvent, MappingStartEvent, ScalarEvent, SequenceStartEvent
from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode
from ruamel.yaml.reader import ReaderError

from hvbridge.addresses import (
    VMADDR_CID_ANY,
    VMADDR_PORT_ANY,
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
from hvbridge.errors import AddressError, ConfigError, Problem
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
    from collections.abc import Collection, Iterator, Sequence

    from hvbridge.addresses import Role

Format = Literal["toml", "yaml"]


ROUTE_KEYS: Final = frozenset({"listen", "connect"} | {f.name for f in attrs.fields(RouteOptions)})

_T = TypeVar("_T")
_Path = tuple[str, ...]

#: The source of a table built from a command's arguments (`forward`): it has no route names of its own.
COMMAND_LINE: Final = "<command line>"
#: Larger files are refused before parsing (docs/reference.md, "Route table": a route table is a
#: small hand-written file).
MAX_FILE_BYTES: Final = 1024 * 1024
# A route table nests 4 levels (routes.NAME.allow[i]); these bound what ruamel.yaml composes.
_MAX_YAML_DEPTH: Final = 32
_MAX_YAML_NODES: Final = 20_000
_FORMATS: Final[dict[str, Format]] = {".toml": "toml", ".yaml": "yaml", ".yml": "yaml"}

_TOP_KEYS: Final = ("bridge", "defaults", "routes")
_ROUTE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)?")
_SIZE = re.compile(r"([0-9]{1,20})(B|KiB|MiB|GiB)?")
_MODE = re.compile(r"[0-7]{1,4}")
_KIB: Final = 1024
_MIB: Final = 1024 * 1024
_GIB: Final = 1024 * 1024 * 1024
_SIZE_UNITS: Final = {"B": 1, "KiB": _KIB, "MiB": _MIB, "GiB": _GIB}
_MAX_ID: Final = 2**32 - 2
_MAX_CID: Final = 2**32 - 1

_DURATION_FORMS: Final = "seconds, or a number with a unit ms, s, m or h"
_ENDPOINT_EXAMPLE: Final = "an endpoint such as 'tcp://127.0.0.1:8080'"
_TOO_LARGE: Final = f"file is too large; expected at most 1 MiB ({MAX_FILE_BYTES} bytes)"


class _Invalid(ValueError):
    """One value is wrong; each message says what is wrong and what is expected."""

    def __init__(self, *messages: str) -> None:
        super().__init__(*messages)
        self.messages = messages


@attrs.define
class _Report:
    """The problems found so far, and where each key of the file is (for line numbers)."""

    source: str
    lines: dict[_Path, int] = attrs.Factory(dict)
    problems: list[Problem] = attrs.Factory(list)

    def add(self, path: _Path, message: str, *, line: int | None = None) -> None:
        if line is None:
            line = self.line_of(path)
        location = ".".join(_show_key(key) for key in path)
        self.problems.append(Problem(self.source, line, location, message))

    def line_of(self, path: _Path) -> int | None:
        # A key with no line of its own (missing, or inside a TOML inline table) takes the
        # line of its table. No further up: that line would likely belong to another table.
        line = self.lines.get(path)
        if line is None and len(path) > 1:
            line = self.lines.get(path[:-1])
        return line

    def error(self) -> ConfigError:
        return ConfigError(sorted(self.problems, key=lambda p: (p.line is None, p.line or 0)))


# -- public API ---------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], fmt: Format | None = None) -> RouteTable:
    """Read and validate a route table file; `-` reads standard input (TOML unless `fmt` says).

    The format is `fmt` if given, else it comes from the extension: `.toml`, `.yaml` or `.yml`.

    Args:
        path: The file, or `-` for standard input (source `<stdin>` in messages).
        fmt: "toml" or "yaml" whatever the file's name (e.g. `routes.conf`), or None.

    Returns:
        The valid, resolved route table.

    Raises:
        ConfigError: The file cannot be read (missing, a directory, not permitted, not UTF-8,
            over 1 MiB), has an unknown extension, or has problems; all of them are listed.
    """
    name = os.fspath(path)
    if name == "-":
        return parse_config(_read_stdin(), fmt=fmt or "toml", source="<stdin>")
    if not name:
        raise ConfigError.single(
            "''", "", "an empty file name; expected the path of a route table file, or - for stdin"
        )
    text = _read_file(name)  # first: a missing file or a directory says so, whatever its name
    if fmt is None:
        extension = os.path.splitext(name)[1]
        fmt = _FORMATS.get(extension.lower())
        if fmt is None:
            wrong = f"unsupported file extension {extension!r}" if extension else "no file extension"
            raise ConfigError.single(name, "", f"{wrong}; expected .toml, .yaml or .yml, or --format toml|yaml")
    return parse_config(text, fmt=fmt, source=name)


def parse_config(text: str, *, fmt: Format, source: str) -> RouteTable:
    """Validate the text of a route table (docs/reference.md, "Route table") and resolve its defaults.

    Args:
        text: The whole file.
        fmt: "toml" or "yaml" (YAML 1.2: `on`/`no` are strings).
        source: The file name for messages, e.g. `routes.toml` or `<stdin>`.

    Returns:
        The valid route table; every route has every option resolved.

    Raises:
        ConfigError: Lists every problem, each as `FILE:LINE: LOCATION: what is wrong; what is
            expected`. Nothing else is raised, whatever the text.
    """
    if len(text) > MAX_FILE_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise ConfigError.single(source, "", _TOO_LARGE)
    report = _Report(source)
    match fmt:
        case "toml":
            data = _load_toml(text, report)
        case "yaml":
            data = _load_yaml(text, report)
        case _:
            assert_never(fmt)
    return _table(data, report)


def table_from_mapping(data: object, *, source: str) -> RouteTable:
    """Validate an already parsed route table tree, as parse_config() does for a file.

    The CLI's `forward` command uses it with `{"routes": {"forward": {...}}}`.

    Args:
        data: Nested mappings and lists of str, int, float and bool, like tomllib returns.
        source: Where it came from, for messages (e.g. `<command line>`).

    Returns:
        The valid route table.

    Raises:
        ConfigError: Lists every problem (without line numbers).
    """
    return _table(data, _Report(source))


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
    lines.append(f"shutdown_grace = {_toml_string(_format_duration(bridge.shutdown_grace))}")
    for route in table.routes:
        lines += ["", f"[routes.{_toml_key(route.name)}]"]
        lines += [f"{key} = {value}" for key, value in _route_items(route)]
    return "\n".join(lines) + "\n"


def parse_duration(value: object) -> float:
    """Read a duration: a non-negative number of seconds, or a string such as "250ms", "1.5s", "10m", "1h".

    Args:
        value: An int or float (not a bool), or a string of a number with an optional unit ms, s, m or h.

    Returns:
        The duration in seconds.

    Raises:
        ValueError: The value is not a finite, non-negative duration.
    """
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = None
    elif isinstance(value, str) and len(value) <= 400:  # longer is no float anyway
        match = _DURATION.fullmatch(value)
        if match is not None:
            number = float(match[1])
            unit = match[2]
            # Dividing (not multiplying by 0.001) keeps "250ms" exactly equal to 0.25.
            seconds = number / 1000 if unit == "ms" else number * {None: 1, "s": 1, "m": 60, "h": 3600}[unit]
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"got {_describe(value)}; expected a duration ({_DURATION_FORMS}, such as '5s')")
    return seconds


def parse_size(value: object) -> int:
    """Read a size in bytes: an int, or a string of digits with an optional unit B, KiB, MiB or GiB.

    Args:
        value: e.g. 65536, "65536", "64KiB", "1MiB".

    Returns:
        The size in bytes.

    Raises:
        ValueError: The value is not a non-negative size.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match is not None:
            return int(match[1]) * _SIZE_UNITS[match[2] or "B"]
    raise ValueError(f"got {_describe(value)}; expected a size (bytes, or a number with a unit B, KiB, MiB or GiB)")


# -- reading files ------------------------------------------------------------------------


def _read_file(name: str) -> str:
    if os.path.isdir(name):
        raise ConfigError.single(name, "", "is a directory; expected a route table file")
    try:
        # O_NONBLOCK: opening a FIFO must not wait forever for a writer; it is refused below.
        with open(os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise ConfigError.single(name, "", "not a regular file; expected a route table file")
            data = file.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        parent = os.path.dirname(name)
        if parent and not os.path.isdir(parent):
            message = f"no such directory {parent!r}; expected the path of a route table file"
            raise ConfigError.single(name, "", message) from None
        raise ConfigError.single(name, "", "no such file; expected the path of a route table file") from None
    except PermissionError:
        raise ConfigError.single(name, "", "permission denied; expected a file this user may read") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError.single(name, "", f"cannot read the file ({why}); expected a readable file") from exc
    return _decode(data, name)


def _read_stdin() -> str:
    stream: TextIO | None = sys.stdin
    if stream is None:
        raise ConfigError.single("<stdin>", "", "there is no standard input; expected the route table there")
    buffer: BinaryIO | None = getattr(stream, "buffer", None)
    if buffer is None:  # a text-only stream, e.g. io.StringIO in tests
        return stream.read(MAX_FILE_BYTES + 1)
    return _decode(buffer.read(MAX_FILE_BYTES + 1), "<stdin>")


def _decode(data: bytes, source: str) -> str:
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError.single(source, "", _TOO_LARGE)
    # Windows editors often save UTF-8 with a byte order mark; neither format wants it.
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        message = f"invalid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); expected a UTF-8 text file"
        raise ConfigError.single(source, "", message, line=line) from exc


# -- TOML ---------------------------------------------------------------------------------

_TOML_ERROR = re.compile(r"(?s)(.*) \(at (?:line (\d+), column (\d+)|end of document)\)")
_BARE_KEY = r"[A-Za-z0-9_-]+"
_KEY_ATOM = rf"""(?:{_BARE_KEY}|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')"""
_DOTTED_KEY = rf"{_KEY_ATOM}(?:[ \t]*\.[ \t]*{_KEY_ATOM})*"
_TOML_HEADER = re.compile(rf"[ \t]*\[\[?[ \t]*({_DOTTED_KEY})[ \t]*\]")
_TOML_KEY_LINE = re.compile(rf"[ \t]*({_DOTTED_KEY})[ \t]*=")
_TOML_KEY_ATOM = re.compile(_KEY_ATOM)
# A route table's deepest key is routes.NAME.KEY; dots inside quoted parts do not count.
_MAX_TOML_KEY_PARTS: Final = 8


def _load_toml(text: str, report: _Report) -> object:
    # tomllib takes time and memory quadratic in the parts of one dotted key, in a header, a
    # key line or an inline table (`a.a.a...` of 100 kB: minutes, gigabytes): refuse those first.
    for number, text_line in enumerate(text.split("\n"), start=1):
        if text_line.count(".") >= _MAX_TOML_KEY_PARTS and _toml_key_parts(text_line) > _MAX_TOML_KEY_PARTS:
            message = (
                f"a key has too many dotted parts; expected at most {_MAX_TOML_KEY_PARTS}, such as routes.NAME.KEY"
            )
            raise ConfigError.single(report.source, "", message, line=number)
    try:
        data: object = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line, message = _toml_error(str(exc), text)
        message = _toml_duplicate(message, text, line) or message
        raise ConfigError.single(report.source, "", f"invalid TOML: {message}", line=line) from exc
    except ValueError as exc:  # int() refuses integers of more than 4300 digits
        long_number = re.search(r"[0-9][0-9_]{99,}", text)
        line = None if long_number is None else text.count("\n", 0, long_number.start()) + 1
        message = f"invalid TOML: an integer is too long; expected at most {sys.get_int_max_str_digits()} digits"
        raise ConfigError.single(report.source, "", message, line=line) from exc
    except RecursionError as exc:
        message = "invalid TOML: arrays or inline tables are nested too deep; expected a few levels at most"
        raise ConfigError.single(report.source, "", message) from exc
    report.lines.update(_toml_lines(text))
    return data


_TOML_TWICE = re.compile(r"cannot declare \((.*)\) twice .*")


def _toml_duplicate(message: str, text: str, line: int | None) -> str | None:
    """tomllib's words for a key or table given twice, in the words of this module's messages."""
    twice = _TOML_TWICE.fullmatch(message)
    if twice is not None:
        table = ".".join(_show_key(part.strip().strip("'\"")) for part in twice[1].split(","))
        return f"table [{table}] is declared twice; expected each table once"
    if not message.startswith("cannot overwrite a value") or line is None:
        return None
    key = _TOML_KEY_LINE.match(text.split("\n")[line - 1])
    named = f" {_quote('.'.join(_toml_key_path(key[1])))}" if key is not None else ""
    return f"duplicate key{named}; expected each key once in a table"


def _toml_key_parts(line: str) -> int:
    """At least the parts of the longest dotted key on a TOML line, in linear time.

    Counts the dots in each run of key characters (blanks included); a quoted string counts as
    key characters, so that dots inside string values are not counted; a comment ends the line.
    A regex would backtrack on lines such as `"\\"\\"\\"...`.
    """
    most = dots = 0
    index = 0
    while index < len(line):
        char = line[index]
        if char in "\"'":
            index += 1
            while index < len(line) and line[index] != char:
                index += 2 if char == '"' and line[index] == "\\" else 1
        elif char == "#":
            break
        elif char == ".":
            dots += 1
            most = max(most, dots)
        elif not (char.isascii() and (char.isalnum() or char in "_- \t")):
            dots = 0
        index += 1
    return most + 1


def _toml_unquote(atom: str) -> str:
    if atom[0] == "'":
        return atom[1:-1]
    if atom[0] != '"':
        return atom
    # TOML basic strings escape as JSON does, except \UXXXXXXXX; such a key gets no line.
    try:
        value = json.loads(atom)
    except ValueError:
        return atom
    return value if isinstance(value, str) else atom


def _toml_error(text: str, document: str) -> tuple[int | None, str]:
    match = _TOML_ERROR.fullmatch(text)
    if match is None:
        return None, text
    message = match[1][:1].lower() + match[1][1:]
    if match[2] is None:
        return document.count("\n") + 1, f"{message} (at the end of the file)"
    return int(match[2]), f"{message} (column {match[3]})"


def _toml_lines(text: str) -> dict[_Path, int]:
    """Map each table and key path to the line that defines it, by a line-by-line scan."""
    lines: dict[_Path, int] = {}
    table: _Path = ()
    closing: str | None = None  # the delimiter of a multi-line string still open
    for number, line in enumerate(text.split("\n"), start=1):
        if closing is not None:
            if line.count(closing) % 2 == 1:
                closing = None
            continue
        header = _TOML_HEADER.match(line)
        if header is not None:
            table = _toml_key_path(header[1])
            _record_line(lines, table, number)
            continue
        key = _TOML_KEY_LINE.match(line)
        if key is not None:
            _record_line(lines, table + _toml_key_path(key[1]), number)
            rest = line[key.end() :]
            closing = next((d for d in ('"""', "'''") if rest.count(d) % 2 == 1), None)
    return lines


def _record_line(lines: dict[_Path, int], path: _Path, number: int) -> None:
    # Messages name paths of at most 3 keys (routes.NAME.KEY); deeper ones need no line.
    for end in range(1, min(len(path), 4) + 1):
        lines.setdefault(path[:end], number)


def _toml_key_path(dotted: str) -> _Path:
    parts: list[str] = []
    for match in _TOML_KEY_ATOM.finditer(dotted):
        atom = match.group()
        parts.append(_toml_unquote(atom))
    return tuple(parts)


# -- YAML ---------------------------------------------------------------------------------


class _YamlRefused(Exception):
    """The YAML composer stopped: an alias, or a tree too deep or too big."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _BoundedComposer(Composer):
    """ruamel.yaml's composer, refusing aliases and bounding the depth and size of the tree.

    Composing pulls events from the parser lazily, so these checks stop the scanner early too:
    ruamel's scanner is quadratic in the nesting of flow collections (`[[[[...` of 100 kB
    takes minutes), and aliases expand exponentially (billion laughs) once walked.
    """

    def __init__(self, loader: object = None) -> None:
        super().__init__(loader)
        self.warn_double_anchors = False  # harmless without aliases; and no warnings on stderr
        self.nodes = 0

    def compose_node(self, parent: object, index: object) -> object:
        event = self.parser.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, AliasEvent):
            raise _YamlRefused(line, f"YAML aliases (*{event.anchor}) are not supported; write the value out in full")
        # ruamel's constructors trust an explicit tag and fail in odd ways on values that do
        # not fit it (`!!int ""`: IndexError); the plain kinds are all a route table needs.
        tag = str(event.ctag) if event.ctag is not None else "!"
        if tag != "!" and tag != _PLAIN_TAGS[type(event)]:
            shown = tag.replace("tag:yaml.org,2002:", "!!")
            raise _YamlRefused(
                line, f"YAML tag {shown} is not supported; expected a plain value (quoted, for a string)"
            )
        if self.depth >= _MAX_YAML_DEPTH:
            raise _YamlRefused(line, f"nesting is too deep; expected at most {_MAX_YAML_DEPTH} levels")
        self.nodes += 1
        if self.nodes > _MAX_YAML_NODES:
            raise _YamlRefused(line, f"too many values; expected at most {_MAX_YAML_NODES}")
        return super().compose_node(parent, index)


def _load_yaml(text: str, report: _Report) -> object:
    yaml = YAML(typ="safe", pure=True)
    yaml.Composer = _BoundedComposer
    try:
        node: object = yaml.compose(text)
    except _YamlRefused as exc:
        raise ConfigError.single(report.source, "", exc.message, line=exc.line) from exc
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = None if mark is None else mark.line + 1
        # The context is either "while parsing ..." (noise) or the first half of the sentence
        # ("expected a single document in the stream", "but found another document").
        context = exc.context if exc.context and not str(exc.context).startswith("while") else None
        what = ", ".join(str(part) for part in (context, exc.problem) if part)
        raise ConfigError.single(report.source, "", f"invalid YAML: {what}", line=line) from exc
    except ReaderError as exc:  # a control character, say; the reader checks the whole text first
        line = text.count("\n", 0, exc.position) + 1
        message = f"invalid YAML: character U+{exc.character:04X} is not allowed; expected printable text"
        raise ConfigError.single(report.source, "", message, line=line) from exc
    if node is None:  # an empty document
        return None
    return _yaml_value(yaml, node, (), report)


_PLAIN_TAGS: Final = {
    ScalarEvent: "tag:yaml.org,2002:str",
    SequenceStartEvent: "tag:yaml.org,2002:seq",
    MappingStartEvent: "tag:yaml.org,2002:map",
}
_OMIT: Final = object()  # a YAML value already reported as unreadable


def _yaml_value(yaml: YAML, node: object, path: _Path, report: _Report) -> object:
    # The composer bounds the depth, so this recursion is bounded too.
    if isinstance(node, MappingNode):
        table: dict[str, object] = {}
        first_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, ScalarNode):
                kind = "a table" if isinstance(key_node, MappingNode) else "a list"
                report.add(path, f"got {kind} as a key; expected plain string keys", line=line)
                continue
            # Keys keep their text: `80:` and `"80":` both name the key "80", as in TOML.
            key = str(key_node.value)
            if key in first_lines:
                message = f"duplicate key (first on line {first_lines[key]}); expected each key once"
                report.add((*path, key), message, line=line)
                continue
            first_lines[key] = line
            report.lines[(*path, key)] = line
            value = _yaml_value(yaml, value_node, (*path, key), report)
            if value is not _OMIT:
                table[key] = value
        return table
    if isinstance(node, SequenceNode):
        items = [_yaml_value(yaml, item, path, report) for item in node.value]
        return [item for item in items if item is not _OMIT]
    assert isinstance(node, ScalarNode)
    if str(node.tag).endswith(":int") and len(str(node.value)) > sys.get_int_max_str_digits():
        report.add(path, f"integer is too long; expected at most {sys.get_int_max_str_digits()} digits")
        return _OMIT
    try:
        scalar: object = yaml.constructor.construct_object(node, deep=True)
    except (YAMLError, ValueError) as exc:  # `a: <<` (a merge key as a value); a date such as 2001-13-40
        why = exc.problem if isinstance(exc, MarkedYAMLError) and exc.problem else str(exc).split(";")[0]
        report.add(path, f"cannot read {_quote(str(node.value))}: {why}; expected a string, number or boolean")
        return _OMIT
    return scalar


# -- validation ---------------------------------------------------------------------------


def _table(data: object, report: _Report) -> RouteTable:
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
            report.add(("bridge", "metrics"), _overlap_message(bridge.metrics, other, "an endpoint of its own"))
    if report.problems:
        raise report.error()
    return RouteTable(routes=routes, bridge=bridge, source=report.source)


def _as_table(value: object, path: _Path, report: _Report, expected: str) -> dict[str, object] | None:
    if not isinstance(value, Mapping):
        report.add(path, f"got {_describe(value)}; expected {expected}")
        return None
    table: dict[str, object] = {}
    for key, item in value.items():
        if isinstance(key, str):
            table[key] = item
        else:
            report.add(path, f"got the key {_describe(key)}; expected string keys")
    return table


def _parse_keys(
    table: Mapping[str, object],
    path: _Path,
    parsers: Mapping[str, Callable[[object], object]],
    report: _Report,
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
        except _Invalid as exc:
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


def _bridge(value: object, report: _Report) -> BridgeSettings:
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


def _defaults(value: object, report: _Report) -> dict[str, object]:
    table = {} if value is None else _as_table(value, ("defaults",), report, "a table of route options")
    if table is None:
        return {}
    why = "has no default; expected it in each [routes.NAME] table"
    refused = {"listen": f"listen {why}", "connect": f"connect {why}"}
    return _parse_keys(table, ("defaults",), _OPTION_PARSERS, report, refused=refused)


def _routes(
    value: object, defaults: Mapping[str, object], listeners: ListenBinds, report: _Report
) -> tuple[Route, ...]:
    table = {} if value is None else _as_table(value, ("routes",), report, "a table with one table per route")
    if table is None:
        return ()
    if not table:
        report.add(("routes",), "no routes; expected at least one [routes.NAME] table")
        return ()
    routes = []
    for name, body in table.items():
        if not _ROUTE_NAME.fullmatch(name):
            report.add(("routes", name), "invalid route name; expected 1 to 64 of the characters A-Z a-z 0-9 _ . -")
        route = _route(name, body, defaults, listeners, report)
        if route is not None:
            routes.append(route)
    return tuple(routes)


def _route(
    name: str, body: object, defaults: Mapping[str, object], listeners: ListenBinds, report: _Report
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
            report.add((*path, "listen"), _overlap_message(listen, other, "each route to listen on its own endpoint"))
        _check_applies(listen, connect, options, set(values), path, report)
    if len(report.problems) > before or listen is None or connect is None:
        return None
    return Route(name, listen, connect, _route_options(options))


def _endpoint(table: Mapping[str, object], path: _Path, role: Role, report: _Report) -> Address | None:
    if role not in table:
        report.add((*path, role), f"missing; expected {_ENDPOINT_EXAMPLE}")
        return None
    try:
        return _parse_endpoint(table[role], role)
    except _Invalid as exc:
        report.add((*path, role), exc.messages[0])
        return None


def _check_applies(
    listen: Address,
    connect: Address | None,
    options: dict[str, object],
    explicit: set[str],
    path: _Path,
    report: _Report,
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
            yield f"rule {_quote(str(rule))}{origin} does not apply to a {family} listener; expected {wanted}"


#: A host name -> the IP addresses (text) a listener on it binds; [] when it does not resolve.
Resolve = Callable[[str], "Sequence[str]"]
# (family, port or service, host/CID/path/VM, wildcard): one thing a listener binds.
_BindKey = tuple[str, object, object, bool]
_HV_WILDCARD: Final = uuid.UUID(int=0)


def _bind_keys(address: Address, resolve: Resolve | None) -> list[_BindKey]:
    """What a listener on `address` binds; [] when each bind gets its own (port 0, port any)."""
    match address:
        case TcpAddress(port=0) | StdioAddress():
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
        case VsockAddress(port=port) if port == VMADDR_PORT_ANY:
            return []
        case VsockAddress(cid=cid, port=port):
            return [("vsock", port, cid, cid == VMADDR_CID_ANY)]
        case UnixAddress(abstract=True):
            return [("unix-abstract", 0, address.path, False)]
        case UnixAddress():
            return [("unix", 0, os.path.normpath(address.path), False)]
        case VsockMuxAddress():  # the listen side binds PATH_PORT (docs/reference.md, "Endpoints")
            return [("unix", 0, os.path.normpath(f"{address.path}_{address.port}"), False)]
        case HyperVAddress(vm=vm, service_id=service):
            return [("hvsock", service, vm.casefold() if isinstance(vm, str) else vm, vm == _HV_WILDCARD)]
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


def _overlap_message(address: Address, other: tuple[str, Address], expected: str) -> str:
    name, endpoint = other
    if endpoint == address:
        return f"{_quote(str(address))} is also the listen endpoint of route {name!r}; expected {expected}"
    return (
        f"{_quote(str(address))} binds what routes.{_show_key(name)}.listen ({_quote(str(endpoint))}) binds;"
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
            message = _overlap_message(route.listen, other, "each route to listen on its own endpoint")
            problems.append(Problem(table.source, None, f"routes.{_show_key(route.name)}.listen", message))
    if table.bridge.metrics is not None:
        other = binds.find(table.bridge.metrics)
        if other is not None:
            message = _overlap_message(table.bridge.metrics, other, "an endpoint of its own")
            problems.append(Problem(table.source, None, "bridge.metrics", message))
    return problems


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


# -- text for messages and for format_table() ---------------------------------------------


def _describe(value: object) -> str:
    """A value as a message shows it: never huge, never a raw repr of a nested tree."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if abs(value) < 10**18 else "a very large integer"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return _quote(value)
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def _quote(text: str) -> str:
    return repr(text) if len(text) <= 60 else f"{text[:57]!r}..."


def _show_key(key: str) -> str:
    return key if _ROUTE_NAME.fullmatch(key) else _quote(key)


def _toml_string(text: str) -> str:
    # JSON string escapes are TOML basic-string escapes, except that TOML also forbids DEL.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(name: str) -> str:
    return name if re.fullmatch(_BARE_KEY, name) else _toml_string(name)


def _format_duration(seconds: float) -> str:
    """The shortest duration text that parse_duration() reads back as exactly `seconds`."""
    seconds = float(seconds)
    if seconds.is_integer() and seconds < 2**53:
        whole = int(seconds)
        for unit, size in (("h", 3600), ("m", 60)):
            if whole and whole % size == 0:
                return f"{whole // size}{unit}"
        return f"{whole}s"
    millis = seconds * 1000
    if millis.is_integer() and millis < 2**53:
        text = f"{int(millis)}ms"
        if parse_duration(text) == seconds:
            return text
    # repr() is the shortest text that reads back exactly; write it without an exponent.
    return f"{decimal.Decimal(repr(seconds)):f}s"


def _format_size(size: int) -> str:
    for unit, scale in (("GiB", _GIB), ("MiB", _MIB), ("KiB", _KIB)):
        if size and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def _toml_size(size: int) -> str:
    text = _format_size(size)
    return _toml_string(text) if text.endswith("B") else text


def _route_items(route: Route) -> Iterator[tuple[str, str]]:
    options = route.options
    unix_listener = isinstance(route.listen, UnixAddress | VsockMuxAddress) and not (
        isinstance(route.listen, UnixAddress) and route.listen.abstract
    )
    default = RouteOptions()
    yield "listen", _toml_string(str(route.listen))
    yield "connect", _toml_string(str(route.connect))
    yield "connect_timeout", _toml_string(_format_duration(options.connect_timeout))
    yield "connect_retries", str(options.connect_retries)
    yield "idle_timeout", _toml_string(_format_duration(options.idle_timeout))
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


# -- one parser per key: narrow `object`, or raise _Invalid saying what was expected --------


def _parse_endpoint(value: object, role: Role) -> Address:
    if not isinstance(value, str):
        raise _Invalid(f"got {_describe(value)}; expected {_ENDPOINT_EXAMPLE}")
    try:
        if isinstance(parse_address(value), StdioAddress):
            raise _Invalid(f"stdio is only for `hvbridge connect`; expected {_ENDPOINT_EXAMPLE}")
        return parse_address(value, role=role)
    except AddressError as exc:
        raise _Invalid(str(exc)) from None


def _parse_log_file(value: object) -> str:
    # Absolute in either form: a scheduled task or service starts in C:\Windows\System32 and a
    # unit in /, so a relative path would land there. ntpath also reads C:/x and \\server\share.
    if not isinstance(value, str) or "\0" in value or not (posixpath.isabs(value) or ntpath.isabs(value)):
        raise _Invalid(
            f"got {_describe(value)}; expected an absolute file path such as"
            " 'C:\\ProgramData\\hvbridge\\hvbridge.log' or '/var/log/hvbridge.log'"
        )
    return value


def _parse_metrics(value: object) -> Address:
    expected = "expected tcp://HOST:PORT, unix:///PATH or unix:@NAME, such as 'tcp://127.0.0.1:9477'"
    try:
        address = _parse_endpoint(value, "listen")
    except _Invalid as exc:
        # The endpoint parser lists every family; metrics speaks only HTTP over TCP or Unix.
        what = exc.messages[0].partition(";")[0]
        raise _Invalid(f"{what}; {expected}") from None
    if not isinstance(address, TcpAddress | UnixAddress):
        raise _Invalid(f"got {_quote(str(address))}; {expected}")
    return address


def _duration_parser(expected: str, *, positive: bool = False) -> Callable[[object], float]:
    def parse(value: object) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError:
            seconds = None
        if seconds is None or (positive and seconds == 0):
            raise _Invalid(f"got {_describe(value)}; expected {expected}")
        return seconds

    return parse


def _int_parser(low: int, high: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return value
        raise _Invalid(f"got {_describe(value)}; expected an integer {low}..{high}")

    return parse


def _size_parser(low: int, high: int, example: str) -> Callable[[object], int]:
    expected = (
        f"a size {_format_size(low)}..{_format_size(high)}"
        f" (bytes, or a number with a unit B, KiB, MiB or GiB, such as '{example}')"
    )

    def parse(value: object) -> int:
        try:
            size = parse_size(value)
        except ValueError:
            size = None
        if size is None or not low <= size <= high:
            raise _Invalid(f"got {_describe(value)}; expected {expected}")
        return size

    return parse


def _parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise _Invalid(f"got {_describe(value)}; expected true or false")


def _choice_parser(choices: tuple[str, ...]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if isinstance(value, str) and value in choices:
            return value
        raise _Invalid(f"got {_describe(value)}; expected one of: {', '.join(choices)}")

    return parse


def _parse_mode(value: object) -> int:
    if isinstance(value, str) and _MODE.fullmatch(value) and int(value, 8) <= 0o777:
        return int(value, 8)
    expected = 'a quoted string of octal digits 0000..0777, such as "0660"'
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**18:
        # TOML's 0o660 arrives as the number 432, YAML 1.2's unquoted 0660 as 660: say what was
        # read, in octal too, and that the mode must be a string.
        raise _Invalid(f'got the number {value} (octal {value:o}); the mode must be a string, such as "0660"')
    raise _Invalid(f"got {_describe(value)}; expected {expected}")


def _id_parser(what: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if isinstance(value, str) and value and "\0" not in value:
            return value
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_ID:
            return str(value)
        raise _Invalid(f"got {_describe(value)}; expected a {what} name or a numeric id 0..{_MAX_ID}")

    return parse


def _parse_allow(value: object) -> tuple[AllowRule, ...]:
    if not isinstance(value, list | tuple):
        raise _Invalid(
            f"got {_describe(value)}; expected a list of rules such as ['127.0.0.0/8'], ['cid:3'] or ['vm:my-vm']"
        )
    rules: list[AllowRule] = []
    messages: list[str] = []
    for item in value:
        try:
            rules.append(_parse_rule(item))
        except _Invalid as exc:
            messages += exc.messages
    if messages:
        raise _Invalid(*messages)
    return tuple(rules)


def _parse_rule(item: object) -> AllowRule:
    if not isinstance(item, str):
        raise _Invalid(
            f"got {_describe(item)} in the list; expected strings such as '127.0.0.0/8', 'cid:3' or 'vm:my-vm'"
        )
    if item.startswith("cid:"):
        digits = item[len("cid:") :]
        if digits.isascii() and digits.isdigit() and len(digits) <= 10 and int(digits) <= _MAX_CID:
            return CidRule(int(digits))
        raise _Invalid(f"invalid rule {_quote(item)}; expected cid:N with N an integer 0..{_MAX_CID}")
    if item.startswith("vm:"):
        return VmRule(_parse_vm(item))
    try:
        return ipaddress.ip_network(item)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(item, strict=False)
    except ValueError:
        raise _Invalid(
            f"invalid rule {_quote(item)}; expected a CIDR such as '127.0.0.0/8' or '::1', cid:N or vm:GUID"
        ) from None
    raise _Invalid(f"invalid rule {_quote(item)}: host bits are set; did you mean '{loose}'?")


def _parse_vm(item: str) -> uuid.UUID | str:
    text = item[len("vm:") :]
    if not text or "/" in text:
        raise _Invalid(f"invalid rule {_quote(item)}; expected vm:GUID or vm:NAME")
    # A VM is spelled as in hvsock://VM/SERVICE; let addresses.py read it the same way.
    try:
        address = parse_address(f"hvsock://{text}/0")
    except AddressError as exc:
        raise _Invalid(f"invalid rule {_quote(item)}: {exc}") from None
    assert isinstance(address, HyperVAddress)
    return address.vm


_OPTION_PARSERS: Final[dict[str, Callable[[object], object]]] = {
    "connect_timeout": _duration_parser(f"a duration greater than 0 ({_DURATION_FORMS}, such as '5s')", positive=True),
    "connect_retries": _int_parser(0, 100),
    "idle_timeout": _duration_parser(f"a duration ({_DURATION_FORMS}, such as '10m'), or 0 for none"),
    "max_connections": _int_parser(1, 1_000_000),
    "half_close": _parse_bool,
    "buffer_size": _size_parser(_KIB, 16 * _MIB, "64KiB"),
    "allow": _parse_allow,
    "mode": _parse_mode,
    "owner": _id_parser("user"),
    "group": _id_parser("group"),
    "vsock_buffer_size": _size_parser(_KIB, _GIB, "256KiB"),
    "connected_suspend": _parse_bool,
    "proxy_protocol": _choice_parser(get_args(ProxyProtocol)),
    "accept_proxy": _parse_bool,
}

_BRIDGE_PARSERS: Final[dict[str, Callable[[object], object]]] = {
    "log_level": _choice_parser(get_args(LogLevel)),
    "log_format": _choice_parser(get_args(LogFormat)),
    "log_file": _parse_log_file,
    "metrics": _parse_metrics,
    "shutdown_grace": _duration_parser(f"a duration ({_DURATION_FORMS}, such as '10s')"),
}
