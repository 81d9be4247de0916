"""The alert and recording rules: `promtool check rules` accepts the rendered file, and `promtool test rules`
drives every alert with synthetic series, once where it must fire and once where it must stay silent.

The unit tests run on a copy without annotations (promtool compares annotations too, and theirs are prose
for people; `check rules` above parses their templates)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from llamactl.plan.alerts import alert_rules
from llamactl.plan.render import render_balancer_files
from tests.render.tools import load, need

C = 'cluster="vision-prod"'
A = f'{C},host="gpu-01",instance="gpu-01/0",gpu="0",job="llamactl"'
B = f'{C},host="gpu-02",instance="gpu-02/0",gpu="0",job="llamactl"'
LABELS_A = {"cluster": "vision-prod", "host": "gpu-01", "instance": "gpu-01/0", "gpu": "0", "job": "llamactl"}
CLUSTER = {"cluster": "vision-prod"}


def series(name: str, labels: str, values: str) -> dict[str, str]:
    return {"series": f"{name}{{{labels}}}", "values": values}


def requests(codes: dict[str, str]) -> list[dict[str, str]]:
    return [series("llamactl_requests_total", f'{A},endpoint="/infer",code="{code}"', v) for code, v in codes.items()]


def buckets(name: str, counts: dict[str, str]) -> list[dict[str, str]]:
    return [series(f"{name}_bucket", f'{A},le="{le}"', v) for le, v in counts.items()]


# alert -> (eval time, input series, labels when firing) for the firing case, and the same for the silent one
CASES: dict[str, tuple[tuple[str, list[dict[str, str]], dict[str, str]], tuple[str, list[dict[str, str]]]]] = {
    "LlamactlInstanceDown": (
        ("3m", [series("up", A, "0x5")], {**LABELS_A, "severity": "critical"}),
        ("3m", [series("up", A, "1x5")])),
    "LlamactlInstanceNotReady": (
        ("11m", [series("llamactl_ready", A, "0x15"), series("llamactl_ready", B, "1x15")],
         {**LABELS_A, "severity": "warning"}),
        ("11m", [series("llamactl_ready", A, "1x5 0x10")])),  # not ready for 6 of the 10 minutes only
    "LlamactlGpuFault": (
        ("1m", [series("llamactl_gpu_fault", A, "0 1")], {**LABELS_A, "severity": "critical"}),
        ("1m", [series("llamactl_gpu_fault", A, "0 0")])),
    "LlamactlGpuMemoryNearFull": (
        ("16m", [series("DCGM_FI_DEV_FB_USED", A, "81000x20"), series("DCGM_FI_DEV_FB_FREE", A, "500x20")],
         {**LABELS_A, "severity": "warning"}),
        ("16m", [series("DCGM_FI_DEV_FB_USED", A, "70000x20"), series("DCGM_FI_DEV_FB_FREE", A, "11500x20")])),
    "LlamactlQueueSaturated": (
        ("6m", [series("llamactl_num_requests_waiting", A, "95x10"), series("llamactl_queue_limit", A, "100x10")],
         {**LABELS_A, "severity": "warning"}),
        ("6m", [series("llamactl_num_requests_waiting", A, "50x10"), series("llamactl_queue_limit", A, "100x10")])),
    "LlamactlHigh429Rate": (
        ("15m", requests({"200": "0+60x20", "429": "0+10x20"}), {**CLUSTER, "severity": "warning"}),
        ("15m", requests({"200": "0+60x20", "429": "0+1x20"}))),
    "LlamactlLatencyP95OverSLO": (
        ("15m", buckets("llamactl_e2e_request_latency_seconds",
                        {"60": "0x20", "120": "0x20", "300": "0+10x20", "+Inf": "0+10x20"}),
         {**CLUSTER, "severity": "warning"}),
        ("15m", buckets("llamactl_e2e_request_latency_seconds",
                        {"60": "0+10x20", "120": "0+10x20", "300": "0+10x20", "+Inf": "0+10x20"}))),
    "LlamactlTtftP95OverSLO": (
        ("15m", buckets("llamactl_time_to_first_token_seconds", {"1": "0x20", "5": "0x20", "10": "0+10x20",
                                                                 "+Inf": "0+10x20"}),
         {**CLUSTER, "severity": "warning"}),
        ("15m", buckets("llamactl_time_to_first_token_seconds", {"1": "0+10x20", "5": "0+10x20",
                                                                 "10": "0+10x20", "+Inf": "0+10x20"}))),
    "LlamactlHighErrorRate": (
        ("10m", requests({"200": "0+60x20", "500": "0+10x20"}), {**CLUSTER, "severity": "critical"}),
        ("10m", requests({"200": "0+60x20", "500": "0+1x20"}))),
    "LlamactlVersionDrift": (
        ("35m", [series("llamactl_build_info", f'{A},version="0.1.0",config_hash="aa"', "1x40"),
                 series("llamactl_build_info", f'{B},version="0.2.0",config_hash="aa"', "1x40")],
         {**CLUSTER, "severity": "warning"}),
        ("35m", [series("llamactl_build_info", f'{A},version="0.1.0",config_hash="aa"', "1x40"),
                 series("llamactl_build_info", f'{B},version="0.1.0",config_hash="bb"', "1x40")])),
    "LlamactlConfigDrift": (
        ("35m", [series("llamactl_build_info", f'{A},version="0.1.0",config_hash="aa"', "1x40"),
                 series("llamactl_build_info", f'{B},version="0.1.0",config_hash="bb"', "1x40")],
         {**CLUSTER, "severity": "warning"}),
        ("35m", [series("llamactl_build_info", f'{A},version="0.1.0",config_hash="aa"', "1x40"),
                 series("llamactl_build_info", f'{B},version="0.2.0",config_hash="aa"', "1x40")])),
    "LlamactlNoReadyUpstream": (
        ("3m", [series("llamactl_ready", A, "0x5"), series("llamactl_ready", B, "1 0x5")],
         {**CLUSTER, "severity": "critical"}),
        ("3m", [series("llamactl_ready", A, "0x5"), series("llamactl_ready", B, "1x5")])),
}


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    names = [r["alert"] for r in alert_rules(load("example"))]
    assert sorted(names) == sorted(CASES)


def test_promtool_checks_and_tests_the_rules(tmp_path: Path) -> None:
    promtool = need("promtool")
    inv = load("example")
    rendered = render_balancer_files(inv)[inv.health.alerts.rules_path].content
    rules = tmp_path / "llamactl.yml"
    rules.write_bytes(rendered)
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 20 rules found" in check.stdout

    doc = yaml.safe_load(rendered)
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    bare = tmp_path / "bare.yml"
    bare.write_text(yaml.safe_dump(doc))
    tests: list[dict[str, Any]] = []
    for alert, ((fire_at, fire_series, labels), (quiet_at, quiet_series)) in CASES.items():
        tests.append({"interval": "1m", "input_series": fire_series, "alert_rule_test": [
            {"eval_time": fire_at, "alertname": alert, "exp_alerts": [{"exp_labels": labels}]}]})
        tests.append({"interval": "1m", "input_series": quiet_series, "alert_rule_test": [
            {"eval_time": quiet_at, "alertname": alert, "exp_alerts": []}]})
    spec = tmp_path / "tests.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(bare)], "evaluation_interval": "1m", "tests": tests}))
    run = subprocess.run([promtool, "test", "rules", str(spec)], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_rules_are_rendered_only_when_the_inventory_asks() -> None:
    inv = load("small")
    assert not inv.health.alerts.enabled
    assert inv.health.alerts.rules_path not in render_balancer_files(inv)
