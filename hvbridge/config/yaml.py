"""The bounded YAML reader (YAML 1.2 through ruamel.yaml; `on`/`no` are strings).

Rules:
1. YAML aliases (billion laughs) and explicit YAML tags other than !!str/!!seq/!!map are
   refused, and YAML depth and node count are bounded while ruamel.yaml composes.
2. Line numbers come from ruamel.yaml's node marks.
"""

from __future__ import annotations

import sys
from typing import Final

from ruamel.yaml import YAML
from ruamel.yaml.composer import Composer
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import AliasEvent, MappingStartEvent, ScalarEvent, SequenceStartEvent
from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode
from ruamel.yaml.reader import ReaderError

from hvbridge.config.problems import KeyPath, Report, quote
from hvbridge.errors import ConfigError

# A route table nests 4 levels (routes.NAME.allow[i]); these bound what ruamel.yaml composes.
_MAX_YAML_DEPTH: Final = 32


_MAX_YAML_NODES: Final = 20_000


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


def load_yaml(text: str, report: Report) -> object:
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


def _yaml_value(yaml: YAML, node: object, path: KeyPath, report: Report) -> object:
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
        report.add(path, f"cannot read {quote(str(node.value))}: {why}; expected a string, number or boolean")
        return _OMIT
    return scalar
