"""SSHExecutor: the Executor protocol over one paramiko connection per host (plus its SFTP session).

Commands run with ``exec_command(command.shell())`` (inside ``timeout(1)`` when a timeout is
given, inside ``sudo -n`` with ``become``: see ``become.wire``) and no pty (a pty merges stderr
into stdout and kills background children at session end); ``channel.communicate`` moves the
bytes without deadlocking against SSH flow control.

With ``become`` (and a non-root user), files are staged over SFTP in a private directory of the
user's and installed by one root command (see ``become.INSTALL_SCRIPT``); reads go through ``sudo cat``.
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
from llamactl.remote import become
from llamactl.remote.base import CommandTimeout, RemoteFileError, RunResult, check_result, decode
from llamactl.remote.channel import CHUNK, communicate
from llamactl.remote.target import Hop, SSHTarget
from llamactl.remote.transport import open_transports

__all__ = ["Hop", "SSHExecutor", "SSHTarget", "connect"]

log = logging.getLogger("llamactl.remote")

# With a timeout, the host enforces it: coreutils timeout(1) TERMs the command's process group, then
# KILLs it after KILL_AFTER_S. (SSH "signal" requests would not do: OpenSSH ignores them for root
# sessions.) Our own wait is longer by CLIENT_MARGIN_S, for a host that stopped answering.
KILL_AFTER_S = become.KILL_AFTER_S
CLIENT_MARGIN_S = 5.0
# timeout(1): TERM sufficed / KILL was needed; -1: no exit status, as when a login shell that exec-ed
# `sudo timeout ...` is killed along with it (sudo re-raises its child's KILL on itself).
_TIMED_OUT_CODES = (124, 137, -1)


def connect(target: SSHTarget, *, sleep: Callable[[float], None] = time.sleep) -> SSHExecutor:
    """Open (and authenticate) the connection, verifying host keys; raises ``ConnectError``.

    With ``target.become``, also checks that passwordless sudo works (unless the user is root), so
    a host that would ask for a password fails here, before anything is changed on it.
    """
    executor = SSHExecutor(target, open_transports(target, sleep=sleep))
    if target.become and target.user != "root":
        try:
            executor._enable_sudo()
        except BaseException:
            executor.close()
            raise
    return executor


def _last_line(stderr: bytes, code: int) -> str:
    lines = decode(stderr).strip().splitlines()
    return lines[-1] if lines else f"exit code {code}"


class SSHExecutor:
    def __init__(self, target: SSHTarget, transports: list[paramiko.Transport]) -> None:
        self._target = target
        self._transports = transports  # jump hops first, the host's own connection last
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.Lock()
        self._sudo = False  # commands and files go through `sudo -n` (become, user not root)

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

    @property
    def sudo(self) -> bool:
        """Whether commands and file writes go through ``sudo -n``."""
        return self._sudo

    def _enable_sudo(self) -> None:
        result = self.run(become.PROBE, check=False, timeout_s=self._target.connect_timeout_s)
        if result.exit_code != 0:
            raise become.probe_error(self.host, self._target.where, self._target.user,
                                     result.exit_code, result.stderr)
        self._sudo = result.stdout.strip() != "root"  # uid 0 under another name: nothing to do

    def _transport(self, doing: str) -> paramiko.Transport:
        transport = self._transports[-1]
        if not transport.is_active():
            raise self._lost(doing)
        return transport

    def run(self, command: Command, *, check: bool = True, timeout_s: float | None = None,
            stdin: bytes | None = None) -> RunResult:
        shown = command.display()
        code, out, err, elapsed = self._exec(command, shown, timeout_s, stdin)
        stderr = decode(err)
        if code == -1:  # paramiko ignores "exit-signal": the process died of a signal
            stderr += "(no exit status: the command was killed by a signal)\n"
        result = RunResult(self.host, shown, code, decode(out), stderr, elapsed)
        log.debug("%s: `%s` -> %d in %.3f s", self.host, shown, code, result.duration_s)
        return check_result(result, check)

    def _exec(self, command: Command, shown: str, timeout_s: float | None, stdin: bytes | None
              ) -> tuple[int, bytes, bytes, float]:
        """Exit code, raw stdout and stderr, seconds; raises for a lost connection or a timeout."""
        doing = f"while running `{shown}`"
        command_wire = become.wire(command, sudo=self._sudo, timeout_s=timeout_s)
        started = time.monotonic()
        try:
            channel = self._transport(doing).open_session(timeout=self._target.connect_timeout_s)
            channel.exec_command(command_wire)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise self._lost(doing, exc) from exc
        limit = None if timeout_s is None else timeout_s + KILL_AFTER_S + CLIENT_MARGIN_S
        status, out, err = communicate(channel, stdin, limit)
        if status is None:
            raise CommandTimeout(self.host, shown, float(timeout_s or 0), decode(err))
        code = status
        elapsed = time.monotonic() - started
        if code == -1 and not self._transports[-1].is_active():
            raise self._lost(doing)
        if timeout_s is not None and code in _TIMED_OUT_CODES and elapsed >= timeout_s:
            raise CommandTimeout(self.host, shown, timeout_s, decode(err))
        return code, out, err, elapsed

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

    def _makedirs(self, sftp: paramiko.SFTPClient, directory: str, path: str) -> None:
        if directory in ("", "/"):
            return
        try:
            sftp.stat(directory)
            return
        except FileNotFoundError:
            pass
        self._makedirs(sftp, posixpath.dirname(directory.rstrip("/")), path)
        try:
            sftp.mkdir(directory, 0o755)
        except OSError as exc:
            try:
                sftp.stat(directory)  # created meanwhile by someone else is fine
            except OSError:
                raise RemoteFileError(self.host, path, f"cannot create directory {directory}: "
                                                       f"{self._denied(exc)}") from exc

    def _denied(self, exc: OSError) -> str:
        """The error's text, plus a hint when a non-root user lacks permission (become is off)."""
        text = str(exc.strerror or exc)
        if exc.errno == errno.EACCES and self._target.user != "root":
            text += f" (as user {self._target.user!r}; ssh.become: true writes through sudo)"
        return text

    def _put(self, path: str, mode: int, write: Callable[[paramiko.SFTPFile], None]) -> None:
        if self._sudo:
            self._put_as_root(path, mode, write)
            return
        doing = f"while writing {path}"
        sftp = self._sftp_client(doing)
        tmp = f"{path}.tmp-{secrets.token_hex(6)}"
        try:
            self._makedirs(sftp, posixpath.dirname(path), path)
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
            raise RemoteFileError(self.host, path, f"cannot write: {self._denied(exc)}") from exc

    def _put_as_root(self, path: str, mode: int, write: Callable[[paramiko.SFTPFile], None]) -> None:
        doing = f"while writing {path}"
        sftp = self._sftp_client(doing)
        staging = self._staging_dir(sftp, path, doing)
        staged = f"{staging}/upload"
        try:
            # The directory is 0700 and ours: nobody else can open the file while it fills.
            with sftp.open(staged, "wb") as remote:
                remote.chmod(0o600)
                remote.set_pipelined(True)
                write(remote)
            code, _, err, _ = self._exec(become.install_command(staged, path, mode, f"{path}.tmp-{secrets.token_hex(6)}"),
                                         f"sudo install {path}", None, None)
            if code != 0:
                raise RemoteFileError(self.host, path, f"cannot write as root: {_last_line(err, code)}")
        except (paramiko.SSHException, EOFError) as exc:
            raise self._lost(doing, exc) from exc
        except OSError as exc:
            raise RemoteFileError(self.host, path, f"cannot stage the upload in {staging}: "
                                                   f"{exc.strerror or exc}") from exc
        finally:
            for remove, leftover in ((sftp.remove, staged), (sftp.rmdir, staging)):
                try:
                    remove(leftover)
                except (OSError, paramiko.SSHException, EOFError):
                    pass  # already moved by the install (the usual case), or the connection is gone

    def _staging_dir(self, sftp: paramiko.SFTPClient, path: str, doing: str) -> str:
        """A fresh 0700 directory in the user's home (else /tmp) for an upload on its way to root."""
        name = f".llamactl-upload-{secrets.token_hex(8)}"
        errors: list[str] = []
        try:
            bases = [sftp.normalize("."), "/tmp"]
        except (paramiko.SSHException, EOFError) as exc:
            raise self._lost(doing, exc) from exc
        except OSError:
            bases = ["/tmp"]
        for base in dict.fromkeys(bases):
            staging = posixpath.join(base, name)
            try:
                sftp.mkdir(staging, 0o700)  # fails if the name exists: never reuse someone's directory
                return staging
            except (paramiko.SSHException, EOFError) as exc:
                raise self._lost(doing, exc) from exc
            except OSError as exc:
                errors.append(f"{staging}: {exc.strerror or exc}")
        raise RemoteFileError(self.host, path, "cannot stage the upload: " + "; ".join(errors))

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
        if self._sudo:
            code, out, err, _ = self._exec(become.read_command(path), f"sudo cat {path}", None, None)
            if code == become.MISSING_EXIT_CODE:
                return None
            if code != 0:
                raise RemoteFileError(self.host, path, f"cannot read as root: {_last_line(err, code)}")
            return out
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
            raise RemoteFileError(self.host, path, f"cannot read: {self._denied(exc)}") from exc

    def connected(self) -> bool:
        """Whether every hop is still up: paramiko's keepalives plus TCP_USER_TIMEOUT (transport.py) end a
        transport whose peer vanished, so this turns False about DEAD_PEER_S after a host or network dies."""
        return all(t.is_active() for t in self._transports)

    def close(self) -> None:
        with self._lock:
            if self._sftp is not None:
                self._sftp.close()
                self._sftp = None
        for transport in reversed(self._transports):
            transport.close()
