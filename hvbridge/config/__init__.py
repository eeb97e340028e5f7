"""Route tables: the TOML/YAML text of docs/reference.md, "Route table" in, a frozen RouteTable or a ConfigError out.

This package owns the route table's schema, its defaults and every message about a bad file.
It is pure: it never imports trio and never creates sockets. parse_config() reports every
problem in one pass, each as `FILE:LINE: routes.NAME.KEY: what is wrong; what is expected`.

This module is the public face (load_config, parse_config, table_from_mapping, and the entry
points of its submodules); the rules live with their code:

- toml: the TOML reader and its line scanner (line numbers, dotted keys refused early).
- yaml: the bounded YAML reader (aliases, tags, depth and size refused while composing).
- schema: narrowing and validation of the parsed tree, defaults, ROUTE_KEYS.
- binds: listen endpoints compared by what they bind (ListenBinds, listen_conflicts).
- units: durations and sizes, read and written so that they read back exactly.
- problems: the report of problems with their lines, and how values are shown in messages.
- writer: format_table().

Rule kept here: any text given to parse_config() gives a RouteTable or a ConfigError, never
another exception, and in bounded time and memory, whoever wrote the file: files over 1 MiB
are refused before any parsing; each reader bounds the rest (see its header).
"""

from __future__ import annotations

import codecs
import os
import stat
import sys
from typing import TYPE_CHECKING, BinaryIO, Final, Literal, TextIO, assert_never

from hvbridge.config.binds import ListenBinds, listen_conflicts
from hvbridge.config.problems import Report
from hvbridge.config.schema import ROUTE_KEYS, table_from_data
from hvbridge.config.toml import load_toml
from hvbridge.config.units import parse_duration, parse_size
from hvbridge.config.writer import format_table
from hvbridge.config.yaml import load_yaml
from hvbridge.errors import ConfigError

if TYPE_CHECKING:
    from hvbridge.routes import RouteTable

Format = Literal["toml", "yaml"]


#: The source of a table built from a command's arguments (`forward`): it has no route names of its own.
COMMAND_LINE: Final = "<command line>"


#: Larger files are refused before parsing (docs/reference.md, "Route table": a route table is a
#: small hand-written file).
MAX_FILE_BYTES: Final = 1024 * 1024


_FORMATS: Final[dict[str, Format]] = {".toml": "toml", ".yaml": "yaml", ".yml": "yaml"}


_TOO_LARGE: Final = f"file is too large; expected at most 1 MiB ({MAX_FILE_BYTES} bytes)"


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
    report = Report(source)
    match fmt:
        case "toml":
            data = load_toml(text, report)
        case "yaml":
            data = load_yaml(text, report)
        case _:
            assert_never(fmt)
    return table_from_data(data, report)


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
    return table_from_data(data, Report(source))


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


__all__ = [
    "COMMAND_LINE",
    "MAX_FILE_BYTES",
    "ROUTE_KEYS",
    "Format",
    "ListenBinds",
    "format_table",
    "listen_conflicts",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
    "table_from_mapping",
]
