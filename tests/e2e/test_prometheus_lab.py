"""The lab's balancer host runs Prometheus (inventory ``prometheus:``): it scrapes every instance and nginx
(its targets API says up), has the rules loaded, reloads (never restarts) on new rules; and plain ``status``
shows the balancer's own figures from nginx stub_status."""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from llamactl.inventory import load_inventory
from tests.e2e.test_deploy import jpeg, write_inventory
from tests.labfixtures import Lab, lab_sh, llamactl

pytestmark = [pytest.mark.lab, pytest.mark.slow]
UNIT = "llamactl-prometheus.service"


def prometheus_url(lab: Lab) -> str:
    inv = load_inventory(lab.inventory)
    assert inv.prometheus is not None
    return f"http://{inv.balancer.hosts[0].address}:{inv.prometheus.port}"


def api(lab: Lab, path: str) -> dict:  # type: ignore[type-arg]
    resp = httpx.get(prometheus_url(lab) + path, timeout=10, trust_env=False)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "success", body
    return body["data"]  # type: ignore[no-any-return]


def targets_up(lab: Lab, timeout_s: float = 60) -> dict[str, dict[str, str]]:
    """Wait until every active target is up; returns job -> instance label -> health."""
    deadline = time.monotonic() + timeout_s
    while True:
        active = api(lab, "/api/v1/targets?state=active")["activeTargets"]
        seen: dict[str, dict[str, str]] = {}
        for t in active:
            seen.setdefault(t["labels"]["job"], {})[t["labels"]["instance"]] = t["health"]
        if active and all(t["health"] == "up" for t in active):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(json.dumps(seen, indent=1))
        time.sleep(1)


def test_prometheus_scrapes_every_instance_and_the_balancer(deployed_lab: Lab) -> None:
    changes = deployed_lab.deploy_json["prometheus"]["changes"]["lab-lb"]
    assert f"start {UNIT} (not running)" in changes and "start llamactl-nginx-exporter.service (not running)" in changes
    seen = targets_up(deployed_lab)
    instances = sorted(i.id for i in load_inventory(deployed_lab.inventory).instances())
    assert sorted(seen["llamactl"]) == instances and set(seen["llamactl"].values()) == {"up"}
    assert seen["llamactl-balancer"] == {"lab-lb/nginx": "up"}
    # the series behind the rules and the dashboard are there, with the file_sd labels
    ready = api(deployed_lab, "/api/v1/query?query=llamactl_ready")["result"]
    assert sorted(r["metric"]["instance"] for r in ready) == instances
    assert all(r["metric"]["cluster"] == "lab" for r in ready)
    nginx = api(deployed_lab, "/api/v1/query?query=nginx_http_requests_total")["result"]
    assert nginx and float(nginx[0]["value"][1]) > 0
    groups = {g["name"] for g in api(deployed_lab, "/api/v1/rules")["groups"]}
    assert groups == {"llamactl-lab-recording", "llamactl-lab-alerts"}
    assert lab_sh(deployed_lab, "lab-lb", f"systemctl is-enabled {UNIT}").strip() == "enabled"


def _rule_expr(lab: Lab, alert: str) -> str:
    for group in api(lab, "/api/v1/rules")["groups"]:
        for rule in group["rules"]:
            if rule["name"] == alert:
                return str(rule["query"])
    raise AssertionError(f"no rule {alert}")


def test_new_rules_reload_prometheus_and_never_restart_it(deployed_lab: Lab, tmp_path: Path) -> None:
    pid = lab_sh(deployed_lab, "lab-lb", f"systemctl show -p MainPID --value {UNIT}").strip()
    inv = write_inventory(deployed_lab, tmp_path, lambda d: d["health"]["alerts"].__setitem__("ttft_p95_slo_s", 7.5))
    try:
        proc = llamactl("deploy", str(inv), "--json", timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        result = json.loads(proc.stdout)
        assert result["prometheus"]["changes"] == {"lab-lb": [
            "updated /etc/llamactl/prometheus/prometheus.yml", f"reload {UNIT} (config or rules changed)"]}
        assert all(h["changed"] == 0 for h in result["hosts"].values())  # the servers were not touched
        deadline = time.monotonic() + 30
        while "> 7.5" not in _rule_expr(deployed_lab, "LlamactlTtftP95OverSLO"):
            assert time.monotonic() < deadline, _rule_expr(deployed_lab, "LlamactlTtftP95OverSLO")
            time.sleep(0.5)
        assert lab_sh(deployed_lab, "lab-lb", f"systemctl show -p MainPID --value {UNIT}").strip() == pid
        reloads = api(deployed_lab, "/api/v1/query?query=prometheus_config_last_reload_successful")["result"]
        assert reloads and reloads[0]["value"][1] == "1"
    finally:
        started = time.time()
        back = llamactl("deploy", str(deployed_lab.inventory), "--json", timeout=600)
    assert back.returncode == 0, back.stdout + back.stderr
    deadline = time.monotonic() + 30
    while last_reload(deployed_lab) < started:  # SIGHUP: the reload lands a moment after `systemctl reload`
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert f"reload {UNIT} (config or rules changed)" in json.loads(back.stdout)["prometheus"]["changes"]["lab-lb"]
    assert "> 5" in _rule_expr(deployed_lab, "LlamactlTtftP95OverSLO")
    assert lab_sh(deployed_lab, "lab-lb", f"systemctl show -p MainPID --value {UNIT}").strip() == pid
    # unchanged: nothing touched, not even a reload (the process's own /metrics: the TSDB lags a scrape)
    stamp = last_reload(deployed_lab)
    same = llamactl("deploy", str(deployed_lab.inventory), "--json", timeout=600)
    assert same.returncode == 0 and json.loads(same.stdout)["prometheus"]["changes"] == {}, same.stdout
    time.sleep(2)
    assert last_reload(deployed_lab) == stamp
    assert lab_sh(deployed_lab, "lab-lb", f"systemctl show -p MainPID --value {UNIT}").strip() == pid


def last_reload(lab: Lab) -> float:
    text = httpx.get(prometheus_url(lab) + "/metrics", timeout=10, trust_env=False).text
    found = re.search(r"^prometheus_config_last_reload_success_timestamp_seconds (\S+)$", text, re.MULTILINE)
    assert found, text[:500]
    return float(found.group(1))


def test_a_deploy_without_the_section_removes_the_service(deployed_lab: Lab, tmp_path: Path) -> None:
    inv = write_inventory(deployed_lab, tmp_path, lambda d: d.pop("prometheus"))
    try:
        off = llamactl("deploy", str(inv), "--json", timeout=600)
        assert off.returncode == 0, off.stdout + off.stderr
        assert json.loads(off.stdout)["prometheus"]["changes"] == {"lab-lb": ["removed the Prometheus service"]}
        gone = lab_sh(deployed_lab, "lab-lb", f"systemctl is-active {UNIT} llamactl-nginx-exporter.service; "
                      f"test -e /etc/systemd/system/{UNIT} || echo gone", check=False).split()
        assert gone == ["inactive", "inactive", "gone"], gone
    finally:
        on = llamactl("deploy", str(deployed_lab.inventory), "--json", timeout=600)
    assert on.returncode == 0, on.stdout + on.stderr
    assert f"start {UNIT} (not running)" in json.loads(on.stdout)["prometheus"]["changes"]["lab-lb"]
    targets_up(deployed_lab)


def test_plain_status_shows_the_balancers_connections_and_request_rate(deployed_lab: Lab) -> None:
    """Traffic through the balancer while plain `status` (no --deep) runs: its line and JSON carry nginx's
    active connections and a request rate above zero."""
    stop = threading.Event()
    body = {"image": base64.b64encode(jpeg()).decode(), "question": "What is in this picture?"}

    def traffic() -> None:
        with httpx.Client(timeout=120, trust_env=False) as client:
            while not stop.is_set():
                client.post(f"{deployed_lab.endpoint}/infer", json=body)
                client.get(f"{deployed_lab.endpoint}/healthz")

    workers = [threading.Thread(target=traffic, daemon=True) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        time.sleep(1)
        text = llamactl("status", str(deployed_lab.inventory), timeout=120)
        doc = json.loads(llamactl("status", str(deployed_lab.inventory), "--json", timeout=120).stdout)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=130)
    found = re.search(r"balancer lab-lb: (\d+) active connection\(s\), ([0-9.]+) req/s \(nginx stub_status\)",
                      text.stdout)
    assert found, text.stdout + text.stderr
    assert float(found.group(2)) > 0, text.stdout
    lb = doc["balancers"][0]
    assert lb["figures_error"] is None and lb["requests_per_s"] > 0 and lb["active_connections"] >= 0, lb
