"""YAML to plain data, keeping the line and column of every node.

We walk ``yaml.compose`` nodes ourselves instead of ``yaml.safe_load`` because safe_load silently keeps
the last of two duplicate keys, forgets positions, and expands aliases without limit (a "billion laughs"
document would exhaust memory). Here every visit of a node counts against a budget, so an alias bomb
stops after a few thousand nodes with a clear message. ``${VAR}`` interpolation happens during the walk.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from llamactl.errors import Problem

PathKey = tuple[str | int, ...]

# Far above any real inventory (the example has ~150 nodes); an alias bomb hits it within milliseconds.
MAX_NODES = 20_000
MAX_DEPTH = 40  # inventories are ~5 levels deep; a recursive alias would otherwise recurse forever
MAX_ALIASES = 1_000  # nodes reached again through aliases (a shared mapping reused by many hosts is fine)

_INTERP = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Pos:
    """Where a value sits: the position of its key (for mapping entries) and of the value itself."""

    key_line: int
    key_col: int
    line: int
    col: int


@dataclass
class Tree:
    """The parsed document: plain data plus positions keyed by path."""

    data: Any
    positions: dict[PathKey, Pos] = field(default_factory=dict)
    # Original text of strings that used ${VAR}: shown in messages instead of the (maybe secret) value.
    raw: dict[PathKey, str] = field(default_factory=dict)
    # Strings whose interpolation failed: already reported, so their (empty) value is not judged again.
    broken: set[PathKey] = field(default_factory=set)


def dotted(path: PathKey) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


class _Alias(yaml.Node):  # type: ignore[misc]
    """An alias reference kept as its own node, so a refusal can name the line that used the alias."""

    def __init__(self, target: yaml.Node, mark: yaml.Mark) -> None:
        super().__init__(target.tag, target.value, mark, mark)
        self.target = target


class _Loader(yaml.SafeLoader):  # type: ignore[misc]
    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            return _Alias(super().compose_node(parent, index), mark)
        return super().compose_node(parent, index)


class _Budget(Exception):
    def __init__(self, mark: yaml.Mark, message: str) -> None:
        self.mark = mark
        self.message = message


class _Walker:
    def __init__(self, filename: str, env: Mapping[str, str]) -> None:
        self.filename = filename
        self.env = env
        self.problems: list[Problem] = []
        self.tree = Tree(None)
        self.visits = 0
        self.aliases = 0
        self.alias_sites: list[yaml.Mark] = []  # the alias references being expanded, outermost first
        self.constructor = yaml.SafeLoader("")

    def problem(self, node_mark: yaml.Mark, path: PathKey, message: str) -> None:
        self.problems.append(
            Problem(self.filename, node_mark.line + 1, node_mark.column + 1, dotted(path), message)
        )

    def walk(self, node: yaml.Node, path: PathKey) -> Any:
        if len(path) > MAX_DEPTH:
            mark = self.alias_sites[0] if self.alias_sites else node.start_mark
            raise _Budget(mark, f"found nesting deeper than {MAX_DEPTH} levels, expected a shallow inventory "
                          "(a recursive alias?)")
        if isinstance(node, _Alias):
            self.alias_sites.append(node.start_mark)
            try:
                return self.walk(node.target, path)
            finally:
                self.alias_sites.pop()
        self.visits += 1
        if self.alias_sites:
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise _Budget(self.alias_sites[0],
                              f"found more than {MAX_ALIASES} nodes expanded from aliases, "
                              f"expected at most {MAX_ALIASES} (refusing a possible alias bomb)")
        if self.visits > MAX_NODES:
            raise _Budget(node.start_mark, f"found more than {MAX_NODES} nodes after expanding aliases, "
                          f"expected at most {MAX_NODES} (refusing a possible alias bomb)")
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self._child(item, item, path + (i,)) for i, item in enumerate(node.value)]
        return self._scalar(node, path)

    def _child(self, key_node: yaml.Node, value_node: yaml.Node, path: PathKey) -> Any:
        km, vm = key_node.start_mark, value_node.start_mark
        self.tree.positions[path] = Pos(km.line + 1, km.column + 1, vm.line + 1, vm.column + 1)
        return self.walk(value_node, path)

    def _mapping(self, node: yaml.MappingNode, path: PathKey) -> dict[str, Any]:
        out: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            while isinstance(key_node, _Alias):
                key_node = key_node.target
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(key_node.start_mark, path, "found a complex mapping key, expected a plain name")
                continue
            key = str(key_node.value)
            if key == "<<":
                self.problem(key_node.start_mark, path + (key,),
                             "found a YAML merge key (<<), expected plain keys (use defaults and groups)")
                continue
            if key in first_line:
                self.problem(key_node.start_mark, path + (key,),
                             f'found a duplicate key "{key}" (first on line {first_line[key]}), '
                             "expected each key once")
                continue
            first_line[key] = key_node.start_mark.line + 1
            out[key] = self._child(key_node, value_node, path + (key,))
        return out

    def _scalar(self, node: yaml.Node, path: PathKey) -> Any:
        try:
            value = self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            self.problem(node.start_mark, path, f"found tag {node.tag}, expected a plain YAML value ({exc})")
            return None
        if isinstance(value, str) and "$" in value:
            text = self._interpolate(value, node, path)
            if node.style is None and path in self.tree.raw and path not in self.tree.broken:
                # An unquoted `port: ${PORT}` means the number, as if PORT's value were written there.
                tag = self.constructor.resolve(yaml.ScalarNode, text, (True, False))
                return self.constructor.construct_object(yaml.ScalarNode(tag, text), deep=True)
            return text
        return value

    def _interpolate(self, text: str, node: yaml.Node, path: PathKey) -> str:
        used = False

        def repl(match: re.Match[str]) -> str:
            nonlocal used
            token = match.group(0)
            if token == "$${":
                return "${"
            name = match.group(1)
            if name is None or not _ENV_NAME.match(name):
                self.tree.broken.add(path)
                self.problem(node.start_mark, path,
                             f'found "{token}" in "{text}", '
                             "expected ${NAME} (write $${ for a literal ${)")
                return token
            used = True
            if name not in self.env:
                self.tree.broken.add(path)
                self.problem(node.start_mark, path,
                             f"found ${{{name}}} but environment variable {name} is not set, expected it set")
                return ""
            return self.env[name]

        result = _INTERP.sub(repl, text)
        if used:
            self.tree.raw[path] = text
        return result


def parse_yaml(text: str, filename: str, env: Mapping[str, str]) -> tuple[Tree, list[Problem]]:
    """Parse one YAML document. Returns the tree and every problem found (syntax errors stop early)."""
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = exc.problem or "invalid YAML"
        context = f" ({exc.context})" if exc.context else ""
        return Tree(None), [Problem(filename, line, col, "", f"found invalid YAML: {what}{context}")]
    except yaml.YAMLError as exc:
        return Tree(None), [Problem(filename, 1, 1, "", f"found invalid YAML: {exc}")]
    if root is None:
        empty = "found an empty document, expected an inventory mapping"
        return Tree(None), [Problem(filename, 1, 1, "", empty)]
    walker = _Walker(filename, env)
    walker.tree.positions[()] = Pos(1, 1, root.start_mark.line + 1, root.start_mark.column + 1)
    try:
        walker.tree.data = walker.walk(root, ())
    except _Budget as exc:
        mark = exc.mark
        return Tree(None), [Problem(filename, mark.line + 1, mark.column + 1, "", exc.message)]
    return walker.tree, walker.problems
