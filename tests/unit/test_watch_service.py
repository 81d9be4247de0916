"""``health.watch``: the files and commands that run ``llamactl watch`` as a service on the balancer host."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from llamactl.inventory import load_inventory
from llamactl.plan import watchsvc
from llamactl.plan.deploy import DesiredHost, plan_host
from llamactl.plan.facts import HostFacts, UnitState
from llamactl.plan.release import Artifact, Release

INVENTORY = """\
version: 1
cluster: c1
defaults:
  gpus: 0
  model: {source: /srv/model, upload_from: model}
  ssh: {identity_file: keys/id_ed25519, known_hosts: known_hosts}
  server:
    api_keys: {env: KEYS}
    env: {NOTE: "a ${LITERAL}, ${WHO}"}
  pip: {wheelhouse: wheels, no_index: true}
groups:
  g:
    hosts:
      h1: {address: 10.9.0.1}
      h2: {address: 10.9.0.2, ssh: {identity_file: ~/other_key}}
balancer:
  hosts:
    lb: {address: 10.9.0.100}
health: {interval_s: 7, watch: true}
redis: {password: {env: REDIS_PW}}
"""


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "inv").mkdir()
    path = tmp_path / "inv" / "inventory.yaml"
    path.write_text(INVENTORY.replace("a ${LITERAL}", "a $${LITERAL}"))
    return path, tmp_path / "home"


def test_placed_inventory_is_self_contained_and_carries_no_api_key(setup: tuple[Path, Path]) -> None:
    path, home = setup
    from llamactl.inventory.yamltree import parse_yaml

    tree, problems = parse_yaml(path.read_text(), str(path), {"KEYS": "sk-1", "WHO": "ops",
                                                              "REDIS_PW": "redis-password-0123456"})
    assert problems == []
    base = path.parent
    assert watchsvc.ssh_files(tree.data, base, home) == [home / "other_key", base / "keys/id_ed25519",
                                                        base / "known_hosts"]
    contents = {p: p.name.encode() for p in watchsvc.ssh_files(tree.data, base, home)}
    inv = load_inventory(path, env={"KEYS": "sk-1", "WHO": "ops", "REDIS_PW": "redis-password-0123456"})
    files = watchsvc.watch_files(inv, tree.data, base, home, contents, "/opt/llamactl/current/bin/llamactl")
    assert {p: f.mode for p, f in files.items()} == {
        "/etc/llamactl/watch/ssh-0-other_key": 0o600, "/etc/llamactl/watch/ssh-1-id_ed25519": 0o600,
        "/etc/llamactl/watch/ssh-2-known_hosts": 0o600, "/etc/llamactl/watch/inventory.yaml": 0o600,
        "/etc/systemd/system/llamactl-watch.service": 0o644}
    placed = files[watchsvc.WATCH_INVENTORY].content.decode()
    assert "sk-1" not in placed
    doc = yaml.safe_load(placed)
    assert doc["defaults"]["ssh"] == {"identity_file": "/etc/llamactl/watch/ssh-1-id_ed25519",
                                      "known_hosts": "/etc/llamactl/watch/ssh-2-known_hosts",
                                      "use_ssh_config": False}
    assert doc["groups"]["g"]["hosts"]["h2"]["ssh"] == {"identity_file": "/etc/llamactl/watch/ssh-0-other_key"}
    assert doc["defaults"]["model"] == {"source": "/srv/model"} and doc["defaults"]["pip"] == {"no_index": True}
    assert "api_keys" not in doc["defaults"]["server"]
    assert "redis" not in doc  # watch never uses Redis: no password reference to resolve on the balancer host
    # read back on the balancer host: loads without the controller's environment or files
    (path.parent / "placed.yaml").write_text(placed)
    again = load_inventory(path.parent / "placed.yaml", env={})
    assert again.host("h1").server.env == {"NOTE": "a ${LITERAL}, ops"}
    assert again.host("h2").ssh.identity_file == "/etc/llamactl/watch/ssh-0-other_key"


def test_watch_unit(setup: tuple[Path, Path], tmp_path: Path) -> None:
    inv = load_inventory(setup[0], env={"KEYS": "k", "WHO": "w", "REDIS_PW": "redis-password-0123456"})
    unit = watchsvc.render_watch_unit(inv, "/opt/llamactl/current/bin/llamactl")
    text = unit.content.decode()
    assert unit.mode == 0o644
    assert ("ExecStart=/opt/llamactl/current/bin/llamactl watch /etc/llamactl/watch/inventory.yaml --interval 7 "
            "--log-file /var/log/llamactl/watch.log") in text
    assert "LogsDirectory=llamactl\n" in text and "Restart=always" in text and "cluster c1" in text
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    path = tmp_path / "llamactl-watch.service"
    path.write_bytes(watchsvc.render_watch_unit(inv, shutil.which("true") or "/bin/true").content)
    done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_commands() -> None:
    assert watchsvc.is_active_command().shell() == "systemctl is-active llamactl-watch.service"
    assert watchsvc.remove_command().display() == (
        "if [ -e /etc/systemd/system/llamactl-watch.service ]; then systemctl disable --now llamactl-watch.service; "
        "rm -rf /etc/systemd/system/llamactl-watch.service /etc/llamactl/watch && systemctl daemon-reload && "
        "echo removed; fi")


def test_plan_installs_a_controller_release_and_starts_the_service() -> None:
    from llamactl.inventory import PipSettings
    from llamactl.plan.deploy import Run
    from llamactl.plan.render import RenderedFile

    unit = watchsvc.WATCH_UNIT_PATH
    desired = DesiredHost(name="lb", python="/usr/bin/python3", install_dir="/opt/llamactl", gpus=(), instances=(),
                          files={unit: RenderedFile(b"[Unit]\n", 0o644)},
                          release=Release("r2", Artifact(Path("/w/llamactl.whl"), "llamactl.whl", "", 1)),
                          pip=PipSettings(no_index=True), extra="", services=(watchsvc.WATCH_UNIT,))
    fresh = HostFacts(python=(3, 11, 2), venv=True, free_bytes=None, systemd=True, files={unit: None},
                      wheelhouse={}, releases=[], current=None, model_manifest=None, model_present=None)
    plan = plan_host(desired, fresh)
    cmds = [s.command.display() for s in plan.steps if isinstance(s, Run)]
    build = next(c for c in cmds if "pip install" in c)
    assert build.endswith("--no-index /opt/llamactl/wheels/llamactl.whl && touch /opt/llamactl/releases/r2/.complete")
    assert "systemctl enable llamactl-watch.service" in cmds and "systemctl daemon-reload" in cmds
    assert [(a.unit, a.action, a.url) for a in plan.actions] == [("llamactl-watch.service", "start", "")]
    import hashlib

    running = replace(fresh, files={unit: hashlib.sha256(b"[Unit]\n").hexdigest()}, releases=["r2"], current="r2",
                      units={watchsvc.WATCH_UNIT: UnitState("active", "enabled")})
    assert plan_host(desired, running).steps == [] and plan_host(desired, running).actions == []
    upgraded = plan_host(desired, replace(running, current="r1", releases=["r1", "r2"]))
    assert [(a.unit, a.action) for a in upgraded.actions] == [("llamactl-watch.service", "restart")]


def test_placed_inventory_leaves_the_vrrp_password_out(tmp_path: Path) -> None:
    from llamactl.inventory.yamltree import parse_yaml

    path = tmp_path / "inventory.yaml"
    path.write_text(INVENTORY.replace("a ${LITERAL}", "a $${LITERAL}").replace(
        "    lb: {address: 10.9.0.100}\n", "    lb: {address: 10.9.0.100}\n"
                                      "    lb2: {address: 10.9.0.101}\n  vip: {address: 10.9.0.50, router_id: 3, "
                                      "advert_interval_s: 1, auth: {env: VRRP_PW}}\n"))
    env = {"KEYS": "sk-1", "WHO": "ops", "VRRP_PW": "vrrp-pw", "REDIS_PW": "redis-password-0123456789"}
    tree, _ = parse_yaml(path.read_text(), str(path), env)
    inv = load_inventory(path, env=env)
    placed = watchsvc.watch_inventory(tree.data, tmp_path, tmp_path / "home",
                                      {p: str(p) for p in watchsvc.ssh_files(tree.data, tmp_path, tmp_path / "home")})
    doc = yaml.safe_load(placed)
    assert doc["balancer"]["vip"] == {"address": "10.9.0.50", "router_id": 3, "advert_interval_s": 1}
    (tmp_path / "placed.yaml").write_text(placed.decode())
    assert load_inventory(tmp_path / "placed.yaml", env={}).balancer.vip is not None
    assert inv.balancer.vip is not None and inv.balancer.vip.auth == "vrrp-pw"
