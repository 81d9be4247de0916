"""LocalExecutor: the Executor protocol on this machine (a balancer on localhost; tests).

Commands go through ``/bin/sh -c command.shell()``, the same string sshd would hand the login shell,
so a command behaves the same locally and remotely.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from llamactl.errors import UsageError
from llamactl.plan.command import Command
from llamactl.remote.base import CommandTimeout, RemoteFileError, RunResult, check_result, decode

CHUNK = 1024 * 1024
_Writer = Callable[[BinaryIO], object]


class LocalExecutor:
    def __init__(self, host: str = "localhost") -> None:
        self._host = host

    @property
    def host(self) -> str:
        return self._host

    def run(self, command: Command, *, check: bool = True, timeout_s: float | None = None,
            stdin: bytes | None = None) -> RunResult:
        shown = command.display()
        started = time.monotonic()
        # Own session: on timeout the whole process group goes, not just the shell.
        proc = subprocess.Popen(["/bin/sh", "-c", command.shell()], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(stdin or b"", timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            raise CommandTimeout(self.host, shown, float(timeout_s or 0), decode(err)) from None
        result = RunResult(self.host, shown, proc.returncode, decode(out), decode(err),
                           time.monotonic() - started)
        return check_result(result, check)

    def _put(self, path: str, mode: int, write: _Writer) -> None:
        target = Path(path)
        fd = -1
        tmp = ""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".tmp-")  # created 0600
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as out:
                fd = -1
                write(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            if tmp:
                Path(tmp).unlink(missing_ok=True)
            raise RemoteFileError(self.host, path, f"cannot write: {exc.strerror or exc}") from exc

    def put_bytes(self, data: bytes, path: str, mode: int = 0o644) -> None:
        self._put(path, mode, lambda out: out.write(data))

    def put_file(self, local_path: str | Path, path: str, mode: int = 0o644) -> None:
        try:
            source = open(local_path, "rb")  # noqa: SIM115
        except OSError as exc:
            raise UsageError(f"{local_path}: cannot read local file: {exc.strerror or exc}") from exc

        def copy(out: BinaryIO) -> None:
            while chunk := source.read(CHUNK):
                out.write(chunk)

        with source:
            self._put(path, mode, copy)

    def read_bytes(self, path: str) -> bytes | None:
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RemoteFileError(self.host, path, f"cannot read: {exc.strerror or exc}") from exc

    def connected(self) -> bool:
        return True

    def close(self) -> None:
        pass

