"""The problems found in a route table, where each key is, and how values are shown in messages.

Every message shows a value through describe()/quote(): never huge, never a raw repr of a
nested tree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs

from hvbridge.errors import ConfigError, Problem

KeyPath = tuple[str, ...]


ROUTE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class Invalid(ValueError):
    """One value is wrong; each message says what is wrong and what is expected."""

    def __init__(self, *messages: str) -> None:
        super().__init__(*messages)
        self.messages = messages


@attrs.define
class Report:
    """The problems found so far, and where each key of the file is (for line numbers)."""

    source: str
    lines: dict[KeyPath, int] = attrs.Factory(dict)
    problems: list[Problem] = attrs.Factory(list)

    def add(self, path: KeyPath, message: str, *, line: int | None = None) -> None:
        if line is None:
            line = self.line_of(path)
        location = ".".join(show_key(key) for key in path)
        self.problems.append(Problem(self.source, line, location, message))

    def line_of(self, path: KeyPath) -> int | None:
        # A key with no line of its own (missing, or inside a TOML inline table) takes the
        # line of its table. No further up: that line would likely belong to another table.
        line = self.lines.get(path)
        if line is None and len(path) > 1:
            line = self.lines.get(path[:-1])
        return line

    def error(self) -> ConfigError:
        return ConfigError(sorted(self.problems, key=lambda p: (p.line is None, p.line or 0)))


def describe(value: object) -> str:
    """A value as a message shows it: never huge, never a raw repr of a nested tree."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if abs(value) < 10**18 else "a very large integer"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return quote(value)
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def quote(text: str) -> str:
    return repr(text) if len(text) <= 60 else f"{text[:57]!r}..."


def show_key(key: str) -> str:
    return key if ROUTE_NAME.fullmatch(key) else quote(key)
