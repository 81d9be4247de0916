"""Small-batch projections (1..8 rows) as a Triton kernel that streams the weight once across every SM.

Why: at batch 1 a decode step is a chain of GEMVs bound by weight reads, and cuBLAS leaves bandwidth unused on
the narrower ones (H100, weights rotated so they come from memory: o 2.0 TB/s, q/k/v 2.4, down 2.6, gate/up and
lm_head 2.85). Here each program owns ``block_n`` output features and walks the whole reduction, so the grid is
out_features / block_n programs (1,024 for o at 4): every SM keeps loads in flight. The residual can be added
in the same kernel (o and down projections).

``linear(x, w, config, residual=None)``: y = x @ w.T (+ residual, written into it), CUDA tensors, rows <= 8.
``Projections`` is what the decode step calls: a one-row projection whose weight shape has a chosen config runs
here, everything else through cuBLAS (``F.linear``/``addmm_``) as before. ``choose`` measures at start, on the
model's own weights (each layer's are distinct, so successive calls read memory, not the 50 MB L2), which shapes
gain and with which config; a config that does not match ``F.linear`` (relative L2 > 1e-2) is never chosen.
On an H100 (bench/results/engine_gemv_probe_run1_h100.json) one row took 13.9 vs 16.5 us (o), 19.7 vs 21.1
(q/k/v), 79 vs 82 (gate/up), 42.6 vs 44.7 (down), 335 vs 371 (lm_head); at 2 or more rows cuBLAS was as fast.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llamactl.server.engine.continuous.fused import add_linear_
from llamactl.server.engine.continuous.kernel_choice import relative_l2

try:  # triton ships with CUDA builds of torch; CPU installs run without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

MAX_ROWS = 8


@dataclass(frozen=True)
class Config:
    block_n: int
    block_k: int
    warps: int
    stages: int

    def __str__(self) -> str:
        return f"n{self.block_n}k{self.block_k}w{self.warps}s{self.stages}"


# the five fastest of a wider sweep at one row on an H100 (engine_gemv_probe_run1_h100.json)
CONFIGS = [Config(n, k, w, s) for n, k, w, s in [
    (4, 512, 4, 3), (8, 512, 4, 3), (8, 1024, 8, 2), (16, 512, 8, 3), (8, 256, 4, 3),
]]


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit  # type: ignore[untyped-decorator]
    def _gemv_kernel(  # type: ignore[no-untyped-def]
        x_ptr, w_ptr, r_ptr, y_ptr, N, stride_x, stride_r, stride_y,
        K: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr, HAS_RES: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, M_PAD)
        offs_k = tl.arange(0, BLOCK_K)
        n_ok = offs_n < N
        m_ok = offs_m < M
        acc = tl.zeros((M_PAD, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < K
            w = tl.load(w_ptr + offs_n[:, None] * K + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptr + offs_m[:, None] * stride_x + kk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            acc += x[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32)
        y = tl.sum(acc, axis=2)
        out_mask = m_ok[:, None] & n_ok[None, :]
        if HAS_RES:
            r = tl.load(r_ptr + offs_m[:, None] * stride_r + offs_n[None, :], mask=out_mask, other=0.0)
            y += r.to(tl.float32)
        tl.store(y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=out_mask)


def linear(x: torch.Tensor, w: torch.Tensor, config: Config, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [m, k] @ w[n, k].T; with ``residual`` [m, n] the sum is written into it (returned)."""
    m, k = x.shape
    n = w.shape[0]
    out = residual if residual is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    m_pad = 1 if m == 1 else 2 if m == 2 else 4 if m <= 4 else 8
    # the 3-D accumulator grows with the padded rows: keep it at most 1..2 K floats per thread
    block_k = max(32, config.block_k // m_pad)
    grid = (triton.cdiv(n, config.block_n),)
    _gemv_kernel[grid](x, w, out, out, n, x.stride(0), out.stride(0), out.stride(0),
                       K=k, M=m, M_PAD=m_pad, HAS_RES=residual is not None, BLOCK_N=config.block_n, BLOCK_K=block_k,
                       num_warps=config.warps, num_stages=config.stages)
    return out


@dataclass
class Projections:
    """x @ w.T for the decode step: Triton for one row where ``chosen`` has the weight's shape, else cuBLAS."""

    chosen: dict[tuple[int, int], Config] = field(default_factory=dict)
    timings: dict[str, str] = field(default_factory=dict)  # per shape, for /health

    def _config(self, x: torch.Tensor, w: torch.Tensor) -> Config | None:
        if not self.chosen or x.numel() != w.shape[1] or not w.is_contiguous():
            return None
        return self.chosen.get((int(w.shape[0]), int(w.shape[1])))

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        cfg = self._config(x, w)
        if cfg is None:
            return F.linear(x, w)
        return linear(x.reshape(1, -1).contiguous(), w, cfg).view(*x.shape[:-1], w.shape[0])

    def add_(self, h: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """h += x @ w.T in place (h is the residual stream)."""
        cfg = self._config(x, w)
        if cfg is None or not h.is_contiguous():
            return add_linear_(h, x, w)
        linear(x.reshape(1, -1).contiguous(), w, cfg, residual=h.view(1, -1))
        return h


def choose(weights: Iterable[torch.Tensor], time_fn: Callable[[Callable[[], torch.Tensor]], float],
           candidates: list[Config] | None = None, margin: float = 0.03) -> Projections:
    """Per weight shape: time one-row cuBLAS against each candidate config, cycling over every weight of that
    shape; keep a config that is correct and at least ``margin`` faster. ``time_fn`` times a callable (seconds
    per call, e.g. inside a CUDA graph)."""
    by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
    for w in weights:
        if w.dim() == 2 and w.is_contiguous():
            by_shape.setdefault((int(w.shape[0]), int(w.shape[1])), []).append(w)
    out = Projections()
    if not available():
        return out
    for (n, k), ws in by_shape.items():
        config, timings = _choose_for(ws, time_fn, CONFIGS if candidates is None else candidates, margin)
        if config is not None:
            out.chosen[(n, k)] = config
        out.timings[f"{n}x{k}"] = f"{config or 'cublas'} ({timings} us)"
    return out


def _choose_for(ws: list[torch.Tensor], time_fn: Callable[[Callable[[], torch.Tensor]], float],
                candidates: list[Config], margin: float) -> tuple[Config | None, str]:
    gen = torch.Generator(device=ws[0].device).manual_seed(0)
    x = torch.randn(1, ws[0].shape[1], device=ws[0].device, dtype=ws[0].dtype, generator=gen)

    def cycling(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], torch.Tensor]:
        it = itertools.cycle(ws)
        return lambda: fn(next(it))

    base = time_fn(cycling(lambda w: F.linear(x, w)))
    best_time, best = base * (1 - margin), None
    times = [f"cublas {base * 1e6:.1f}"]
    ref = F.linear(x, ws[0]).float()
    residual = torch.randn(1, ws[0].shape[0], device=x.device, dtype=x.dtype, generator=gen)
    for cfg in candidates:
        plain = linear(x, ws[0], cfg).float()
        added = linear(x, ws[0], cfg, residual=residual.clone()).float()
        if relative_l2(plain, ref) > 1e-2 or relative_l2(added, residual.float() + ref) > 1e-2:
            times.append(f"{cfg} wrong")
            continue

        def run(w: torch.Tensor, cfg: Config = cfg) -> torch.Tensor:
            return linear(x, w, cfg)

        t = time_fn(cycling(run))
        times.append(f"{cfg} {t * 1e6:.1f}")
        if t < best_time:
            best_time, best = t, cfg
    return best, ", ".join(times)

