"""`pip.extras`: more of llamactl's extras in a server host's release venv (flash4 on Hopper GPUs), in a venv of
their own so adding or dropping one builds it anew (from a copy of the active one) rather than reusing the last."""

from __future__ import annotations

from pathlib import Path

from llamactl.inventory import load_inventory
from llamactl.ops.deploy import prepare
from llamactl.plan.deploy import Run, desired_host, plan_host
from llamactl.plan.facts import HostFacts

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = (ROOT / "inventory.example.yaml").read_text()


def test_a_group_with_extras_gets_its_own_release_venv_with_them(tmp_path: Path) -> None:
    text = EXAMPLE.replace("  l4:\n    gpus: 2\n", "  l4:\n    gpus: 2\n    pip:\n      extras: [flash4, flash4]\n", 1)
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    inv = load_inventory(path, env={})
    wheel = tmp_path / "llamactl-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"not really a wheel")
    ship = prepare(inv, wheel)
    hosts = {spec.name: spec for spec in inv.hosts}
    plain, extra = ship.release_for(hosts["gpu-01"]), ship.release_for(hosts["gpu-03"])
    assert hosts["gpu-03"].pip.extras == ["flash4"] and hosts["gpu-01"].pip.extras == []  # listed twice: once
    assert extra.release_id == plain.release_id + "+flash4" and ship.release_id == plain.release_id
    assert extra.wheel == plain.wheel

    # gpu-03 runs the plain release now: the plan builds the new venv from a copy of it, with both extras
    facts = HostFacts(python=(3, 11, 2), venv=True, free_bytes=50 * 1024**3, systemd=True, files={},
                      wheelhouse={}, releases=[plain.release_id], current=plain.release_id,
                      model_manifest=None, model_present=True, units={}, gpu_count=8)
    build = {}
    for name in ("gpu-01", "gpu-03"):
        desired = desired_host(inv, hosts[name], ship.release_for(hosts[name]), None)
        runs = [s.command.display() for s in plan_host(desired, facts).steps if isinstance(s, Run)]
        build[name] = [c for c in runs if "pip install" in c]
    assert build["gpu-01"] == []  # its release is there already
    [line] = build["gpu-03"]
    venv = f"/opt/llamactl/releases/{plain.release_id}+flash4"
    assert f"cp -a /opt/llamactl/releases/{plain.release_id} {venv}" in line
    assert f"'/opt/llamactl/wheels/{wheel.name}[server,flash4]'" in line
    assert f"touch {venv}/.complete" in line
