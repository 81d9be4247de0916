"""The decode step's cross-attention forms (engine/continuous/cross_attention.py): the same math as fused.attend,
and the start-time choice among them (timed on GPUs; here with a fake timer)."""

from __future__ import annotations

import pytest
import torch

from llamactl.server.engine.continuous import cross_attention as ca
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


def test_choice_is_the_fastest_correct_form(monkeypatch: pytest.MonkeyPatch) -> None:
    def wrong(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
        return attend(q, k, v, bias, scale) * 1.5

    def broken(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
        raise RuntimeError("No available kernel")

    cost = {"matmul": 3.0, "keys_first": 2.0, "wrong": 0.5, "broken": 0.1}
    monkeypatch.setattr(ca, "CANDIDATES", {"matmul": attend, "keys_first": ca.keys_first, "wrong": wrong,
                                           "broken": broken})
    calls: list[str] = []

    def timer(fn: object) -> float:
        name = calls[-1]
        return cost[name]

    def tracking(name: str, fn: ca.Attend) -> ca.Attend:
        def run(*args: object) -> torch.Tensor:
            calls.append(name)
            return fn(*args)  # type: ignore[arg-type]
        return run

    monkeypatch.setattr(ca, "CANDIDATES", {n: tracking(n, f) for n, f in ca.CANDIDATES.items()})
    best, timings = ca.choose(shapes, [1, 4], 0.25, timer=timer)
    assert best == "keys_first"
    assert timings == {"matmul": [3.0, 3.0], "keys_first": [2.0, 2.0]}  # wrong and broken left out
