"""A real ``redis-server`` for tests: on a free loopback port, its data in a temporary directory.

Restartable on the same port and directory, so tests can check what survives a restart (the append-only file).
``running`` starts one for a fixture: ``redis_server`` in tests/conftest.py (one per test) and in
tests/server/conftest.py (one per module, for the servers a module starts against it).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
PASSWORD = "redis-test-password-0123"  # the ``redis_server`` fixtures' password


def need_redis_server() -> None:
    if not Path(REDIS_SERVER).exists():
        pytest.fail("redis-server is not installed: run scripts/bootstrap.sh (apt package redis-server)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """``redis-server CONF`` with the port, bind and data directory overridden on its command line."""

    def __init__(self, conf: Path, data_dir: Path, password: str) -> None:
        need_redis_server()
        self.conf, self.data_dir, self.password = conf, data_dir, password
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def with_password(cls, tmp: Path, password: str) -> RedisServer:
        """A minimal config like the rendered one: password, protected mode, append-only file every second."""
        conf = tmp / "redis.conf"
        conf.write_text(f"requirepass {password}\nprotected-mode yes\nappendonly yes\nappendfsync everysec\n"
                        'save ""\nmaxmemory-policy noeviction\n')
        conf.chmod(0o600)
        return cls(conf, tmp / "data", password)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir.parent / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, str(self.conf), "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", str(self.data_dir), "--daemonize", "no", "--supervised", "no"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        self._wait_answering()

    def _wait_answering(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                tail = (self.data_dir.parent / "redis.log").read_text()[-2000:]
                raise AssertionError(f"redis-server exited with {self.proc.returncode}:\n{tail}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                    reply = b""
                    while b"PONG" not in reply and b"LOADING" not in reply:
                        chunk = sock.recv(256)
                        if not chunk:
                            break
                        reply += chunk
                    if b"+PONG" in reply:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"redis-server on port {self.port} did not answer within {timeout_s}s")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()  # SIGTERM: redis fsyncs the append-only file and exits
        self.proc.wait(timeout=30)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@contextmanager
def running(tmp: Path, password: str = PASSWORD) -> Iterator[RedisServer]:
    """A started ``RedisServer.with_password(tmp, password)``, stopped on exit."""
    server = RedisServer.with_password(tmp, password)
    server.start()
    try:
        yield server
    finally:
        server.stop()
