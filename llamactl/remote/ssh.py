"""SSHExecutor: the Executor protocol over one paramiko connection per host (plus its SFTP session).

Commands run with ``exec_command(command.shell())`` (inside ``timeout(1)`` when a timeout is
given) and no pty (a pty merges stderr into stdout and kills background children at session end). stdout and stderr are drained by two threads while a
third feeds stdin, so a command producing megabytes on both streams, or reading a large stdin
before writing, cannot deadlock against SSH flow control.
"""

from __future__ import annotations

import errno
import logging
import posixpath
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import paramiko

from llamactl.errors import ConnectError, UsageError
from llamactl.plan.command import Command
from llamactl.remote.base import CommandTimeout, RemoteFileError, RunResult, check_result, decode
from llamactl.remote.target import Hop, SSHTarget
from llamactl.remote.transport import open_transports

__all__ = ["Hop", "SSHExecutor", "SSHTarget", "connect"]

log = logging.getLogger("llamactl.remote")

CHUNK = 256 * 1024
# After the exit status arrives, output still in flight gets this long; a background child that
# inherited stdout (``daemon &``) would otherwise keep the channel open forever.
DRAIN_GRACE_S = 1.0
# With a timeout, the host enforces it: coreutils timeout(1) TERMs the command's process group, then
# KILLs it after KILL_AFTER_S. (SSH "signal" requests would not do: OpenSSH ignores them for root
# sessions.) Our own wait is longer by CLIENT_MARGIN_S, for a host that stopped answering.
KILL_AFTER_S = 2.0
CLIENT_MARGIN_S = 5.0
_TIMED_OUT_CODES = (124, 137)  # timeout(1): TERM sufficed / KILL was needed


def connect(target: SSHTarget, *, sleep: Callable[[float], None] = time.sleep) -> SSHExecutor:
    """Open (and authenticate) the connection, verifying host keys; raises ``ConnectError``."""
    return SSHExecutor(target, open_transports(target, sleep=sleep))


def _drain(recv: Callable[[int], bytes], sink: bytearray) -> None:
    while True:
        try:
            data = recv(CHUNK)
        except (OSError, EOFError, paramiko.SSHException):
            return
        if not data:
            return
        sink += data


def _feed(channel: paramiko.Channel, data: bytes) -> None:
    try:
        channel.sendall(data)
        channel.shutdown_write()
    except (OSError, EOFError, paramiko.SSHException):
        pass  # the command exited without reading all of stdin; its exit code tells the story


class SSHExecutor:
    def __init__(self, target: SSHTarget, transports: list[paramiko.Transport]) -> None:
        self._target = target
        self._transports = transports  # jump hops first, the host's own connection last
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.Lock()

    @property
    def host(self) -> str:
        return self._target.name

    @property
    def target(self) -> SSHTarget:
        return self._target

    def __enter__(self) -> SSHExecutor:  # noqa: PYI034 - Self needs 3.11; we support 3.10
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _lost(self, doing: str, exc: BaseException | None = None) -> ConnectError:
        detail = f": {exc}" if exc is not None and str(exc) else ""
        return ConnectError(self.host, f"connection to {self._target.where} lost {doing}{detail}")

    def _transport(self, doing: str) -> paramiko.Transport:
        transport = self._transports[-1]
        if not transport.is_active():
            raise self._lost(doing)
        return transport

    def run(self, command: Command, *, check: bool = True, timeout_s: float | None = None,
            stdin: bytes | None = None) -> RunResult:
        shown = command.display()
        doing = f"while running `{shown}`"
        wire = command.shell()
        if timeout_s is not None:
            wire = Command(("timeout", "-k", f"{KILL_AFTER_S:g}", f"{timeout_s:.3f}", "sh", "-c", wire)).shell()
        started = time.monotonic()
        try:
            channel = self._transport(doing).open_session(timeout=self._target.connect_timeout_s)
            channel.exec_command(wire)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise self._lost(doing, exc) from exc
        out, err = bytearray(), bytearray()
        with channel:
            threads = [threading.Thread(target=_drain, args=(channel.recv, out), daemon=True),
                       threading.Thread(target=_drain, args=(channel.recv_stderr, err), daemon=True)]
            if stdin:
                threads.append(threading.Thread(target=_feed, args=(channel, stdin), daemon=True))
            else:
                channel.shutdown_write()
            for thread in threads:
                thread.start()
            limit = None if timeout_s is None else timeout_s + KILL_AFTER_S + CLIENT_MARGIN_S
            if not channel.status_event.wait(limit):
                channel.close()
                for thread in threads:
                    thread.join(1.0)
                raise CommandTimeout(self.host, shown, float(timeout_s or 0), decode(bytes(err)))
            for thread in threads[:2]:
                thread.join(DRAIN_GRACE_S)
            channel.close()  # wakes readers held by a lingering background child
            for thread in threads:
                thread.join()
            code = channel.recv_exit_status()
        elapsed = time.monotonic() - started
        if code == -1 and not self._transports[-1].is_active():
            raise self._lost(doing)
        stderr = decode(bytes(err))
        if timeout_s is not None and code in _TIMED_OUT_CODES and elapsed >= timeout_s:
            raise CommandTimeout(self.host, shown, timeout_s, stderr)
        if code == -1:  # paramiko ignores "exit-signal": the process died of a signal
            stderr += "(no exit status: the command was killed by a signal)\n"
        result = RunResult(self.host, shown, code, decode(bytes(out)), stderr, elapsed)
        log.debug("%s: `%s` -> %d in %.3f s", self.host, shown, code, result.duration_s)
        return check_result(result, check)

    # ---- files (SFTP) -------------------------------------------------------------------------

    def _sftp_client(self, doing: str) -> paramiko.SFTPClient:
        with self._lock:
            if self._sftp is None or self._sftp.get_channel() is None or self._sftp.get_channel().closed:
                try:
                    client = paramiko.SFTPClient.from_transport(self._transport(doing))
                except (paramiko.SSHException, EOFError, OSError) as exc:
                    raise self._lost(doing, exc) from exc
                if client is None:
                    raise self._lost(doing)
                self._sftp = client
            return self._sftp

    def _makedirs(self, sftp: paramiko.SFTPClient, directory: str) -> None:
        if directory in ("", "/"):
            return
        try:
            sftp.stat(directory)
            return
        except FileNotFoundError:
            pass
        self._makedirs(sftp, posixpath.dirname(directory.rstrip("/")))
        try:
            sftp.mkdir(directory, 0o755)
        except OSError:
            sftp.stat(directory)  # created meanwhile by someone else is fine; anything else raises

    def _put(self, path: str, mode: int, write: Callable[[paramiko.SFTPFile], None]) -> None:
        doing = f"while writing {path}"
        sftp = self._sftp_client(doing)
        tmp = f"{path}.tmp-{secrets.token_hex(6)}"
        try:
            self._makedirs(sftp, posixpath.dirname(path))
            with sftp.open(tmp, "wb") as remote:
                # Restrict the (still empty) file before any byte lands, so a 0600 secret never has a
                # moment where others could read it; the rename then publishes it complete.
                remote.chmod(mode)
                remote.set_pipelined(True)
                write(remote)
            sftp.posix_rename(tmp, path)
        except (paramiko.SSHException, EOFError) as exc:
            raise self._lost(doing, exc) from exc
        except OSError as exc:
            try:
                sftp.remove(tmp)
            except (OSError, paramiko.SSHException, EOFError):
                pass
            raise RemoteFileError(self.host, path, f"cannot write: {exc.strerror or exc}") from exc

    def put_bytes(self, data: bytes, path: str, mode: int = 0o644) -> None:
        def write(remote: paramiko.SFTPFile) -> None:
            for offset in range(0, len(data), CHUNK):
                remote.write(data[offset:offset + CHUNK])

        self._put(path, mode, write)

    def put_file(self, local_path: str | Path, path: str, mode: int = 0o644) -> None:
        try:
            local = open(local_path, "rb")  # noqa: SIM115 - closed below, opened first to fail early
        except OSError as exc:
            raise UsageError(f"{local_path}: cannot read local file for {self.host}:{path}: "
                             f"{exc.strerror or exc}") from exc

        def write(remote: paramiko.SFTPFile) -> None:
            while chunk := local.read(CHUNK):
                remote.write(chunk)

        with local:
            self._put(path, mode, write)

    def read_bytes(self, path: str) -> bytes | None:
        doing = f"while reading {path}"
        sftp = self._sftp_client(doing)
        try:
            with sftp.open(path, "rb") as remote:
                remote.prefetch()
                return bytes(remote.read())
        except (paramiko.SSHException, EOFError) as exc:
            raise self._lost(doing, exc) from exc
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise RemoteFileError(self.host, path, f"cannot read: {exc.strerror or exc}") from exc

    def close(self) -> None:
        with self._lock:
            if self._sftp is not None:
                self._sftp.close()
                self._sftp = None
        for transport in reversed(self._transports):
            transport.close()
