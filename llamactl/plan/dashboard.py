"""A Grafana dashboard for one cluster (pure: the inventory in, dashboard JSON out).

Import it in Grafana (Dashboards -> New -> Import -> upload the JSON) and pick the Prometheus data source that
scrapes the file_sd targets. Every query reads the servers' series or the recording rules of
``llamactl.plan.alerts``; ``tests/render/test_dashboard.py`` parses each one with promtool.
"""

from __future__ import annotations

import json
from typing import Any

from llamactl.inventory.cluster import Inventory
from llamactl.plan.alerts import INFERENCE

_DS = {"type": "prometheus", "uid": "${datasource}"}


def _panel(pid: int, title: str, queries: list[tuple[str, str]], unit: str, x: int, y: int, *,
           kind: str = "timeseries", w: int = 12, h: int = 8, max_value: float | None = None) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit}
    if max_value is not None:
        defaults["max"] = max_value
        defaults["min"] = 0
    return {
        "id": pid, "type": kind, "title": title, "datasource": _DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": [{"refId": chr(ord("A") + i), "datasource": _DS, "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(queries)],
    }


def panels(cluster: str) -> list[dict[str, Any]]:
    c = f'cluster="{cluster}"'
    infer = f"{c},{INFERENCE}"

    def quantile(q: float, metric: str) -> str:
        return f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{c}}}[5m])))"

    rows: list[tuple[str, list[tuple[str, str]], str, dict[str, Any]]] = [
        ("Instances ready", [(f"llamactl:instances_ready:sum{{{c}}}", "ready"),
                             (f"count(up{{{c}}})", "instances")], "short", {"kind": "stat"}),
        ("Instance state (1 = ready)", [(f"llamactl_ready{{{c}}}", "{{instance}}")], "short",
         {"kind": "state-timeline", "max_value": 1}),
        ("Throughput (inference requests/s)",
         [(f"sum by (instance) (rate(llamactl_requests_total{{{infer}}}[5m]))", "{{instance}}")], "reqps", {}),
        ("Generated tokens/s",
         [(f"sum by (instance) (rate(llamactl_generation_tokens_total{{{c}}}[5m]))", "{{instance}}")], "short", {}),
        ("End-to-end latency", [(quantile(0.5, "llamactl_e2e_request_latency_seconds"), "p50"),
                                (f"llamactl:e2e_latency_seconds:p95_5m{{{c}}}", "p95")], "s", {}),
        ("Time to first token", [(quantile(0.5, "llamactl_time_to_first_token_seconds"), "p50"),
                                 (f"llamactl:time_to_first_token_seconds:p95_5m{{{c}}}", "p95")], "s", {}),
        ("Queue", [(f"llamactl_num_requests_waiting{{{c}}}", "waiting {{instance}}"),
                   (f"llamactl_num_requests_running{{{c}}}", "running {{instance}}")], "short", {}),
        ("Queue saturation (waiting / queue_limit)", [(f"llamactl:queue:saturation{{{c}}}", "{{instance}}")],
         "percentunit", {"max_value": 1}),
        ("Batch size (p50)",
         [(f"histogram_quantile(0.5, sum by (le, instance) (rate(llamactl_batch_size_bucket{{{c}}}[5m])))",
           "{{instance}}")], "short", {}),
        ("KV and cross-attention pool usage", [(f"llamactl_kv_pool_usage_ratio{{{c}}}", "kv {{instance}}"),
                                               (f"llamactl_cross_pool_usage_ratio{{{c}}}", "cross {{instance}}")],
         "percentunit", {"max_value": 1}),
        ("Errors and refusals (per second)",
         [(f"sum by (reason) (rate(llamactl_request_errors_total{{{c}}}[5m]))", "{{reason}}"),
          (f"sum by (code) (rate(llamactl_requests_total{{{infer},code=~\"429|5..\"}}[5m]))", "HTTP {{code}}")],
         "reqps", {}),
        ("GPU faults", [(f"llamactl_gpu_fault{{{c}}}", "fault {{instance}}"),
                        (f"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL{{{c}}}", "uncorrectable ECC {{instance}}"),
                        (f"DCGM_FI_DEV_ROW_REMAP_PENDING{{{c}}}", "row remap pending {{instance}}"),
                        (f"DCGM_FI_DEV_XID_ERRORS{{{c}}}", "last Xid {{instance}}")], "short", {}),
        ("GPU utilisation", [(f"DCGM_FI_DEV_GPU_UTIL{{{c}}}", "{{instance}}")], "percent", {"max_value": 100}),
        ("GPU memory used", [(f"llamactl:gpu_memory:ratio{{{c}}}", "{{instance}}")], "percentunit",
         {"max_value": 1}),
        ("GPU temperature", [(f"DCGM_FI_DEV_GPU_TEMP{{{c}}}", "{{instance}}")], "celsius", {}),
        ("GPU power", [(f"DCGM_FI_DEV_POWER_USAGE{{{c}}}", "{{instance}}"),
                       (f"DCGM_FI_DEV_POWER_MGMT_LIMIT{{{c}}}", "limit {{instance}}")], "watt", {}),
        ("GPU clock throttle reasons (NVML bitmask)",
         [(f"DCGM_FI_DEV_CLOCK_THROTTLE_REASONS{{{c}}}", "{{instance}}")], "short", {}),
        ("Engine stalled", [(f"llamactl_engine_stalled{{{c}}}", "{{instance}}")], "short", {"max_value": 1}),
    ]
    out = []
    for n, (title, queries, unit, extra) in enumerate(rows):
        out.append(_panel(n + 1, title, queries, unit, x=(n % 2) * 12, y=(n // 2) * 8, **extra))
    return out


def dashboard(inv: Inventory) -> bytes:
    doc = {
        "title": f"llamactl {inv.cluster}",
        "uid": f"llamactl-{inv.cluster}"[:40],
        "description": "Rendered by llamactl from the inventory; re-render rather than edit.",
        "tags": ["llamactl"],
        "schemaVersion": 39,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource",
                                 "query": "prometheus"}]},
        "panels": panels(inv.cluster),
    }
    return (json.dumps(doc, indent=2) + "\n").encode()
