"""Operating a deployed lab (3 hosts + nginx balancer) under continuous load through the balancer:
rolling restart, kill -9 of a server, and watch healing a stopped server all lose 0 requests (kill -9: except a
response the killed server was already writing, which no proxy can retry)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
from ops_support import LabLoad

from tests.labfixtures import Lab, lab_sh, llamactl

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def uptimes(lab: Lab) -> dict[str, float]:
    from llamactl.inventory import load_inventory

    out = {}
    for inst in load_inventory(lab.inventory).instances():
        out[inst.id] = float(httpx.get(inst.url + "/health", timeout=5, trust_env=False).json()["uptime_s"])
    return out


def wait_all_ready(lab: Lab, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if llamactl("status", str(lab.inventory), "--json", timeout=60).returncode == 0:
            return time.monotonic() - start
        time.sleep(1)
    raise AssertionError(f"not all instances ready within {timeout_s:g} s")


def test_rolling_restart_under_load_loses_nothing(deployed_lab: Lab) -> None:
    wait_all_ready(deployed_lab, 120)
    before = uptimes(deployed_lab)
    with LabLoad(deployed_lab.endpoint, max_requests=400, max_seconds=600) as load:
        load.wait_ok(10)
        started = time.monotonic()
        proc = llamactl("restart", str(deployed_lab.inventory), "--rolling", "--yes", timeout=600)
        load.wait_ok(max(0, 200 - load.ok))
    assert proc.returncode == 0, proc.stderr
    assert "3 instance(s) restarted" in proc.stderr
    since = time.monotonic() - started
    after = uptimes(deployed_lab)
    assert all(after[i] < since for i in after), (before, after, since)  # every server is a new process
    assert load.failed == [] and load.ok >= 200, load.failed[:5]


def test_kill_9_under_load_loses_nothing_and_heals(deployed_lab: Lab) -> None:
    wait_all_ready(deployed_lab, 120)
    restarts = int(lab_sh(deployed_lab, "lab-host1", "systemctl show -p NRestarts --value llamactl@0.service"))
    with LabLoad(deployed_lab.endpoint, max_requests=400, max_seconds=600) as load:
        load.wait_ok(20)
        lab_sh(deployed_lab, "lab-host1", "systemctl kill -s KILL llamactl@0.service")
        healed = wait_all_ready(deployed_lab, 90)
        load.wait_ok(max(0, 200 - load.ok))
    after = int(lab_sh(deployed_lab, "lab-host1", "systemctl show -p NRestarts --value llamactl@0.service"))
    assert after == restarts + 1  # systemd brought it back (Restart=on-failure)
    assert healed < 90
    # nginx retries every request the dead server had not started answering. One whose response headers were
    # already on their way when SIGKILL landed (uvicorn writes them before the body) reaches the client cut short,
    # and no proxy can retry it: that is the only loss a kill -9 may cause, at most one response per client.
    # Seen once in many CI runs (2026-11-28: "peer closed connection without sending complete message body").
    cut = [f for f in load.failed if "without sending complete message body" in f]
    assert [f for f in load.failed if f not in cut] == [] and len(cut) <= 4 and load.ok >= 200, load.failed[:5]


def test_watch_heals_a_stopped_server(deployed_lab: Lab) -> None:
    wait_all_ready(deployed_lab, 120)
    lab_sh(deployed_lab, "lab-host2", "systemctl stop llamactl@0.service")
    watch = subprocess.Popen([sys.executable, "-m", "llamactl", "watch", str(deployed_lab.inventory),
                              "--interval", "1", "--backoff", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events: list[dict[str, object]] = []
    try:
        with LabLoad(deployed_lab.endpoint, max_requests=2000, max_seconds=200) as load:
            deadline = time.monotonic() + 180
            assert watch.stdout is not None
            while time.monotonic() < deadline:
                line = watch.stdout.readline()
                if not line:
                    break
                events.append(json.loads(line))
                if events[-1].get("event") == "undrained" and events[-1].get("instance") == "lab-host2/0":
                    break
    finally:
        watch.terminate()
        watch.wait(timeout=30)
    names = [(e.get("event"), e.get("instance")) for e in events]
    assert ("drained", "lab-host2/0") in names and ("restart", "lab-host2/0") in names, names
    assert ("undrained", "lab-host2/0") in names, names
    assert lab_sh(deployed_lab, "lab-host2", "systemctl is-active llamactl@0.service").strip() == "active"
    assert load.failed == [], load.failed[:5]
    wait_all_ready(deployed_lab, 60)


def test_redeploy_with_a_changed_setting_under_load_loses_nothing(deployed_lab: Lab, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """deploy restarts serving instances through the balancer, batch by batch (issue: zero-downtime deploys)."""
    import yaml

    wait_all_ready(deployed_lab, 120)
    data = yaml.safe_load(deployed_lab.inventory.read_text())
    data["defaults"]["server"]["max_batch_size"] = 3
    changed = tmp_path / "inventory.yaml"
    changed.write_text(yaml.safe_dump(data, sort_keys=False))
    with LabLoad(deployed_lab.endpoint, max_requests=400, max_seconds=600) as load:
        load.wait_ok(10)
        started = time.monotonic()
        proc = llamactl("deploy", str(changed), "--json", timeout=900)
        load.wait_ok(max(0, 200 - load.ok))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert all(any("settings changed" in c for c in h["changes"]) for h in result["hosts"].values()), result
    since = time.monotonic() - started
    after = uptimes(deployed_lab)
    assert all(after[i] < since for i in after), (after, since)  # every server is a new process
    assert load.failed == [] and load.ok >= 200, load.failed[:5]
    back = llamactl("deploy", str(deployed_lab.inventory), "--json", timeout=900)  # leave the lab as it was
    assert back.returncode == 0, back.stderr
