"""The Prometheus file_sd targets load through `promtool check config` and carry the expected labels."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from llamactl.plan.render import render_balancer_files
from tests.render.tools import load, need


@pytest.mark.parametrize("name", ["small", "many", "example"])
def test_promtool_accepts_targets(name: str, tmp_path: Path) -> None:
    promtool = need("promtool")
    inv = load(name)
    targets = tmp_path / "llamactl.json"
    targets.write_bytes(render_balancer_files(inv)[inv.balancer.prometheus_targets_path].content)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 15s\nscrape_configs:\n  - job_name: llamactl\n"
        f"    file_sd_configs:\n      - files: ['{targets}']\n"
    )
    result = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
    groups = json.loads(targets.read_text())
    assert len(groups) == len(inv.instances())
    first = inv.instances()[0]
    assert groups[0] == {
        "targets": [f"{first.address}:{first.port}"],
        "labels": {
            "cluster": inv.cluster,
            "host": first.host,
            "instance": first.id,
            "gpu": "cpu" if first.gpu is None else str(first.gpu),
        },
    }
