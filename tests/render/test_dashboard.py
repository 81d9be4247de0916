"""The Grafana dashboard: valid JSON with unique panel ids, every query parsed by promtool, and every series it
reads exposed by the server's /metrics or recorded by the rules (so no panel stays empty for a typo)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from llamactl.plan.alerts import recording_rules
from llamactl.plan.render import render_balancer_files
from llamactl.server.gpu_health import healthy_reading
from llamactl.server.metrics import Metrics
from tests.render.tools import load, need

SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\{")


def exposed_names() -> set[str]:
    metrics = Metrics(running=lambda: 0, waiting=lambda: 0, gpu_memory=lambda: None, gpu=healthy_reading)
    metrics.requests.labels(endpoint="/infer", code="200").inc()  # labelled series appear once used
    metrics.request_errors.labels(reason="timeout").inc()
    text = metrics.render().decode()
    return {line.split()[0].split("{")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_the_dashboard_queries_parse_and_read_real_series(tmp_path: Path) -> None:
    promtool = need("promtool")
    inv = load("example")
    doc = json.loads(render_balancer_files(inv)[inv.health.alerts.dashboard_path].content)
    assert doc["title"] == "llamactl vision-prod" and doc["templating"]["list"][0]["type"] == "datasource"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)) >= 15
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    assert all(t["datasource"]["uid"] == "${datasource}" for p in doc["panels"] for t in p["targets"])

    known = exposed_names() | {r["record"] for r in recording_rules(inv.cluster)} | {"up"}
    used = {name for e in exprs for name in SELECTOR.findall(e)}
    assert used - known == set()
    assert all('cluster="vision-prod"' in e for e in exprs)

    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules))
    check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in check.stdout
