"""The decode step's one-row projections (engine/continuous/gemv.py): which calls go to the Triton kernel, and
that everything else is exactly cuBLAS' F.linear / addmm_.

The kernel itself needs Triton: on a GPU it is checked by gemv.choose at start (a config that differs from
F.linear is never chosen), by bench/engine_gpu_check.py (answers equal generate with it forced on) and by
bench/engine_gemv_probe.py; here, where Triton is importable (not in CI's CPU install), it also runs in
Triton's interpreter.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from llamactl.server.engine.continuous import gemv
from llamactl.server.engine.continuous.gemv import Config, Projections, choose

from ._support import run_in_triton_interpreter


def test_without_a_choice_projections_are_cublas_exactly() -> None:
    torch.manual_seed(0)
    proj = Projections()
    w = torch.randn(24, 16)
    for rows in (1, 3):
        x = torch.randn(rows, 1, 16)
        assert torch.equal(proj.linear(x, w), F.linear(x, w))
        h = torch.randn(rows, 1, 24)
        want = h.clone().view(-1, 24).addmm_(x.view(-1, 16), w.t()).view(rows, 1, 24)
        assert torch.equal(proj.add_(h, x, w), want)


def test_only_one_row_of_a_chosen_shape_goes_to_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[tuple[int, ...], Config, bool]] = []

    def fake_kernel(x: torch.Tensor, w: torch.Tensor, config: Config,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
        calls.append((tuple(x.shape), config, residual is not None))
        y = x @ w.t()
        if residual is None:
            return y
        residual += y
        return residual

    monkeypatch.setattr(gemv, "linear", fake_kernel)
    cfg = gemv.CONFIGS[0]
    proj = Projections({(24, 16): cfg})
    w, other = torch.randn(24, 16), torch.randn(8, 16)
    one, two = torch.randn(1, 1, 16), torch.randn(2, 1, 16)
    assert torch.allclose(proj.linear(one, w), F.linear(one, w))
    h = torch.randn(1, 1, 24)
    want = h + F.linear(one, w)
    got = proj.add_(h, one, w)
    assert got is h and torch.allclose(h, want)
    assert calls == [((1, 16), cfg, False), ((1, 16), cfg, True)]
    calls.clear()
    proj.linear(two, w)  # two rows: cuBLAS
    proj.add_(torch.randn(2, 1, 24), two, w)
    proj.linear(one, other)  # a shape without a choice: cuBLAS
    assert calls == []


def test_choose_without_triton_on_a_gpu_keeps_cublas() -> None:
    if gemv.available():
        pytest.skip("a GPU with Triton is here: choose would time the kernel")
    proj = choose([torch.randn(8, 4)], lambda fn: 1.0)
    assert proj.chosen == {} and proj.timings == {}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (CPU install)")
def test_kernel_in_triton_interpreter() -> None:
    code = """
import torch
from llamactl.server.engine.continuous import gemv
torch.manual_seed(0)
for rows in (1, 2, 3, 8):
    for n, k in ((40, 300), (64, 256)):
        for cfg in gemv.CONFIGS:
            x, w, r = torch.randn(rows, k), torch.randn(n, k), torch.randn(rows, n)
            ref = x @ w.t()
            assert torch.allclose(gemv.linear(x, w, cfg), ref, atol=1e-4, rtol=1e-4), (rows, n, k, cfg)
            assert torch.allclose(gemv.linear(x, w, cfg, residual=r.clone()), r + ref, atol=1e-4, rtol=1e-4)
print("ok")
"""
    run_in_triton_interpreter(code)


def test_choose_keeps_a_correct_config_only_when_it_is_enough_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """The selection logic with a stand-in kernel and clock: per weight shape, the fastest config that matches
    F.linear (with and without the residual) and beats cuBLAS by the margin; a wrong one is never chosen."""
    fast, wrong, slow = Config(4, 64, 4, 1), Config(8, 64, 4, 1), Config(16, 64, 4, 1)
    speed = {None: 10.0, fast: 9.0, wrong: 1.0, slow: 9.9}
    current: list[Config | None] = [None]

    def stand_in(x: torch.Tensor, w: torch.Tensor, config: Config,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        current[0] = config
        y = F.linear(x, w) * (2.0 if config == wrong else 1.0)
        return y if residual is None else residual.add_(y)

    def clock(fn: Any) -> float:  # runs the callable, reports the speed of whatever it ran
        current[0] = None
        fn()
        return speed[current[0]] * 1e-6

    monkeypatch.setattr(gemv, "linear", stand_in)
    monkeypatch.setattr(gemv, "available", lambda: True)
    torch.manual_seed(0)
    weights = [torch.randn(24, 16), torch.randn(24, 16), torch.randn(8, 16), torch.randn(16, 8).t()]
    proj = choose(weights, clock, candidates=[slow, wrong, fast])
    assert proj.chosen == {(24, 16): fast, (8, 16): fast}  # the transposed (non-contiguous) weight is left out
    assert "wrong" in proj.timings["24x16"] and proj.timings["24x16"].startswith(str(fast))
    speed[fast] = 9.8  # 2 % faster than cuBLAS: under the 3 % margin
    assert choose(weights, clock, candidates=[slow, fast]).chosen == {}
