"""The Triton cross-attention's split and tile settings (decode_attention.CrossConfig) on this GPU, 11B shapes.

One decode token a row against 6,404 image positions x 8 K/V heads x 128 (bf16, K/V in a pool of 64 slots so
successive rows come from memory, not L2), at 1, 8 and 32 rows: each config timed inside CUDA graphs and checked
against ``fused.attend``; cuDNN's fused attention beside it. Prints and writes JSON.

    python3 bench/engine_cross_probe.py --out $OUT/engine_cross_probe.json      # GPU only, ~1 min
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from llamactl.server.engine.continuous import cross_attention as ca
from llamactl.server.engine.continuous import decode_attention as da
from llamactl.server.engine.continuous.fused import attend
from llamactl.server.engine.continuous.kernel_choice import time_in_graph


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    heads, kv, length, d, slots = 32, 8, 6404, 128, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(slots, kv, length, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(slots, kv, length, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    report: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                 "sms": torch.cuda.get_device_properties(0).multi_processor_count, "rows": {}}
    configs = [da.CrossConfig(p, b, w, s) for p, b, w, s in
               itertools.product((1, 2, 4, 8), (32, 64, 128), (4, 8), (2, 3))]
    with torch.inference_mode():
        for rows in (1, 8, 32):
            q = torch.randn(rows, heads, 1, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            bias = torch.zeros(rows, 1, 1, length, device="cuda", dtype=torch.bfloat16)
            kk, vv = k[:rows], v[:rows]
            ref = attend(q, kk, vv, bias, d**-0.5).float()
            out: dict[str, float] = {}
            cudnn = ca.CANDIDATES["sdpa_cudnn"]
            out["sdpa_cudnn"] = time_in_graph(partial(cudnn, q, kk, vv, bias, d**-0.5), calls=16, reps=5) * 1e6
            for cfg in configs:
                name = f"p{cfg.per_sm}b{cfg.block}w{cfg.warps}s{cfg.stages}"
                try:
                    got = da.cross_attention(q, kk, vv, bias, d**-0.5, cfg).float()
                    if float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref)) > 2e-2:
                        out[name] = -1.0
                        continue
                    run = partial(da.cross_attention, q, kk, vv, bias, d**-0.5, cfg)
                    out[name] = time_in_graph(run, calls=16, reps=5) * 1e6
                except Exception as exc:  # noqa: BLE001 - a config that cannot compile is reported, not fatal
                    out[name] = -2.0
                    print(name, "failed:", str(exc)[:200], flush=True)
            best = sorted((t, n) for n, t in out.items() if t > 0)[:6]
            print(f"rows {rows}: default {out.get('p2b64w4s2', -1):.1f} us; best", best, flush=True)
            report["rows"][str(rows)] = out  # type: ignore[index]
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
