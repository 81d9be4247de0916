"""One error hierarchy. Every user-facing error names what went wrong and where.

The CLI maps these to exit codes in one place (``llamactl.cli.main``):
0 ok, 1 operation failed, 2 bad usage or invalid inventory, 3 cannot reach or authenticate.
"""

from __future__ import annotations

from dataclasses import dataclass


class LlamactlError(Exception):
    """Base class: a problem we explain to the user without a traceback."""

    exit_code = 1


class UsageError(LlamactlError):
    """Bad command-line usage or a bad local file argument."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One inventory problem, printed as ``FILE:LINE:COL: dotted.path: message``."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class InventoryError(LlamactlError):
    """The inventory is invalid; carries every problem found, not just the first."""

    exit_code = 2

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class ConnectError(LlamactlError):
    """A host cannot be reached or refuses our credentials or host key."""

    exit_code = 3

    def __init__(self, host: str, message: str) -> None:
        self.host = host
        super().__init__(f"{host}: {message}")


class RemoteCommandError(LlamactlError):
    """A command on a host exited non-zero."""

    exit_code = 1

    def __init__(self, host: str, command: str, exit_code: int, stderr: str) -> None:
        self.host = host
        self.command = command
        self.returncode = exit_code
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-5:]
        detail = ("\n  " + "\n  ".join(tail)) if tail else ""
        super().__init__(f"{host}: `{command}` exited with {exit_code}{detail}")


class OperationFailed(LlamactlError):
    """An operation ran but some hosts or instances failed (details already shown)."""

    exit_code = 1
