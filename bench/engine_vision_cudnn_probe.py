"""The vision tower's attention (8 four-tile images: 16 heads x 6,432 positions, head dim 80) through cuDNN's own
graph API (the `nvidia-cudnn-frontend` wheel, carried; not a dependency of llamactl), against what the engine runs
(PyTorch's SDPA on its cuDNN backend, which takes cuDNN's first heuristic plan):
- every execution plan cuDNN offers for the same bf16 graph, each timed (is a plan other than the first faster?);
- the FP8 (e4m3) forward with per-tensor scales (Q, K, V and the probabilities in e4m3; Hopper's kernel also
  writes O in e4m3), every plan timed, its distance from the bf16 result, and the cost of quantizing Q/K/V with
  PyTorch ops.
Inputs are random normal (scores ~N(0, 1) after the 1/sqrt(80) scale); q/k/v are views of one [n, L, 3, heads, d]
buffer, as tower.py's q/k/v GEMM lays them out.

    python3 bench/engine_vision_cudnn_probe.py --out $OUT/engine_vision_cudnn_probe.json    # GPU only, ~1 min

The wheel (1.8 MB; 1.14.1 needs no other package, later ones pull in CUTLASS's DSL) goes beside the others that
bench/engine_wheels.sh fetches: `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
--implementation cp --platform manylinux_2_28_x86_64 -d .whl nvidia-cudnn-frontend==1.14.1`.
Measured (H200, run 1): bf16 plans 4.31 ms at best (the one PyTorch runs), FP8 3.53 ms at 6.0e-2 from bf16.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F
from engine_probe import timed
from engine_vision_attn_probe import HEAD_DIM, HEADS, LENGTH, probe_args
from torch.nn.attention import SDPBackend, sdpa_kernel

E4M3_MAX = 448.0


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def time_plans(graph: Any, pack: dict[Any, torch.Tensor], handle: Any, check: Any) -> list[dict[str, Any]]:
    """Each built plan: its name, seconds per call and ``check()`` after running it (or the error)."""
    out = []
    for i in range(int(graph.get_execution_plan_count())):
        entry: dict[str, Any] = {"index": i}
        try:
            entry["name"] = graph.get_plan_name_at_index(i)
        except Exception as exc:  # noqa: BLE001 - older frontends lack plan names
            entry["name"] = f"? ({exc})"[:80]
        try:
            ws = torch.empty(max(int(graph.get_workspace_size_plan_at_index(i)), 1), device="cuda", dtype=torch.uint8)

            def run(i: int = i, ws: torch.Tensor = ws) -> None:
                graph.execute_plan_at_index(pack, ws, index=i, handle=handle)

            entry["s"] = timed(run, reps=5)
            entry.update(check())
        except Exception as exc:  # noqa: BLE001 - a plan may build but not run on this shape
            entry["error"] = str(exc)[:300]
        print(entry, flush=True)
        out.append(entry)
    return out


def build(cudnn: Any, graph: Any) -> None:
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans(cudnn.build_plan_policy.ALL)


def main() -> None:
    args = probe_args()
    import cudnn

    n, heads, length, d = args.images, HEADS, LENGTH, HEAD_DIM
    scale = d**-0.5
    flops = 4 * n * heads * length * length * d
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(n, length, 3, heads, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))  # [n, heads, L, d] views
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "cudnn_backend": cudnn.backend_version(), "frontend": cudnn.__version__,
                              "shape": [n, heads, length, d], "tflop": flops / 1e12}
    with torch.inference_mode():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            ref = F.scaled_dot_product_attention(q, k, v, scale=scale)
            report["torch_cudnn_s"] = timed(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale), reps=5)
        exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
        report["torch_cudnn_vs_float32"] = rel_l2(ref, exact)
        print(report, flush=True)
        handle = cudnn.create_handle()
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)

        # bf16, every plan
        bf16 = cudnn.data_type.BFLOAT16
        graph = cudnn.pygraph(io_data_type=bf16, intermediate_data_type=cudnn.data_type.FLOAT,
                              compute_data_type=cudnn.data_type.FLOAT, handle=handle)
        tq, tk, tv = (graph.tensor(name=nm, dim=list(x.shape), stride=list(x.stride()), data_type=bf16)
                      for nm, x in (("q", q), ("k", k), ("v", v)))
        o, _ = graph.sdpa(name="sdpa", q=tq, k=tk, v=tv, generate_stats=False, attn_scale=scale)
        out = torch.empty(n, length, heads, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        o.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride()))
        try:
            build(cudnn, graph)
            pack = {tq: q, tk: k, tv: v, o: out}
            report["bf16_plans"] = time_plans(graph, pack, handle,
                                              lambda: {"rel_l2_vs_torch": rel_l2(out, ref),
                                                       "rel_l2_vs_float32": rel_l2(out, exact)})
        except Exception as exc:  # noqa: BLE001
            report["bf16_error"] = str(exc)[:500]
            print("bf16 graph:", exc, flush=True)

        # FP8 e4m3, per-tensor scales, every plan
        f8 = torch.float8_e4m3fn
        scales = [E4M3_MAX / float(x.abs().amax()) for x in (q, k, v)]
        qkv8 = torch.empty_like(qkv, dtype=f8)
        for j, s in enumerate(scales):
            qkv8[:, :, j] = (qkv[:, :, j].float() * s).to(f8)
        q8, k8, v8 = (qkv8[:, :, j].transpose(1, 2) for j in range(3))

        def quantize() -> None:
            for j in range(3):
                part = qkv[:, :, j]
                s = E4M3_MAX / part.abs().amax().float()
                qkv8[:, :, j] = (part.float() * s).to(f8)

        report["quantize_qkv_torch_s"] = timed(quantize, reps=5)
        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph8 = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
        t8 = [graph8.tensor(name=nm, dim=list(x.shape), stride=list(x.stride()), data_type=e4m3)
              for nm, x in (("q", q8), ("k", k8), ("v", v8))]
        scalar = {"dim": [1, 1, 1, 1], "stride": [1, 1, 1, 1], "data_type": fp32}
        tdq, tdk, tdv, tds, tss, tso = (graph8.tensor(name=nm, **scalar) for nm in ("dq", "dk", "dv", "ds", "ss", "so"))
        o8, _, amax_s, amax_o = graph8.sdpa_fp8(
            name="sdpa_fp8", q=t8[0], k=t8[1], v=t8[2], descale_q=tdq, descale_k=tdk, descale_v=tdv,
            descale_s=tds, scale_s=tss, scale_o=tso, generate_stats=False, attn_scale=scale)
        out8 = torch.empty(n, length, heads, d, device="cuda", dtype=f8).transpose(1, 2)
        o8.set_output(True).set_dim(list(out8.shape)).set_stride(list(out8.stride())).set_data_type(e4m3)
        amax_s_t = torch.zeros(1, 1, 1, 1, device="cuda")
        amax_o_t = torch.zeros(1, 1, 1, 1, device="cuda")
        for t in (amax_s, amax_o):
            t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
        scale_o = E4M3_MAX / float(v.abs().amax())  # |O| <= max |V|: a convex combination of V's rows

        def one(x: float) -> torch.Tensor:
            return torch.full((1, 1, 1, 1), x, device="cuda", dtype=torch.float32)

        try:
            build(cudnn, graph8)
            pack8 = {t8[0]: q8, t8[1]: k8, t8[2]: v8, tdq: one(1 / scales[0]), tdk: one(1 / scales[1]),
                     tdv: one(1 / scales[2]), tds: one(1 / E4M3_MAX), tss: one(E4M3_MAX), tso: one(scale_o),
                     o8: out8, amax_s: amax_s_t, amax_o: amax_o_t}

            def check8() -> dict[str, float]:
                deq = out8.float() / scale_o
                return {"rel_l2_vs_torch_bf16": rel_l2(deq, ref), "rel_l2_vs_float32": rel_l2(deq, exact),
                        "amax_o": float(amax_o_t), "amax_s": float(amax_s_t)}

            report["fp8_plans"] = time_plans(graph8, pack8, handle, check8)
        except Exception as exc:  # noqa: BLE001
            report["fp8_error"] = str(exc)[:500]
            print("fp8 graph:", exc, flush=True)
    for key in ("bf16_plans", "fp8_plans"):
        timed_plans = [p for p in report.get(key, []) if "s" in p]
        if timed_plans:
            best = min(timed_plans, key=lambda p: p["s"])
            report[f"{key}_best"] = {"index": best["index"], "s": best["s"], "tflops": flops / best["s"] / 1e12}
    report["torch_cudnn_tflops"] = flops / report["torch_cudnn_s"] / 1e12
    print({k: v for k, v in report.items() if not k.endswith("_plans")}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
