"""quantization: fp8 — e4m3 copies of the text layers (fp8.py), on the tiny real checkpoint (float32, CPU).

The CPU runs the kernel's arithmetic in float32 (``fp8.reference``); so the engine's greedy answers must equal
transformers' ``generate`` on a copy of the checkpoint whose text projections hold the dequantized FP8 values.
The kernel itself runs in Triton's interpreter where Triton is installed (not in CI's CPU install).
"""

from __future__ import annotations

import importlib.util
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import torch.nn.functional as F

from llamactl.server.engine.continuous import fp8
from llamactl.server.engine.protocol import GenParams, GenRequest
from llamactl.server.tiny import trained_image

from ._support import make_settings, png_b64, run_in_triton_interpreter, start_thread_server
from .test_continuous_engine import image_prompt, run_all, running_engine


def test_quantize_keeps_each_row_within_e4m3_rounding() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 64, generator=g) * torch.logspace(-3, 1, 40)[:, None]  # rows of very different scales
    w[7] = 0.0
    qw = fp8.quantize(w, rows_at_once=16)  # several slices
    assert qw.q.dtype == torch.float8_e4m3fn and qw.scale.shape == (40,)
    back = fp8.dequantized(qw, torch.float32)
    assert torch.equal(back[7], torch.zeros(64))
    big = w.abs() > w.abs().amax(dim=1, keepdim=True) / 64  # normal e4m3 values: 3 mantissa bits
    rel = ((back - w).abs() / w.abs().clamp(min=1e-30))[big]
    assert rel.max() <= 2**-4 + 1e-6
    assert torch.allclose(back.abs().amax(dim=1), w.abs().amax(dim=1))  # each row's largest is exact


def test_concatenated_copies_equal_the_copy_of_the_concatenation() -> None:
    a, b = torch.randn(8, 32), torch.randn(5, 32) * 3
    joined = fp8.cat([fp8.quantize(a), fp8.quantize(b)])
    whole = fp8.quantize(torch.cat([a, b]))
    assert torch.equal(joined.q.float(), whole.q.float()) and torch.equal(joined.scale, whole.scale)


def test_projections_multiply_by_the_dequantized_weight_and_add_in_place() -> None:
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(24, 32, generator=g), torch.randn(3, 1, 32, generator=g)
    qw = fp8.quantize(w)
    proj = fp8.Fp8Projections(use_kernel=False)
    want = F.linear(x, fp8.dequantized(qw, torch.float32))
    assert torch.allclose(proj.linear(x, qw), want, atol=1e-5)
    h = torch.randn(3, 1, 24, generator=g)
    expected = h + want
    out = proj.add_(h, x, qw)
    assert out is h and torch.allclose(h, expected, atol=1e-5)
    assert torch.equal(proj.linear(x, w), F.linear(x, w))  # a plain weight goes through cuBLAS/ATen as before


def test_kept_checkpoint_weights_serve_where_chosen_and_for_prefill_chunks() -> None:
    """fp8_keep_bf16: a bucket whose fastest form was cuBLAS (chosen None) and any call past the largest bucket use
    the kept weight, exactly F.linear's result (no kernel runs on this path)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 32, generator=g)
    qw = fp8.quantize(w)
    qw.dense = w
    proj = fp8.Fp8Projections(use_kernel=True, chosen={(24, 32, 16): None, (24, 32, 64): None})
    for rows in (3, 16, 50, fp8.MAX_BUCKET + 1, 200):
        x = torch.randn(rows, 32, generator=g)
        assert torch.equal(proj.linear(x, qw), F.linear(x, w)), rows
        h = torch.randn(rows, 24, generator=g)
        want = h + F.linear(x, w)
        assert torch.allclose(proj.add_(h, x, qw), want, atol=1e-5)
    assert proj._dense(torch.zeros(20, 32), qw) is w  # bucket 32 never timed: the kept weight...
    proj.chosen[(24, 32, 32)] = fp8.DEFAULT
    assert proj._dense(torch.zeros(20, 32), qw) is None  # ...the kernel where a config won


def test_image_kv_in_fp8_pools_round_per_head_and_move_with_their_scales() -> None:
    from llamactl.server.engine.continuous.pools import PoolShape, SlotPools

    shape = PoolShape(self_layers=1, cross_layers=2, kv_heads=2, head_dim=8, max_len=16, cross_len=12,
                      element_bytes=4, image_kv_fp8=True)
    assert shape.cross_bytes_per_slot == 2 * 2 * 2 * (12 * 8 + 4)  # a byte a value, a float32 scale per head
    assert replace(shape, image_kv_fp8=False).cross_bytes_per_slot == 2 * 2 * 2 * 12 * 8 * 4
    pools = SlotPools(shape, 4, [0], [1, 2], torch.float32, "cpu")
    torch.manual_seed(0)
    k = torch.randn(1, 2, 10, 8) * torch.tensor([1e-3, 50.0])[None, :, None, None]  # heads of very unlike sizes
    v = torch.randn(1, 2, 10, 8)
    pools.write_image_kv(1, torch.tensor([2]), k, v)
    assert pools.ck[1].dtype == torch.float8_e4m3fn
    got_k, got_v = pools.image_kv(1, torch.tensor([2]))
    for got, want in ((got_k[:, :, :10], k), (got_v[:, :, :10], v)):
        step = want.abs().amax(dim=(2, 3), keepdim=True) / 448 * 2**-9  # e4m3's subnormal step, per head
        assert ((got - want).abs() <= want.abs() * 2**-4 + step).all()  # e4m3's rounding, any head size
    pools.move(2, 0, length=3, has_image=True)
    moved_k, moved_v = pools.image_kv(1, slice(0, 1))
    assert torch.equal(moved_k, got_k) and torch.equal(moved_v, got_v)


def test_split_configs_need_whole_blocks_per_part_and_are_named_by_their_split() -> None:
    assert fp8.fits(fp8.Config(128, 128, 8, 4, 4), 14336)  # 11B's down: 4 parts of 3,584 = 28 blocks
    assert not fp8.fits(fp8.Config(64, 1024, 4, 2, 4), 14336)  # 3,584 is not a multiple of 1,024
    assert not fp8.fits(fp8.Config(32, 256, 4, 4, 8), 1000)
    assert str(fp8.Config(64, 128, 4, 4, 4)) == "n64k128w4s4p4" and str(fp8.Config(32, 256, 4, 4)) == "n32k256w4s4"
    assert all(fp8.fits(c, k) for c in fp8.CONFIGS for k in (4096, 14336))  # every 11B reduction, every config
    qw = fp8.quantize(torch.randn(48, 1000))
    with pytest.raises(ValueError, match="multiple of block_k 256 x split 8"):
        fp8.linear(torch.randn(2, 1000), qw, fp8.Config(32, 256, 4, 4, 8))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (CPU install)")
def test_the_kernel_equals_its_reference_in_tritons_interpreter() -> None:
    code = textwrap.dedent("""
        import torch
        from llamactl.server.engine.continuous import fp8
        torch.manual_seed(0)
        qw = fp8.quantize(torch.randn(48, 256) * 0.05)
        configs = (fp8.Config(16, 128, 4, 2), fp8.Config(32, 256, 4, 2),  # one program per tile
                   fp8.Config(32, 64, 4, 2, 2), fp8.Config(16, 32, 4, 2, 8))  # split: 2 and 8 parts
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            for m in (1, 5, 16, 17, 40, 70):  # 70: past MAX_BUCKET, a split config runs unsplit
                x = torch.randn(m, 256).to(dtype)
                ref = fp8.reference(x, qw).float()
                for cfg in configs:
                    got = fp8.linear(x, qw, cfg).float()
                    r = torch.randn(m, 48).to(dtype)
                    added = fp8.linear(x, qw, cfg, residual=r.clone()).float()
                    err = (got - ref).norm() / ref.norm()
                    err_added = (added - (r.float() + ref)).norm() / (r.float() + ref).norm()
                    assert err < tol and err_added < tol, (dtype, m, cfg, float(err), float(err_added))
                    assert torch.equal(fp8.linear(x, qw, cfg).float(), got)  # the parts add in a fixed order
                # every split call leaves its tiles' counters at zero for the next one
                assert int(fp8._tile_counters(x.device).abs().sum()) == 0
        print("ok")
    """)
    run_in_triton_interpreter(code)


def _dequantized_reference_model(tiny_checkpoint: Path) -> torch.nn.Module:
    """The checkpoint with each text projection and the LM head replaced by its FP8 copy's values."""
    from transformers import MllamaForConditionalGeneration

    model = MllamaForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32).eval()
    fp8.dequantize_in_place(model)
    return model


def test_fp8_engine_answers_equal_generate_on_the_dequantized_weights(tiny_checkpoint: Path) -> None:
    reference = _dequantized_reference_model(tiny_checkpoint)
    with running_engine(tiny_checkpoint, quantization="fp8", fp8_image_kv=False, max_batch_size=4,
                        gen_max_new_tokens=64) as eng:
        text = eng.hf.model.model.language_model
        assert text.layers[0].self_attn.q_proj.weight.numel() == 0  # the checkpoint's copy was freed
        assert eng.describe()["quantization"].startswith("fp8")
        reqs = [
            GenRequest(prompt=image_prompt(eng), image=trained_image("red"), params=GenParams(max_new_tokens=24)),
            GenRequest(prompt=image_prompt(eng, "What colour is it?"), image=trained_image("blue").resize((120, 40)),
                       params=GenParams(max_new_tokens=16)),
            GenRequest(prompt=eng.render_prompt([{"role": "user", "content": [{"type": "text", "text": "Count"}]}]),
                       image=None, params=GenParams(max_new_tokens=12)),
            GenRequest(prompt=image_prompt(eng), image=trained_image("blue"), params=GenParams(max_new_tokens=20)),
        ]
        results = run_all(eng, reqs, gaps_s=[0.0, 0.05])
        proc, tok = eng.hf.processor, eng.hf.processor.tokenizer
        for req, result in zip(reqs, results):
            inputs = proc(images=[[req.image]] if req.image is not None else None, text=[req.prompt],
                          add_special_tokens=False, return_tensors="pt")
            with torch.inference_mode():
                out = reference.generate(**inputs, max_new_tokens=req.params.max_new_tokens, do_sample=False,
                                         pad_token_id=eng.hf._pad_id, temperature=1.0, top_p=1.0, top_k=50)
            ids = [t for t in out[0, inputs["input_ids"].shape[1]:].tolist() if t not in eng.hf._eos_ids]
            assert result.text == tok.decode(ids, skip_special_tokens=True) and result.text
        assert max(r.batch_size for r in results) > 1


def _image_kv_through_fp8(model: torch.nn.Module) -> None:
    """Hooks on each cross-attention layer of ``model``: its image K (after k_norm) and V replaced by the values
    their FP8 form stands for (``fp8.quantize_image_kv``, as the engine's pools keep them)."""
    text = model.model.language_model
    for i in text.config.cross_attention_layers:
        attn = text.layers[i].cross_attn
        kvh, hd = attn.num_key_value_heads, attn.head_dim

        def through(x: torch.Tensor) -> torch.Tensor:  # [n, kv_heads, L, d]
            return fp8.dequantize_image_kv(*fp8.quantize_image_kv(x), x.dtype)

        def v_hook(_mod: Any, _args: Any, out: torch.Tensor, kvh: int = kvh, hd: int = hd) -> torch.Tensor:
            n, length, _ = out.shape
            v = through(out.view(n, length, kvh, hd).transpose(1, 2))
            return v.transpose(1, 2).reshape(n, length, kvh * hd)

        attn.k_norm.register_forward_hook(lambda _mod, _args, out: through(out))
        attn.v_proj.register_forward_hook(v_hook)


@pytest.mark.parametrize("image_kv_fp8", [False, True])
def test_fp8_engine_logits_equal_the_dequantized_model_and_differ_from_the_checkpoint(tiny_checkpoint: Path,
                                                                                       image_kv_fp8: bool) -> None:
    """Teacher-forced: prefill and three decode steps of an image row and a text-only row, against transformers'
    forward on the dequantized copy (the same numbers up to float32 rounding) and on the checkpoint itself (the
    quantization's own distance: what the test would miss if the copies were not used). With FP8 image K/V the
    reference's image K/V go through the same rounding (hooks), and they must matter: without them the image
    row differs."""
    from transformers import MllamaForConditionalGeneration

    from llamactl.server.engine.continuous import ContinuousEngine
    from llamactl.server.engine.continuous.model import Newcomer

    reference = _dequantized_reference_model(tiny_checkpoint)
    weights_only = None
    if image_kv_fp8:
        weights_only = _dequantized_reference_model(tiny_checkpoint)
        _image_kv_through_fp8(reference)
    original = MllamaForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32).eval()
    eng = ContinuousEngine(make_settings(tiny_checkpoint, quantization="fp8", fp8_image_kv=image_kv_fp8,
                                         max_batch_size=4))
    eng.start()
    try:
        reqs = [GenRequest(prompt=image_prompt(eng), image=trained_image("red"), params=GenParams(max_new_tokens=8)),
                GenRequest(prompt=eng.render_prompt([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]),
                           image=None, params=GenParams(max_new_tokens=8))]
        for r in reqs:
            eng.prepare(r)
        rows = [Newcomer(i, r.prepared.input_ids, r.prepared.cross_mask, r.prepared.pixel_values,
                         r.prepared.aspect_ratio_ids, r.prepared.aspect_ratio_mask) for i, r in enumerate(reqs)]
        forced = [[5, 17, 42], [9, 3, 77]]
        runner = eng.runner
        with torch.inference_mode():
            runner.encode_images([rows[0]])
            runner.set_cross_rows(rows)
            got = [runner.prefill(rows)]
            lengths = [len(r.input_ids) for r in rows]
            for step in range(2):
                toks = torch.tensor([f[step] for f in forced])
                pos = torch.tensor([n + step for n in lengths])
                got.append(runner.decode(toks, pos, 2, max(lengths) + step + 1))
        engine_logits = torch.stack(got, dim=1)  # [rows, 3, vocab]
        assert eng.pools.ck[0].dtype == (torch.float8_e4m3fn if image_kv_fp8 else torch.float32)
        assert ("image K/V fp8" in eng.describe()["quantization"]) == image_kv_fp8
        for i, req in enumerate(reqs):
            p = req.prepared
            ids = torch.tensor([p.input_ids + forced[i][:2]])
            kw = {}
            if p.pixel_values is not None:
                mask = torch.cat([p.cross_mask, p.cross_mask[-1:].expand(2, -1)])[None, :, None, :]
                kw = {"pixel_values": p.pixel_values, "aspect_ratio_ids": p.aspect_ratio_ids,
                      "aspect_ratio_mask": p.aspect_ratio_mask, "cross_attention_mask": mask}
            with torch.inference_mode():
                want = reference(input_ids=ids, use_cache=False, **kw).logits[0, lengths[i] - 1:]
                plain = original(input_ids=ids, use_cache=False, **kw).logits[0, lengths[i] - 1:]
            dist = (torch.linalg.vector_norm(engine_logits[i] - want) / torch.linalg.vector_norm(want)).item()
            quant = (torch.linalg.vector_norm(want - plain) / torch.linalg.vector_norm(plain)).item()
            assert dist < 1e-4 and quant > 1e-3, (i, dist, quant)
            if weights_only is not None and p.pixel_values is not None:
                with torch.inference_mode():
                    bf = weights_only(input_ids=ids, use_cache=False, **kw).logits[0, lengths[i] - 1:]
                image_kv = (torch.linalg.vector_norm(engine_logits[i] - bf) / torch.linalg.vector_norm(bf)).item()
                assert image_kv > 1e-4, image_kv  # the image K/V's rounding shows in the image row
    finally:
        eng.close()


def test_fp8_with_kept_weights_on_the_cpu_answers_as_the_checkpoint(tiny_checkpoint: Path) -> None:
    """Off the GPU the kept weights are always the faster form: the answers are the checkpoint's own."""
    with running_engine(tiny_checkpoint, quantization="fp8", fp8_keep_bf16=True, max_batch_size=4,
                        gen_max_new_tokens=64) as eng:
        text = eng.hf.model.model.language_model
        assert text.layers[0].self_attn.q_proj.weight.numel() > 0  # kept (a view of the fused q/k/v)
        assert "bf16 text weights kept" in eng.describe()["quantization"]
        req = GenRequest(prompt=image_prompt(eng), image=trained_image("red"), params=GenParams(max_new_tokens=24))
        [result] = run_all(eng, [req])
        inputs = eng.hf.processor(images=[[req.image]], text=[req.prompt], add_special_tokens=False,
                                  return_tensors="pt")
        with torch.inference_mode():
            out = eng.hf.model.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=eng.hf._pad_id,
                                        temperature=1.0, top_p=1.0, top_k=50)
        ids = [t for t in out[0, inputs["input_ids"].shape[1]:].tolist() if t not in eng.hf._eos_ids]
        assert result.text == eng.hf.processor.tokenizer.decode(ids, skip_special_tokens=True) and result.text


def test_fp8_runs_on_the_continuous_engine_and_health_says_so(tiny_checkpoint: Path) -> None:
    from llamactl.server.state import choose_engine

    engine, reason = choose_engine(make_settings(tiny_checkpoint, quantization="fp8", engine="hf"), None)
    assert engine.name == "continuous" and reason is not None and "fp8 runs on the continuous engine" in reason
    engine, reason = choose_engine(make_settings(tiny_checkpoint, quantization="fp8"), None)
    assert engine.name == "continuous" and reason is None

    srv = start_thread_server(make_settings(tiny_checkpoint, quantization="fp8", engine="hf"))
    try:
        health = httpx.get(srv.url + "/health").json()
        assert health["engine"]["name"] == "continuous" and health["engine"]["requested"] == "hf"
        assert "fp8" in health["engine"]["fallback_reason"]
        r = httpx.post(srv.url + "/infer", json={"image": png_b64("red"), "max_tokens": 8}, timeout=120)
        assert r.status_code == 200 and r.json()
    finally:
        srv.stop()
