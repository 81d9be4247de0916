"""Two balancer hosts and a VIP on a real lab (``lab up 1 --balancers 2``): deploy installs nothing the lab
lacks, renders and starts keepalived (checked by the real ``keepalived -t`` on each host), status shows the
holder, drains reach both nginx, and under continuous load through the VIP the loss of the active host
(its link, then its nginx) costs at most 3 s of failed requests, after which nothing fails and the first
host's return leaves the VIP where it is. Run under ``flock /tmp/llamactl-lab.lock``."""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.vip_failover import holders, run, to_markdown
from tests.labfixtures import Lab, lab_available, lab_sh, llamactl

pytestmark = [pytest.mark.lab, pytest.mark.slow]

NAME, SUBNET = "vip", "10.203.0.0/24"
VIP = "10.203.0.250"
CONF = "/etc/nginx/conf.d/llamactl.conf"


@pytest.fixture(scope="module")
def vip_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = lab_available()
    if reason:
        pytest.skip(reason)
    if not os.path.exists("/usr/sbin/keepalived"):
        pytest.skip("keepalived is not installed on this machine (bash scripts/bootstrap.sh installs it)")
    d = tmp_path_factory.mktemp("viplab")
    llamactl("lab", "down", "--dir", str(d), "--name", NAME)
    up = llamactl("lab", "up", "1", "--balancers", "2", "--dir", str(d), "--name", NAME, "--subnet", SUBNET,
                  timeout=1200)
    if up.returncode != 0:
        llamactl("lab", "down", "--dir", str(d), "--name", NAME)
        raise AssertionError(f"lab up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")
    try:
        proc = llamactl("deploy", str(d / "inventory.yaml"), "--json", timeout=1500)
        assert proc.returncode == 0, f"deploy failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        yield Lab(d, d / "inventory.yaml", (d / "endpoint").read_text().strip(), json.loads(proc.stdout))
    finally:
        down = llamactl("lab", "down", "--dir", str(d), "--name", NAME)
        assert down.returncode == 0, down.stderr


def test_deploy_starts_keepalived_and_the_first_host_holds_the_vip(vip_lab: Lab) -> None:
    result = vip_lab.deploy_json
    assert vip_lab.endpoint == f"http://{VIP}:80"
    assert result["ok"] is True and result["balancer"]["changed"] is True
    vip = result["vip"]
    assert vip["address"] == VIP and vip["holder"] == "lab-lb" and vip["error"] is None
    for host in ("lab-lb", "lab-lb2"):
        assert vip["hosts"][host]["action"] == "started" and vip["hosts"][host]["interface"] == "eth0"
        assert vip["hosts"][host]["changed"] == ["/etc/keepalived/keepalived.conf",
                                                 "/etc/keepalived/llamactl-check-nginx.sh"]
        # the same nginx config on each, accepted by nginx -t there; keepalived's config by keepalived -t
        out = lab_sh(vip_lab, host, f"nginx -t 2>&1 && keepalived -t -f /etc/keepalived/keepalived.conf 2>&1 "
                     f"&& echo CONFIG-OK && systemctl is-enabled keepalived && sha256sum {CONF}")
        assert "CONFIG-OK\nenabled\n" in out, out
    sums = {lab_sh(vip_lab, h, f"sha256sum {CONF}").split()[0] for h in ("lab-lb", "lab-lb2")}
    assert len(sums) == 1
    assert holders(vip_lab.state) == ["lab-lb"]


def test_inference_through_the_vip(vip_lab: Lab) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (30, 120, 200)).save(buf, format="JPEG")
    resp = httpx.post(f"{vip_lab.endpoint}/infer", json={"image": base64.b64encode(buf.getvalue()).decode(),
                                                         "question": "What is in this picture?"},
                      timeout=120, trust_env=False)
    assert resp.status_code == 200, resp.text
    assert set(resp.json()["result"]) == {"summary", "caption", "reasoning", "conclusion"}
    # the CLI finds the VIP through the inventory (Inventory.endpoint), as the demo does through lab/endpoint
    photo = vip_lab.dir / "photo.jpg"
    photo.write_bytes(buf.getvalue())
    proc = llamactl("infer", str(photo), "-i", str(vip_lab.inventory), "--json", timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["result"]["conclusion"] is not None


def test_redeploy_touches_nothing(vip_lab: Lab) -> None:
    before = lab_sh(vip_lab, "lab-lb2", "systemctl show -p MainPID --value keepalived")
    proc = llamactl("deploy", str(vip_lab.inventory), "--json", timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["changed"] == 0 and result["vip"]["changed"] is False, result
    assert all(h["action"] == "unchanged" and h["changed"] == [] for h in result["vip"]["hosts"].values())
    assert lab_sh(vip_lab, "lab-lb2", "systemctl show -p MainPID --value keepalived") == before
    # one deploy lock and one audit log: on the first balancer host only
    assert lab_sh(vip_lab, "lab-lb", "wc -l < /var/log/llamactl/audit.log").strip() == "2"
    assert lab_sh(vip_lab, "lab-lb2", "test -e /var/log/llamactl/audit.log || echo none") == "none\n"


def test_status_shows_each_balancer_and_the_holder(vip_lab: Lab) -> None:
    proc = llamactl("status", str(vip_lab.inventory), "--json", timeout=120)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["vip"]["holder"] == "lab-lb" and report["vip"]["ok"] is True
    # each balancer host probed at its own address (not the first one through the VIP)
    assert {(b["name"], b["url"].removesuffix("/healthz"), b["state"]) for b in report["balancers"]} == {
        ("lab-lb", "http://10.203.0.10", "ready"), ("lab-lb2", "http://10.203.0.251", "ready")}  # httpx drops :80
    assert report["vip"]["hosts"] == {"lab-lb": {"keepalived": "active", "holds_vip": True},
                                      "lab-lb2": {"keepalived": "active", "holds_vip": False}}
    human = llamactl("status", str(vip_lab.inventory), timeout=120, env={"COLUMNS": "250"})
    assert f"VIP {VIP}: held by lab-lb; keepalived: lab-lb active, lab-lb2 active" in human.stdout, human.stdout


def test_missing_keepalived_fails_preflight_with_the_command(vip_lab: Lab) -> None:
    # keepalived hidden on lab-lb2 only (a bind mount in that host's own mount namespace); the lab host has no
    # registry, so deploy cannot install it and must stop before changing anything, naming the command.
    lab_sh(vip_lab, "lab-lb2", "mount --bind /dev/null /usr/sbin/keepalived")
    try:
        proc = llamactl("deploy", str(vip_lab.inventory), timeout=600)
    finally:
        lab_sh(vip_lab, "lab-lb2", "umount /usr/sbin/keepalived")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert ("lab-lb2: balancer.vip needs keepalived, which is not installed and could not be installed" in proc.stderr
            and "install it on lab-lb2 with `apt-get install -y --no-install-recommends keepalived` and deploy "
            "again" in proc.stderr), proc.stderr
    assert holders(vip_lab.state) == ["lab-lb"]  # nothing changed: keepalived still runs, the VIP stays


def test_a_drain_reaches_every_balancer_host(vip_lab: Lab) -> None:
    from llamactl.inventory import load_inventory
    from llamactl.ops.balancer import apply_balancer_config
    from llamactl.ops.connect import HostPool

    inv = load_inventory(vip_lab.inventory)
    with HostPool(inv) as pool:
        res = apply_balancer_config(inv, pool.balancers(), frozenset({"lab-host1/0"}), reason="test")
        assert [h.host for h in res.hosts if h.reloaded] == ["lab-lb", "lab-lb2"]
        for host in ("lab-lb", "lab-lb2"):
            assert " down;" in lab_sh(vip_lab, host, f"grep -F 'server 10.203.0.11:8000' {CONF}")
        apply_balancer_config(inv, pool.balancers(), frozenset(), reason="test")
    for host in ("lab-lb", "lab-lb2"):
        assert " down;" not in lab_sh(vip_lab, host, f"grep -F 'server 10.203.0.11:8000' {CONF}")


def test_losing_the_active_balancer_costs_at_most_3_s(vip_lab: Lab) -> None:
    result = run(vip_lab.dir)
    out = os.environ.get("LLAMACTL_VIP_BENCH_OUT")  # bench/results/vip_failover: record the figures
    if out:
        Path(out).with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(out).with_suffix(".md").write_text(to_markdown(result))
    for s in result["scenarios"]:  # type: ignore[attr-defined]
        assert s["switch_s"] is not None, s
        assert s["failed_span_s"] <= 3.0, s
        assert s["first_ok_after_fault_s"] is not None and s["first_ok_after_fault_s"] <= 3.5, s
        assert s["failures_after_switch_settled"] == 0, s
        assert not s["flapped"] and s["failures_after_return"] == 0, s
    assert result["scenarios"][0]["active_before"] == "lab-lb"  # type: ignore[index]
