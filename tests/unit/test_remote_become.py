"""ssh.become as pure logic: the inventory key, SSHTarget.from_settings, the wire form, probe errors.

(The real thing, with sshd and sudo, is tests/remote/test_ssh_become.py.)
"""

from __future__ import annotations

import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

from llamactl.errors import InventoryError
from llamactl.inventory import load_inventory
from llamactl.inventory.model import SSHSettings
from llamactl.plan.command import Command
from llamactl.remote import become
from llamactl.remote.target import SSHTarget

EXAMPLE = (Path(__file__).resolve().parents[2] / "inventory.example.yaml").read_text()


def test_settings_default_off_and_example_turns_it_on(tmp_path: Path) -> None:
    assert SSHSettings().become is False
    path = tmp_path / "inv.yaml"
    path.write_text(EXAMPLE)
    inv = load_inventory(path, env={})
    assert all(h.ssh.become for h in inv.hosts) and all(b.ssh.become for b in inv.balancer.hosts)
    assert SSHTarget.from_settings("gpu-01", "10.0.0.11", inv.hosts[0].ssh).become is True


def test_become_must_be_a_boolean_with_its_position(tmp_path: Path) -> None:
    text = EXAMPLE.replace("    become: true ", '    become: "yes"', 1)
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    with pytest.raises(InventoryError) as caught:
        load_inventory(path, env={})
    line = text[: text.index('become: "yes"')].count("\n") + 1
    assert [str(p) for p in caught.value.problems] == [
        f'{path}:{line}:13: defaults.ssh.become: found string "yes", expected true or false']


def test_from_settings_reads_become_and_plain_objects_default_off() -> None:
    on = SSHSettings.model_validate({"become": True, "use_ssh_config": False})
    assert SSHTarget.from_settings("h", "1.2.3.4", on).become is True
    plain = SimpleNamespace(use_ssh_config=False)  # no become attribute at all
    assert SSHTarget.from_settings("h", "1.2.3.4", plain).become is False


def test_wire_without_sudo_or_timeout_is_the_command_itself() -> None:
    command = Command.of("systemctl", "restart", "llamactl@0.service")
    assert become.wire(command, sudo=False, timeout_s=None) == command.shell()


def test_wire_sudo_and_timeout_nest_and_quote_once() -> None:
    command = Command.sh("echo 'it''s' $HOME > /etc/x")
    argv = shlex.split(become.wire(command, sudo=True, timeout_s=1.5))
    assert argv == ["sudo", "-n", "--", "timeout", "-k", "2", "1.500", "sh", "-c", "exec " + command.shell()]
    assert shlex.split(argv[-1][len("exec "):]) == ["sh", "-c", "echo 'it''s' $HOME > /etc/x"]
    assert shlex.split(become.wire(command, sudo=True, timeout_s=None)) == [
        "sudo", "-n", "--", "sh", "-c", "exec " + command.shell()]


def test_install_command_passes_paths_as_arguments_not_script_text() -> None:
    command = become.install_command("/home/d/.up/upload", "/etc/llamactl/a b;c", 0o600, "/etc/llamactl/t")
    assert command.argv[:2] == ("sh", "-c") and "/etc/llamactl" not in command.argv[2]
    assert command.argv[3:] == ("sh", "/home/d/.up/upload", "/etc/llamactl/a b;c", "0600", "/etc/llamactl/t")


@pytest.mark.parametrize(("code", "stderr", "expected"), [
    (1, "sudo: a password is required\n", "passwordless sudo is required (sudo said: sudo: a password is required)"),
    (127, "sh: 1: sudo: not found\n", "sudo is not installed on the host"),
    (1, "sudo: sorry, you must have a tty to run sudo\n", "`sudo -n true` failed (sudo said: sudo: sorry"),
])
def test_probe_errors_name_host_user_and_cause(code: int, stderr: str, expected: str) -> None:
    error = become.probe_error("gpu-01", "deploy@10.0.0.11:22", "deploy", code, stderr)
    assert str(error).startswith("gpu-01: ssh.become: deploy@10.0.0.11:22: user 'deploy' cannot run commands as root: ")
    assert expected in str(error) and error.exit_code == 3
