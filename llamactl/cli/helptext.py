"""Help texts that read as paragraphs at any terminal width.

Docstrings are hard-wrapped for the source's line length. Depending on its version and markup mode,
typer shows those line breaks as they are (the command list, a docstring's first line), which breaks
sentences in the middle of a terminal line. Every command's help is therefore given to typer with each
paragraph joined into one line, and the terminal wraps it.
"""

from __future__ import annotations

import inspect
from typing import Any


def paragraphs(doc: str | None) -> str | None:
    """``doc`` with the lines of each paragraph joined by spaces; blank lines still separate paragraphs."""
    if doc is None:
        return None
    blocks = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in block.splitlines() if line.strip())
                       for block in blocks if block.strip())


def reflow_help(app: Any) -> None:
    """Give every registered command and command group of a typer app its docstring as paragraphs."""
    for info in app.registered_commands:
        if info.help is None and info.callback is not None:
            info.help = paragraphs(inspect.getdoc(info.callback))
        _reflow_fields(info)
    for group in app.registered_groups:
        _reflow_fields(group)
        sub = group.typer_instance
        if isinstance(sub, type(app)):  # unset fields hold typer's placeholders, not None
            _reflow_fields(sub.info)
            reflow_help(sub)


def _reflow_fields(info: Any) -> None:
    for field in ("help", "epilog"):
        value = getattr(info, field, None)
        if isinstance(value, str):
            setattr(info, field, paragraphs(value))
