"""Host-key checking against real sshd servers: unknown, changed, pinned, hashed, several key types."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from llamactl.errors import ConnectError
from llamactl.plan.command import Command
from llamactl.remote.ssh import connect
from tests.remote.sshd import NEEDS_SSHD, Lab

pytestmark = NEEDS_SSHD


def openssh_fingerprint(public_key: Path) -> str:
    """What `ssh-keygen -lf` prints: the independent reference for our fingerprint format."""
    return subprocess.run(["ssh-keygen", "-lf", str(public_key)], check=True, capture_output=True,
                          text=True).stdout.split()[1]


def test_unknown_host_key_is_refused_with_fingerprint(sshlab: Lab) -> None:
    server = sshlab.sshd(trusted=False)
    target = sshlab.target(server, name="gpu-07")
    with pytest.raises(ConnectError) as info:
        connect(target)
    message = str(info.value)
    expected = openssh_fingerprint(Path(f"{server.host_keys[0]}.pub"))
    assert expected.startswith("SHA256:") and not expected.endswith("=")
    assert message.startswith(f"gpu-07: host key for 127.0.0.1:{server.port} is unknown: ssh-ed25519 {expected}")
    assert f"ssh-keyscan -p {server.port} -t ssh-ed25519 127.0.0.1 >> {sshlab.known_hosts}" in message
    assert "accept-new" in message and info.value.host == "gpu-07" and info.value.exit_code == 3
    assert sshlab.known_hosts.read_text() == ""  # strict never writes


def test_changed_host_key_is_refused_naming_old_and_new(sshlab: Lab) -> None:
    server = sshlab.sshd()
    old = openssh_fingerprint(Path(f"{server.host_keys[0]}.pub"))
    connect(sshlab.target(server)).close()
    new_key = sshlab.new_host_key()
    server.restart([new_key])
    for policy in ("strict", "accept-new"):
        with pytest.raises(ConnectError) as info:
            connect(sshlab.target(server, host_key_policy=policy))
        message = str(info.value)
        assert "has CHANGED" in message and "refusing" in message
        assert old in message and openssh_fingerprint(Path(f"{new_key}.pub")) in message
        assert f"ssh-keygen -R '[127.0.0.1]:{server.port}' -f {sshlab.known_hosts}" in message


def test_accept_new_pins_then_refuses_a_change(sshlab: Lab) -> None:
    server = sshlab.sshd(trusted=False)
    with connect(sshlab.target(server, host_key_policy="accept-new")) as host:
        assert host.run(Command.of("true")).ok
    assert sshlab.known_hosts.read_text() == server.known_hosts_line()
    with connect(sshlab.target(server)) as host:  # strict now succeeds: the key is pinned
        assert host.run(Command.of("true")).ok
    assert sshlab.known_hosts.read_text() == server.known_hosts_line()  # not pinned twice
    server.restart([sshlab.new_host_key()])
    with pytest.raises(ConnectError, match="CHANGED"):
        connect(sshlab.target(server, host_key_policy="accept-new"))


def test_accept_new_from_parallel_connections_pins_each_host_once(sshlab: Lab) -> None:
    servers = [sshlab.sshd(trusted=False) for _ in range(2)]
    errors: list[BaseException] = []

    def go(i: int) -> None:
        try:
            connect(sshlab.target(servers[i % 2], host_key_policy="accept-new")).close()
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(sshlab.known_hosts.read_text().splitlines(keepends=True)) == sorted(
        s.known_hosts_line() for s in servers)


def test_hashed_known_hosts_entry(sshlab: Lab) -> None:
    server = sshlab.sshd()
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(sshlab.known_hosts)], check=True, capture_output=True)
    assert sshlab.known_hosts.read_text().startswith("|1|")
    with connect(sshlab.target(server)) as host:
        assert host.run(Command.of("true")).ok


def test_host_with_several_keys_shows_the_one_we_know(sshlab: Lab) -> None:
    ed25519, rsa = sshlab.new_host_key("ed25519"), sshlab.new_host_key("rsa")
    server = sshlab.sshd(host_keys=[ed25519, rsa], trusted=False)
    from paramiko import PKey

    sshlab.known_hosts.write_text(server.known_hosts_line(PKey.from_path(rsa)))  # only the RSA key is known
    with connect(sshlab.target(server)) as host:
        assert host.run(Command.of("true")).ok


def test_jump_host_key_is_verified_too(sshlab: Lab) -> None:
    jump = sshlab.sshd(trusted=False)
    inner = sshlab.sshd()
    from llamactl.remote.target import Hop

    target = sshlab.target(inner, name="inner", jump=(Hop("bastion", "127.0.0.1", jump.port, "root",
                                                          (sshlab.client_key,)),))
    with pytest.raises(ConnectError) as info:
        connect(target)
    assert str(info.value).startswith(f"inner: jump host bastion: host key for 127.0.0.1:{jump.port} is unknown")
