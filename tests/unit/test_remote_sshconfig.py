"""ssh_config resolution, ProxyJump parsing and the inventory-vs-config precedence of SSHTarget."""

from __future__ import annotations

import getpass
from pathlib import Path
from types import SimpleNamespace

import paramiko
import pytest

from llamactl.errors import UsageError
from llamactl.inventory.model import SSHSettings
from llamactl.remote.sshconfig import SSHConfigEntry, JumpSpec, load_config, lookup, lookup_host, parse_jump
from llamactl.remote.target import Hop, SSHTarget

CONFIG = """
Host gpu-01
  HostName 10.9.0.1
  User alice
  Port 2201
  IdentityFile ~/.ssh/gpu01

Host bastion
  HostName 203.0.113.5
  User jumper
  Port 2022
  IdentityFile /keys/bastion

Host 10.0.0.*
  User bob
  ProxyJump bastion
  IdentityFile /keys/tenner

Host *
  IdentityFile /keys/default
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "ssh_config"
    path.write_text(CONFIG)
    return path


@pytest.mark.parametrize(("spec", "hops"), [
    ("bastion", [JumpSpec("bastion")]),
    ("ops@bastion:2222", [JumpSpec("bastion", "ops", 2222)]),
    ("ssh://ops@bastion:2222", [JumpSpec("bastion", "ops", 2222)]),
    ("a, b@c:23", [JumpSpec("a"), JumpSpec("c", "b", 23)]),
    ("[2001:db8::1]:2200", [JumpSpec("2001:db8::1", None, 2200)]),
    ("u@[::1]", [JumpSpec("::1", "u", None)]),
    ("2001:db8::1", [JumpSpec("2001:db8::1")]),
])
def test_parse_jump(spec: str, hops: list[JumpSpec]) -> None:
    assert parse_jump(spec) == hops


@pytest.mark.parametrize(("spec", "error"), [
    ("bastion:ssh", "jump 'bastion:ssh': 'ssh' is not a TCP port (1-65535)"),
    ("bastion:0", "jump 'bastion:0': '0' is not a TCP port"),
    ("a,,b", "jump 'a,,b': empty hop"),
    ("@host", "jump '@host': expected [user@]host[:port]"),
    ("user@", "jump 'user@': expected [user@]host[:port]"),
])
def test_parse_jump_errors(spec: str, error: str) -> None:
    with pytest.raises(UsageError, match=error.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        parse_jump(spec)


def test_lookup_marks_unset_hostname_as_none() -> None:
    config = paramiko.SSHConfig.from_text(CONFIG)
    found = lookup(config, "gpu-01")
    assert (found.hostname, found.user, found.port) == ("10.9.0.1", "alice", 2201)
    assert found.identity_files[1] == "/keys/default" and found.identity_files[0].endswith("/.ssh/gpu01")
    assert lookup(config, "elsewhere") == SSHConfigEntry(identity_files=("/keys/default",))


def test_lookup_host_merges_name_then_address() -> None:
    config = paramiko.SSHConfig.from_text(CONFIG)
    found = lookup_host(config, "gpu-02", "10.0.0.12")
    assert (found.user, found.proxy_jump, found.hostname) == ("bob", "bastion", None)
    assert found.identity_files == ("/keys/default", "/keys/tenner")  # name's first, then the address's
    assert lookup_host(None, "x", "y") == SSHConfigEntry()


def test_config_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "cfg"
    bad.write_text("Host x\n  Port notaport\n")
    with pytest.raises(UsageError, match="ssh config Port for x: 'notaport' is not a TCP port"):
        lookup_host(load_config(bad), "x", "x")
    assert load_config(tmp_path / "missing") is None


def test_explicit_inventory_values_win_over_config(config_file: Path) -> None:
    ssh = SSHSettings.model_validate({"user": "deploy", "port": 22, "identity_file": "/keys/inv",
                                      "jump": "ops@gate:2200"})
    target = SSHTarget.from_settings("gpu-01", "10.0.0.11", ssh, ssh_config_path=config_file)
    assert (target.address, target.user, target.port) == ("10.0.0.11", "deploy", 22)
    assert target.identity_files == (Path("/keys/inv"),)
    assert target.jump == (Hop("gate", "gate", 2200, "ops", (Path("/keys/default"),)),)


def test_config_fills_what_the_inventory_left_unset(config_file: Path) -> None:
    ssh = SSHSettings.model_validate({"known_hosts": "/kh"})  # port and user only defaulted
    target = SSHTarget.from_settings("gpu-01", "gpu-01", ssh, ssh_config_path=config_file)
    assert (target.address, target.user, target.port) == ("10.9.0.1", "alice", 2201)
    assert target.identity_files[-1] == Path("/keys/default") and target.known_hosts == Path("/kh")
    assert target.jump == ()


def test_config_proxyjump_resolves_the_hop_through_config_too(config_file: Path) -> None:
    target = SSHTarget.from_settings("gpu-07", "10.0.0.17", SSHSettings(), ssh_config_path=config_file)
    assert (target.address, target.user, target.port) == ("10.0.0.17", "bob", 22)
    assert target.jump == (Hop("bastion", "203.0.113.5", 2022, "jumper", (Path("/keys/bastion"),
                                                                            Path("/keys/default"))),)
    assert target.where == "bob@10.0.0.17:22 via bastion"


def test_explicit_address_beats_config_hostname(config_file: Path) -> None:
    target = SSHTarget.from_settings("gpu-01", "10.0.0.11", SSHSettings(), ssh_config_path=config_file)
    assert target.address == "10.0.0.11" and target.user == "alice" and target.port == 2201


def test_use_ssh_config_false_ignores_the_file(config_file: Path) -> None:
    ssh = SSHSettings.model_validate({"use_ssh_config": False})
    target = SSHTarget.from_settings("gpu-01", "gpu-01", ssh, ssh_config_path=config_file)
    assert (target.address, target.user, target.port, target.identity_files) == (
        "gpu-01", getpass.getuser(), 22, ())


def test_config_path_from_environment(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMACTL_SSH_CONFIG", str(config_file))
    assert SSHTarget.from_settings("gpu-01", "gpu-01", SSHSettings()).user == "alice"


def test_plain_objects_count_non_none_as_explicit(config_file: Path) -> None:
    ssh = SimpleNamespace(user=None, port=2299, identity_file=None, jump=None, known_hosts="/kh",
                          host_key_policy="accept-new", connect_timeout_s=3, use_ssh_config=True)
    target = SSHTarget.from_settings("gpu-01", "gpu-01", ssh, ssh_config_path=config_file)
    assert (target.user, target.port, target.host_key_policy, target.connect_timeout_s) == (
        "alice", 2299, "accept-new", 3.0)


def test_bad_policy_is_usage_error() -> None:
    ssh = SimpleNamespace(host_key_policy="yolo", use_ssh_config=False)
    with pytest.raises(UsageError, match="gpu-01: ssh.host_key_policy 'yolo': expected strict or accept-new"):
        SSHTarget.from_settings("gpu-01", "1.2.3.4", ssh)


def test_config_reparsed_only_when_the_file_changes(config_file: Path) -> None:
    first = load_config(config_file)
    assert load_config(config_file) is first
    config_file.write_text(CONFIG.replace("User alice", "User carol"))
    assert SSHTarget.from_settings("gpu-01", "gpu-01", SSHSettings(), ssh_config_path=config_file).user == "carol"
