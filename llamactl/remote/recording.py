"""RecordingExecutor: the Executor protocol without a host, for tests and ``deploy --dry-run``.

It records every run, upload and read (display forms, sizes and digests only: never file contents,
stdin or unmasked arguments, so a record can be printed), answers commands from scripted replies, and
keeps uploads in a fake filesystem that later reads see. For a dry run it can wrap a real executor:
reads fall through to the real host, and commands the caller marks as read-only probes really run
there, while everything that would change the host is only recorded.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llamactl.errors import UsageError
from llamactl.plan.command import Command
from llamactl.remote.base import Executor, RunResult, check_result


@dataclass(frozen=True)
class Reply:
    """A scripted answer. ``raises`` simulates a failure such as a lost connection."""

    exit_code: int = 0
    stdout: str = ""
    stderr: str = ""
    raises: Exception | None = None


Responder = Callable[[Command], "Reply | None"]


@dataclass(frozen=True)
class Recorded:
    kind: Literal["run", "put", "read"]
    host: str
    command: str = ""  # display form (secrets masked) of a run
    path: str = ""
    mode: int | None = None
    size: int = 0  # bytes uploaded, or stdin length for a run
    sha256: str = ""  # of the uploaded content
    dry: bool = True  # False when it really ran on a wrapped executor

    def __str__(self) -> str:
        if self.kind == "run":
            return f"{self.host}: run {self.command}" + (f" (stdin {self.size} bytes)" if self.size else "")
        if self.kind == "put":
            return f"{self.host}: put {self.path} mode {self.mode:04o} ({self.size} bytes)"
        return f"{self.host}: read {self.path}"


@dataclass
class FakeFile:
    content: bytes
    mode: int = 0o644


class RecordingExecutor:
    def __init__(
        self,
        host: str = "dry-run",
        *,
        responses: Mapping[str, Reply] | None = None,
        responder: Responder | None = None,
        default: Reply = Reply(),
        files: Mapping[str, bytes | FakeFile] | None = None,
        inner: Executor | None = None,
        passthrough: Callable[[Command], bool] | None = None,
    ) -> None:
        """``responses`` are keyed by ``command.shell()`` (or its display form); ``responder`` is asked
        next; ``default`` answers the rest. ``inner``: a real executor for reads and ``passthrough``
        commands."""
        self._host = host
        self.responses = dict(responses or {})
        self.responder = responder
        self.default = default
        self.files: dict[str, FakeFile] = {
            path: f if isinstance(f, FakeFile) else FakeFile(f) for path, f in (files or {}).items()}
        self.calls: list[Recorded] = []
        self.closed = False
        self.lost = False  # set by a test: the connection to this host is gone
        self._inner = inner
        self._passthrough = passthrough
        self._lock = threading.Lock()

    @property
    def host(self) -> str:
        return self._host

    @property
    def commands(self) -> list[str]:
        """Display forms of the commands run so far, in order."""
        return [c.command for c in self.calls if c.kind == "run"]

    @property
    def uploads(self) -> list[Recorded]:
        return [c for c in self.calls if c.kind == "put"]

    def _record(self, entry: Recorded) -> None:
        with self._lock:
            self.calls.append(entry)

    def _reply(self, command: Command) -> Reply:
        for key in (command.shell(), command.display()):
            if key in self.responses:
                return self.responses[key]
        if self.responder is not None:
            answer = self.responder(command)
            if answer is not None:
                return answer
        return self.default

    def run(self, command: Command, *, check: bool = True, timeout_s: float | None = None,
            stdin: bytes | None = None) -> RunResult:
        shown = command.display()
        real = self._inner is not None and self._passthrough is not None and self._passthrough(command)
        self._record(Recorded("run", self.host, command=shown, size=len(stdin or b""), dry=not real))
        if real:
            assert self._inner is not None
            result = self._inner.run(command, check=False, timeout_s=timeout_s, stdin=stdin)
            return check_result(RunResult(self.host, shown, result.exit_code, result.stdout,
                                          result.stderr, result.duration_s), check)
        reply = self._reply(command)
        if reply.raises is not None:
            raise reply.raises
        return check_result(RunResult(self.host, shown, reply.exit_code, reply.stdout, reply.stderr, 0.0),
                            check)

    def put_bytes(self, data: bytes, path: str, mode: int = 0o644) -> None:
        self._record(Recorded("put", self.host, path=path, mode=mode, size=len(data),
                              sha256=hashlib.sha256(data).hexdigest()))
        with self._lock:
            self.files[path] = FakeFile(bytes(data), mode)

    def put_file(self, local_path: str | Path, path: str, mode: int = 0o644) -> None:
        try:
            data = Path(local_path).read_bytes()
        except OSError as exc:
            raise UsageError(f"{local_path}: cannot read local file: {exc.strerror or exc}") from exc
        self.put_bytes(data, path, mode)

    def read_bytes(self, path: str) -> bytes | None:
        self._record(Recorded("read", self.host, path=path))
        with self._lock:
            fake = self.files.get(path)
        if fake is not None:
            return fake.content
        return self._inner.read_bytes(path) if self._inner is not None else None

    def connected(self) -> bool:
        return not self.lost

    def close(self) -> None:
        self.closed = True
