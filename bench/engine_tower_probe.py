"""The vision tower with tower.py's regrouped encoder layers against transformers' layers, on a GPU (11B shape,
random weights, bf16, split-mask attention on cuDNN as the engine runs it).

Measures, for chunks of 2 and 8 four-tile images: seconds per tower call for each form, and kernel time by kind
(8 images); how far each bf16 form is from the float32 tower (2 images; relative L2 of the projected states);
the residual + layer norm kernel against PyTorch's ops (bf16, bit-equal stream, norm difference, time); the GELU
epilogue against erf GELU after the GEMM (difference, time).

    python3 bench/engine_tower_probe.py --out $OUT/engine_tower_probe.json      # GPU only, ~1 minute
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F
from engine_probe import kernel_kinds, timed
from torch.nn.attention import SDPBackend


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def inputs(n: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    pixel = torch.randn(n, 1, 4, 3, 560, 560, device="cuda", generator=gen).to(dtype)
    ar_ids = torch.ones(n, 1, dtype=torch.long, device="cuda")
    ar_cpu = torch.ones(n, 1, 4, dtype=torch.long)
    return pixel, ar_ids, ar_cpu.to("cuda"), ar_cpu


def vision_models() -> tuple[Any, Any, Any, Any]:
    """The 11B-shape vision model and projector with random weights: float32 (the reference) and a bf16 copy."""
    from transformers import MllamaConfig
    from transformers.models.mllama.modeling_mllama import MllamaVisionModel

    cfg = MllamaConfig()
    cfg.vision_config.image_size = 560
    torch.manual_seed(0)
    with torch.device("cuda"):
        vision32 = MllamaVisionModel._from_config(cfg.vision_config, dtype=torch.float32).eval()
        projector32 = torch.nn.Linear(cfg.vision_config.vision_output_dim, cfg.text_config.hidden_size)
    return vision32, projector32, copy.deepcopy(vision32).to(torch.bfloat16), copy.deepcopy(projector32).to(torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from llamactl.server.engine.continuous import tower
    from llamactl.server.engine.continuous.vision import VisionEncoder

    torch.backends.cuda.enable_cudnn_sdp(True)
    vision32, projector32, vision, projector = vision_models()
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "gates_tanh": [round(tower.tower_layer(layer).gate_attn, 4)
                                             for layer in vision.global_transformer.layers[:2]]}
    with torch.inference_mode():
        ref_encoder = VisionEncoder(vision32, projector32, split_mask=True)
        ref_encoder.fused = False  # float32, transformers' layers, PyTorch's attention: the reference
        encoder = VisionEncoder(vision, projector, split_mask=True)
        encoder.backends = [SDPBackend.CUDNN_ATTENTION]
        x2 = inputs(2, torch.bfloat16)
        ref = ref_encoder(x2[0].float(), *x2[1:])
        outs = {}
        for name, fused in (("transformers", False), ("fused", True)):
            encoder.fused = fused
            outs[name] = encoder(*x2)
            report[f"{name}_vs_float32_rel_l2"] = rel_l2(outs[name], ref)
        report["fused_vs_transformers_rel_l2"] = rel_l2(outs["fused"], outs["transformers"])
        del ref, ref_encoder, vision32, projector32, outs
        torch.cuda.empty_cache()
        print({k: v for k, v in report.items() if "rel_l2" in k}, flush=True)
        for n in (2, 8):
            x = inputs(n, torch.bfloat16)
            for name, fused in (("transformers", False), ("fused", True)):
                encoder.fused = fused
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                report[f"{name}_{n}_images_s"] = timed(lambda x=x: encoder(*x), reps=5)
                report[f"{name}_{n}_images_peak_gb"] = (torch.cuda.max_memory_allocated() - before) / 1e9
                print(name, n, f"{report[f'{name}_{n}_images_s'] * 1000:.1f} ms", flush=True)
                if n == 8:
                    report[f"{name}_8_images_kernels"] = kernel_kinds(lambda x=x: encoder(*x))
        # the split-mask attention's two passes at one layer's shapes for 8 images, q/k/v as the fused q/k/v GEMM
        # lays them out (run 2 also timed the padding rows' pass as plain matmuls: 1.16 vs 0.20 ms)
        qkv = torch.randn(8, 4 * 1608, 3, 16, 80, device="cuda", dtype=torch.bfloat16)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        rows, key_bias = (x.cuda() for x in encoder.host_rows(torch.ones(8, 4, dtype=torch.long), torch.bfloat16))
        index = rows[:, None, :, None].expand(8, 16, rows.shape[1], 80)
        qp = torch.gather(q, 2, index)
        with torch.nn.attention.sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            report["attn_full_pass_s"] = timed(lambda: F.scaled_dot_product_attention(q, k, v), reps=5)
            report["attn_pad_pass_s"] = timed(
                lambda: F.scaled_dot_product_attention(qp, k, v, attn_mask=key_bias), reps=5)
        print({k: v for k, v in report.items() if k.startswith("attn")}, flush=True)
        # the residual + layer norm pass alone, at 8 images' rows
        rows, hidden = 8 * 4 * 1608, 1280
        norm = vision.transformer.layers[0].post_attention_layernorm
        h = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
        y = torch.randn_like(h)
        for gate in (1.0, 0.6):
            want_h = h + (y if gate == 1.0 else y * gate)
            want = F.layer_norm(want_h, (hidden,), norm.weight, norm.bias, norm.eps)
            got_h = h.clone()
            got = tower.residual_norm_(got_h, y, gate, norm, use_kernel=True)
            report[f"residual_norm_gate{gate}"] = {
                "stream_equal": bool(torch.equal(got_h, want_h)),
                "stream_max_abs": float((got_h.float() - want_h.float()).abs().max()),
                "norm_rel_l2": rel_l2(got, want), "norm_max_abs": float((got.float() - want.float()).abs().max()),
            }
        hh = h.clone()
        report["residual_norm_kernel_s"] = timed(lambda: tower.residual_norm_(hh, y, 1.0, norm, use_kernel=True),
                                                 reps=10)
        report["residual_norm_torch_s"] = timed(lambda: tower.residual_norm_(hh, y, 1.0, norm, use_kernel=False),
                                                reps=10)
        fc1 = vision.transformer.layers[0].mlp.fc1
        xin = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
        erf = tower.mlp_up(fc1, xin, epilogue=False)
        tanh_ = tower.mlp_up(fc1, xin, epilogue=True)
        report["gelu_epilogue"] = {"rel_l2": rel_l2(tanh_, erf),
                                   "max_abs": float((tanh_.float() - erf.float()).abs().max()),
                                   "epilogue_s": timed(lambda: tower.mlp_up(fc1, xin, epilogue=True), reps=10),
                                   "separate_s": timed(lambda: tower.mlp_up(fc1, xin, epilogue=False), reps=10)}
        print({k: v for k, v in report.items() if k.startswith(("residual", "gelu"))}, flush=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
