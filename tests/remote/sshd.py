"""Real OpenSSH servers on 127.0.0.1 for the SSH edge's tests (helpers; fixtures in conftest.py).

Each ``sshd`` is ``/usr/sbin/sshd -D -e -f <config>`` on a free port with its own host key, accepting
one client key (or several) through a temporary AuthorizedKeysFile. Known_hosts files are written
from the servers' real public keys, so strict host-key checking is what gets exercised.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
import pytest

from llamactl.remote.hostkeys import host_entry_name
from llamactl.remote.target import SSHTarget

SSHD = "/usr/sbin/sshd"

NEEDS_SSHD = pytest.mark.skipif(
    not (os.path.exists(SSHD) and shutil.which("ssh-keygen") and os.geteuid() == 0),
    reason="needs root, /usr/sbin/sshd and ssh-keygen",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path, kind: str = "ed25519") -> paramiko.PKey:
    extra = ["-b", "2048"] if kind == "rsa" else []
    subprocess.run(["ssh-keygen", "-q", "-t", kind, *extra, "-N", "", "-C", f"test-{kind}", "-f", str(path)],
                   check=True)
    return paramiko.PKey.from_path(path)


@dataclass
class Sshd:
    workdir: Path
    port: int
    host_keys: list[Path]
    authorized_keys: Path
    log_level: str = "VERBOSE"
    # Also accept each user's own ~/.ssh/authorized_keys (for non-root test users, who cannot read
    # the lab's file under root's private pytest directory).
    user_keys: bool = False
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / f"sshd-{self.port}.log"

    @property
    def host_key(self) -> paramiko.PKey:
        return paramiko.PKey.from_path(self.host_keys[0])

    def start(self) -> None:
        config = self.workdir / f"sshd_config-{self.port}"
        lines = [
            "ListenAddress 127.0.0.1", f"Port {self.port}",
            *[f"HostKey {k}" for k in self.host_keys],
            f"AuthorizedKeysFile {self.authorized_keys}{' .ssh/authorized_keys' if self.user_keys else ''}",
            "PidFile none", "UsePAM no", "StrictModes no", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PubkeyAuthentication yes", "PermitRootLogin prohibit-password",
            "AllowTcpForwarding yes", "MaxStartups 100", "MaxSessions 50", f"LogLevel {self.log_level}",
            "Subsystem sftp internal-sftp",
        ]
        config.write_text("\n".join(lines) + "\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    if s.recv(64).startswith(b"SSH-2.0"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("sshd did not come up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self.proc = None

    def restart(self, host_keys: list[Path]) -> None:
        """Same port, other host key(s): a reinstalled host, or an impostor."""
        self.stop()
        self.host_keys = host_keys
        self.start()

    def known_hosts_line(self, key: paramiko.PKey | None = None) -> str:
        key = key or self.host_key
        return f"{host_entry_name('127.0.0.1', self.port)} {key.get_name()} {key.get_base64()}\n"


@dataclass
class Lab:
    dir: Path
    client_key: Path
    authorized_keys: Path
    known_hosts: Path
    servers: list[Sshd] = field(default_factory=list)

    def new_host_key(self, kind: str = "ed25519") -> Path:
        path = self.dir / f"host_{kind}_{len(list(self.dir.glob('host_*'))) }"
        keygen(path, kind)
        return path

    def sshd(self, *, host_keys: list[Path] | None = None, trusted: bool = True, log_level: str = "VERBOSE",
             user_keys: bool = False) -> Sshd:
        server = Sshd(self.dir, free_port(), host_keys or [self.new_host_key()], self.authorized_keys, log_level,
                      user_keys)
        server.start()
        self.servers.append(server)
        if trusted:
            with open(self.known_hosts, "a") as f:
                f.write(server.known_hosts_line())
        return server

    def target(self, server: Sshd, **overrides: object) -> SSHTarget:
        settings: dict[str, object] = {
            "name": f"h{server.port}", "address": "127.0.0.1", "port": server.port, "user": "root",
            "identity_files": (self.client_key,), "known_hosts": self.known_hosts, "allow_agent": False,
            "look_for_keys": False, "connect_timeout_s": 5.0, "retries": 0,
        }
        settings.update(overrides)
        return SSHTarget(**settings)  # type: ignore[arg-type]
