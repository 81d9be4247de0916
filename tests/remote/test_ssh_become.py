"""ssh.become against a real sshd and the real sudo: a throwaway non-root user logs in with a key,
runs commands and writes root-owned files through `sudo -n`; without a NOPASSWD rule it fails early.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llamactl.errors import ConnectError, RemoteCommandError
from llamactl.plan.command import Command
from llamactl.remote.base import CommandTimeout, RemoteFileError
from llamactl.remote.ssh import SSHExecutor, connect
from tests.remote.sshd import NEEDS_SSHD, Lab, Sshd

pytestmark = [NEEDS_SSHD, pytest.mark.skipif(not shutil.which("useradd"), reason="needs useradd")]

SUDOERS_D = Path("/etc/sudoers.d")


def _ensure_sudo() -> None:
    if shutil.which("sudo") and shutil.which("visudo"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "sudo"]
    if subprocess.run(install, env=env, check=False, capture_output=True, timeout=300).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, capture_output=True, timeout=300)
        subprocess.run(install, env=env, check=True, capture_output=True, timeout=300)


class Users:
    """Creates login users (key from the lab) and removes them, their sudoers rules and test dirs."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.created: list[str] = []
        self.paths: list[Path] = []

    def add(self, *, sudo: bool) -> str:
        name = f"llt{secrets.token_hex(4)}"
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True, capture_output=True)
        self.created.append(name)
        # "*": no password yet not locked; sshd without PAM refuses accounts whose password is "!".
        subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True)
        home = Path(os.path.expanduser(f"~{name}"))
        (home / ".ssh").mkdir(mode=0o700)
        (home / ".ssh" / "authorized_keys").write_text(Path(f"{self.lab.client_key}.pub").read_text())
        subprocess.run(["chown", "-R", f"{name}:{name}", str(home / ".ssh")], check=True)
        if sudo:
            staged = self.lab.dir / f"sudoers-{name}"
            staged.write_text(f"{name} ALL=(root) NOPASSWD: ALL\n")
            subprocess.run(["visudo", "-cf", str(staged)], check=True, capture_output=True)  # never break sudo
            rule = SUDOERS_D / f"llamactl-test-{name}"  # per user: test runs may overlap
            self.paths.append(rule)
            shutil.copyfile(staged, rule)
            rule.chmod(0o440)
        return name

    def root_dir(self, name: str) -> Path:
        """A directory under /etc that this test owns (removed afterwards)."""
        path = Path(f"/etc/llamactl-test-{name}")
        self.paths.append(path)
        return path

    def cleanup(self) -> None:
        for path in self.paths:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        for name in self.created:
            deadline = time.monotonic() + 10
            while True:  # sshd's per-session process may outlive our close() for a moment
                subprocess.run(["pkill", "-KILL", "-u", name], check=False, capture_output=True)
                done = subprocess.run(["userdel", "-r", name], check=False, capture_output=True, text=True)
                if done.returncode != 8 or time.monotonic() > deadline:  # 8: user still logged in
                    break
                time.sleep(0.1)
            gone = subprocess.run(["id", name], check=False, capture_output=True).returncode != 0
            assert gone, f"test user {name} not removed: {done.stderr}"


@pytest.fixture
def users(sshlab: Lab) -> Iterator[Users]:
    _ensure_sudo()
    made = Users(sshlab)
    yield made
    made.cleanup()


@pytest.fixture
def server(sshlab: Lab) -> Sshd:
    return sshlab.sshd(user_keys=True)


@pytest.fixture
def open_as(sshlab: Lab, server: Sshd) -> Iterator[Callable[..., SSHExecutor]]:
    opened: list[SSHExecutor] = []

    def open_(user: str, *, become: bool) -> SSHExecutor:
        executor = connect(sshlab.target(server, user=user, become=become))
        opened.append(executor)
        return executor

    yield open_
    for executor in opened:
        executor.close()


def test_become_runs_commands_as_root(users: Users, open_as: Callable[..., SSHExecutor]) -> None:
    name = users.add(sudo=True)
    plain = open_as(name, become=False)
    assert plain.run(Command.of("id", "-u")).stdout.strip() != "0" and not plain.sudo
    root = open_as(name, become=True)
    assert root.sudo and root.run(Command.of("id", "-u")).stdout == "0\n"
    tricky = "it's a \"test\" $HOME `id` ; rm -rf /nonexistent"
    assert root.run(Command.of("printf", "%s", tricky)).stdout == tricky  # quoted once, through two shells
    assert root.run(Command.of("cat"), stdin=b"through sudo\n").stdout == "through sudo\n"
    with pytest.raises(RemoteCommandError) as info:
        root.run(Command.sh("echo nope >&2; exit 5"))
    assert info.value.returncode == 5 and "nope" in info.value.stderr


def test_root_user_with_become_is_a_no_op(open_as: Callable[..., SSHExecutor]) -> None:
    root = open_as("root", become=True)
    assert not root.sudo
    assert root.run(Command.of("id", "-u")).stdout == "0\n"


def test_put_bytes_lands_root_owned_with_mode_and_replaces_atomically(
        users: Users, open_as: Callable[..., SSHExecutor]) -> None:
    name = users.add(sudo=True)
    host = open_as(name, become=True)
    target = users.root_dir(name) / "sub" / "x"
    host.put_bytes(b"LLAMACTL_API_KEYS=k1\n", str(target), mode=0o600)
    info = target.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o600)
    assert target.read_bytes() == b"LLAMACTL_API_KEYS=k1\n"
    parent = target.parent.stat()
    assert (parent.st_uid, stat.S_IMODE(parent.st_mode)) == (0, 0o755)
    before = info.st_ino
    with open(target, "rb") as reader:  # a reader of the old file keeps seeing it whole: a rename
        host.put_bytes(b"v2\n" * 1000, str(target), mode=0o644)
        assert reader.read() == b"LLAMACTL_API_KEYS=k1\n"
    assert target.stat().st_ino != before and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["x"]  # no temp file left next to it
    home = Path(os.path.expanduser(f"~{name}"))
    assert not list(home.glob(".llamactl-upload-*"))  # the staging directory is gone too


def test_put_file_streams_as_root(users: Users, open_as: Callable[..., SSHExecutor], tmp_path: Path) -> None:
    name = users.add(sudo=True)
    host = open_as(name, become=True)
    local = tmp_path / "wheel.whl"
    local.write_bytes(os.urandom(2_000_000))
    target = users.root_dir(name) / "wheelhouse" / "wheel.whl"
    host.put_file(local, str(target), mode=0o640)
    assert target.read_bytes() == local.read_bytes()
    assert (target.stat().st_uid, stat.S_IMODE(target.stat().st_mode)) == (0, 0o640)


def test_read_bytes_through_sudo(users: Users, open_as: Callable[..., SSHExecutor]) -> None:
    name = users.add(sudo=True)
    secret_dir = users.root_dir(name)
    secret_dir.mkdir(mode=0o700)
    secret = secret_dir / "secret"
    secret.write_bytes(b"\x00binary\xff root only\n")
    secret.chmod(0o600)
    plain = open_as(name, become=False)
    with pytest.raises(RemoteFileError, match="Permission denied"):
        plain.read_bytes(str(secret))
    host = open_as(name, become=True)
    assert host.read_bytes(str(secret)) == b"\x00binary\xff root only\n"  # raw bytes, not decoded text
    assert host.read_bytes(str(secret_dir / "missing")) is None
    with pytest.raises(RemoteFileError, match=f"^{host.host}: {secret_dir}: cannot read as root: .*Is a directory"):
        host.read_bytes(str(secret_dir))


def test_without_become_writing_etc_is_a_clear_permission_error(
        users: Users, open_as: Callable[..., SSHExecutor]) -> None:
    name = users.add(sudo=True)
    plain = open_as(name, become=False)
    target = users.root_dir(name) / "x"
    with pytest.raises(RemoteFileError) as info:
        plain.put_bytes(b"x", str(target), mode=0o600)
    assert str(info.value) == (f"{plain.host}: {target}: cannot create directory {target.parent}: Permission "
                               f"denied (as user {name!r}; ssh.become: true writes through sudo)")
    assert not target.parent.exists()


def test_without_a_sudoers_rule_connect_fails_fast_and_clearly(
        users: Users, sshlab: Lab, server: Sshd) -> None:
    name = users.add(sudo=False)
    started = time.monotonic()
    with pytest.raises(ConnectError) as info:
        connect(sshlab.target(server, user=name, become=True))
    assert time.monotonic() - started < 5  # `sudo -n` never waits for a password
    message = str(info.value)
    assert message.startswith(f"h{server.port}: ssh.become: {name}@127.0.0.1:{server.port}: ")
    assert "passwordless sudo is required" in message and "a password is required" in message
    assert info.value.exit_code == 3


def test_timeout_through_sudo_kills_the_root_command(users: Users, open_as: Callable[..., SSHExecutor]) -> None:
    name = users.add(sudo=True)
    host = open_as(name, become=True)
    marker_dir = users.root_dir(name)
    marker_dir.mkdir()
    with pytest.raises(CommandTimeout):
        host.run(Command.sh(f"sleep 2; touch {marker_dir}/survived"), timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(CommandTimeout):  # ignores TERM: timeout(1), running as root, must KILL it
        host.run(Command.sh(f"trap '' TERM; sleep 4; touch {marker_dir}/stubborn"), timeout_s=0.3)
    assert time.monotonic() - started < 4
    time.sleep(2.2)
    assert not list(marker_dir.iterdir())
    assert host.run(Command.of("id", "-u")).stdout == "0\n"
