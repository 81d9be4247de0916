"""Markdown summaries of the GPU bench JSON (bench/multi_gpu.py)."""

from __future__ import annotations

from typing import Any


def _row(label: str, r: dict[str, Any]) -> str:
    util = r.get("gpu_util_mean_pct") or {}
    util_s = ", ".join(f"gpu{g} {u['util_pct']}%" for g, u in util.items()) or "-"
    return (f"| {label} | {r['concurrency']} | {r['requests']} | {r['failed']} | {r['tok_per_s']} | "
            f"{r['req_per_s']} | {r['latency_s_p50']} | {r['latency_s_p95']} | {r['ttft_s_p50']} | "
            f"{r['ttft_s_p95']} | {', '.join(f'{k}: {v}' for k, v in r['upstreams'].items())} | {util_s} |")


def multi_gpu_markdown(info: dict[str, Any]) -> str:
    args = info.get("args", {})
    lines = [
        "# Multi-GPU run: one `llamactl serve` per GPU behind nginx (least_conn)",
        "",
        f"- Device: {info.get('device', 'unknown')}",
        f"- Versions: {info.get('versions', '-')}; {info.get('nginx_version', '-')}",
        f"- Model: {info.get('mode')} (random weights, 11B shapes; tokens are meaningless, the cost is real)",
        (f"- Server settings (rendered env files): max_batch_size {args.get('max_batch')}, max_wait_ms "
         f"{args.get('max_wait_ms')}, cache off, bf16, {args.get('max_tokens')}-token answers (ignore_eos)"),
        ("- Method: closed loop, streaming /v1/chat/completions through nginx, one 4-tile 1120x1120 JPEG per "
         f"request; per level one warm round (not counted) then {args.get('rounds')} x concurrency requests"),
        f"- One GPU: {info.get('single_gpu_config', '-')}",
        (f"- cuDNN SDPA in the servers: {args.get('cudnn_sdpa', 'default')}; prewarm of every instance at every "
         f"level first: {args.get('prewarm', False)}"),
        "",
        ("| run | concurrency | requests | failed | tok/s | req/s | p50 s | p95 s | TTFT p50 s | TTFT p95 s "
         "| upstreams | GPU util |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in info.get("single", []):
        lines.append(_row("1 GPU", r))
    if "multi" in info:
        lines.append(_row(f"{len(args.get('gpus', []))} GPUs", info["multi"]))
    res = info.get("result")
    if res:
        verdict = "PASSED" if res["pass"] else "NOT MET"
        lines += ["", (f"**Speed-up {res['speedup']}x** ({res['multi_tok_per_s']} vs {res['single_tok_per_s']} "
                       f"tok/s), failed requests {res['failed']}: acceptance (>= 1.9x, 0 failures) {verdict}.")]
    pin = info.get("pinning", {})
    if pin:
        lines += ["", "GPU pinning (nvidia-smi compute apps per server process):", ""]
        for p in pin.get("processes", []):
            lines.append(f"- pid {p['pid']}: CUDA_VISIBLE_DEVICES={p['CUDA_VISIBLE_DEVICES']}, GPUs used "
                         f"{p.get('gpus_used', '-')}, {p.get('used_mib', '-')} MiB")
        if "one_gpu_per_process" in pin:
            lines.append(f"- one GPU per process, no sharing: {pin['one_gpu_per_process']}")
    return "\n".join(lines) + "\n"
