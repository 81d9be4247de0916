"""Prometheus recording and alert rules for one cluster (pure: the inventory in, a rules file out).

Every series comes from the servers' /metrics through the file_sd targets ``render`` writes, whose labels
(``cluster``, ``host``, ``instance``, ``gpu``) select this cluster and name the instance in each alert.
Thresholds come from ``health.alerts`` in the inventory. ``tests/render/test_alert_rules.py`` checks the
file with ``promtool check rules`` and drives every alert with ``promtool test rules``.
"""

from __future__ import annotations

from typing import Any

import yaml

from llamactl.inventory.cluster import Inventory

# Inference answers only: probes (/health, /ready: 503 while loading) are not the clients' traffic.
INFERENCE = 'endpoint=~"/infer|/batch_infer|/v1/chat/completions|/v1/jobs"'


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}m" if s % 60 == 0 and s else f"{s}s"


def recording_rules(cluster: str) -> list[dict[str, str]]:
    c = f'cluster="{cluster}"'
    infer = f"{c},{INFERENCE}"

    def p95(metric: str) -> str:
        return f"histogram_quantile(0.95, sum by (cluster, le) (rate({metric}_bucket{{{c}}}[5m])))"

    def ratio(codes: str) -> str:
        return (f"sum by (cluster) (rate(llamactl_requests_total{{{infer},code=~\"{codes}\"}}[5m])) "
                f"/ sum by (cluster) (rate(llamactl_requests_total{{{infer}}}[5m]))")

    return [
        {"record": "llamactl:e2e_latency_seconds:p95_5m", "expr": p95("llamactl_e2e_request_latency_seconds")},
        {"record": "llamactl:time_to_first_token_seconds:p95_5m", "expr": p95("llamactl_time_to_first_token_seconds")},
        {"record": "llamactl:requests:rate5m",
         "expr": f"sum by (cluster) (rate(llamactl_requests_total{{{infer}}}[5m]))"},
        {"record": "llamactl:requests_5xx:ratio_rate5m", "expr": ratio("5..")},
        {"record": "llamactl:requests_429:ratio_rate5m", "expr": ratio("429")},
        {"record": "llamactl:instances_ready:sum", "expr": f"sum by (cluster) (llamactl_ready{{{c}}})"},
        {"record": "llamactl:queue:saturation",
         "expr": f"llamactl_num_requests_waiting{{{c}}} / llamactl_queue_limit{{{c}}}"},
        {"record": "llamactl:gpu_memory:ratio",
         "expr": f"DCGM_FI_DEV_FB_USED{{{c}}} / (DCGM_FI_DEV_FB_USED{{{c}}} + DCGM_FI_DEV_FB_FREE{{{c}}})"},
    ]


def alert_rules(inv: Inventory) -> list[dict[str, Any]]:
    a = inv.health.alerts
    c = f'cluster="{inv.cluster}"'

    def alert(name: str, expr: str, for_s: float, severity: str, summary: str, description: str,
              **labels: str) -> dict[str, Any]:
        rule: dict[str, Any] = {"alert": name, "expr": expr}
        if for_s:
            rule["for"] = _duration(for_s)
        rule["labels"] = {"severity": severity, **labels}
        rule["annotations"] = {"summary": summary, "description": description}
        return rule

    def drift(label: str) -> str:
        return f"count by (cluster) (count by (cluster, {label}) (llamactl_build_info{{{c}}})) > 1"

    return [
        alert("LlamactlInstanceDown", f"up{{{c}}} == 0", 120, "critical",
              "{{ $labels.instance }} does not answer /metrics",
              "Prometheus cannot scrape {{ $labels.instance }} on {{ $labels.host }}: the server is down or "
              "unreachable. `llamactl status` and `llamactl logs` show why."),
        alert("LlamactlInstanceNotReady", f"llamactl_ready{{{c}}} == 0", a.not_ready_for_s, "warning",
              "{{ $labels.instance }} not ready for " + _duration(a.not_ready_for_s),
              "The server answers but /ready is 503 (loading, draining, stalled or gpu_fault)."),
        alert("LlamactlGpuFault", f"llamactl_gpu_fault{{{c}}} == 1", 0, "critical",
              "GPU fault on {{ $labels.instance }}",
              "NVML reported a hardware fault (critical Xid, uncorrectable ECC error or row remap): the "
              "instance is not ready and `watch` drained it. Fix or reset the GPU, restart the instance, then "
              "`llamactl undrain INVENTORY {{ $labels.instance }}`."),
        alert("LlamactlGpuMemoryNearFull", f"llamactl:gpu_memory:ratio{{{c}}} > {a.gpu_memory_ratio:g}", 900,
              "warning", "GPU memory of {{ $labels.instance }} over " + f"{a.gpu_memory_ratio:.0%}",
              "Framebuffer use is {{ $value | humanizePercentage }}; another process may be on this GPU."),
        alert("LlamactlQueueSaturated", f"llamactl:queue:saturation{{{c}}} > {a.queue_saturation_ratio:g}", 300,
              "warning", "Queue of {{ $labels.instance }} nearly full",
              "{{ $value | humanizePercentage }} of queue_limit is waiting: clients are about to get 429s."),
        alert("LlamactlHigh429Rate", f"llamactl:requests_429:ratio_rate5m{{{c}}} > {a.rate_429_ratio:g}", 600,
              "warning", "{{ $value | humanizePercentage }} of requests answered 429",
              "The cluster refuses work for lack of capacity: add GPUs or raise queue_limit."),
        alert("LlamactlLatencyP95OverSLO",
              f"llamactl:e2e_latency_seconds:p95_5m{{{c}}} > {a.p95_latency_slo_s:g}", 600, "warning",
              "p95 latency {{ $value | humanizeDuration }} over the SLO of " + f"{a.p95_latency_slo_s:g} s",
              "End-to-end p95 latency of the cluster over 5 minutes."),
        alert("LlamactlTtftP95OverSLO",
              f"llamactl:time_to_first_token_seconds:p95_5m{{{c}}} > {a.ttft_p95_slo_s:g}", 600, "warning",
              "p95 time to first token {{ $value | humanizeDuration }} over the SLO of "
              + f"{a.ttft_p95_slo_s:g} s", "Time to first token p95 of the cluster over 5 minutes."),
        alert("LlamactlHighErrorRate", f"llamactl:requests_5xx:ratio_rate5m{{{c}}} > {a.error_ratio:g}", 300,
              "critical", "{{ $value | humanizePercentage }} of inference requests failed (5xx)",
              "Inference answers with a 5xx status over 5 minutes."),
        alert("LlamactlVersionDrift", drift("version"), a.drift_for_s, "warning",
              "Instances run different llamactl versions",
              "{{ $value }} versions run at once for longer than a rolling restart takes; deploy again."),
        alert("LlamactlConfigDrift", drift("config_hash"), a.drift_for_s, "warning",
              "Instances run different configurations",
              "{{ $value }} config hashes run at once for longer than a rolling restart takes; deploy again."),
        alert("LlamactlNoReadyUpstream", f"absent(llamactl_ready{{{c}}} == 1)", 60, "critical",
              "The balancer has no ready instance", "No instance of the cluster reports ready: nginx answers "
              "503 to every request.", cluster=inv.cluster),
    ]


def rules_file(inv: Inventory) -> bytes:
    """The rules file Prometheus loads (``rule_files:``)."""
    doc = {"groups": [
        {"name": f"llamactl-{inv.cluster}-recording", "rules": recording_rules(inv.cluster)},
        {"name": f"llamactl-{inv.cluster}-alerts", "rules": alert_rules(inv)},
    ]}
    header = f"# Prometheus rules for llamactl cluster {inv.cluster}; rendered by llamactl, do not edit.\n"
    body: str = yaml.safe_dump(doc, sort_keys=False, width=120)
    return (header + body).encode()
