"""A real lab of 3 hosts + balancer: SSH with strict host keys, isolation, systemd, nginx, venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import paramiko
import pytest
import yaml

from llamactl.lab import core
from llamactl.lab.state import LabState
from tests.lab.labhelpers import run, ssh
from tests.labfixtures import LAB_NAME, LAB_SUBNET

pytestmark = pytest.mark.lab


def test_every_host_answers_ssh_with_strict_host_keys(lab3: LabState) -> None:
    for h in lab3.hosts:
        with ssh(lab3, h.name) as client:
            rc, out, _ = run(client, "hostname; cat /etc/machine-id")
            name, machine_id = out.split()
            assert (rc, name) == (0, h.name)
            assert machine_id != Path("/etc/machine-id").read_text().strip()


def test_a_host_key_not_in_known_hosts_is_refused(lab3: LabState, tmp_path: Path) -> None:
    # host1's line under host2's address: the key host2 presents does not match, so strict checking refuses.
    lines = (Path(lab3.dir) / "known_hosts").read_text().splitlines()
    h1, h2 = lab3.servers[0], lab3.servers[1]
    key = next(line for line in lines if line.startswith(h1.address + ",")).split(" ", 1)[1]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"{h2.address} {key}\n")
    with pytest.raises(paramiko.SSHException):
        ssh(lab3, h2.name, known_hosts=wrong)


def test_hosts_have_their_own_files_and_host_keys(lab3: LabState) -> None:
    probe = f"/opt/probe-{uuid.uuid4().hex}"
    h1, h2 = lab3.servers[0].name, lab3.servers[1].name
    with ssh(lab3, h1) as c1, ssh(lab3, h2) as c2:
        assert run(c1, f"echo one > {probe} && echo x > /var/lib/probe && cat {probe}")[1] == "one\n"
        assert run(c2, f"test -e {probe}")[0] == 1
        assert run(c2, "test -e /var/lib/probe")[0] == 1
        keys = {run(c, "cat /etc/ssh/ssh_host_ed25519_key.pub")[1].split()[1] for c in (c1, c2)}
        assert len(keys) == 2
        assert run(c1, "ls /etc/ssh/ssh_host_rsa_key /etc/ssh/ssh_host_ecdsa_key")[0] != 0
    assert not Path(probe).exists() and not Path("/var/lib/probe").exists()


def test_hosts_resolve_each_other_by_name_and_cannot_reach_out(lab3: LabState) -> None:
    with ssh(lab3, "lab-host1") as client:
        rc, out, _ = run(client, "getent hosts lab-lb lab-host3")
        assert rc == 0 and lab3.balancer.address in out
        # No default route: anything outside the lab fails at once instead of hanging.
        rc, _, err = run(client, "python3 -c \"import socket; socket.create_connection(('192.0.2.1', 80), 2)\"")
        assert rc != 0 and "unreachable" in err.lower()


def test_systemd_is_pid1_and_running_without_failed_units(lab3: LabState) -> None:
    for h in lab3.hosts:
        with ssh(lab3, h.name) as client:
            assert run(client, "cat /proc/1/comm")[1].strip() == "systemd"
            state = run(client, "systemctl is-system-running")[1].strip()
            failed = run(client, "systemctl --failed --no-legend --plain")[1].strip()
            assert state == "running" and failed == "", (h.name, state, failed)
            assert run(client, "systemctl is-active ssh")[1].strip() == "active"
            # /proc/sys and /sys are read-only: no sysctl reaches the shared kernel.
            assert run(client, "echo 1 > /proc/sys/net/ipv4/ip_forward")[0] != 0
            assert run(client, "touch /sys/probe")[0] != 0


def test_nginx_runs_only_on_the_balancer(lab3: LabState) -> None:
    with ssh(lab3, "lab-lb") as client:
        assert run(client, "systemctl is-active nginx")[1].strip() == "active"
        rc, _, err = run(client, "nginx -t")
        assert rc == 0, err
        _, dump, _ = run(client, "nginx -T 2>/dev/null")
        assert "include /etc/nginx/conf.d/*.conf;" in dump
        assert run(client, "test -e /etc/nginx/sites-enabled/default")[0] == 1
    for h in lab3.servers:
        with ssh(lab3, h.name) as client:
            assert run(client, "systemctl is-active nginx")[1].strip() != "active"


def test_python_venv_works_on_a_host(lab3: LabState) -> None:
    with ssh(lab3, "lab-host2") as client:
        rc, out, err = run(client, "/usr/bin/python3 -m venv /opt/venv-probe && "
                                   "/opt/venv-probe/bin/python -c 'import sys; print(sys.prefix)'", timeout=120)
        assert (rc, out.strip()) == (0, "/opt/venv-probe"), err


def test_files_written_for_deploy(lab3: LabState) -> None:
    d = Path(lab3.dir)
    assert (d / "endpoint").read_text() == f"http://{lab3.balancer.address}:80\n"
    inv = yaml.safe_load((d / "inventory.yaml").read_text())
    assert inv["defaults"]["ssh"]["known_hosts"] == str(d / "known_hosts")
    assert set(inv["groups"]["lab"]["hosts"]) == {"lab-host1", "lab-host2", "lab-host3"}
    assert (d / "model" / "config.json").is_file()
    wheels = [p.name for p in (d / "wheelhouse").glob("*.whl")]
    assert any(w.startswith("torch-2.13.0+cpu-") for w in wheels)
    assert any(w.startswith("transformers-") for w in wheels)


def test_inventory_validates(lab3: LabState) -> None:
    load = pytest.importorskip("llamactl.inventory").load_inventory
    inv = load(Path(lab3.dir) / "inventory.yaml")
    assert [h.name for h in inv.hosts] == ["lab-host1", "lab-host2", "lab-host3"]
    assert [h.address for h in inv.hosts] == [h.address for h in lab3.servers]
    assert inv.endpoint == f"http://{lab3.balancer.address}:80"
    assert [i.url for i in inv.instances()] == [f"http://{h.address}:8000" for h in lab3.servers]


def test_status_reports_every_host(lab3: LabState) -> None:
    _, rows = core.status(Path(lab3.dir))
    assert [(r.name, r.systemd, r.sshd) for r in rows] == [(h.name, "running", True) for h in lab3.hosts]


def test_status_command_json(lab3: LabState) -> None:
    proc = subprocess.run([sys.executable, "-m", "llamactl", "lab", "status", "--dir", lab3.dir, "--json"],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["name"], report["subnet"]) == (LAB_NAME, LAB_SUBNET) == (lab3.name, lab3.subnet)
    assert {h["name"]: (h["address"], h["systemd"], h["sshd"]) for h in report["hosts"]} == {
        h.name: (h.address, "running", True) for h in lab3.hosts
    }


@pytest.mark.slow
def test_wheelhouse_resolves_the_server_extra_without_an_index(lab3: LabState) -> None:
    from llamactl.lab import wheelhouse

    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-index",
         "--find-links", str(Path(lab3.dir) / "wheelhouse"), *wheelhouse.server_requirements()],
        check=False, capture_output=True, text=True, timeout=300, env={"PIP_CONFIG_FILE": "/dev/null", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torch-2.13.0+cpu" in proc.stdout and "bitsandbytes-" in proc.stdout


def test_hosts_do_not_see_the_controllers_lab_files_or_caches(lab3: LabState) -> None:
    assert (Path(lab3.dir) / "id_ed25519").exists() and Path("/var/cache/llamactl-lab").is_dir()
    with ssh(lab3, "lab-host1") as client:
        for path in (lab3.dir, "/var/cache/llamactl-lab"):
            assert run(client, f'test ! -e {path} || test -z "$(ls -A {path})"')[0] == 0, path
        assert run(client, "test -e /etc/pip.conf || test -e /etc/xdg/pip")[0] == 1


def test_validate_command_accepts_the_lab_inventory(lab3: LabState) -> None:
    proc = subprocess.run([sys.executable, "-m", "llamactl", "validate", str(Path(lab3.dir) / "inventory.yaml")],
                          check=False, capture_output=True, text=True, timeout=60, env={**os.environ, "NO_COLOR": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cluster lab, 3 hosts" in " ".join(proc.stdout.split())


def test_llamactl_ssh_edge_reaches_every_lab_host_with_strict_keys(lab3: LabState) -> None:
    from llamactl.inventory import load_inventory
    from llamactl.plan.command import Command
    from llamactl.remote.ssh import SSHTarget, connect

    inv = load_inventory(Path(lab3.dir) / "inventory.yaml")
    targets = [(h.name, h.address, h.ssh) for h in inv.hosts]
    targets += [(b.name, b.address, b.ssh) for b in inv.balancer.hosts]
    for name, address, settings in targets:
        assert settings.host_key_policy == "strict"
        executor = connect(SSHTarget.from_settings(name, address, settings))
        try:
            assert executor.run(Command(("hostname",))).stdout.strip() == name
        finally:
            executor.close()
