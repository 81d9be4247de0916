"""The decode step's projections with FP8 weights (fp8.py's kernel) against bf16 cuBLAS, 11B shapes, on a GPU.

For each weight shape of the 11B text model and 1 / 16 / 32 / 64 rows: ``F.linear`` on bf16 weights and the
FP8 kernel with each candidate config (the engine's and split-K ones), every call on the next of several distinct weights (reads from memory, not
L2, as in a decode step), timed inside a CUDA graph. Also: how far the FP8 product is from the bf16 one (relative
L2: the quantization's error) and from ``fp8.reference`` (the kernel's own error), and the step's projection time
summed over the model (32 self layers, 8 cross layers, lm_head) per row count. Prints a table, writes JSON.

    python3 bench/engine_fp8_probe.py --out $OUT/engine_fp8_probe.json     # GPU, ~1-2 min
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llamactl.server.engine.continuous import fp8
from llamactl.server.engine.continuous.kernel_choice import relative_l2, time_in_graph

# (in, out) and how many of each a decode step multiplies by (11B: 32 self layers, 8 cross layers)
SHAPES = {"qkv": ((4096, 6144), 32), "o": ((4096, 4096), 40), "gate_up": ((4096, 28672), 40),
          "down": ((14336, 4096), 40), "cross_q": ((4096, 4096), 8), "lm_head": ((4096, 128256), 1)}
ROWS = (1, 16, 32, 64)
# split-K candidates (git after 19,44 UTC 2026-11-28): several programs per output tile's reduction
EXTRA = [fp8.Config(*c) for c in [
    (32, 256, 4, 4, 2), (32, 256, 4, 4, 4), (64, 128, 4, 4, 2), (64, 128, 4, 4, 4), (64, 256, 4, 3, 4),
    (128, 128, 4, 4, 2), (128, 128, 4, 4, 4), (128, 128, 8, 4, 4), (128, 64, 4, 6, 8), (64, 128, 4, 4, 8),
    (128, 128, 4, 4, 8), (16, 256, 4, 4, 4),
]]


def timed(fns: list[Any], calls: int) -> float:
    it = itertools.cycle(fns)
    return time_in_graph(lambda: next(it)(), calls=calls, reps=5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--x-f16", action="store_true",
                    help="only the engine's configs, rows already fp16 vs bf16 (what converting them costs)")
    ap.add_argument("--ring-mib", type=int, default=400, help="distinct weights per shape, at least this many MiB")
    args = ap.parse_args()
    dev = "cuda"
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "kernel_available": fp8.available(), "shapes": {}}
    step_bf16 = {r: 0.0 for r in ROWS}
    step_fp8 = {r: 0.0 for r in ROWS}
    step_f16 = {r: 0.0 for r in ROWS}
    t_start = time.time()
    for name, ((k, n), count) in SHAPES.items():
        w0 = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        copies = max(2, -(-(args.ring_mib << 20) // (w0.numel() * 2)))
        ws = [w0] + [torch.randn_like(w0) * 0.02 for _ in range(copies - 1)]
        qws = [fp8.quantize(w) for w in ws]
        entry: dict[str, Any] = {}
        for rows in ROWS:
            x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
            bf16 = F.linear(x, w0).float()
            ref8 = fp8.reference(x, qws[0]).float()
            calls = max(16, 2 * len(ws))
            t_bf16 = timed([lambda w=w, x=x: F.linear(x, w) for w in ws], calls)
            row: dict[str, Any] = {"bf16_us": round(t_bf16 * 1e6, 1),
                                   "bf16_TBps": round(w0.numel() * 2 / t_bf16 / 1e12, 2),
                                   "fp8_vs_bf16_rel_l2": round(relative_l2(ref8, bf16), 4)}
            best = None
            best16: float | None = None  # the fastest config with rows already fp16 (--x-f16)
            x16 = x.half()
            if args.x_f16:  # what a cast kernel before each projection would cost
                row["cast_us"] = round(timed([lambda x=x: x.to(torch.float16)], calls) * 1e6, 1)
            for cfg in (*fp8.CONFIGS, *([] if args.x_f16 else EXTRA)):
                if not fp8.fits(cfg, k):
                    continue
                try:
                    got = fp8.linear(x, qws[0], cfg).float()
                    err = relative_l2(got, ref8)
                    t = timed([lambda q=q, cfg=cfg, x=x: fp8.linear(x, q, cfg) for q in qws], calls)
                except Exception as exc:  # noqa: BLE001 - report a config this GPU cannot build
                    row[str(cfg)] = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
                    continue
                row[str(cfg)] = {"us": round(t * 1e6, 1), "kernel_rel_l2": round(err, 5),
                                 "TBps_fp8_bytes": round(w0.numel() / t / 1e12, 2)}
                if args.x_f16:
                    t16 = timed([lambda q=q, cfg=cfg, x16=x16: fp8.linear(x16, q, cfg) for q in qws], calls)
                    row[str(cfg)]["x_f16_us"] = round(t16 * 1e6, 1)
                    best16 = t16 if best16 is None else min(best16, t16)
                if err <= 1e-2 and (best is None or t < best[0]):
                    best = (t, str(cfg))
            if best16 is not None:
                row["best_x_f16_us"] = round(best16 * 1e6, 1)
                step_f16[rows] += best16 * count
            if best is not None:
                row["best"] = {"config": best[1], "us": round(best[0] * 1e6, 1),
                               "speedup_vs_bf16": round(t_bf16 / best[0], 2)}
                step_fp8[rows] += best[0] * count
            step_bf16[rows] += t_bf16 * count
            entry[f"rows{rows}"] = row
            kernels = {c: v["us"] for c, v in row.items() if isinstance(v, dict) and "us" in v}
            print(f"{name:8s} rows {rows:3d}: bf16 {t_bf16 * 1e6:7.1f} us  fp8 best {row.get('best')}"
                  f"  quant rel_l2 {row['fp8_vs_bf16_rel_l2']}  all {kernels}", flush=True)
        report["shapes"][name] = entry
        if args.out:  # as it goes: a run cut short keeps its shapes
            args.out.write_text(json.dumps(report, indent=1))
        del ws, qws
        torch.cuda.empty_cache()
    report["step_projections_ms"] = {
        str(r): {"bf16": round(step_bf16[r] * 1e3, 3), "fp8": round(step_fp8[r] * 1e3, 3),
                 "saved_ms": round((step_bf16[r] - step_fp8[r]) * 1e3, 3),
                 **({"fp8_rows_f16": round(step_f16[r] * 1e3, 3)} if args.x_f16 else {})} for r in ROWS}
    report["seconds"] = round(time.time() - t_start, 1)
    print("projection time of one 11B decode step (ms):", json.dumps(report["step_projections_ms"]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
