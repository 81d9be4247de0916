"""Commands as argv lists, quoted in exactly one place.

Planners build ``Command`` values; executors run ``command.shell()``. Secrets never go into argv
(they travel in 0600 files), but any argument can still be marked secret so it is masked when printed.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

MASK = "***"


@dataclass(frozen=True)
class Command:
    """One remote command. ``argv`` is run as-is; ``script`` (if set) is run by ``sh -c``."""

    argv: tuple[str, ...]
    description: str = ""
    secret_indices: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def of(cls, *argv: str, description: str = "") -> Command:
        return cls(tuple(argv), description)

    @classmethod
    def sh(cls, script: str, description: str = "") -> Command:
        """A shell snippet (pipelines, redirections). Build ``script`` with ``quote``/``join``."""
        return cls(("sh", "-c", script), description)

    def shell(self) -> str:
        """The exact string sent to the remote shell."""
        return shlex.join(self.argv)

    def display(self) -> str:
        """Safe to print or log: secret arguments masked."""
        shown = [MASK if i in self.secret_indices else a for i, a in enumerate(self.argv)]
        if len(shown) == 3 and shown[:2] == ["sh", "-c"]:
            return shown[2]
        return shlex.join(shown)


def quote(value: str) -> str:
    return shlex.quote(value)


def join(argv: list[str] | tuple[str, ...]) -> str:
    return shlex.join(argv)
