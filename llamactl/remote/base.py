"""The executor protocol: the one interface through which llamactl touches a host.

Planners produce ``Command`` values and file contents; only executors (SSH, local, recording)
act on them. Every error an executor raises names its host.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from llamactl.errors import LlamactlError, RemoteCommandError
from llamactl.plan.command import Command

# Exit code reported for a command we stopped waiting for (the convention of timeout(1)).
TIMEOUT_EXIT_CODE = 124


@dataclass(frozen=True)
class RunResult:
    """What one command did. ``command`` is the display form (secrets masked), never the raw argv."""

    host: str
    command: str
    exit_code: int
    stdout: str
    stderr: str
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class CommandTimeout(RemoteCommandError):
    """A command ran longer than its timeout; we closed its channel (or killed it locally)."""

    def __init__(self, host: str, command: str, timeout_s: float, stderr: str = "") -> None:
        super().__init__(host, command, TIMEOUT_EXIT_CODE, stderr)
        self.timeout_s = timeout_s
        self.args = (f"{host}: `{command}` timed out after {timeout_s:g} s (exit code {TIMEOUT_EXIT_CODE})",)


class RemoteFileError(LlamactlError):
    """Reading or writing a file on a host failed (permissions, disk full, not a directory...)."""

    def __init__(self, host: str, path: str, message: str) -> None:
        self.host = host
        self.path = path
        super().__init__(f"{host}: {path}: {message}")


@runtime_checkable
class Executor(Protocol):
    """One host. Not required to be safe for concurrent use by several threads."""

    @property
    def host(self) -> str: ...

    def run(
        self,
        command: Command,
        *,
        check: bool = True,
        timeout_s: float | None = None,
        stdin: bytes | None = None,
    ) -> RunResult:
        """Run ``command.shell()``; raise ``RemoteCommandError`` if ``check`` and it exits non-zero."""
        ...

    def put_bytes(self, data: bytes, path: str, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` atomically (temp file + rename), creating parent directories."""
        ...

    def put_file(self, local_path: str | Path, path: str, mode: int = 0o644) -> None:
        """Copy a local file to ``path`` atomically, streaming (never the whole file in memory)."""
        ...

    def read_bytes(self, path: str) -> bytes | None:
        """The file's content, or None when it does not exist."""
        ...

    def connected(self) -> bool:
        """False once the connection to the host is known to be lost (a dead peer, a cut network)."""
        ...

    def close(self) -> None: ...


def check_result(result: RunResult, check: bool) -> RunResult:
    """Raise the contract's error for a failed command when the caller asked for checking."""
    if check and result.exit_code != 0:
        raise RemoteCommandError(result.host, result.command, result.exit_code, result.stderr)
    return result


def decode(data: bytes) -> str:
    # Remote output is not guaranteed UTF-8 (locales, binary tools); never fail on it.
    return data.decode("utf-8", errors="replace")
