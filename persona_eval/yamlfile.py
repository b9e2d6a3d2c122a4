"""YAML configuration files read with the line of every key and list item, so errors cite file:line: field."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from persona_eval.errors import ConfigError

__all__ = ["YamlDocument", "child_path", "item_path", "load_yaml", "parse_yaml"]

_MERGE_TAG = "tag:yaml.org,2002:merge"
# The last component of a key path: ".key" or "[index]".
_LAST_COMPONENT = re.compile(r"(\.[^.\[\]]*|\[\d+\])$")


def child_path(parent: str, key: object) -> str:
    """The key path of `key` inside the mapping at `parent`: ``models.llama-8b`` + ``dtype``."""
    return f"{parent}.{key}" if parent else str(key)


def item_path(parent: str, index: int) -> str:
    """The key path of item `index` of the list at `parent`: ``triage.bounds[0]``."""
    return f"{parent}[{index}]"


@dataclass(frozen=True)
class YamlDocument:
    """One YAML file: its plain data (dicts, lists, scalars) and the 1-based line of every key path.

    Key paths join mapping keys with dots and list indices in brackets (``triage.bounds[0].max``); the
    document itself is the empty path.
    """

    path: Path
    data: Any
    lines: Mapping[str, int] = field(default_factory=dict)
    raw: bytes = b""

    def line(self, key_path: str) -> int | None:
        """The line of `key_path`, or of the nearest enclosing key that has one (a key that is missing
        is reported at the entry that lacks it)."""
        while True:
            if key_path in self.lines:
                return self.lines[key_path]
            shorter = _LAST_COMPONENT.sub("", key_path)
            if shorter == key_path or not key_path:
                return None
            key_path = shorter

    def where(self, key_path: str = "") -> str:
        """``file:line: key.path`` for messages; the parts that are unknown are left out."""
        line = self.line(key_path)
        location = f"{self.path}:{line}" if line is not None else str(self.path)
        return f"{location}: {key_path}" if key_path else location

    def error(self, key_path: str, message: str) -> ConfigError:
        """A one-line ConfigError at `key_path`: ``file:line: key.path: message``."""
        return ConfigError(f"{self.where(key_path)}: {' '.join(message.split())}")


def load_yaml(path: str | Path, *, kind: str) -> YamlDocument:
    """The YAML file at `path` (`kind` names it in messages: "models file"), refusing a key given twice
    in one mapping, which plain YAML loaders resolve silently in favour of the last."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {kind} ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return parse_yaml(text, path=path, raw=raw)


def parse_yaml(text: str, *, path: str | Path, raw: bytes = b"") -> YamlDocument:
    """The YAML document in `text`; `path` names it in messages."""
    path = Path(path)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines: dict[str, int] = {}
        if node is not None:
            _record_lines(node, "", lines, path, set())
            data = loader.construct_document(node)
        else:
            data = None
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error_message(path, text, exc)) from None
    finally:
        loader.dispose()
    return YamlDocument(path=path, data=data, lines=lines, raw=raw)


def _key_text(node: yaml.Node) -> str:
    return str(node.value) if isinstance(node, yaml.ScalarNode) else "?"


def _record_lines(node: yaml.Node, key_path: str, lines: dict[str, int], path: Path,
                  active: set[int]) -> None:
    # An alias can point back at a node that contains it; such a node is walked once.
    if id(node) in active:
        return
    active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = _key_text(key_node)
            line = key_node.start_mark.line + 1
            child = child_path(key_path, key)
            if isinstance(key_node, yaml.ScalarNode):
                identity = (key_node.tag, key)
                if identity in first_line:
                    raise ConfigError(f"{path}:{line}: {child}: duplicate key {key!r} (first given on line "
                                      f"{first_line[identity]}); give each key once")
                first_line[identity] = line
            lines.setdefault(child, line)
            _record_lines(value_node, child, lines, path, active)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = item_path(key_path, index)
            lines.setdefault(child, item.start_mark.line + 1)
            _record_lines(item, child, lines, path, active)
    active.discard(id(node))


def _yaml_error_message(path: Path, text: str, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    if mark is None:
        return f"{path}: not valid YAML: {problem}"
    source_lines = text.splitlines()
    source = source_lines[mark.line].strip() if mark.line < len(source_lines) else ""
    quoted = f": {source!r}" if source else ""
    return f"{path}:{mark.line + 1}: not valid YAML ({problem}){quoted}"
