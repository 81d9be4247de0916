"""FP8 weights for the text layers (``quantization: fp8``): e4m3 copies of every text projection and the LM head,
one scale per output feature, multiplied by the 16-bit rows in a Triton kernel (weight-only: nothing is quantized
per step, so a step gains no kernels). The checkpoint's bf16 text weights are freed once copied (about half their
bytes come back); the vision tower and the cross-attention K/V projections (once per image) stay bf16.

Why: a decode step of the 11B shape at 32 rows reads ~20 GB of bf16 weights and ~7 GB of image K/V and is bound by
those reads (bench/results/engine.md: its GEMMs 5.0 of 8.3 ms on an H200). cuBLAS' FP8 GEMM (``torch._scaled_mm``)
needs FP8 rows too; quantizing them per step cost more than the halved reads saved below ~28k output features
(bench/results/engine_gemv_probe_run1_h100.json).

Arithmetic: ``y = (x @ q.T) * scale`` with ``q = round_e4m3(w / scale)``, ``scale = amax(|w| of the row) / 448``.
In the kernel each program owns ``block_n`` weight rows and up to ``block_m`` batch rows and walks the reduction;
the e4m3 tile becomes fp16 (one instruction a pair on sm_89+; e4m3 -> bf16 goes through float32 and made the
kernel ~1.4x slower than bf16 cuBLAS on an H200, bench/results/engine_fp8_probe_run2_h200.json) and the rows fp16
(clamped to its range); products accumulate in float32. Where the kernel cannot run (the CPU, no Triton, an older
GPU) ``reference`` computes the same in float32: slower than bf16, for tests.

Split reduction: at 16-64 rows one program per tile of output features leaves too few loads in flight (a
4096-feature output is 128 tiles of 32 for 132 SMs); a config with ``split`` > 1 gives each tile's reduction to
that many programs, which write float32 partial sums to a workspace, and the last to arrive (a counter per tile,
reset by it) adds them in a fixed order and applies scale and residual. On an H200 at 32 rows that made the kernel
faster than bf16 cuBLAS for every 11B shape (q/k/v 15.0 vs 16.3 us, down 26.9 vs 34.5; before it, q/k/v, o and
down lost: bench/results/engine_fp8_probe_run3_h200.json).

Measured (bench/results/engine.md, Session 9, an H200, against bf16 in the same call, run 29): +28 % output at
one client, +10 % at 8, +7 % at 32 and +1 % at 64 clients; the logits at the bf16 floor against transformers on
the copies' own values. With ``fp8_keep_bf16`` (the bf16 weights kept, the faster form per shape and row bucket):
+22 % / +11 % / +7 % / 0 %, for ~9 GB more memory instead of ~9 GB less.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from llamactl.server.engine.continuous import gemv
from llamactl.server.engine.continuous.fused import CrossWeights, SelfWeights, add_linear_, concat_into_views
from llamactl.server.engine.continuous.kernel_choice import relative_l2

try:  # triton ships with CUDA builds of torch; CPU installs run without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn


@dataclass(frozen=True)
class Config(gemv.Config):
    """The one-row kernel's launch parameters, and ``split``: how many programs share one tile's reduction."""

    split: int = 1

    def __str__(self) -> str:
        return super().__str__() + (f"p{self.split}" if self.split > 1 else "")


# timed at start per weight shape and row bucket (``choose``): of the 17 configs tried on an H200
# (bench/results/engine_fp8_probe_run3_h200.json), the five that are within 3 % of the fastest for every 11B shape
# at 1, 16, 32 and 64 rows; each divides the 11B shape's reductions
CONFIGS = [Config(*c) for c in [
    (32, 256, 4, 4), (128, 128, 4, 4), (64, 128, 4, 4, 4), (128, 128, 4, 4, 4), (128, 128, 8, 4, 4),
]]
DEFAULT = Config(32, 256, 4, 4)


def available() -> bool:
    """The kernel needs Triton and a GPU with e4m3 conversions (compute capability 8.9: Ada, Hopper and later)."""
    return triton is not None and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@dataclass
class QuantWeight:
    q: torch.Tensor  # [n, k] float8_e4m3fn
    scale: torch.Tensor  # [n] float32
    dense: torch.Tensor | None = None  # the checkpoint's weight, where kept (``fp8_keep_bf16``)


def quantize(w: torch.Tensor, rows_at_once: int = 8192) -> QuantWeight:
    """Per output feature (row): scale = amax / 448, q = round(w / scale) in e4m3 (a zero row keeps a tiny scale)."""
    n = w.shape[0]
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
    scale = torch.empty(n, dtype=torch.float32, device=w.device)
    for start in range(0, n, rows_at_once):  # float32 temporaries of a slice, not of lm_head's 128k rows
        part = w[start : start + rows_at_once].float()
        s = (part.abs().amax(dim=1) / E4M3_MAX).clamp(min=1e-12)
        q[start : start + rows_at_once] = (part / s[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        scale[start : start + rows_at_once] = s
    return QuantWeight(q, scale)


def quantize_image_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An image's cross-attention K or V, x [n, kv_heads, L, d], as e4m3 with one scale per row and K/V head
    (amax / 448 over its positions and dims): -> (q [n, kv_heads, L, d], scale [n, kv_heads] float32). e4m3 is a
    float format, so one scale per head keeps each value's relative rounding (<= 2^-4) whatever its size."""
    scale = (x.abs().float().amax(dim=(2, 3)) / E4M3_MAX).clamp(min=1e-12)
    q = (x.float() / scale[:, :, None, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_image_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values ``quantize_image_kv`` stands for, in ``dtype``: q [n, kv_heads, L, d], scale [n, kv_heads]."""
    return (q.float() * scale[:, :, None, None]).to(dtype)


def dequantized(qw: QuantWeight, dtype: torch.dtype) -> torch.Tensor:
    """The weight the FP8 copy stands for, in ``dtype`` (tests, and a reference model for the CPU check)."""
    return (qw.q.float() * qw.scale[:, None]).to(dtype)


def reference(x: torch.Tensor, qw: QuantWeight, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [m, k] -> x @ (q * scale).T in float32, cast to x's dtype; with ``residual`` [m, n] added into it."""
    y = (x.float() @ qw.q.float().t()) * qw.scale
    if residual is None:
        return y.to(x.dtype)
    residual.copy_((residual.float() + y).to(residual.dtype))
    return residual


if triton is not None:

    @triton.jit  # type: ignore[untyped-decorator]
    def _w8_kernel(  # type: ignore[no-untyped-def]
        x_ptr, q_ptr, s_ptr, r_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, stride_x, stride_r, stride_y,
        K: tl.constexpr, HAS_RES: tl.constexpr, VIA_F32: tl.constexpr, DOT_F16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    ):
        # y^T tile [BLOCK_N, BLOCK_M] = q tile [BLOCK_N, K] @ x^T [K, BLOCK_M]: the weight's rows take the MMA's
        # wide side, the few batch rows its narrow one (the smallest tl.dot tile is 16). With SPLIT > 1 each of
        # SPLIT programs walks 1/SPLIT of the reduction (more programs in flight: a 4096-feature output is only
        # 128 tiles of 32 for 132 SMs)
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        K_PART: tl.constexpr = K // SPLIT
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = pid_k * K_PART + tl.arange(0, BLOCK_K)
        n_ok = offs_n < N
        m_ok = offs_m < M
        out_mask = n_ok[:, None] & m_ok[None, :]
        q_ptrs = q_ptr + offs_n[:, None] * K + offs_k[None, :]
        x_ptrs = x_ptr + offs_m[None, :] * stride_x + offs_k[:, None]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for _ in range(0, K_PART, BLOCK_K):  # K_PART is a multiple of BLOCK_K (``linear`` checks)
            w = tl.load(q_ptrs, mask=n_ok[:, None], other=0.0)
            x = tl.load(x_ptrs, mask=m_ok[None, :], other=0.0)
            if VIA_F32:  # float32 models, and Triton's interpreter (no direct e4m3 -> bf16 there)
                acc = tl.dot(w.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
            elif DOT_F16:  # e4m3 -> f16 is one instruction on sm_89+ (-> bf16 goes through f32: 1.4x slower)
                if x.dtype == tl.float16:
                    x16 = x
                else:  # bf16 rows, clamped to fp16's range
                    x16 = tl.clamp(x.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
                acc = tl.dot(w.to(tl.float16), x16, acc)
            else:
                acc = tl.dot(w.to(x.dtype), x, acc)
            q_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        if SPLIT == 1:
            _w8_epilogue(acc, s_ptr, r_ptr, y_ptr, offs_n, offs_m, n_ok, out_mask, stride_r, stride_y, HAS_RES)
        else:
            # each part's sums go to the float32 workspace [SPLIT, M, N]; the tile's last part to finish (a
            # counter per tile, left at 0 again for the next call) adds them in a fixed order (deterministic)
            ws_tile = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
            tl.store(ws_tile + pid_k * M * N, acc, mask=out_mask)
            tl.debug_barrier()  # every thread's part stored before the tile's counter moves
            tile = pid_m * tl.num_programs(0) + pid_n
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if arrived == SPLIT - 1:
                total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for part in tl.static_range(SPLIT):  # from L2 (.cg): the other parts were written by other SMs
                    total += tl.load(ws_tile + part * M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
                _w8_epilogue(total, s_ptr, r_ptr, y_ptr, offs_n, offs_m, n_ok, out_mask, stride_r, stride_y,
                             HAS_RES)
                tl.atomic_xchg(cnt_ptr + tile, 0)

    @triton.jit  # type: ignore[untyped-decorator]
    def _w8_epilogue(acc, s_ptr, r_ptr, y_ptr, offs_n, offs_m, n_ok, out_mask, stride_r, stride_y,  # type: ignore[no-untyped-def]
                     HAS_RES: tl.constexpr):
        y = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
        if HAS_RES:
            r = tl.load(r_ptr + offs_m[None, :] * stride_r + offs_n[:, None], mask=out_mask, other=0.0)
            y += r.to(tl.float32)
        tl.store(y_ptr + offs_m[None, :] * stride_y + offs_n[:, None], y.to(y_ptr.dtype.element_ty), mask=out_mask)


MAX_BUCKET = 64  # the largest row bucket timed at start (``choose``); more rows are a prefill chunk
_COUNTER_TILES = 1 << 17  # tiles a split call may have (lm_head's 128,256 features in tiles of 16: 8,016 a row tile)
_counters: dict[torch.device, torch.Tensor] = {}


def _tile_counters(device: torch.device) -> torch.Tensor:
    """The split kernel's per-tile counters for ``device``, zeros, made once (outside any graph capture: the first
    split call is ``choose``'s check, and every call leaves them at zero). Calls on one device must not overlap:
    the engine makes them all on its main stream."""
    counters = _counters.get(device)
    if counters is None:
        counters = _counters[device] = torch.zeros(_COUNTER_TILES, dtype=torch.int32, device=device)
    return counters


def block_m(rows: int) -> int:
    """The batch rows one program covers: 16 (the smallest tl.dot tile) up to 16 rows, then 32, then 64."""
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


def fits(config: Config, k: int) -> bool:
    """Whether ``config`` can walk a reduction of ``k``: each split part a whole number of blocks."""
    return k % (config.block_k * config.split) == 0


def linear(x: torch.Tensor, qw: QuantWeight, config: Config, residual: torch.Tensor | None = None,
           via_f32: bool | None = None, dot_f16: bool = True) -> torch.Tensor:
    """x [m, k] (contiguous rows) @ dequantized(qw).T through the kernel; with ``residual`` [m, n] the sum is
    written into it (returned). A split config runs unsplit past ``MAX_BUCKET`` rows (prefill chunks: enough
    programs already)."""
    m, k = x.shape
    n = qw.q.shape[0]
    if not fits(config, k):
        raise ValueError(f"reduction {k} is not a multiple of block_k {config.block_k} x split {config.split}")
    out = residual if residual is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm = block_m(m)
    split = config.split if m <= MAX_BUCKET else 1
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, bm), split)
    if split > 1:
        if grid[0] * grid[1] > _COUNTER_TILES:
            raise ValueError(f"{grid[0] * grid[1]} tiles exceed the split kernel's {_COUNTER_TILES} counters")
        workspace = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
        counters = _tile_counters(x.device)
    else:
        workspace = counters = out  # not read
    if via_f32 is None:
        via_f32 = x.dtype == torch.float32
    _w8_kernel[grid](x, qw.q, qw.scale, out, out, workspace, counters, m, n, x.stride(0), out.stride(0),
                     out.stride(0), K=k, HAS_RES=residual is not None, VIA_F32=via_f32, DOT_F16=dot_f16,
                     BLOCK_M=bm, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT=split,
                     num_warps=config.warps, num_stages=config.stages)
    return out


def cat(parts: list[QuantWeight]) -> QuantWeight:
    """Several projections of one input as one (q/k/v, gate/up): the scales are per row, so quantizing each and
    concatenating equals quantizing the concatenation."""
    return QuantWeight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))


@dataclass
class TextCopies:
    """The FP8 text layers: per layer the fused weights of ``fused.SelfWeights``/``CrossWeights`` as QuantWeights
    (norms and gates stay the modules' own), and the LM head's (None when it has a bias: it stays a module)."""

    layers: list[SelfWeights | CrossWeights]
    head: QuantWeight | None

    @property
    def bytes(self) -> int:
        weights = [qw for w in self.layers for qw in (w.q if isinstance(w, CrossWeights) else w.qkv, w.o,
                                                      w.gate_up, w.down)]
        weights += [self.head] if self.head is not None else []
        return sum(qw.q.numel() + 4 * qw.scale.numel() for qw in weights)  # type: ignore[union-attr]


def quantized_modules(model: Any) -> list[Any]:
    """The linear modules ``quantize_text`` copies (benches and tests build a dequantized reference from them)."""
    text = model.model.language_model
    cross = set(text.config.cross_attention_layers)
    mods = []
    for i, layer in enumerate(text.layers):
        attn = [layer.cross_attn.q_proj, layer.cross_attn.o_proj] if i in cross else [
            layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj]
        mods += [*attn, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    if getattr(model.lm_head, "bias", None) is None:
        mods.append(model.lm_head)
    return mods


def dequantize_in_place(model: Any) -> None:
    """Each module of ``quantized_modules`` given the values of its FP8 copy, in its own dtype (``quantize`` is
    deterministic, so these are the values the engine multiplies by): the reference for the engine's logits."""
    with torch.no_grad():
        for mod in quantized_modules(model):
            mod.weight.data = dequantized(quantize(mod.weight.data), mod.weight.dtype)


def quantize_text(model: Any, free: bool, dense: bool = False) -> TextCopies:
    """FP8 copies of every text projection but the cross-attention K/V ones (they project image states once per
    image, in bf16) and of a bias-free LM head, layer by layer, q/k/v and gate/up concatenated as the engine
    multiplies by them. ``free``: each module's own weight is replaced by an empty tensor once copied, so the
    checkpoint's bytes go back to the allocator as the copies are made (the modules are then containers of their
    norms and gates; nothing may call them). ``dense`` (not with ``free``): each copy keeps the checkpoint's weight
    beside it (q/k/v and gate/up concatenated as in ``fused``, the modules' weights views of them)."""
    if free and dense:
        raise ValueError("a weight cannot be both freed and kept")
    text = model.model.language_model
    cross = set(text.config.cross_attention_layers)

    tied = model.lm_head.weight.data_ptr() == text.embed_tokens.weight.data_ptr()  # one tensor: never freed

    def copy(*mods: Any) -> QuantWeight:
        parts = []
        for mod in mods:
            if getattr(mod, "bias", None) is not None:
                raise ValueError("fp8 projections expect bias-free linear layers")
            parts.append(quantize(mod.weight.data))
            if free and not (tied and mod is model.lm_head):
                mod.weight.data = torch.empty(0, dtype=mod.weight.dtype, device=mod.weight.device)
        out = parts[0] if len(parts) == 1 else cat(parts)
        if dense:
            out.dense = mods[0].weight if len(mods) == 1 else concat_into_views(list(mods))
        return out

    layers: list[SelfWeights | CrossWeights] = []
    for i, layer in enumerate(text.layers):
        mlp = layer.mlp
        gate_up, down = copy(mlp.gate_proj, mlp.up_proj), copy(mlp.down_proj)
        norms = {"ln_in": layer.input_layernorm, "ln_post": layer.post_attention_layernorm}
        if i in cross:
            ca = layer.cross_attn
            layers.append(CrossWeights(
                q=copy(ca.q_proj), o=copy(ca.o_proj), gate_up=gate_up, down=down, q_norm=ca.q_norm,  # type: ignore[arg-type]
                attn_gate=layer.cross_attn_attn_gate.detach().tanh(),
                mlp_gate=layer.cross_attn_mlp_gate.detach().tanh(), **norms,
            ))
        else:
            a = layer.self_attn
            layers.append(SelfWeights(
                qkv=copy(a.q_proj, a.k_proj, a.v_proj), o=copy(a.o_proj), gate_up=gate_up, down=down,  # type: ignore[arg-type]
                **norms,
            ))
    head = None if getattr(model.lm_head, "bias", None) is not None else copy(model.lm_head)
    return TextCopies(layers, head)


Weight = torch.Tensor | QuantWeight


@dataclass
class Fp8Projections:
    """The runner's ``proj`` (model.py) when its weights are FP8 copies: a ``QuantWeight`` goes through the kernel
    with the config chosen for its shape and row bucket (``reference`` where the kernel cannot run), or, where it
    kept its checkpoint weight (``dense``), through cuBLAS on that weight when that was faster for the bucket
    (chosen None) or the rows exceed the largest bucket (prefill); a plain tensor through cuBLAS as before."""

    chosen: dict[tuple[int, int, int], Config | None] = field(default_factory=dict)  # (n, k, block_m) -> config
    use_kernel: bool = False
    timings: dict[str, str] = field(default_factory=dict)  # per shape, for /health

    def _dense(self, x2: torch.Tensor, qw: QuantWeight) -> torch.Tensor | None:
        """The kept checkpoint weight if this call should use it, else None."""
        if qw.dense is None:
            return None
        if not self.use_kernel or x2.shape[0] > MAX_BUCKET:
            return qw.dense
        n, k = qw.q.shape  # a bucket not timed (or timed fastest on cuBLAS) takes the kept weight
        return qw.dense if self.chosen.get((n, k, block_m(x2.shape[0]))) is None else None

    def _run(self, x2: torch.Tensor, qw: QuantWeight, residual: torch.Tensor | None) -> torch.Tensor:
        if not self.use_kernel:
            return reference(x2, qw, residual)
        n, k = qw.q.shape
        config = self.chosen.get((n, k, block_m(x2.shape[0])), DEFAULT) or DEFAULT
        return linear(x2, qw, config, residual=residual)

    def linear(self, x: torch.Tensor, w: Weight) -> torch.Tensor:
        if not isinstance(w, QuantWeight):
            return F.linear(x, w)
        x2 = x.reshape(-1, x.shape[-1])
        dense = self._dense(x2, w)
        if dense is not None:
            return F.linear(x, dense)
        y = self._run(x2.contiguous(), w, None)
        return y.view(*x.shape[:-1], w.q.shape[0])

    def add_(self, h: torch.Tensor, x: torch.Tensor, w: Weight) -> torch.Tensor:
        """h += x @ w.T in place (h is the residual stream, contiguous)."""
        if not isinstance(w, QuantWeight):
            return add_linear_(h, x, w)
        x2 = x.reshape(-1, x.shape[-1])
        dense = self._dense(x2, w)
        if dense is not None:
            return add_linear_(h, x, dense)
        self._run(x2.contiguous(), w, h.view(-1, h.shape[-1]))
        return h


def choose(proj: Fp8Projections, weights: Iterable[Weight], rows: Iterable[int],
           time_fn: Callable[[Callable[[], torch.Tensor]], float], dtype: torch.dtype = torch.bfloat16,
           candidates: list[Config] | None = None) -> None:
    """Per weight shape and row bucket: time each config (cycling over every weight of that shape, so the reads
    come from memory, not L2) and keep the fastest whose output matches ``reference`` (relative L2 <= 1e-2); where
    the weights kept their checkpoint copies, cuBLAS on those too (chosen None when it is the fastest)."""
    by_shape: dict[tuple[int, int], list[QuantWeight]] = {}
    for qw in weights:
        if not isinstance(qw, QuantWeight):
            continue
        by_shape.setdefault((int(qw.q.shape[0]), int(qw.q.shape[1])), []).append(qw)
    buckets = sorted({block_m(r) for r in rows})
    for (n, k), qws in by_shape.items():
        for bm in buckets:
            config, times = _choose_for(qws, bm, time_fn, candidates or CONFIGS, dtype)
            proj.chosen[(n, k, bm)] = config
            proj.timings[f"{n}x{k} rows<={bm}"] = f"{config or 'cublas-bf16'} ({times} us)"


def _choose_for(qws: list[QuantWeight], rows: int, time_fn: Callable[[Callable[[], torch.Tensor]], float],
                candidates: list[Config], dtype: torch.dtype) -> tuple[Config | None, str]:
    dev = qws[0].q.device
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(rows, qws[0].q.shape[1], device=dev, dtype=dtype, generator=gen)  # the model's: compiled now
    ref = reference(x, qws[0]).float()
    best: Config | None = DEFAULT
    best_time, times = float("inf"), []
    if qws[0].dense is not None:
        dense = itertools.cycle([qw.dense for qw in qws])
        best, best_time = None, time_fn(lambda: F.linear(x, next(dense)))  # type: ignore[arg-type]
        times.append(f"cublas-bf16 {best_time * 1e6:.1f}")
    for cfg in candidates:
        if not fits(cfg, qws[0].q.shape[1]):
            continue
        try:
            got = linear(x, qws[0], cfg).float()
            residual = torch.randn(rows, qws[0].q.shape[0], device=dev, dtype=x.dtype, generator=gen)
            added = linear(x, qws[0], cfg, residual=residual.clone()).float()  # compiled now, not in a capture
        except Exception as exc:  # noqa: BLE001 - a config this GPU's compiler cannot build (shared memory)
            times.append(f"{cfg} failed ({type(exc).__name__})")
            continue
        if relative_l2(got, ref) > 1e-2 or relative_l2(added, residual.float() + ref) > 1e-2:
            times.append(f"{cfg} wrong")
            continue
        it = itertools.cycle(qws)
        t = time_fn(lambda cfg=cfg, it=it: linear(x, next(it), cfg))
        times.append(f"{cfg} {t * 1e6:.1f}")
        if t < best_time:
            best, best_time = cfg, t
    return best, ", ".join(times)
