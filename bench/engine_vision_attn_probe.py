"""The vision tower's attention at its own head dim (80) against the same attention with q/k/v zero-padded to 96
and 128 (zeros add nothing to q.k, and V's extra columns come out zero and are dropped): does a kernel's speed at
a wider head dim pay for 1.2x / 1.6x the FLOPs and the padding copies? One layer's shapes for 8 four-tile images
(16 heads x 6,432 positions), each backend, bf16; outputs checked against the unpadded call.

    python3 bench/engine_vision_attn_probe.py --out $OUT/engine_vision_attn_probe.json      # GPU only, ~30 s
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F
from engine_probe import timed
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, LENGTH, HEAD_DIM = 16, 6432, 80  # one tower attention layer of a four-tile image (4 x 1,608 positions)


def probe_args() -> argparse.Namespace:
    """--out (the JSON report) and --images (8: a chunk of the engine's tower), for the tower attention probes."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--images", type=int, default=8)
    return ap.parse_args()


def main() -> None:
    args = probe_args()
    n, heads, length, d = args.images, HEADS, LENGTH, HEAD_DIM
    gen = torch.Generator(device="cuda").manual_seed(0)
    # the layout the tower hands over: [n, L, heads, d] viewed as [n, heads, L, d]
    q, k, v = (torch.randn(n, length, heads, d, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
               for _ in range(3))
    flops = 4 * n * heads * length * length * d
    report: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                 "shape": [n, heads, length, d], "tflop_at_80": flops / 1e12, "runs": {}}
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    with torch.inference_mode():
        ref = None
        for name, backend in backends.items():
            for width in (80, 96, 128):
                def run(width: int = width, backend: SDPBackend = backend) -> torch.Tensor:
                    if width == d:
                        qq, kk, vv = q, k, v
                    else:
                        qq, kk, vv = (F.pad(x, (0, width - d)) for x in (q, k, v))
                    with sdpa_kernel([backend]):
                        out = F.scaled_dot_product_attention(qq, kk, vv, scale=d**-0.5)
                    return out[..., :d].transpose(1, 2).contiguous()

                key = f"{name}_d{width}"
                try:
                    out = run().float()
                    if ref is None:
                        ref = out
                    err = float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))
                    t = timed(run, reps=5)
                    report["runs"][key] = {"s": t, "rel_l2_vs_first": err,  # type: ignore[index]
                                           "tflops_useful": flops / t / 1e12}
                    print(key, f"{t * 1000:.2f} ms, {flops / t / 1e12:.0f} TFLOP/s useful, rel L2 {err:.1e}",
                          flush=True)
                except RuntimeError as exc:
                    report["runs"][key] = {"error": str(exc)[:300]}  # type: ignore[index]
                    print(key, "failed:", str(exc)[:200], flush=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
