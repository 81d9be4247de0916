"""Pure parts of the engine benchmark (issue 10): the roofline model, the acceptance checks, the markdown report.

No sockets, no subprocesses, no clock: everything here takes the measured figures as data, so it is unit-tested
on the CPU machine (tests/server/test_engine_bench_script.py).

Roofline. A decode step reads the text decoder's weights once (W bytes) plus, for every row of the batch, that
row's cross-attention K/V of one 4-tile image and its self-attention KV (X bytes a row); at memory bandwidth BW
the best output rate at batch B is

    roofline(B) = B * BW / (W + B * X)      tokens per second (prefill and vision time ignored)

W and X are fitted (least squares on bytes per step, B * BW / rate, which is linear in B) to the H100 figures of
shared/notes/gpu-baseline.md: ~180 tok/s at batch 1, ~2.2k at 16, ~3.4k at 32 with BW = 3.35 TB/s. That gives
W ~ 18.0 GB and X ~ 0.42 GB and reproduces the three figures within 2 %. An H200 reads 4.8 TB/s: the same bytes
per step, scaled by 4.8 / 3.35. A level with C concurrent clients is compared with roofline(C): C rows could
decode together, so that is the most the GPU could give at that load, whatever a design makes of it.
"""

from __future__ import annotations

import math
from typing import Any

H100_BW = 3.35e12  # bytes/s, H100 SXM (HBM3)
H200_BW = 4.8e12  # bytes/s, H200 (HBM3e)
# Output tokens/s on one H100 at batch sizes, 11B shape, bf16, one 4-tile image a row (gpu-baseline.md).
H100_ANCHORS = {1: 180.0, 16: 2200.0, 32: 3400.0}


def fit_bytes_per_step(anchors: dict[int, float] = H100_ANCHORS, bw: float = H100_BW) -> tuple[float, float]:
    """(W, X): bytes per decode step = W + B * X, least squares over the anchors' B * BW / rate."""
    pts = [(b, b * bw / rate) for b, rate in anchors.items()]
    mb = sum(b for b, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    x = sum((b - mb) * (y - my) for b, y in pts) / sum((b - mb) ** 2 for b, _ in pts)
    return my - x * mb, x


W_BYTES, X_BYTES = fit_bytes_per_step()


def bandwidth_for(gpu_name: str) -> tuple[float | None, str]:
    """Memory bandwidth of the GPU named by nvidia-smi, and how it was chosen (None: no roofline for it)."""
    name = gpu_name.upper()
    if "H200" in name:
        return H200_BW, "H200: 4.8 TB/s, the H100 roofline scaled by 4.8/3.35"
    if "H100" in name and "PCIE" not in name and "NVL" not in name:
        return H100_BW, "H100 SXM: 3.35 TB/s"
    return None, f"no roofline for {gpu_name or 'this device'} (only H100 SXM and H200 are modelled)"


def roofline_tok_s(batch: int, bw: float) -> float:
    return batch * bw / (W_BYTES + batch * X_BYTES)


def of_roofline(tok_s: float | None, batch: int, bw: float | None) -> float | None:
    """Measured / roofline(batch), as a fraction (None without a bandwidth or a figure)."""
    if bw is None or tok_s is None:
        return None
    return round(tok_s / roofline_tok_s(batch, bw), 3)


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values (same rule as gpu_load.pct)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled series of a Prometheus text exposition: name -> value (comments and labelled series skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#" or "{" in line:
            continue
        name, _, rest = line.partition(" ")
        try:
            out[name] = float(rest.split()[0])
        except (ValueError, IndexError):
            continue
    return out


# Sampled during a measured level: the engine's gauges (peak) and counters (difference over the level).
PEAK_SERIES = ("llamactl_kv_pool_usage_ratio", "llamactl_cross_pool_usage_ratio",
               "llamactl_requests_waiting_for_memory", "llamactl_num_requests_running",
               "llamactl_num_requests_waiting", "llamactl_engine_stalled")
COUNTERS = ("llamactl_engine_steps_total", "llamactl_generation_tokens_total")
# Histograms of a request's time before its first token: their mean over a level (from _sum and _count).
BEFORE_FIRST_TOKEN = ("llamactl_image_decode_seconds", "llamactl_request_processor_seconds",
                      "llamactl_request_queue_seconds", "llamactl_time_to_first_token_seconds")


def _mean_key(histogram: str) -> str:
    """llamactl_image_decode_seconds -> image_decode_mean_s"""
    return histogram.removeprefix("llamactl_").removesuffix("_seconds") + "_mean_s"


def engine_window(first: dict[str, float], last: dict[str, float], peaks: dict[str, float],
                  wall_s: float) -> dict[str, Any]:
    """What the server's /metrics say about a level: peaks of its gauges, steps/s and tokens per step."""
    out: dict[str, Any] = {k.removeprefix("llamactl_") + "_peak": v for k, v in peaks.items()}
    steps = last.get(COUNTERS[0], 0.0) - first.get(COUNTERS[0], 0.0)
    tokens = last.get(COUNTERS[1], 0.0) - first.get(COUNTERS[1], 0.0)
    if steps > 0 and wall_s > 0:
        out["engine_steps_per_s"] = round(steps / wall_s, 1)
        out["tokens_per_step"] = round(tokens / steps, 2)
    for name in BEFORE_FIRST_TOKEN:
        count = last.get(name + "_count", 0.0) - first.get(name + "_count", 0.0)
        if count > 0:
            total = last.get(name + "_sum", 0.0) - first.get(name + "_sum", 0.0)
            out[_mean_key(name)] = round(total / count, 4)
    return out


# -- acceptance (issue 10) ---------------------------------------------------------------------------------

def _level(design: dict[str, Any] | None, conc: int) -> dict[str, Any] | None:
    for lv in (design or {}).get("levels", []):
        if lv.get("concurrency") == conc and "tok_per_s" in lv:
            return dict(lv)
    return None


def acceptance(designs: dict[str, dict[str, Any]], gpu_name: str) -> list[dict[str, Any]]:
    """The issue's GPU acceptance rows, each with the measured figure, the target and pass/fail/None (not run).

    The targets are H100 targets; on another GPU the rows are still computed, and ``note`` says so.
    """
    new = designs.get("continuous")
    hf = designs.get("hf")
    note = "" if "H100" in gpu_name.upper() else f"measured on {gpu_name or 'a CPU'}: the targets are for one H100"
    engine = (new or {}).get("engine_reported")
    if new is not None and "ready_s" in new and engine != "continuous":
        note = (note + "; " if note else "") + f"/health reports engine {engine!r}, not 'continuous'"
    rows: list[dict[str, Any]] = []

    def row(name: str, value: float | None, target: str, ok: bool | None) -> None:
        rows.append({"criterion": name, "measured": value, "target": target, "pass": ok})

    c32, c1, c64, h32 = _level(new, 32), _level(new, 1), _level(new, 64), _level(hf, 32)
    t32 = c32["tok_per_s"] if c32 else None
    row("32 clients: output tok/s", t32, ">= 1500", None if t32 is None else t32 >= 1500)
    ratio = round(t32 / h32["tok_per_s"], 2) if t32 and h32 and h32.get("tok_per_s") else None
    row("32 clients: x the hf engine", ratio, ">= 3", None if ratio is None else ratio >= 3)
    p95 = c32.get("ttft_s_p95") if c32 else None
    row("32 clients: TTFT p95 s", p95, "<= 1.5", None if p95 is None else p95 <= 1.5)
    # The same level without its opening burst (gpu_load.steady): every client busy, none just starting.
    st = c32.get("steady_tok_per_s") if c32 else None
    row("32 clients, steady window: output tok/s", st, ">= 1500", None if st is None else st >= 1500)
    sp95 = c32.get("steady_ttft_s_p95") if c32 else None
    row("32 clients, steady window: TTFT p95 s", sp95, "<= 1.5", None if sp95 is None else sp95 <= 1.5)
    # Where the whole level's TTFT tail comes from (gpu_load.ttft_split): each client's first request, sent at
    # once, against every later one.
    for part, key in (("the opening burst", "burst_ttft_s_p95"), ("after the burst", "after_burst_ttft_s_p95")):
        v = c32.get(key) if c32 else None
        row(f"32 clients, {part}: TTFT p95 s", v, "<= 1.5", None if v is None else v <= 1.5)
    t1 = c1["tok_per_s"] if c1 else None
    row("1 client: output tok/s", t1, ">= 100", None if t1 is None else t1 >= 100)
    p50 = c1.get("ttft_s_p50") if c1 else None
    row("1 client: TTFT p50 s", p50, "<= 0.2", None if p50 is None else p50 <= 0.2)
    if c64 is None:
        row("64 clients: failed requests (no OOM)", None, "0", None)
        row("64 clients: tok/s vs 32 clients", None, ">= the 32-client figure", None)
    else:
        bad = int(c64.get("failed", 0)) + int(c64.get("cut", 0))
        alive = c64.get("server_alive_after", True)
        row("64 clients: failed requests (no OOM)", bad, "0", bad == 0 and bool(alive))
        t64 = c64.get("tok_per_s")
        row("64 clients: tok/s vs 32 clients", t64, ">= the 32-client figure",
            None if t64 is None or t32 is None else t64 >= t32)
    for r in rows:
        r["note"] = note
    return rows


# -- markdown --------------------------------------------------------------------------------------------

def _f(x: Any, nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _gb(b: float | None) -> str:
    return "-" if not b else f"{b / 1e9:.1f}"


def markdown(info: dict[str, Any]) -> str:
    env = info.get("env", {})
    gpu = env.get("gpu_name") or "CPU"
    out = [f"# Engine benchmark (issue 10): {gpu}", "",
           (f"{info.get('started', '')}; mode {info.get('mode')}; git {env.get('git_rev', '?')}; "
           f"{env.get('versions', '')}"), "",
           f"Device: {env.get('gpu', '-')}; driver {env.get('driver', '-')}; CPU: {env.get('cpu', '-')}.", "",
           (f"Roofline: {info.get('roofline', {}).get('formula', '-')}; "
           f"{info.get('roofline', {}).get('bandwidth_note', '')}."), ""]
    if ballast := info.get("gpu_ballast"):
        out += [(f"**Memory held back** (bench/gpu_ballast.py, for the servers): {ballast['held_gib']} GiB of "
                 f"{ballast['total_gib']}, leaving {ballast['free_gib']} GiB free (an idle 80 GB H100 reports 79.18); "
                 "the GPU memory figures include the held part."), ""]
    if info.get("status"):
        out += [f"**Status: {info['status']}**", ""]
    base = info.get("baseline") or {}
    if base:
        out += ["## Bare HF generate (this machine, before any server)", "",
                f"{base.get('note', '')}", "",
                "| batch | tokens | wall s | tok/s | req/s | TTFT s (1-token generate) | peak GPU GB | of roofline |",
                "|---|---|---|---|---|---|---|---|"]
        for r in base.get("runs", []):
            out.append(f"| {r['batch']} | {r['new_tokens']} | {_f(r.get('wall_s'), 2)} | {_f(r.get('tok_per_s'))} | "
                       f"{_f(r.get('req_per_s'), 2)} | {_f(r.get('ttft_s'), 3)} | {_gb(r.get('peak_bytes'))} | "
                       f"{_f(r.get('of_roofline'), 3)} |")
        if base.get("error"):
            out.append(f"\nBaseline error: `{base['error']}`")
        out.append("")
    for name, d in (info.get("designs") or {}).items():
        out += [f"## {name}: {d.get('title', '')}", "",
                (f"Server: `{d.get('env_summary', '')}`; /health engine: {d.get('engine_reported')!r}; "
                f"ready in {_f(d.get('ready_s'))} s; {d.get('note', '')}"), "",
                ("| clients | requests ok/failed/cut | tok/s | req/s | TTFT p50 / p95 s | ITL p50 / p95 ms | "
                "e2e p50 s | peak GPU GB (smi / health) | GPU util % | server cores | mean batch | of roofline |"),
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for lv in d.get("levels", []):
            if "tok_per_s" not in lv:
                out.append(f"| {lv.get('concurrency')} | {lv.get('skipped') or lv.get('error') or '-'} "
                           "| | | | | | | | | | |")
                continue
            itl50 = None if lv.get("itl_s_p50") is None else lv["itl_s_p50"] * 1000
            itl95 = None if lv.get("itl_s_p95") is None else lv["itl_s_p95"] * 1000
            out.append(
                f"| {lv['concurrency']} | {lv['ok']}/{lv['failed']}/{lv.get('cut', 0)} | {_f(lv['tok_per_s'])} | "
                f"{_f(lv['req_per_s'], 2)} | {_f(lv.get('ttft_s_p50'), 3)} / {_f(lv.get('ttft_s_p95'), 3)} | "
                f"{_f(itl50)} / {_f(itl95)} | {_f(lv.get('latency_s_p50'), 2)} | "
                f"{_f(lv.get('gpu_mem_smi_peak_gb'))} / {_gb(lv.get('gpu_mem_health_peak_bytes'))} | "
                f"{_f(lv.get('gpu_util_mean_pct'))} | {_f(lv.get('server_cores'), 2)} | "
                f"{_f((lv.get('batches') or {}).get('mean_batch_size'))} | {_f(lv.get('of_roofline'), 3)} |")
        em = [(lv["concurrency"], lv["engine_metrics"]) for lv in d.get("levels", []) if lv.get("engine_metrics")]
        if em:
            out += ["", ("From the server's /metrics during each level (peaks of the gauges; steps and tokens per "
                    "step from its counters; before the first token, means of its histograms: image decode, "
                    "processor, wait in the engine's queue, and the server-side TTFT they are part of):"), "",
                    ("| clients | engine steps/s | tokens per step | KV pool peak | cross-attention pool peak | "
                    "waiting for memory peak | running peak | waiting peak | decode / processor / queue / TTFT "
                    "mean s |"), "|---|---|---|---|---|---|---|---|---|"]
            for conc, m in em:
                before = " / ".join(_f(m.get(_mean_key(k)), 3) for k in BEFORE_FIRST_TOKEN)
                out.append(f"| {conc} | {_f(m.get('engine_steps_per_s'))} | {_f(m.get('tokens_per_step'), 2)} | "
                           f"{_f(m.get('kv_pool_usage_ratio_peak'), 2)} | {_f(m.get('cross_pool_usage_ratio_peak'), 2)} "
                           f"| {_f(m.get('requests_waiting_for_memory_peak'), 0)} | "
                           f"{_f(m.get('num_requests_running_peak'), 0)} | {_f(m.get('num_requests_waiting_peak'), 0)} "
                           f"| {before} |")
        cut = [str(lv["concurrency"]) for lv in d.get("levels", []) if lv.get("cut")]
        if cut:
            out.append(f"\nCut: at {', '.join(cut)} clients the level's time ran out with requests still running "
                       "(counted as cut, not failed); its tok/s and latencies cover the finished ones only.")
        if d.get("error"):
            out.append(f"\nError: `{d['error']}`")
        out.append("")
    acc = info.get("acceptance") or []
    if acc:
        out += ["## Acceptance (issue 10, GPU rows; the engine under test is `continuous`)", "",
                "| criterion | measured | target | pass |", "|---|---|---|---|"]
        for r in acc:
            verdict = "not run" if r["pass"] is None else ("yes" if r["pass"] else "**no**")
            out.append(f"| {r['criterion']} | {_f(r['measured'], 2)} | {r['target']} | {verdict} |")
        if acc[0].get("note"):
            out += ["", f"Note: {acc[0]['note']}."]
        out.append("")
    out += ["## Method", "", *info.get("method", [])]
    return "\n".join(out) + "\n"


def summary(info: dict[str, Any]) -> str:
    """A short fixed-width table of every level and the acceptance rows: the last thing a device call prints."""
    env = info.get("env", {})
    rows = [f"{env.get('gpu_name') or 'CPU'} | {info.get('status')} | {info.get('elapsed_s', '?')} s",
            (f"{'design':<11}{'clients':>8}{'ok/fail':>9}{'tok/s':>9}{'req/s':>7}{'ttft50':>8}{'ttft95':>8}"
            f"{'itl50ms':>8}{'itl95ms':>8}{'memGB':>7}{'util%':>6}{'roof':>6}")]
    for r in (info.get("baseline") or {}).get("runs", []):
        if "tok_per_s" in r:
            rows.append(f"{'generate':<11}{r['batch']:>8}{'-':>9}{r['tok_per_s']:>9.1f}{r.get('req_per_s', 0):>7.2f}"
                        f"{_f(r.get('ttft_s'), 3):>8}{'-':>8}{'-':>8}{'-':>8}{_gb(r.get('peak_bytes')):>7}{'-':>6}"
                        f"{_f(r.get('of_roofline'), 2):>6}")
    for name, d in (info.get("designs") or {}).items():
        for lv in d.get("levels", []):
            if "tok_per_s" not in lv:
                rows.append(f"{name:<11}{lv.get('concurrency'):>8}  {lv.get('skipped') or lv.get('error')}")
                continue
            itl = [None if lv.get(k) is None else lv[k] * 1000 for k in ("itl_s_p50", "itl_s_p95")]
            rows.append(f"{name:<11}{lv['concurrency']:>8}{str(lv['ok']) + '/' + str(lv['failed']):>9}"
                        f"{lv['tok_per_s']:>9.1f}{lv['req_per_s']:>7.2f}{_f(lv.get('ttft_s_p50'), 3):>8}"
                        f"{_f(lv.get('ttft_s_p95'), 3):>8}{_f(itl[0]):>8}{_f(itl[1]):>8}"
                        f"{_f(lv.get('gpu_mem_smi_peak_gb')):>7}{_f(lv.get('gpu_util_mean_pct'), 0):>6}"
                        f"{_f(lv.get('of_roofline'), 2):>6}")
        if d.get("error"):
            rows.append(f"{name:<11} error: {str(d['error'])[:200]}")
        if d.get("note"):
            rows.append(f"{name:<11} note: {d['note'][:200]}")
    for r in info.get("acceptance") or []:
        verdict = "not run" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
        rows.append(f"acceptance: {r['criterion']}: {_f(r['measured'], 2)} (target {r['target']}) {verdict}")
    return "\n".join(rows)

