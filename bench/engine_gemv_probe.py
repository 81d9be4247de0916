"""The decode step's weight GEMMs at small batch, in several forms, timed inside CUDA graphs.

Why: at batch 1 on an H100 the q/k/v and o projections ran at 1.0-1.9 TB/s (engine_green_probe_run1_h100.json,
fp8 table: o 0.92 TB/s, qkv 1.6 TB/s) where gate/up and down reach 2.5-2.9 TB/s; that is ~0.8 ms of the 9.2 ms
batch-1 step, and the 1-client figure (99.9 tok/s) needs ~0.1 % more. Each form computes x @ W^T for the 11B
model's shapes (bf16) and is checked against F.linear:
- ``linear``: F.linear(x, W) (what fused.py runs);
- ``addmm_``: h.addmm_(x, W^T) into a residual (what fused.add_linear_ runs for o and down);
- ``w_first``: (W @ x^T)^T (cuBLAS sees M = out features, N = batch);
- ``mv``: torch.mv per row (batch 1 only: cuBLAS GEMV);
- ``fp8``: torch._scaled_mm with e4m3 weights and row-wise scales (numbers differ: FP8 rounding; reported).
Prints a table and writes JSON.

    python3 bench/engine_gemv_probe.py --out $OUT/engine_gemv_probe.json     # GPU, ~20 s
    python3 bench/engine_gemv_probe.py --cpu-smoke                            # the forms on tiny shapes, no timing
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llamactl.server.engine.continuous import gemv
from llamactl.server.engine.continuous.kernel_choice import time_in_graph

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
          "cross_q": (4096, 4096), "lm_head": (4096, 128256)}


def forms(w: torch.Tensor, rows: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    residual = torch.zeros(rows, w.shape[0], dtype=w.dtype, device=w.device)  # the check runs first, on zeros
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "linear": lambda x: F.linear(x, w),
        "addmm_": lambda x: residual.addmm_(x, w.t()),
        "w_first": lambda x: (w @ x.t()).t(),
    }
    if rows == 1:
        out["mv"] = lambda x: torch.mv(w, x[0]).unsqueeze(0)
    if w.is_cuda and hasattr(torch, "_scaled_mm"):
        scale_w = (w.abs().amax(dim=1, keepdim=True).float() / 448.0).clamp(min=1e-12)
        w8 = (w.float() / scale_w).to(torch.float8_e4m3fn)

        def fp8(x: torch.Tensor) -> torch.Tensor:
            scale_x = (x.abs().amax(dim=1, keepdim=True).float() / 448.0).clamp(min=1e-12)
            x8 = (x.float() / scale_x).to(torch.float8_e4m3fn)
            return torch._scaled_mm(x8, w8.t(), scale_a=scale_x, scale_b=scale_w.t(), out_dtype=x.dtype)

        out["fp8"] = fp8
    return out


def ring(w: torch.Tensor, budget_bytes: int) -> list[torch.Tensor]:
    """Distinct copies of ``w`` totalling at least ``budget_bytes``: successive calls read DRAM, not L2 (50 MB
    on an H100), as a decode step does (every layer has its own weights)."""
    copies = max(1, -(-budget_bytes // (w.numel() * w.element_size())))
    return [w] + [torch.randn_like(w) * 0.02 for _ in range(copies - 1)]


def timed(per_copy: list[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor) -> float:
    """Seconds per call, each captured call on the next copy of the weight."""
    it = itertools.cycle(per_copy)
    return time_in_graph(lambda: next(it)(x), calls=max(20, len(per_copy) * 2), reps=5)


def run(device: str, scale_down: int) -> dict[str, Any]:
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for name, (k, n) in SHAPES.items():
        k, n = k // scale_down, n // scale_down
        w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
        weights = ring(w, 256 << 20) if device == "cuda" else [w]
        nbytes = w.numel() * w.element_size()
        for rows in (1, 2, 8, 32):
            x = torch.randn(rows, k, device=device, dtype=dtype)
            ref = F.linear(x, w).float()
            row: dict[str, Any] = {}
            all_forms = [forms(wi, rows) for wi in weights]
            for form in all_forms[0]:
                try:
                    got = all_forms[0][form](x).float()
                    err = float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref))
                    entry: dict[str, Any] = {"rel_l2": round(err, 4)}
                    if device == "cuda":
                        us = round(timed([f[form] for f in all_forms], x) * 1e6, 1)
                        entry.update(us=us, TBps=round(nbytes / (us * 1e-6) / 1e12, 2))
                    row[form] = entry
                except RuntimeError as exc:
                    row[form] = str(exc)[:100]
            if device == "cuda" and gemv.available() and rows <= gemv.MAX_ROWS:
                for cfg in gemv.CONFIGS:
                    res = torch.randn(rows, n, device=device, dtype=dtype)
                    got = gemv.linear(x, w, cfg, residual=res.clone()).float()
                    want = (res.float() + ref)
                    err = float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))
                    plain = [lambda x, wi=wi, cfg=cfg: gemv.linear(x, wi, cfg) for wi in weights]
                    us = round(timed(plain, x) * 1e6, 1)
                    row[f"triton_{cfg}"] = {"rel_l2": round(err, 4), "us": us,
                                            "TBps": round(nbytes / (us * 1e-6) / 1e12, 2)}
            report[f"{name}_m{rows}"] = row
            best = min((e["us"], f) for f, e in row.items() if isinstance(e, dict) and "us" in e) \
                if device == "cuda" else None
            print(name, rows, "best:", best, row, flush=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--cpu-smoke", action="store_true", help="run every form on small CPU shapes (no timing)")
    args = ap.parse_args()
    report = run("cpu", 64) if args.cpu_smoke else run("cuda", 1)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    bad = [k for k, row in report.items() if isinstance(row, dict)
           for form, e in row.items() if form != "fp8" and isinstance(e, dict) and e["rel_l2"] > 2e-2]
    if bad:
        print("forms that differ from F.linear:", bad)
        sys.exit(1)


if __name__ == "__main__":
    main()
