"""The decode step's cross-attention forms (engine/continuous/cross_attention.py): the same math as fused.attend,
and the start-time choice among them (timed on GPUs; here with a fake timer)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from llamactl.server.engine.continuous import cross_attention as ca
from llamactl.server.engine.continuous import kernel_choice as kc
from llamactl.server.engine.continuous.fused import attend


def shapes(b: int, length: int = 50) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(b)
    q = torch.randn(b, 8, 1, 16, generator=g)
    k = torch.randn(b, 2, length, 16, generator=g)
    v = torch.randn(b, 2, length, 16, generator=g)
    bias = torch.zeros(b, 1, 1, length)
    bias[::2, :, :, -13:] = torch.finfo(torch.float32).min  # rows whose image has fewer tiles
    return q, k, v, bias


@pytest.mark.parametrize("name", ["keys_first", "sdpa_math"])
def test_each_form_equals_attend(name: str) -> None:
    fn = ca.keys_first if name == "keys_first" else ca.fused_sdpa(None)  # None: PyTorch's choice (math on CPU)
    for b in (1, 3):
        q, k, v, bias = shapes(b)
        torch.testing.assert_close(fn(q, k, v, bias, 0.25), attend(q, k, v, bias, 0.25), rtol=1e-5, atol=1e-5)


def test_keys_first_takes_prompts_too() -> None:
    g = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(2, 8, 5, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g), torch.randn(2, 2, 9, 16)
    bias = torch.zeros(2, 1, 5, 9)
    bias[1, :, :, 6:] = torch.finfo(torch.float32).min
    torch.testing.assert_close(ca.keys_first(q, k, v, bias, 0.3), attend(q, k, v, bias, 0.3), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one query token"):
        ca.fused_sdpa(None)(q, k, v, bias, 0.3)


def test_choice_is_the_fastest_correct_form_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """matmul fastest at batch 1, keys_first at 4 (as the matmuls and cuDNN's kernel crossed over on an H100);
    a form that differs from attend and one that raises are left out however fast."""

    def wrong(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
        return attend(q, k, v, bias, scale) * 1.5

    def broken(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
        raise RuntimeError("No available kernel")

    cost = {("matmul", 1): 1.0, ("matmul", 4): 3.0, ("keys_first", 1): 2.0, ("keys_first", 4): 2.0,
            ("wrong", 1): 0.5, ("wrong", 4): 0.5}
    last: list[tuple[str, int]] = []

    def tracking(name: str, fn: ca.Attend) -> ca.Attend:
        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
            last.append((name, q.shape[0]))
            return fn(q, k, v, bias, scale)
        return run

    forms = {"matmul": attend, "keys_first": ca.keys_first, "wrong": wrong, "broken": broken}
    monkeypatch.setattr(ca, "CANDIDATES", {n: tracking(n, f) for n, f in forms.items()})
    choice, timings = ca.choose(shapes, [1, 4], 0.25, timer=lambda fn: cost[last[-1]])
    assert choice == {1: "matmul", 4: "keys_first"}
    assert timings == {"matmul": [1.0, 3.0], "keys_first": [2.0, 2.0]}
    assert [kc.for_rows(choice, rows) for rows in (1, 2, 3, 4, 16)] == ["matmul"] * 3 + ["keys_first"] * 2
    monkeypatch.setattr(ca, "CANDIDATES", {"broken": broken})
    assert ca.choose(shapes, [1, 8], 0.25, timer=lambda fn: 1.0) == ({1: "matmul", 8: "matmul"}, {})


def test_the_engine_wires_the_choice_into_its_decode_step(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the tiny model (CPU), with a choice of keys_first from batch 2 on: the runner takes
    that choice per batch, /health names it, and greedy decoding still equals the engine's matmul answer."""
    from llamactl.server.engine.continuous import ContinuousEngine
    from llamactl.server.engine.protocol import GenParams, GenRequest
    from llamactl.server.tiny import trained_image, trained_messages

    from ._support import make_settings
    from .test_continuous_engine import run_all

    eng = ContinuousEngine(make_settings(tiny_checkpoint, max_batch_size=8, gen_max_new_tokens=64))
    eng.start()
    thread = threading.Thread(target=eng.run_forever, daemon=True)
    thread.start()
    try:
        def req() -> GenRequest:
            return GenRequest(prompt=eng.render_prompt(trained_messages()), image=trained_image("red"),
                              params=GenParams(max_new_tokens=12))

        before = run_all(eng, [req() for _ in range(3)])
        monkeypatch.setattr("llamactl.server.engine.continuous.engine.choose_cross",
                            lambda q_at, batches, scale, **kw: ({1: "matmul", 2: "keys_first"},
                                                          {"matmul": [1.0, 3.0], "keys_first": [2.0, 2.0]}))
        eng._choose_cross_attention(eng.runner)
        assert eng.runner.cross_choice == {1: "matmul", 2: "keys_first"}
        assert eng.describe()["cross_attention"].startswith("batch 1+: matmul, batch 2+: keys_first (")
        after = run_all(eng, [req() for _ in range(3)])
        assert [r.text for r in after] == [r.text for r in before]
        assert max(r.batch_size for r in after) > 1  # steps of 2+ rows ran the keys_first form
    finally:
        eng.stop()
        thread.join(10)

