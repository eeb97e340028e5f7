"""The TOML reader: tomllib, plus what tomllib lacks for good messages.

Rules:
1. TOML dotted keys of many parts (quadratic in tomllib) are refused before parsing, and TOML
   nested too deep for tomllib's recursion is reported, not raised.
2. Line numbers: tomllib has no positions, so a light scan of the text finds each `[table]`
   header and `KEY =` line (best effort; a problem whose key has no line of its own takes the
   line of its table, else it has none).
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from typing import Final

from hvbridge.config.problems import KeyPath, Report, quote, show_key
from hvbridge.errors import ConfigError

_TOML_ERROR = re.compile(r"(?s)(.*) \(at (?:line (\d+), column (\d+)|end of document)\)")


BARE_KEY = r"[A-Za-z0-9_-]+"


_KEY_ATOM = rf"""(?:{BARE_KEY}|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')"""


_DOTTED_KEY = rf"{_KEY_ATOM}(?:[ \t]*\.[ \t]*{_KEY_ATOM})*"


_TOML_HEADER = re.compile(rf"[ \t]*\[\[?[ \t]*({_DOTTED_KEY})[ \t]*\]")


_TOML_KEY_LINE = re.compile(rf"[ \t]*({_DOTTED_KEY})[ \t]*=")


_TOML_KEY_ATOM = re.compile(_KEY_ATOM)


# A route table's deepest key is routes.NAME.KEY; dots inside quoted parts do not count.
_MAX_TOML_KEY_PARTS: Final = 8


def load_toml(text: str, report: Report) -> object:
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
        table = ".".join(show_key(part.strip().strip("'\"")) for part in twice[1].split(","))
        return f"table [{table}] is declared twice; expected each table once"
    if not message.startswith("cannot overwrite a value") or line is None:
        return None
    key = _TOML_KEY_LINE.match(text.split("\n")[line - 1])
    named = f" {quote('.'.join(_toml_key_path(key[1])))}" if key is not None else ""
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


def _toml_lines(text: str) -> dict[KeyPath, int]:
    """Map each table and key path to the line that defines it, by a line-by-line scan."""
    lines: dict[KeyPath, int] = {}
    table: KeyPath = ()
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


def _record_line(lines: dict[KeyPath, int], path: KeyPath, number: int) -> None:
    # Messages name paths of at most 3 keys (routes.NAME.KEY); deeper ones need no line.
    for end in range(1, min(len(path), 4) + 1):
        lines.setdefault(path[:end], number)


def _toml_key_path(dotted: str) -> KeyPath:
    parts: list[str] = []
    for match in _TOML_KEY_ATOM.finditer(dotted):
        atom = match.group()
        parts.append(_toml_unquote(atom))
    return tuple(parts)
