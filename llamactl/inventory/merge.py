"""Ansible-style layering (defaults -> group -> host) that remembers where each value came from.

Mappings merge key by key, scalars and lists replace. Every merged value keeps the source path of the
layer that supplied it, so a validation error on a merged host points at the line that caused it.
"""

from __future__ import annotations

from typing import Any

from llamactl.inventory.yamltree import PathKey, Pos, Tree, dotted

# Replaced as a whole: mixing `env` from defaults with `file` from a host would be nonsense.
ATOMIC: frozenset[PathKey] = frozenset({("server", "api_keys")})


class Merged:
    """A merged mapping plus, for every relative path in it, the absolute path it came from."""

    def __init__(self, root_origin: PathKey) -> None:
        self.data: dict[str, Any] = {}
        self.origin: dict[PathKey, PathKey] = {(): root_origin}

    def layer(self, data: dict[str, Any], source: PathKey) -> None:
        self._merge(self.data, data, (), source)

    def _merge(self, into: dict[str, Any], data: dict[str, Any], rel: PathKey, source: PathKey) -> None:
        for key, value in data.items():
            here = rel + (key,)
            src = source + (key,)
            current = into.get(key)
            if isinstance(value, dict) and isinstance(current, dict) and here not in ATOMIC:
                self.origin[here] = src
                self._merge(current, value, here, src)
            else:
                into[key] = _copy(value)
                self._drop(here)
                self._record(value, here, src)

    def _drop(self, rel: PathKey) -> None:
        for key in [k for k in self.origin if len(k) > len(rel) and k[: len(rel)] == rel]:
            del self.origin[key]

    def _record(self, value: Any, rel: PathKey, src: PathKey) -> None:
        self.origin[rel] = src
        if isinstance(value, dict):
            for key, item in value.items():
                self._record(item, rel + (key,), src + (key,))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                self._record(item, rel + (i,), src + (i,))

    def source(self, loc: tuple[str | int, ...]) -> PathKey:
        """The absolute path of ``loc``: its own origin or its nearest merged ancestor's plus the rest."""
        for cut in range(len(loc), -1, -1):
            if loc[:cut] in self.origin:
                return self.origin[loc[:cut]] + loc[cut:]
        return loc


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def position(tree: Tree, path: PathKey, key: bool) -> tuple[str, int, int, str | None]:
    """(dotted path, line, col, raw ${} text) of ``path``, falling back on its nearest known ancestor."""
    for cut in range(len(path), -1, -1):
        pos: Pos | None = tree.positions.get(path[:cut])
        if pos is not None:
            exact = cut == len(path)
            line, col = (pos.key_line, pos.key_col) if key or not exact else (pos.line, pos.col)
            return dotted(path), line, col, tree.raw.get(path) if exact else None
    return dotted(path), 1, 1, None
