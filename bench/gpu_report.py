"""Markdown summaries of the GPU bench JSON (bench/multi_gpu.py)."""

from __future__ import annotations

from typing import Any


def _row(label: str, r: dict[str, Any]) -> str:
    util = r.get("gpu_util_mean_pct") or {}
    util_s = ", ".join(f"gpu{g} {u['util_pct']}%" for g, u in util.items()) or "-"
    return (f"| {label} | {r['concurrency']} | {r['requests']} | {r['failed']} | {r['tok_per_s']} | "
            f"{r['req_per_s']} | {r['latency_s_p50']} | {r['latency_s_p95']} | {r['ttft_s_p50']} | "
            f"{r['ttft_s_p95']} | {', '.join(f'{k}: {v}' for k, v in r['upstreams'].items())} | {util_s} |")


def _cpu_cell(r: dict[str, Any]) -> str:
    cpu = r.get("cpu") or {}
    servers = [f"{k} {v['cores']} (top thread {v['top_threads'][0] if v['top_threads'] else 0})"
               for k, v in cpu.items() if k.startswith("server") and v["cores"] > 0.05]
    return "; ".join([*servers, f"load {cpu.get('load_generator_cores', '-')}", f"nginx {cpu.get('nginx_cores', '-')}",
                      f"host {cpu.get('host_busy_pct', '-')}%"]) if cpu else "-"


def _batch_cell(r: dict[str, Any]) -> str:
    parts = []
    for url, b in (r.get("batches") or {}).items():
        if b.get("batches"):
            parts.append(f":{url.rsplit(':', 1)[-1]} {b['batches']} x {b['mean_batch_size']}, {b['mean_batch_s']} s "
                         f"(prep {b['mean_prepare_s']} s)")
    return "; ".join(parts) or "-"


def multi_gpu_markdown(info: dict[str, Any]) -> str:
    args = info.get("args", {})
    hc = info.get("host_cpus", {})
    lines = [
        "# Multi-GPU run: one `llamactl serve` per GPU behind nginx (least_conn)",
        "",
        f"- Device: {info.get('device', 'unknown')}; host CPUs {hc.get('cpus', '-')} "
        f"({hc.get('physical_cores', '-')} physical cores)",
        f"- Versions: {info.get('versions', '-')}",
        f"- Model: {info.get('mode')} (random weights, 11B shapes; tokens are meaningless, the cost is real)",
        (f"- Server settings (rendered env files): max_batch_size {args.get('max_batch')}, max_wait_ms "
         f"{args.get('max_wait_ms')}, cache off, bf16, {args.get('max_tokens')}-token answers (ignore_eos)"),
        ("- Method: closed loop, streaming /v1/chat/completions through nginx, one 4-tile 1120x1120 JPEG per "
         f"request; per level one warm round (not counted) then {args.get('rounds')} x concurrency requests; "
         f"load generator processes: up to {args.get('load_procs')} (one per 8 clients)"),
        "",
    ]
    for v in info.get("variants", []):
        if v.get("skipped"):
            lines += [f"## Variant `{v['variant']}`: skipped ({v['skipped']})", ""]
            continue
        lines += [f"## Variant `{v['variant']}`: inventory server settings {v.get('server_settings') or 'defaults'}",
                  ""]
        for h in v.get("health", []):
            lines.append(f"- {h.get('instance')}: cpu {h.get('cpu')}; engine {h.get('engine')}")
        lines += [
            f"- One GPU: {v.get('single_gpu_config', '-')}",
            "",
            ("| run | concurrency | requests | failed | tok/s | req/s | p50 s | p95 s | TTFT p50 s | TTFT p95 s "
             "| upstreams | GPU util |"),
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        phases = [("1 GPU", r) for r in v.get("single", [])]
        if "multi" in v:
            phases.append((f"{len(args.get('gpus', []))} GPUs", v["multi"]))
        lines += [_row(label, r) for label, r in phases]
        lines += ["", "| run | batches: count x mean size, mean duration (preprocessing) | CPU cores used |",
                  "|---|---|---|"]
        lines += [f"| {label} | {_batch_cell(r)} | {_cpu_cell(r)} |" for label, r in phases]
        res = v.get("result")
        if res:
            verdict = "PASSED" if res["pass"] else "NOT MET"
            lines += ["", (f"**Speed-up {res['speedup']}x** ({res['multi_tok_per_s']} vs {res['single_tok_per_s']} "
                           f"tok/s), failed requests {res['failed']}: acceptance (>= 1.9x, 0 failures) {verdict}.")]
        pin = v.get("pinning", {})
        if pin:
            lines += ["", "GPU pinning (nvidia-smi compute apps per server process):", ""]
            for p in pin.get("processes", []):
                lines.append(f"- pid {p['pid']}: CUDA_VISIBLE_DEVICES={p['CUDA_VISIBLE_DEVICES']}, GPUs used "
                             f"{p.get('gpus_used', '-')}, {p.get('used_mib', '-')} MiB")
            if "one_gpu_per_process" in pin:
                lines.append(f"- one GPU per process, no sharing: {pin['one_gpu_per_process']}")
        lines.append("")
    return "\n".join(lines) + "\n"
