"""Command-line usage errors: recognised by what they are, shown as one error line plus a help hint.

typer parses the command line with click, but recent typer releases carry their own copy of click
(``typer._click``), so ``isinstance(exc, click.ClickException)`` no longer matches what typer raises.
Both copies share one shape: an exception with an integer ``exit_code`` and a ``format_message()``,
usage errors (exit code 2) carrying the parsing ``ctx``. That shape is what we check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

USAGE_EXIT = 2
PROG = "llamactl"


@dataclass(frozen=True)
class UsageReport:
    """What a usage error prints: one error line and a hint, and the exit code."""

    message: str
    hint: str
    exit_code: int

    def lines(self) -> list[str]:
        return [f"error: {self.message}", f"hint: run '{self.hint}' for usage"]


def is_parser_error(exc: BaseException) -> bool:
    """True for click's (or a vendored click's) ``ClickException`` family, whichever copy raised it."""
    return isinstance(getattr(exc, "exit_code", None), int) and callable(getattr(exc, "format_message", None))


def parser_error_report(exc: BaseException, argv: Sequence[str], root: Any) -> UsageReport:
    """The report for an exception that ``is_parser_error``: click's message, made one line, and the
    help command of the (sub)command it is about (from its parsing context, else from ``argv``)."""
    message = " ".join(str(exc.format_message()).split())  # type: ignore[attr-defined]
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command", None)
    path = getattr(ctx, "command_path", None) or command_path(root, argv)
    names = sorted(getattr(command, "commands", {}) or {})
    if names and message.rstrip(".").lower() == "missing command":
        message = f"missing command: expected one of {', '.join(names)}"
    code = int(getattr(exc, "exit_code", 1))
    return UsageReport(message, f"{path} --help", code)


def command_path(root: Any, argv: Sequence[str], prog: str = PROG) -> str:
    """``llamactl lab up`` for ``argv = ["lab", "up", "3"]``: the subcommands named in ``argv`` (pure)."""
    parts = [prog]
    current = root
    for arg in argv:
        if arg.startswith("-"):
            continue
        commands = getattr(current, "commands", None)
        if not isinstance(commands, dict) or arg not in commands:
            break
        parts.append(arg)
        current = commands[arg]
    return " ".join(parts)
