"""The vision tower's attention through FlashAttention 4's CuTe DSL kernels (the `flash-attn-4` wheel and CUTLASS's
Python DSL, carried; not dependencies of llamactl), against what the engine runs (PyTorch's SDPA on cuDNN):
- one layer's unmasked pass for 8 four-tile images (16 heads x 6,432 positions, head dim 80), q/k/v as views of
  tower.py's [n, L, 3, heads, d] q/k/v GEMM output: cuDNN (with the [n, heads, L, d] -> [n, L, heads, d] copy of its
  output the tower needs) against FA4 (which reads and writes [n, L, heads, d] as they are) at its own tile choice
  and at a few others; the first call's compile time; relative L2 of each from a float32 reference (1 image);
- the whole fused tower (8 and 2 images) with each attention, and each tower's distance from the float32 tower,
  switched as the engine switches it (`VisionEncoder.backends` / `.flash4`; runs 1-2 ran the probe's own copy of
  that path, with FA4 at the fastest tile: its own).

    python3 bench/engine_vision_fa4_probe.py --out $OUT/engine_vision_fa4_probe.json    # GPU only

The packages (FA4 4.0.0b36 and CUTLASS DSL 4.8.1 with its CUDA 13 libraries, ~250 MB installed) are too large for
one call's carry; bench/engine_fa4_wheels.sh packs them in two parts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F
from engine_probe import kernel_kinds, timed
from engine_tower_probe import inputs, rel_l2, vision_models
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, LENGTH, HEAD_DIM = 16, 6432, 80


def layer_probe(fa4_fwd: Any, tiles: list[str]) -> dict[str, Any]:
    """One tower attention layer's unmasked pass for 8 images: cuDNN and FA4 at each tile."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(8, LENGTH, 3, HEADS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
    q, k, v = (qkv[:, :, j] for j in range(3))  # [n, L, heads, d] views
    scale = HEAD_DIM ** -0.5
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [n, heads, L, d], as the tower hands them over
    ref = F.scaled_dot_product_attention(qt[:1].float(), kt[:1].float(), vt[:1].float(), scale=scale)
    ref = ref.transpose(1, 2)

    def cudnn() -> torch.Tensor:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = F.scaled_dot_product_attention(qt, kt, vt, scale=scale)
        return out.transpose(1, 2).contiguous()

    flops = 4 * 8 * HEADS * LENGTH * LENGTH * HEAD_DIM
    layer: dict[str, Any] = {}
    got = cudnn()
    layer["cudnn"] = {"s": timed(cudnn, reps=10), "rel_l2_fp32": rel_l2(got[:1], ref)}
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        layer["cudnn"]["s_without_copy"] = timed(lambda: F.scaled_dot_product_attention(qt, kt, vt, scale=scale),
                                                 reps=10)
    for tile in tiles:
        entry: dict[str, Any] = {}
        try:
            fwd = fa4_fwd(tile)
            t0 = time.perf_counter()
            got = fwd(q, k, v, scale)
            torch.cuda.synchronize()
            entry["first_call_s"] = time.perf_counter() - t0
            entry["s"] = timed(lambda fwd=fwd: fwd(q, k, v, scale), reps=10)
            entry["rel_l2_fp32"] = rel_l2(got[:1], ref)
            entry["rel_l2_cudnn"] = rel_l2(got, cudnn())
            entry["shape"], entry["stride"] = list(got.shape), list(got.stride())
        except Exception as exc:  # noqa: BLE001 - a tile may not compile for head dim 80
            entry["error"] = f"{type(exc).__name__}: {exc}"[:400]
        layer[f"fa4_{tile}"] = entry
        print(tile, entry, flush=True)
    for entry in layer.values():
        if "s" in entry:
            entry["tflops"] = flops / entry["s"] / 1e12
    return layer


def stream_check(fwd: Any) -> dict[str, Any]:
    """Does the kernel run on PyTorch's current stream? On a side stream, q/k/v are written only after ~50 ms of
    GEMMs and then attended over; a kernel launched on another stream would read them before they are there.
    Also: the first call's seconds at image counts not compiled for yet (does a new count compile again?)."""
    out: dict[str, Any] = {}
    gen = torch.Generator(device="cuda").manual_seed(1)
    src = torch.randn(3, LENGTH, 3, HEADS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
    want = fwd(*(src[:, :, j] for j in range(3)), HEAD_DIM ** -0.5)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        qkv = torch.zeros_like(src)
        for _ in range(60):
            a = torch.tanh(a @ a.T * 1e-2)  # bounded: a[0, 0] * 0 below is exactly 0
        qkv.copy_(src + a[0, 0] * 0)
        got = fwd(*(qkv[:, :, j] for j in range(3)), HEAD_DIM ** -0.5)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    out["side_stream_equal"] = bool(torch.equal(got, want))
    out["side_stream_rel_l2"] = rel_l2(got, want)
    for n in (1, 3, 5, 8):
        x = torch.randn(n, LENGTH, 3, HEADS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
        t0 = time.perf_counter()
        fwd(*(x[:, :, j] for j in range(3)), HEAD_DIM ** -0.5)
        torch.cuda.synchronize()
        out[f"first_call_{n}_images_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiles", default="default,128x128,192x128,128x176")
    args = ap.parse_args()
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def save() -> None:
        args.out.write_text(json.dumps(report, indent=1, default=str))

    start = time.perf_counter()
    from flash_attn.cute import interface as fa4

    report["import_s"] = time.perf_counter() - start
    torch.backends.cuda.enable_cudnn_sdp(True)

    def fa4_fwd(tile: str) -> Any:
        def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
            kw: dict[str, Any] = {"softmax_scale": scale}
            if tile != "default":
                kw["tile_mn"] = tuple(int(x) for x in tile.split("x"))
            return fa4._flash_attn_fwd(q, k, v, **kw)[0]
        return fwd

    with torch.inference_mode():
        report["stream"] = stream_check(fa4_fwd("default"))
        print(report["stream"], flush=True)
        layer = layer_probe(fa4_fwd, args.tiles.split(","))
        report["layer_8_images"] = layer
        save()
        report["best_tile"] = min((t for t in layer if t.startswith("fa4_") and "s" in layer[t]),
                                  key=lambda t: layer[t]["s"])
        torch.cuda.empty_cache()

        # the whole tower, each attention
        from llamactl.server.engine.continuous.vision import VisionEncoder

        vision32, projector32, vision, projector = vision_models()
        ref_encoder = VisionEncoder(vision32, projector32, split_mask=True)
        ref_encoder.fused = False
        encoder = VisionEncoder(vision, projector, split_mask=True)
        encoder.backends = [SDPBackend.CUDNN_ATTENTION]
        x2 = inputs(2, torch.bfloat16)
        want = ref_encoder(x2[0].float(), *x2[1:])
        del ref_encoder, vision32, projector32
        torch.cuda.empty_cache()
        # the engine's own switch (vision.py): cuDNN, or FA4 at its own tile (the fastest in runs 1-2)
        attentions = {"cudnn": ([SDPBackend.CUDNN_ATTENTION], False), "fa4": (None, True)}
        towers: dict[str, Any] = {}
        for name, (encoder.backends, encoder.flash4) in attentions.items():
            towers[name] = {"rel_l2_fp32_2_images": rel_l2(encoder(*x2), want)}
        for n in (8, 2, 8):  # 8 twice: the first and last timings show the spread within the call
            x = inputs(n, torch.bfloat16)
            for name, (encoder.backends, encoder.flash4) in attentions.items():
                towers[name].setdefault(f"{n}_images_s", []).append(timed(lambda x=x: encoder(*x), reps=5))
                print(name, n, towers[name][f"{n}_images_s"], flush=True)
        x = inputs(8, torch.bfloat16)
        for name, (encoder.backends, encoder.flash4) in attentions.items():
            towers[name]["8_images_kernels"] = kernel_kinds(lambda x=x: encoder(*x))
        report["tower"] = towers
        save()


if __name__ == "__main__":
    main()
