"""Connecting to real sshd servers: key types, agent, auth failures, unreachable hosts, jump, ssh config."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from llamactl.errors import ConnectError
from llamactl.plan.command import Command
from llamactl.remote.parallel import Ok, run_parallel
from llamactl.remote.ssh import SSHTarget, connect
from llamactl.remote.target import Hop
from tests.remote.sshd import NEEDS_SSHD, Lab, free_port, keygen

pytestmark = NEEDS_SSHD


@pytest.mark.parametrize("kind", ["rsa", "ecdsa", "ed25519"])
def test_identity_file_key_types(sshlab: Lab, kind: str) -> None:
    key = sshlab.dir / f"client_{kind}"
    keygen(key, kind)
    sshlab.authorized_keys.write_text(Path(f"{key}.pub").read_text())
    with connect(sshlab.target(sshlab.sshd(), identity_files=(key,))) as host:
        assert host.run(Command.of("whoami")).stdout == "root\n"


def test_wrong_key_names_user_methods_and_keys_tried(sshlab: Lab) -> None:
    server = sshlab.sshd()
    stranger = sshlab.dir / "stranger"
    key = keygen(stranger)
    with pytest.raises(ConnectError) as info:
        connect(sshlab.target(server, name="gpu-01", identity_files=(stranger, sshlab.dir / "absent")))
    message = str(info.value)
    assert message.startswith(f"gpu-01: authentication failed for user 'root' at 127.0.0.1:{server.port} "
                              f"(server accepts: publickey); tried {stranger} (ssh-ed25519 ")
    assert key.fingerprint in message and f"identity file {sshlab.dir / 'absent'} not found" in message
    assert info.value.exit_code == 3


def test_no_key_at_all_says_so(sshlab: Lab) -> None:
    with pytest.raises(ConnectError, match="no identity file, none of ~/.ssh/id_\\*, and no ssh-agent"):
        connect(sshlab.target(sshlab.sshd(), identity_files=()))


def test_passphrase_key_is_explained(sshlab: Lab) -> None:
    locked = sshlab.dir / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "pw", "-f", str(locked)], check=True)
    with pytest.raises(ConnectError, match=f"identity file {locked} is passphrase-protected"):
        connect(sshlab.target(sshlab.sshd(), identity_files=(locked,)))


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
    yield sock
    proc.terminate()
    proc.wait(5)


def test_agent_auth(sshlab: Lab, agent: Path) -> None:
    subprocess.run(["ssh-add", "-q", str(sshlab.client_key)], check=True, env={**os.environ},
                   capture_output=True)
    target = sshlab.target(sshlab.sshd(), identity_files=(), allow_agent=True)
    with connect(target) as host:
        assert host.run(Command.of("true")).ok
    subprocess.run(["ssh-add", "-D"], check=True, capture_output=True)
    with pytest.raises(ConnectError, match="no ssh-agent keys"):
        connect(target)


def test_refused_port_fails_fast_after_bounded_retries(sshlab: Lab) -> None:
    port = free_port()  # nothing listens there
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    target = sshlab.target(sshlab.sshd(), name="gpu-09", port=port, retries=2, retry_backoff_s=0.05)
    started = time.monotonic()
    with pytest.raises(ConnectError) as info:
        connect(target, sleep=sleep)
    elapsed = time.monotonic() - started
    assert str(info.value) == (f"gpu-09: cannot connect to 127.0.0.1:{port}: Connection refused "
                               f"(gave up after 3 attempts)")
    assert sleeps == [0.05, 0.1] and elapsed < 2.0, elapsed


def test_tcp_connect_timeout_is_bounded_and_retried(sshlab: Lab) -> None:
    # A listener whose accept queue is full drops our SYNs: the TCP connect itself times out.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        for filler in fillers:
            filler.settimeout(0.2)
            try:
                filler.connect(("127.0.0.1", port))
            except OSError:
                pass
        target = SSHTarget("slow", "127.0.0.1", port, known_hosts=sshlab.known_hosts, connect_timeout_s=0.4,
                           retries=1, retry_backoff_s=0.05)
        started = time.monotonic()
        with pytest.raises(ConnectError, match=f"^slow: connection to 127.0.0.1:{port} timed out after 0.4 s "
                                               r"\(gave up after 2 attempts\)$"):
            connect(target)
        elapsed = time.monotonic() - started
        for filler in fillers:
            filler.close()
    assert 0.8 <= elapsed < 2.5, elapsed


def test_silent_server_times_out_in_handshake(sshlab: Lab) -> None:
    with socket.socket() as silent:  # accepts TCP (the kernel does) but never says SSH-2.0
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        target = SSHTarget("mute", "127.0.0.1", port, "root", (sshlab.client_key,), known_hosts=sshlab.known_hosts,
                           connect_timeout_s=0.5, retries=1, retry_backoff_s=0.01, allow_agent=False)
        started = time.monotonic()
        with pytest.raises(ConnectError, match=f"^mute: SSH handshake with 127.0.0.1:{port} failed: .*"
                                               f"\\(gave up after 2 attempts\\)$"):
            connect(target)
        assert time.monotonic() - started < 4


def test_dns_failure_is_not_retried(sshlab: Lab) -> None:
    sleeps: list[float] = []
    target = SSHTarget("gpu-x", "no-such-host.invalid", 22, "root", known_hosts=sshlab.known_hosts, retries=3)
    with pytest.raises(ConnectError, match="^gpu-x: cannot resolve host name 'no-such-host.invalid': "):
        connect(target, sleep=sleeps.append)
    assert sleeps == []


def test_proxy_jump_through_a_second_sshd(sshlab: Lab) -> None:
    jump = sshlab.sshd(log_level="DEBUG1")
    inner = sshlab.sshd()
    bastion = Hop("bastion", "127.0.0.1", jump.port, "root", (sshlab.client_key,))
    with connect(sshlab.target(inner, jump=(bastion,))) as host:
        assert host.run(Command.sh("echo $SSH_CONNECTION")).stdout.split()[3] == str(inner.port)
        host.put_bytes(b"via jump", str(sshlab.dir / "jumped"))
    assert (sshlab.dir / "jumped").read_bytes() == b"via jump"
    # The bastion really forwarded it: its log shows the direct-tcpip request to the inner port.
    assert f"target 127.0.0.1 port {inner.port}" in jump.log_path.read_text()


def test_jump_to_a_dead_port_names_the_hop(sshlab: Lab) -> None:
    jump = sshlab.sshd()
    dead = free_port()
    target = sshlab.target(jump, name="inner", port=dead,
                           jump=(Hop("bastion", "127.0.0.1", jump.port, "root", (sshlab.client_key,)),))
    expected = f"^inner: jump host bastion cannot open a connection to 127.0.0.1:{dead}: Connect failed$"
    with pytest.raises(ConnectError, match=expected):
        connect(target)


def test_ssh_config_supplies_hostname_user_port_key_and_proxyjump(sshlab: Lab) -> None:
    jump, inner = sshlab.sshd(), sshlab.sshd()
    config = sshlab.dir / "ssh_config"
    config.write_text(
        f"Host bastion\n  HostName 127.0.0.1\n  Port {jump.port}\n  User root\n  IdentityFile {sshlab.client_key}\n"
        f"Host gpu-*\n  HostName 127.0.0.1\n  Port {inner.port}\n  User root\n  IdentityFile {sshlab.client_key}\n"
        f"  ProxyJump bastion\n"
    )
    settings = SimpleNamespace(known_hosts=str(sshlab.known_hosts), use_ssh_config=True)
    target = SSHTarget.from_settings("gpu-01", "gpu-01", settings, ssh_config_path=config)
    assert (target.address, target.port, target.user) == ("127.0.0.1", inner.port, "root")
    assert target.jump == (Hop("bastion", "127.0.0.1", jump.port, "root", (sshlab.client_key,)),)
    with connect(target) as host:
        assert host.run(Command.sh("echo $SSH_CONNECTION")).stdout.split()[3] == str(inner.port)


def test_eight_parallel_connections_and_true(sshlab: Lab) -> None:
    """The figure for the report: connect + `true` on 8 hosts at once, over loopback sshd."""
    servers = [sshlab.sshd() for _ in range(8)]

    def one(server: object) -> float:
        with connect(sshlab.target(server)) as host:  # type: ignore[arg-type]
            return host.run(Command.of("true")).duration_s

    started = time.monotonic()
    outcomes = run_parallel(servers, one, max_workers=8)
    elapsed = time.monotonic() - started
    assert all(isinstance(o, Ok) for o in outcomes), outcomes
    print(f"\n8 parallel connect + true: {elapsed:.3f} s wall")
    assert elapsed < 10


def test_threads_share_nothing_between_hosts(sshlab: Lab) -> None:
    servers = [sshlab.sshd() for _ in range(3)]
    hosts = [connect(sshlab.target(s)) for s in servers]
    results: dict[int, str] = {}

    def work(i: int) -> None:
        results[i] = "".join(hosts[i].run(Command.of("echo", str(n))).stdout for n in range(3))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: "0\n1\n2\n" for i in range(3)}
    for h in hosts:
        h.close()


def test_failed_handshake_prints_nothing_but_our_error(tmp_path: Path) -> None:
    """paramiko logs handshake failures with tracebacks; a CLI user must see only the ConnectError."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import socket, threading\n"
        "from llamactl.errors import ConnectError\n"
        "from llamactl.remote.ssh import SSHTarget, connect\n"
        "srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)\n"
        "def serve():\n"
        "    c, _ = srv.accept(); c.sendall(b'HTTP/1.1 400 Bad Request\\r\\n\\r\\n'); c.close()\n"
        "threading.Thread(target=serve, daemon=True).start()\n"
        "try:\n"
        f"    connect(SSHTarget('web', '127.0.0.1', srv.getsockname()[1], known_hosts='{tmp_path}/kh', retries=0))\n"
        "except ConnectError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30, check=True)
    assert done.stderr == ""
    assert done.stdout.startswith("web: SSH handshake with 127.0.0.1:") and "banner" in done.stdout
