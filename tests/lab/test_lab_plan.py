"""Pure parts of the lab: names, addresses, inventory, known_hosts, wheelhouse requirements."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.errors import UsageError
from llamactl.lab import inventory, wheelhouse
from llamactl.lab.state import LabState, plan_state


def test_names_and_addresses_follow_the_subnet() -> None:
    s = plan_state("lab", "10.203.0.0/24", Path("/d"), 3)
    assert [(h.name, h.address, h.netns, h.veth) for h in s.hosts] == [
        ("lab-lb", "10.203.0.10", "lab-lb", "vlab-lb"),
        ("lab-host1", "10.203.0.11", "lab-host1", "vlab-1"),
        ("lab-host2", "10.203.0.12", "lab-host2", "vlab-2"),
        ("lab-host3", "10.203.0.13", "lab-host3", "vlab-3"),
    ]
    assert (s.bridge, s.bridge_address) == ("br-lab", "10.203.0.1/24")
    assert s.hosts[1].state_dir == "/d/hosts/lab-host1"


def test_interface_names_fit_15_characters_at_the_limits() -> None:
    s = plan_state("abcdefgh", "10.0.0.0/16", Path("/d"), 200)
    assert max(len(n) for h in s.hosts for n in (h.veth,)) <= 15 and len(s.bridge) <= 15


@pytest.mark.parametrize(
    ("name", "subnet", "count", "message"),
    [
        ("Lab", "10.203.0.0/24", 1, "--name 'Lab': expected 1-8 characters"),
        ("toolongname", "10.203.0.0/24", 1, "--name 'toolongname'"),
        ("lab", "10.203.0.1/24", 1, "--subnet '10.203.0.1/24': 10.203.0.1/24 has host bits set"),
        ("lab", "10.203.0.0/28", 5, "--subnet 10.203.0.0/28: too small for 5 hosts"),
        ("lab", "10.203.0.0/24", 0, "N=0: expected between 1 and 200 hosts"),
    ],
)
def test_bad_options_are_named(name: str, subnet: str, count: int, message: str) -> None:
    with pytest.raises(UsageError) as err:
        plan_state(name, subnet, Path("/d"), count)
    assert str(err.value).startswith(message)


def lab(tmp: str = "/srv/lab") -> LabState:
    return plan_state("lab", "10.203.0.0/24", Path(tmp), 2)


def test_inventory_points_at_lab_files_with_absolute_paths() -> None:
    inv = inventory.build_inventory(lab())
    d = inv["defaults"]
    assert d["ssh"]["identity_file"] == "/srv/lab/id_ed25519"
    assert (d["ssh"]["user"], d["ssh"]["host_key_policy"], d["gpus"], d["python"]) == (
        "root", "strict", 0, "/usr/bin/python3")
    assert d["model"]["upload_from"] == "/srv/lab/model" and d["model"]["dtype"] == "float32"
    assert d["pip"] == {"no_index": True, "wheelhouse": "/srv/lab/wheelhouse"}
    assert inv["groups"]["lab"]["hosts"] == {"lab-host1": {"address": "10.203.0.11"},
                                             "lab-host2": {"address": "10.203.0.12"}}
    assert inv["balancer"]["hosts"] == {"lab-lb": {"address": "10.203.0.10"}}
    assert inventory.endpoint(lab()) == "http://10.203.0.10:80"


def test_known_hosts_and_hosts_file_list_every_host() -> None:
    keys = {h.name: f"ssh-ed25519 KEY{h.name} root@{h.name}" for h in lab().hosts}
    assert inventory.known_hosts(lab(), keys).splitlines() == [
        "10.203.0.10,lab-lb ssh-ed25519 KEYlab-lb",
        "10.203.0.11,lab-host1 ssh-ed25519 KEYlab-host1",
        "10.203.0.12,lab-host2 ssh-ed25519 KEYlab-host2",
    ]
    hosts = inventory.hosts_file(lab())
    assert "10.203.0.10\tlab-lb\n" in hosts and "10.203.0.12\tlab-host2\n" in hosts


def test_wheelhouse_requirements_are_base_plus_server_extra() -> None:
    reqs = wheelhouse.server_requirements()
    names = {r.split(">")[0].split("<")[0].split("=")[0].split(";")[0] for r in reqs}
    assert {"torch", "transformers", "fastapi", "uvicorn", "paramiko", "typer", "bitsandbytes"} <= names
    assert not {"pytest", "mypy"} & names
    assert all(";" not in r for r in reqs)
