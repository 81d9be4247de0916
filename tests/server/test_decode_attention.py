"""The decode step's attention kernels (engine/continuous/decode_attention.py) and how the engine chooses them.

The kernels need Triton: on a GPU they are checked at start (a form that differs from the PyTorch ops is never
chosen) and by bench/engine_gpu_check.py (answers equal generate with them forced on); here, where Triton is
importable (not in CI's CPU install), they run in Triton's interpreter. The choice and the dispatch per batch
size run here on the tiny model, with a PyTorch stand-in for the self-attention kernel.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from llamactl.server.engine.continuous import decode_attention as da
from llamactl.server.engine.continuous.fused import attend, rope_halves

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def reference_self_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                             k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int,
                             scale: float) -> torch.Tensor:
    """What ``da.self_attention`` computes, in PyTorch ops: rotary (transformers' form), the new K/V written at
    each row's position, attention over keys 0..position."""
    b, _, d = qkv.shape
    qk = rope_halves(qkv[:, : heads + kv_heads], cos[positions].view(b, 1, d), sin[positions].view(b, 1, d))
    write_at = positions.view(b, 1, 1, 1).expand(b, kv_heads, 1, d)
    k_cache[:b].scatter_(2, write_at, qk[:, heads:].unsqueeze(2))
    v_cache[:b].scatter_(2, write_at, qkv[:, heads + kv_heads :].unsqueeze(2))
    length = int(positions.max()) + 1
    key_ok = torch.arange(length)[None, :] <= positions[:, None]
    bias = torch.where(key_ok, 0.0, torch.finfo(qkv.dtype).min).to(qkv.dtype).view(b, 1, 1, length)
    return attend(qk[:, :heads].unsqueeze(2), k_cache[:b, :, :length], v_cache[:b, :, :length], bias,
                  scale).reshape(b, heads * d)


def test_splits_cover_every_position_once() -> None:
    for rows, kv, length, sms in [(1, 8, 6404, 132), (32, 8, 6404, 132), (1, 2, 300, 8), (3, 2, 70, 8), (1, 8, 64, 132)]:
        splits = da.splits_for(rows, kv, length, sms)
        per = -(-length // splits)
        assert 1 <= splits <= 64
        assert (splits - 1) * per < length <= splits * per  # no stretch is empty, none is missing
    assert da.splits_for(1, 8, 6404, 132) == 64  # at most 64 stretches (4 programs per SM would be 66)
    assert da.splits_for(32, 8, 6404, 132) == 2
    assert da.splits_for(1, 8, 6404, 132, per_sm=2) == 33


INTERPRETER_CHECK = """
import sys, torch
import triton.runtime.interpreter as interp
# Triton 3.6's interpreter turns loop bounds into ints with int(ndarray), which NumPy 2 refuses for 1-element
# arrays; the compiled kernels never take this path
original = interp._patch_lang_tensor
def patched(tensor, scope):
    original(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
interp._patch_lang_tensor = patched
sys.path.insert(0, sys.argv[1])
from test_decode_attention import reference_self_attention
from llamactl.server.engine.continuous import decode_attention as da
from llamactl.server.engine.continuous.fused import attend
torch.manual_seed(0)
heads, kvh, d, slots, max_len = 8, 2, 32, 5, 200
inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
emb = torch.arange(max_len).float()[:, None] * inv[None]
cos, sin = torch.cat([emb, emb], -1).cos(), torch.cat([emb, emb], -1).sin()
for b, pos in ((1, [5]), (3, [130, 0, 64])):
    qkv, positions = torch.randn(b, heads + 2 * kvh, d), torch.tensor(pos)
    kc, vc = torch.randn(slots, kvh, max_len, d), torch.randn(slots, kvh, max_len, d)
    kc2, vc2 = kc.clone(), vc.clone()
    got = da.self_attention(qkv, cos, sin, positions, kc, vc, heads, kvh, d ** -0.5)
    want = reference_self_attention(qkv, cos, sin, positions, kc2, vc2, heads, kvh, d ** -0.5)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (b, (got - want).abs().max())
    assert torch.allclose(kc, kc2, atol=1e-6) and torch.equal(vc, vc2)
    length = 300
    q = torch.randn(b, heads, 1, d)
    ck = torch.randn(slots, kvh, length + 20, d)[:b, :, :length]  # the pools' slices: position stride > d
    cv = torch.randn(slots, kvh, length + 20, d)[:b, :, :length]
    bias = torch.zeros(b, 1, 1, length)
    bias[0, :, :, 250:] = torch.finfo(torch.float32).min  # an image with fewer tiles
    got = da.cross_attention(q, ck, cv, bias, d ** -0.5)
    assert torch.allclose(got, attend(q, ck, cv, bias, d ** -0.5), atol=1e-5, rtol=1e-5), b
    # rows marked off (the pools' has_image 0) read nothing and get zeros; the others are unchanged
    on = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])[:b] if b > 1 else torch.tensor([0.0, 1.0])
    some = da.cross_attention(q, ck, cv, bias, d ** -0.5, rows_on=on)
    for r in range(b):
        assert torch.equal(some[r], got[r]) if on[r] else not some[r].any(), (b, r)
    # FP8 image K/V (quantization fp8): e4m3 slices with a scale per row and K/V head, as the pools keep them,
    # give the attention over the values they stand for
    from llamactl.server.engine.continuous.fp8 import dequantize_image_kv, quantize_image_kv
    k8, ks = quantize_image_kv(ck * 3.0)
    v8, vs = quantize_image_kv(cv * 0.01)
    pool_k = torch.zeros(slots, kvh, length + 20, d, dtype=torch.float8_e4m3fn)
    pool_v = torch.zeros_like(pool_k)
    pool_k[:b, :, :length], pool_v[:b, :, :length] = k8, v8
    got8 = da.cross_attention(q, pool_k[:b, :, :length], pool_v[:b, :, :length], bias, d ** -0.5, rows_on=on,
                              k_scale=ks, v_scale=vs)
    want8 = attend(q, dequantize_image_kv(k8, ks, q.dtype), dequantize_image_kv(v8, vs, q.dtype), bias, d ** -0.5)
    for r in range(b):
        if on[r]:
            assert torch.allclose(got8[r], want8[r], atol=1e-6, rtol=1e-5), (b, r, (got8[r] - want8[r]).abs().max())
        else:
            assert not got8[r].any(), (b, r)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (CPU install)")
def test_kernels_in_triton_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-c", INTERPRETER_CHECK, str(HERE)], env=env, capture_output=True,
                         text=True, timeout=600, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_engine_chooses_and_dispatches_self_attention_per_batch(tiny_checkpoint: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """On the tiny model (CPU), with a PyTorch stand-in for the kernel and a clock that makes it faster from 8
    rows on: the real start-time selection (outputs compared with the PyTorch ops) picks it there, /health says
    so, steps of 8+ rows run it and only those, and the greedy answers do not change. A stand-in that is wrong
    is never chosen however fast."""
    from llamactl.server.engine.continuous import ContinuousEngine
    from llamactl.server.engine.continuous import engine as engine_module
    from llamactl.server.engine.continuous import model as model_module
    from llamactl.server.engine.protocol import GenParams, GenRequest
    from llamactl.server.tiny import trained_image, trained_messages

    from ._support import make_settings
    from .test_continuous_engine import run_all

    eng = ContinuousEngine(make_settings(tiny_checkpoint, max_batch_size=8, gen_max_new_tokens=64))
    eng.start()
    assert eng.runner is not None and eng.runner.self_choice == {1: "torch"}  # no Triton on the CPU: not timed
    thread = threading.Thread(target=eng.run_forever, daemon=True)
    thread.start()
    try:
        def req(n: int) -> GenRequest:
            return GenRequest(prompt=eng.render_prompt(trained_messages()), image=trained_image("red"),
                              params=GenParams(max_new_tokens=12 + n))

        before = run_all(eng, [req(i) for i in range(8)])
        kernel_rows: list[int] = []
        scale_by = [1.0]

        def stand_in(qkv: torch.Tensor, *args: object) -> torch.Tensor:
            kernel_rows.append(qkv.shape[0])
            return reference_self_attention(qkv, *args) * scale_by[0]  # type: ignore[arg-type]

        last: list[str] = []

        def clock(fn: object) -> float:
            last.clear()
            n = len(kernel_rows)
            fn()  # type: ignore[operator]
            rows = kernel_rows[-1] if len(kernel_rows) > n else 0
            return 1.0 if rows >= 8 else 3.0 if rows else 2.0  # the stand-in: slower below 8 rows, faster from 8

        while eng._running:  # the last step's bookkeeping (results go out before it ends)
            time.sleep(0.01)
        monkeypatch.setattr(model_module, "self_attention", stand_in)
        monkeypatch.setattr(engine_module, "decode_attention_available", lambda: True)
        monkeypatch.setattr(engine_module, "time_in_graph", lambda fn, calls, reps: clock(fn))
        with eng._cv, torch.inference_mode():  # the loop is idle (no requests), as at start
            eng._choose_self_attention(eng.runner)
        assert eng.runner.self_choice == {1: "torch", 8: "triton"}
        assert eng.describe()["self_attention"].startswith("batch 1+: torch, batch 8+: triton (")
        kernel_rows.clear()
        after = run_all(eng, [req(i) for i in range(8)])
        assert [r.text for r in after] == [r.text for r in before]
        assert kernel_rows and min(kernel_rows) >= 8  # 8-row steps ran the kernel, smaller ones did not

        scale_by[0] = 1.5  # a kernel that is wrong: left out, whatever the clock says
        with eng._cv, torch.inference_mode():
            eng._choose_self_attention(eng.runner)
        assert eng.runner.self_choice == {1: "torch", 8: "torch"}
    finally:
        eng.stop()
        thread.join(10)


def test_cross_attention_kernel_skips_rows_without_an_image(tiny_checkpoint: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With the Triton cross-attention chosen, each decode step hands it the pools' has_image as ``rows_on``: 0
    for a text-only row and for a slot left empty by a finished row (a bucket padding over it reads no image K/V).
    A PyTorch stand-in with the kernel's contract (rows marked off get zeros) leaves every answer unchanged."""
    from llamactl.server.engine.continuous import ContinuousEngine
    from llamactl.server.engine.continuous import model as model_module
    from llamactl.server.engine.protocol import GenParams, GenRequest
    from llamactl.server.tiny import trained_image, trained_messages

    from ._support import make_settings
    from .test_continuous_engine import run_all

    eng = ContinuousEngine(make_settings(tiny_checkpoint, max_batch_size=8, gen_max_new_tokens=64))
    eng.start()
    thread = threading.Thread(target=eng.run_forever, daemon=True)
    thread.start()
    try:
        def reqs() -> list[GenRequest]:
            image = [GenRequest(prompt=eng.render_prompt(trained_messages()), image=trained_image(c),
                                params=GenParams(max_new_tokens=6 + 5 * i)) for i, c in enumerate(["red", "blue"])]
            text = GenRequest(prompt=eng.render_prompt([{"role": "user", "content": "Say something."}]),
                              image=None, params=GenParams(max_new_tokens=12))
            return [image[0], text, image[1]]

        before = run_all(eng, reqs())
        seen: list[list[float]] = []

        def stand_in(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                     rows_on: torch.Tensor | None = None) -> torch.Tensor:
            assert rows_on is not None
            on = rows_on[: q.shape[0]]
            seen.append(on.tolist())
            return attend(q, k, v, bias, scale) * (on != 0).view(-1, 1, 1, 1).to(q.dtype)

        while eng._running:
            time.sleep(0.01)
        monkeypatch.setitem(model_module.CROSS_FORMS, "triton", stand_in)
        assert eng.runner is not None
        eng.runner.cross_choice = {1: "triton"}
        after = run_all(eng, reqs())
        assert [r.text for r in after] == [r.text for r in before]
        assert any(0.0 in flags and 1.0 in flags for flags in seen)  # the text-only row beside image rows
        while eng._running:
            time.sleep(0.01)
        assert eng.pools is not None and not eng.pools.has_image.any()  # every slot left empty is marked off
    finally:
        eng.stop()
        thread.join(10)
