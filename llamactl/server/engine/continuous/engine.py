"""The continuous-batching engine: requests join a running batch at step boundaries and leave when done.

Each iteration of the step loop (model thread):
1. admit: waiting requests take free slots, at most one bounded chunk (images, prompt tokens) per iteration,
   so running sequences wait for at most one chunk between two of their tokens;
2. one decode step for every running sequence (a CUDA graph replay on GPUs, the fastest self- and cross-attention
   forms for its rows), its tokens sampled per row on the device and kept there as the next step's inputs;
3. image newcomers are queued through the vision tower + projector (on GPUs on a stream of their own,
   ``encoding.py``) while the batch keeps decoding; with ``vision_queue`` > 1 a full chunk may wait behind the
   one in the tower (chunks join in order), so in a burst the tower goes on without waiting for a join;
4. the previous step's tokens come back to the host (on GPUs one step late, so the GPU never waits for this
   loop): recorded, streamed by the output thread, ends decided; finished or cancelled sequences leave and
   their slots are reused at once (the last running one moves in);
5. text newcomers are prefilled and image newcomers whose states are ready join: cross-attention K/V into their
   slots, the prompt through every layer, the first token sampled; they decode from the next step.
A request that cannot get a slot waits (``waiting_for_memory``); admission in front turns a long wait into 429.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from llamactl.server.engine.continuous import fp8
from llamactl.server.engine.continuous.cross_attention import choose as choose_cross
from llamactl.server.engine.continuous.decode_attention import available as decode_attention_available
from llamactl.server.engine.continuous.encoding import (
    Encoding,
    StreamPriorities,
    VisionLane,
    decode_waits_for_tower,
    stream_priorities,
)
from llamactl.server.engine.continuous.gemv import choose as choose_gemv
from llamactl.server.engine.continuous.graphs import DecodeGraphs, batch_buckets, bucket, length_buckets
from llamactl.server.engine.continuous.kernel_choice import (
    choose_fastest,
    describe_choice,
    relative_l2,
    time_in_graph,
)
from llamactl.server.engine.continuous.model import MllamaRunner, Newcomer
from llamactl.server.engine.continuous.output import OutputWorker, run_all
from llamactl.server.engine.continuous.pixels import FastPixels, image_token_mask, prompt_ids
from llamactl.server.engine.continuous.pools import PoolShape, SlotPools, plan_slots
from llamactl.server.engine.continuous.sampler import RowSampling, sample_tokens
from llamactl.server.engine.continuous.scheduler import gather_left, take_chunk, vision_queue_depth
from llamactl.server.engine.continuous.sequence import Prepared, Sequence
from llamactl.server.engine.continuous.tower_graphs import TowerGraphs, cuda_capture, own_stream
from llamactl.server.engine.continuous.vision import VisionEncoder, choose_backend, choose_layers
from llamactl.server.engine.detok import IncrementalText
from llamactl.server.engine.protocol import (
    EngineFailure,
    EngineStatus,
    FinishReason,
    GenRequest,
    GenResult,
    Stopped,
)
from llamactl.server.hf_engine import PROMPT_ALLOWANCE, HFEngine, context_limit
from llamactl.server.settings import Settings

log = logging.getLogger("llamactl.server.engine")

# Batches up to this size decode through the compiled step: at batch 1 it cut the step from 12.3 to 9.8 ms, but at
# batch 32 its generated attention kernels were slower than eager (31 vs 17 ms; bench/results/engine_direct_run4).
_COMPILED_ROWS = 8  # prompt tokens a slot holds beyond the longest answer the server allows
_GIB = 2**30
# a tower replay's largest distance from the eager tower (relative L2) before the graphs are turned down: the same
# kernels on the same inputs, so anything beyond rounding means a capture went wrong
GRAPH_TOLERANCE = 1e-3


class HostTime:
    """Seconds the step loop's thread spends per phase, since start (``/health`` ``engine.host_s``): where a GPU
    that idles between steps waits on Python. ``wait`` is time blocked on the GPU (a step's tokens, a prefill's
    first tokens), also counted in the phase it happens in (``process``, ``prefill``, ``join``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def snapshot(self) -> dict[str, float]:
        seconds = dict(self.seconds)  # one copy under the interpreter lock: the loop may add a phase meanwhile
        return {k: round(v, 3) for k, v in sorted(seconds.items())}


@dataclass
class _Step:
    """A decode step in flight: its rows as launched and their chosen tokens on the way to the host."""

    seqs: list[Sequence]
    chosen: torch.Tensor  # [rows] on the host (pinned on GPUs), valid once ``done`` fired
    done: Any  # torch.cuda.Event, or None on the CPU (already there)
    launched: float

    def tokens(self, clock: HostTime) -> list[int]:
        if self.done is not None:
            with clock.phase("wait"):
                self.done.synchronize()
        return [int(t) for t in self.chosen.tolist()]


class ContinuousEngine(EngineStatus):
    name = "continuous"

    def __init__(self, settings: Settings, threads: int | None = None) -> None:
        self.settings = settings
        # loading, processor (Pillow's images: the table pixels, the same values on every host), chat template, stops
        self.hf = HFEngine(settings, threads=threads, pillow_images=True)
        self.model_name = settings.model
        super().__init__()
        self._cv = threading.Condition()
        self._waiting: deque[GenRequest] = deque()
        self._running: list[Sequence] = []  # index == slot
        self._stopping = False
        self._admitted = 0  # requests taken from the queue whose prefill has not finished
        self._hold_s = 0.0  # how long the idle tower still holds its waiting images for a fuller chunk
        self._encodings: deque[Encoding] = deque()  # image chunks in the tower, in order (at most vision_queue)
        self._lane = VisionLane()  # where the vision tower runs (a stream of its own on GPUs)
        # decode steps launched whose tokens are not read yet, oldest first (at most settings.pipeline_depth once
        # an iteration is done: the device always has that many queued while the host reads back older ones)
        self._inflight: deque[_Step] = deque()
        # Each row's next input token and position live on the device (sampled there, moved there), so a step
        # is launched before the previous one's tokens reach the host: the GPU never waits for the step loop.
        self._tokens_in: torch.Tensor | None = None
        self._positions_in: torch.Tensor | None = None
        self.pipelined: bool | None = None  # None: on GPUs only (on the CPU there is nothing to overlap)
        self._out = OutputWorker()  # detokenizing, streaming, results: off the step loop
        self._main_stream: Any = None  # CUDA stream of decode and prefill (the tower's: self._lane)
        self.liveness: Any = None  # llamactl.server.liveness.Liveness, set by the server
        self.metrics: Any = None  # llamactl.server.metrics.Metrics, set by the server
        self.step_hook: Callable[[], None] | None = None  # tests: runs at the top of every iteration
        # image requests the server is decoding or preparing, not yet added here (burst_gather_ms); set by the server
        self.images_on_the_way: Callable[[], int] = lambda: 0
        self.runner: MllamaRunner | None = None
        self.pools: SlotPools | None = None
        self.graphs: DecodeGraphs | None = None
        self.max_len = 0
        self.slots = 0
        self.chunk_images = 8
        self.chunk_tokens = 4096
        self.split_vision_mask = True  # vision.py: attention without transformers' dense L x L mask
        self.vision_timings: dict[str, float] = {}  # seconds for 2 images per unmasked-attention kernel
        self.vision_layer_timings: dict[str, float] = {}  # seconds for 2 images per encoder-layer form
        self.vision_graphs = "off (CPU)"  # the tower as CUDA graphs, or why not (/health)
        self._priorities: StreamPriorities | None = None  # CUDA priority per kind of work (GPUs; /health)
        self._tower_first = decode_waits_for_tower(settings.vision_priority)  # each decode step waits for it
        self.cross_attention = "matmul"  # the decode step's cross-attention forms (timed at start on GPUs)
        self.self_attention = "torch"  # the decode step's self-attention: PyTorch ops or Triton (timed on GPUs)
        self.gemv: dict[str, str] = {}  # one-row projections per weight shape: Triton or cuBLAS (timed on GPUs)
        self.fp8_gib: float | None = None  # the FP8 copies' size (quantization fp8)
        self.keep_checkpoint_weights = False  # fp8: keep the bf16 text weights too (benches comparing to them)
        self._eos_ids: frozenset[int] = frozenset()
        self._eos_tensor: torch.Tensor | None = None
        self._b_buckets: list[int] = []
        self._l_buckets: list[int] = []
        self.steps = 0
        self.tower_holds = 0  # decode steps that waited for a chunk in the tower (vision_priority "first")
        self.batches = 0  # prefill chunks (newcomers admitted together)
        self.on_batch: Callable[[int], None] | None = None  # newcomers per chunk (the batch-size histogram)
        self.on_batch_done: Callable[[float], None] | None = None  # seconds per chunk (vision + prefill)
        self.prefill_s = 0.0
        self.decode_s = 0.0
        self.host = HostTime()
        self._processed_at = 0.0

    # -- read-only surface (any thread) ------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        # taken from the queue and being encoded or prefilled count as running
        return len(self._running) + self._admitted + self._encoding_reqs()

    def _encoding_reqs(self) -> int:
        return sum(len(e.reqs) for e in list(self._encodings))

    @property
    def waiting_for_memory(self) -> float:
        return float(len(self._waiting)) if self.slots and len(self._running) >= self.slots else 0.0

    @property
    def kv_pool_usage(self) -> float:
        """Used fraction of the self-attention K/V pool (tokens held over tokens allocated)."""
        if not self.slots or not self.max_len:
            return 0.0
        return sum(s.length for s in list(self._running)) / (self.slots * self.max_len)

    @property
    def cross_pool_usage(self) -> float:
        if not self.slots:
            return 0.0
        return sum(1 for s in list(self._running) if s.has_image) / self.slots

    def describe(self) -> dict[str, Any]:
        hf = self.hf.describe()
        return {
            "device": hf["device"],
            "dtype": hf["dtype"],
            "slots": self.slots,
            "max_len": self.max_len,
            "pool_gib": None if self.pools is None else round(self.pools.bytes / _GIB, 2),
            "cuda_graphs": None if self.graphs is None else self.graphs.captures,
            "compiled": self.settings.engine_compile if self.hf.device == "cuda" else "off",
            "prefill_chunk_images": self.chunk_images,
            "vision_overlaps_decode": self._lane.stream is not None,
            "vision_sms": self._lane.description,
            "vision_priority": self.settings.vision_priority,
            "stream_priorities": None if (p := self._priorities) is None else {
                "main": p.main, "vision_lane": p.lane, "decode_graphs": p.decode_graphs or 0,
                "vision_graphs": p.tower_graphs},
            "vision_queue": self._vision_queue,
            "pipelined": bool(self.pipelined),
            "pipeline_depth": self.settings.pipeline_depth if self.pipelined else 0,
            "burst_gather_ms": self.settings.burst_gather_ms,
            "vision_attention": self._vision_attention(),
            "vision_layers": self._vision_layers(),
            "vision_graphs": self.vision_graphs,
            "cross_attention": self.cross_attention,
            "self_attention": self.self_attention,
            "quantization": self._quantization(),
            "one_row_projections" if self.fp8_gib is None else "fp8_projections": self.gemv or "cublas",
            "image_preprocessing_on": "cpu",  # the processor runs in request threads (prepare), off the GPU loop
            "image_pixels": self._pixels_name(),
            "threads": hf["threads"],
            "steps": self.steps,
            "tower_holds": self.tower_holds,
            "prefill_s_total": round(self.prefill_s, 3),
            "decode_s_total": round(self.decode_s, 3),
            "host_s": self.host.snapshot(),
        }

    def _quantization(self) -> str:
        if self.fp8_gib is None:
            return self.settings.quantization
        kept = "; bf16 text weights kept, the faster used per shape and batch" if self.settings.fp8_keep_bf16 else ""
        image_kv = "fp8 (a scale per image and K/V head)" if self.pools is not None and self.pools.image_kv_fp8 else "bf16"
        return (f"fp8 (text layers and LM head, {self.fp8_gib} GiB; vision tower and image K/V projections bf16; "
                f"image K/V {image_kv}{kept})")

    def _vision_attention(self) -> str:
        if self.runner is None:
            return "-"
        encoder = self.runner.encoder
        if not encoder.split_mask:
            return "dense mask (transformers)"
        if not self.vision_timings:
            return "split mask"
        best = min(self.vision_timings, key=self.vision_timings.__getitem__)
        return f"split mask, {best} (" + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in self.vision_timings.items()) + ")"

    def _vision_layers(self) -> str:
        """Which encoder layers the tower runs (tower.py's fused ones or transformers'), and the start's timing."""
        if self.runner is None:
            return "-"
        name = "fused" if self.runner.encoder.fused else "transformers"
        t = self.vision_layer_timings
        if not t:
            return name
        return f"{name} (" + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in t.items()) + " for 2 images)"

    def render_prompt(self, messages: list[dict[str, Any]]) -> str:
        return self.hf.render_prompt(messages)

    def gpu_memory(self) -> tuple[int, int] | None:
        return self.hf.gpu_memory()

    def close(self) -> None:
        self._out.drain(10)
        self._out.close()
        self.graphs = None
        self.pools = None
        self.runner = None
        self.hf.close()

    # -- lifetime (model thread) -------------------------------------------------------------------------

    def start(self) -> None:
        hf = self.hf
        hf.load()
        model, device = hf.model, hf.device
        text_cfg = model.model.language_model.config
        cross = list(text_cfg.cross_attention_layers)
        self_ids = [i for i in range(text_cfg.num_hidden_layers) if i not in cross]
        heads = text_cfg.num_attention_heads
        vision = model.model.vision_model
        self.max_len = context_limit(self.settings, model)
        shape = PoolShape(
            self_layers=len(self_ids),
            cross_layers=len(cross),
            kv_heads=text_cfg.num_key_value_heads,
            head_dim=text_cfg.hidden_size // heads,
            max_len=self.max_len,
            cross_len=int(vision.max_num_tiles) * int(vision.num_patches),
            element_bytes=torch.finfo(hf.dtype).bits // 8,
        )
        self._eos_ids = hf._eos_ids
        self._eos_tensor = torch.tensor(sorted(self._eos_ids), device=device)
        encoder = VisionEncoder(vision, model.model.multi_modal_projector, split_mask=self.split_vision_mask)
        if self.settings.vision_layers == "transformers" or self.settings.engine_compile in ("vision", "all"):
            encoder.fused = False  # compiling compiles transformers' layers
        if encoder.tower is not None:
            encoder.tower.triton = self.settings.triton_kernels
        with torch.inference_mode():
            copies = self._quantize(model, device)  # before the pools are sized: the freed bytes count
            shape = replace(shape, image_kv_fp8=self._image_kv_fp8(copies, device))
            if device == "cuda":
                self.chunk_images = self.settings.prefill_chunk_images or 8
                # Only the vision tower uses SDPA here (our text attention is plain matmuls), and its shapes
                # repeat (chunks of 1..8 four-tile images): cuDNN's attention runs it 1.9x faster than the
                # default kernel on an H100 (bench/results/engine_probe_run1.json: 0.52 s vs 0.99 s for 8
                # images; relative L2 1.2e-2, within bf16 noise). Its plans are built once per shape below.
                torch.backends.cuda.enable_cudnn_sdp(True)
                if self.settings.engine_compile in ("vision", "all"):
                    _compile_vision(vision)
                if encoder.split_mask:
                    tower_shape = (2, int(vision.max_num_tiles), int(vision.image_size), hf.dtype)
                    self.vision_timings = choose_backend(encoder, *tower_shape)
                    if encoder.fused and self.settings.vision_layers == "auto":
                        self.vision_layer_timings = choose_layers(encoder, *tower_shape)
                # Two streams, two workspaces: PyTorch's caching allocator gives a block freed on one stream only
                # to that stream, so the vision tower's activations (vision stream) and the prefill's (main
                # stream) are reserved separately. One reserve of the tower's peak ran out of memory on an 80 GB
                # H100 at 32 clients (bench/results/engine_bench_run3_h100_oom.md); the prefill's own peak (long
                # text prompts: attention scores of a 4,096-token chunk) is bounded by the 3 GiB beside it.
                # each chunk queued behind the one in the tower holds its finished states until it joins
                planned_queue = vision_queue_depth(self.settings.vision_queue, True, self.settings.vision_graphs)
                queued_states = (planned_queue - 1) * self.chunk_images * shape.cross_len * (
                    text_cfg.hidden_size * shape.element_bytes)
                reserve = 2 * self._measure_workspace(encoder, vision) + queued_states + 3 * _GIB
                free, _total = torch.cuda.mem_get_info()
                self.slots = plan_slots(shape, self.settings.max_batch_size, free, reserve)
            else:
                self.chunk_images = self.settings.prefill_chunk_images or 4
                self.slots = plan_slots(shape, self.settings.max_batch_size, None, 0)
            self.pools = SlotPools(shape, self.slots, self_ids, cross, hf.dtype, device)
            self.runner = MllamaRunner(model, self.pools, encoder, fp8_copies=copies)
            del copies
            if device == "cuda":
                self._choose_cross_attention(self.runner)
                fp8_proj = isinstance(self.runner.proj, fp8.Fp8Projections)
                if fp8_proj:  # FP8 weights have their own kernel; one-row bf16 projections only without them
                    self._choose_fp8(self.runner.proj)  # type: ignore[arg-type]
                if self.settings.triton_kernels:
                    if not fp8_proj:
                        self._choose_gemv(self.runner)
                    self._choose_self_attention(self.runner)
                torch.cuda.empty_cache()  # its random K/V (~0.8 GB) back before the graphs are captured
            self._b_buckets = batch_buckets(self.slots)
            self._l_buckets = length_buckets(self.max_len)
            if device == "cuda":
                # CUDA serves the lower priority number first; graphs keep their capture stream's (encoding.py)
                prio = self._priorities = stream_priorities(self.settings.vision_priority)
                self._main_stream = torch.cuda.Stream(priority=prio.main)  # type: ignore[no-untyped-call]
                self._lane = VisionLane.on_gpu(self.settings.vision_sms, priority=prio.lane)
                self._capture_tower(self.runner, vision, prio.tower_graphs)
                small = self._compiled(self.runner) if self.settings.engine_compile == "all" else None
                self.graphs = DecodeGraphs(
                    self.runner.decode, self._b_buckets[-1], device, small=small, small_rows=_COMPILED_ROWS,
                    capture_stream=None if prio.decode_graphs is None else own_stream(prio.decode_graphs),
                )
            if self.graphs is not None:
                self._tokens_in, self._positions_in = self.graphs.tokens, self.graphs.positions
            else:
                self._tokens_in = torch.zeros(self.slots, dtype=torch.long, device=device)
                self._positions_in = torch.zeros(self.slots, dtype=torch.long, device=device)
            if self.pipelined is None:
                self.pipelined = device == "cuda"
            self._warmup()
        log.info(
            "continuous engine: %d slots of %d tokens (%.1f GiB of pools) on %s, max batch %d",
            self.slots, self.max_len, self.pools.bytes / _GIB, device, self.settings.max_batch_size,
        )
        self._state = "ready"

    def _compiled(self, runner: MllamaRunner) -> Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]:
        """torch.compile the decode step (batch and length symbolic) for small batches.

        A decode step at batch 1 is ~2,000 kernels of which only ~200 are the weight GEMMs that bound it
        (bench/results/engine_probe_run1.json: 6.1 of 10.9 ms of GPU time); fusing the element-wise rest
        (norms, rotary, residuals, masks) is what compiling buys. Graph capture then replays the fused kernels.
        """
        compiled: Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor] = torch.compile(
            runner.decode, dynamic=True
        )
        return compiled

    def _choose_cross_attention(self, runner: MllamaRunner) -> None:
        """Time the decode step's cross-attention forms on this GPU (cross_attention.py) at batch 1, 8 and 32 (at
        most the slots), with this model's shapes; each decode graph then captures the fastest for its rows."""
        pools = runner.pools
        rows = min(32, self.slots)
        dev = pools.device
        gen = torch.Generator(device=dev).manual_seed(0)
        kv_shape = (rows, pools.shape.kv_heads, pools.cross_len, pools.shape.head_dim)
        k = torch.randn(kv_shape, device=dev, dtype=pools.dtype, generator=gen)
        v = torch.randn(kv_shape, device=dev, dtype=pools.dtype, generator=gen)
        q = torch.randn(rows, runner.nh, 1, runner.hd, device=dev, dtype=pools.dtype, generator=gen)
        bias = torch.zeros(rows, 1, 1, pools.cross_len, device=dev, dtype=pools.dtype)
        bias[::2, :, :, -runner.num_patches :] = runner.min_value  # every other row: an image with a tile less
        batches = sorted({1, min(8, rows), rows})
        choice, timings = choose_cross(lambda b: (q[:b], k[:b], v[:b], bias[:b]), batches, runner.scale,
                                       skip=() if self.settings.triton_kernels else ("triton",))
        fp8_kv = "FP8 image K/V, timed on bf16: " if pools.image_kv_fp8 else ""
        if fp8_kv and "triton" in timings:  # only the Triton kernel reads FP8 K/V; the others dequantize each step
            choice = {1: "triton"}
        runner.cross_choice = choice
        self.cross_attention = fp8_kv + describe_choice(choice, timings, batches)

    def _choose_self_attention(self, runner: MllamaRunner) -> None:
        """Time the decode step's self-attention, PyTorch ops against the Triton kernel (decode_attention.py), at
        batch 1, 8 and 32 (at most the slots) on keys up to 256 positions; each decode graph then captures the
        faster for its rows. Runs on the first self layer's pool before any request (its contents are scratch)."""
        if not decode_attention_available():
            return
        pools = runner.pools
        rows, lb = min(32, self.slots), min(256, self.max_len)
        gen = torch.Generator(device=pools.device).manual_seed(0)
        qkv = torch.randn(rows, runner.nh + 2 * runner.nkv, runner.hd, device=pools.device, dtype=pools.dtype,
                          generator=gen)
        positions = torch.randint(0, lb, (rows,), device=pools.device, generator=gen)
        s = 0

        def form(triton: bool) -> Callable[[int], Callable[[], torch.Tensor]]:
            def at(b: int) -> Callable[[], torch.Tensor]:
                step = None if triton else runner.self_step(positions[:b], b, lb)
                return lambda: runner.self_attend(qkv[:b], positions[:b], step, s)

            return at

        batches = sorted({1, min(8, rows), rows})
        choice, timings = choose_fastest({"torch": form(False), "triton": form(True)}, batches,
                                         lambda fn: time_in_graph(fn, calls=16, reps=3))
        pools.k[s].zero_()
        pools.v[s].zero_()
        runner.self_choice = choice
        self.self_attention = describe_choice(choice, timings, batches, digits=1)

    def _choose_gemv(self, runner: MllamaRunner) -> None:
        """Time one-row projections, Triton against cuBLAS, on the model's own weights (gemv.py); the decode
        graphs of batch 1 then capture the faster per weight shape."""
        runner.proj = choose_gemv(runner.decode_weights(), lambda fn: time_in_graph(fn, calls=8, reps=3))
        self.gemv = dict(runner.proj.timings)

    def _image_kv_fp8(self, copies: fp8.TextCopies | None, device: str) -> bool:
        """FP8 image K/V (half the bytes a decode step reads per image row) with FP8 text layers where
        ``fp8_image_kv`` is on; on a GPU only where the Triton cross-attention kernel, which reads them, runs."""
        if copies is None or not self.settings.fp8_image_kv:
            return False
        return device != "cuda" or (decode_attention_available() and self.settings.triton_kernels)

    def _quantize(self, model: Any, device: str) -> fp8.TextCopies | None:
        """``quantization: fp8``: FP8 copies of the text layers (fp8.py), the checkpoint's text weights freed
        unless ``keep_checkpoint_weights`` (a bench comparing against transformers on the same model)."""
        if self.settings.quantization != "fp8":
            return None
        if device == "cuda" and not fp8.available():
            raise RuntimeError(
                "quantization fp8 needs Triton and a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                "use quantization none on this GPU"
            )
        keep = self.settings.fp8_keep_bf16
        copies = fp8.quantize_text(model, free=not (keep or self.keep_checkpoint_weights), dense=keep)
        self.fp8_gib = round(copies.bytes / _GIB, 2)
        if device == "cuda":
            torch.cuda.empty_cache()
        return copies

    def _choose_fp8(self, proj: fp8.Fp8Projections) -> None:
        """Time the FP8 kernel's configs per weight shape and row bucket (decode batches up to the slots, and
        prefill chunks in the largest bucket), on the model's own FP8 weights."""
        assert self.runner is not None
        fp8.choose(proj, self.runner.decode_weights(), sorted({1, min(32, self.slots), fp8.MAX_BUCKET}),
                   lambda fn: time_in_graph(fn, calls=8, reps=3), dtype=self.hf.dtype)
        self.gemv = dict(proj.timings)

    def _capture_tower(self, runner: MllamaRunner, vision: Any, priority: int = 0) -> None:
        """The tower as CUDA graphs (tower_graphs.py) for chunks of 1..chunk_images images, kept only if a replay
        of a mixed chunk (a four-tile and a one-tile image) equals the eager tower; otherwise the eager tower, and
        /health says why."""
        if not self.settings.vision_graphs:
            self.vision_graphs = "off (settings)"
            return
        if self._lane.partitioned:  # a green context is a context of its own; the graphs belong to the primary one
            self.vision_graphs = "off (the tower runs on part of the SMs: vision_sms)"
            return
        size, tiles, dtype = int(vision.image_size), int(vision.max_num_tiles), self.hf.dtype
        try:
            graphs = TowerGraphs(runner.encoder, self.chunk_images, tiles, size, dtype, "cuda",
                                 cuda_capture(stream=own_stream(priority)))
            graphs.capture_all()
            n = min(2, self.chunk_images)
            pixel = torch.randn(n, 1, tiles, 3, size, size, dtype=dtype).pin_memory()
            ar_ids = torch.ones(n, 1, dtype=torch.long)
            ar_mask = torch.ones(n, 1, tiles, dtype=torch.long)
            ar_mask[-1, 0, 1:] = 0
            eager = runner.encoder(pixel.to("cuda"), ar_ids.to("cuda"), ar_mask.to("cuda"), ar_mask)
            replayed = graphs.encode([pixel[i : i + 1] for i in range(n)], [ar_ids[i : i + 1] for i in range(n)],
                                     [ar_mask[i : i + 1] for i in range(n)])
            if replayed is None:
                raise RuntimeError("no graph for a chunk of two images")
            error = relative_l2(replayed.float(), eager.float())
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot be captured (the eager tower still works)
            log.warning("vision tower without CUDA graphs: %s", exc)
            self.vision_graphs = f"off ({type(exc).__name__}: {exc})"[:300]
            return
        finally:
            torch.cuda.empty_cache()  # the warm-ups' blocks, cached for the capture stream
        if error > GRAPH_TOLERANCE:
            self.vision_graphs = f"off (a replay is {error:.1e} from the eager tower)"
            return
        runner.tower_graphs = graphs
        self.vision_graphs = (f"{graphs.count} ({self.chunk_images} chunk sizes x {len(graphs.widths)} padding "
                              f"widths), captured in {graphs.capture_s:.1f} s; replay vs eager {error:.1e}")

    def _measure_workspace(self, encoder: VisionEncoder, vision: Any) -> int:
        """Encode chunks of 1..chunk_images 4-tile images once (attention plans for every chunk shape) and
        return the peak extra memory of the largest, the biggest activation the engine makes."""
        size = int(vision.image_size)
        tiles = int(vision.max_num_tiles)
        dtype = self.hf.dtype
        peak = 0
        for n in range(1, self.chunk_images + 1):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            pixel = torch.randn(n, 1, tiles, 3, size, size, device="cuda", dtype=dtype)
            ar_ids = torch.ones(n, 1, dtype=torch.long, device="cuda")
            ar_mask = torch.ones(n, 1, tiles, dtype=torch.long)
            states = encoder(pixel, ar_ids, ar_mask.to("cuda"), ar_mask)
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated() - before)
            del pixel, states
        torch.cuda.empty_cache()
        return int(peak * 1.25)

    def _warmup(self) -> None:
        """One image request and one text request through the real path (lazy initialisation, first graphs)."""
        from PIL import Image

        from llamactl.server.engine.protocol import GenParams

        image = Image.new("RGB", (64, 64), (120, 130, 140))
        prompt = self.hf.render_prompt(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
        )
        text_prompt = self.hf.render_prompt([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
        reqs = [
            GenRequest(prompt=prompt, image=image, params=GenParams(max_new_tokens=3, min_new_tokens=3)),
            GenRequest(prompt=text_prompt, image=None, params=GenParams(max_new_tokens=3, min_new_tokens=3)),
        ]
        for r in reqs:
            self.prepare(r)
        for r in reqs:  # one at a time: a server may have a single slot
            self._prefill([r])
            while self._running or self._inflight:
                self._iterate([])
        if self.graphs is not None:  # the common small shapes now, so the first requests do not capture
            for rows in self._b_buckets:
                self.graphs.run(rows, self._l_buckets[0])
            torch.cuda.synchronize()

    # -- request surface (any thread) --------------------------------------------------------------------

    def prepare(self, req: GenRequest) -> None:
        if req.prepared is not None:
            return
        hf = self.hf
        if hf.processor is None:
            raise ValueError("the model is not loaded yet")
        fast = self._pixels if req.image is not None and req.image.mode == "RGB" else None
        out: Any = None
        if fast is not None:
            ids = prompt_ids(hf.processor, req.prompt)
        else:
            out = hf.processor(
                images=[[req.image]] if req.image is not None else None,
                text=[req.prompt],
                add_special_tokens=False,  # the chat template already starts with <|begin_of_text|>
                return_tensors="pt",
            )
            ids = [int(t) for t in out["input_ids"][0].tolist()]
        # the steps queued ahead (pipeline_depth) each write one more position, also for a row that just ended
        # or joined: the context is depth - 1 tokens shorter, so they stay inside the slot
        limit = self.max_len or (self.settings.gen_max_new_tokens + PROMPT_ALLOWANCE)
        limit -= self.settings.pipeline_depth - 1
        if len(ids) + req.params.max_new_tokens > limit:
            raise ValueError(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({req.params.max_new_tokens}) is longer than "
                f"this server's context of {limit} tokens"
            )
        if req.image is None:
            req.prepared = Prepared(ids, None, None, None, None)
            return
        pin = hf.device == "cuda"  # the copy to the GPU then does not block the model thread
        if fast is not None:
            pixel, ar_ids, ar_mask, tiles = fast(req.image, pin=pin)
            cross = image_token_mask(ids, hf.processor.image_token_id, tiles, fast.max_tiles)
            req.prepared = Prepared(ids, cross, pixel, ar_ids, ar_mask)
            return
        cross = out["cross_attention_mask"][0, :, 0, :]  # [tokens, tiles]: one image per request
        pixel = out["pixel_values"].to(hf.dtype)  # here, in the request's thread, not on the model thread
        if pin:
            pixel = pixel.pin_memory()
        req.prepared = Prepared(ids, cross, pixel, out["aspect_ratio_ids"], out["aspect_ratio_mask"])

    def _pixels_name(self) -> str:
        if self.hf.processor is None:
            return "-"
        return "the processor" if self._pixels is None else "a table of the processor's values (pixels.py)"

    @functools.cached_property
    def _pixels(self) -> FastPixels | None:
        """The processor's pixel values by pixels.py where it reproduces this processor (made at first use, once
        the processor is loaded)."""
        return FastPixels.for_processor(self.hf.processor.image_processor, self.hf.dtype)

    def add(self, req: GenRequest) -> None:
        with self._cv:
            if self._stopping:
                raise Stopped("the server is shutting down")
            if self.liveness is not None:
                self.liveness.work_arrived(was_idle=not self._waiting and not self._running)
            req.queued_at = time.monotonic()
            self._waiting.append(req)
            self._cv.notify_all()

    def abort(self, req: GenRequest) -> None:
        req.cancel_event.set()  # a running sequence leaves at the next step boundary
        with self._cv:
            try:
                self._waiting.remove(req)
            except ValueError:
                pass

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            left = list(self._waiting)
            self._waiting.clear()
            self._cv.notify_all()
        for req in left:
            _report(req, Stopped("the server shut down before this request ran"))

    # -- the step loop (model thread) --------------------------------------------------------------------

    def run_forever(self) -> None:
        stream = torch.cuda.stream(self._main_stream) if self._main_stream is not None else _no_stream()
        with torch.inference_mode(), stream:
            while True:
                with self._cv:
                    while not self._waiting and not self._running and not self._encodings and not self._stopping:
                        self._cv.wait()
                    if self._stopping and not self._running and not self._encodings:
                        return
                    with self.host.phase("admit"):
                        newcomers = self._take_newcomers()
                    while not newcomers and self._hold_s > 0 and not self._running and not self._encodings:
                        with self.host.phase("gather"):  # a burst's images are still on their way (add() wakes us)
                            self._cv.wait(self._hold_s)
                        with self.host.phase("admit"):
                            newcomers = self._take_newcomers()
                    self._admitted = len(newcomers)
                if self.step_hook is not None:
                    self.step_hook()
                try:
                    self._iterate(newcomers)
                except Exception as exc:  # noqa: BLE001 - fails the step's requests; fatal CUDA errors re-raise
                    self._admitted = 0
                    self._fail_running(exc, newcomers)
                if self.liveness is not None:
                    self.liveness.step_completed()

    def _iterate(self, newcomers: list[GenRequest]) -> None:
        """One iteration: launch a decode step for every running row (its inputs are already on the device),
        queue new images on the vision stream, then read back the PREVIOUS step's tokens while this one runs
        (stream, end, free slots), then prefill text newcomers and join encoded images (they decode from the
        next step). With ``pipeline_depth`` d the newest d steps stay queued and older ones are read back; a row
        that ended rides along in the d steps launched before its end was read; their tokens are dropped."""
        clock = self.host
        with clock.phase("launch"):
            step = self._launch_decode() if self._running else None
        images = [r for r in newcomers if r.image is not None]
        texts = [r for r in newcomers if r.image is None]
        if images:
            with clock.phase("encode"):
                self._start_encoding(images)
        self._admitted = len(texts)
        if step is not None:
            self._inflight.append(step)
        # read back all but the newest ``depth`` steps (all of them when none was launched, or step by step)
        keep = self.settings.pipeline_depth if self.pipelined and step is not None else 0
        with clock.phase("process"):
            while len(self._inflight) > keep:
                self._process(self._inflight.popleft())
        if texts:
            with clock.phase("prefill"):
                self._prefill(texts)
        self._admitted = 0
        # one chunk joins per iteration (the running rows wait for one join at most); with nothing running, wait
        encodings = self._encodings
        if encodings and (encodings[0].ready() or not self._running):
            encoding = encodings.popleft()
            with clock.phase("join"):
                self._join(encoding)
        if not self._running:
            self._inflight.clear()  # every row they carried has ended

    def _take_newcomers(self) -> list[GenRequest]:
        free = self.slots - len(self._running) - self._encoding_reqs()
        self._hold_s = self._gather_hold(free)
        taken = take_chunk(
            self._waiting, free, self.chunk_images,
            self.chunk_tokens, images_busy=self._hold_s > 0 or self._tower_busy(),
            on_cancelled=lambda req: _report(req, _cancelled_result(req)),
        )
        now = time.monotonic()
        for req in taken:
            req.taken_at = now
        return taken

    def _gather_hold(self, free: int) -> float:
        """Seconds the idle tower still holds the waiting images for a fuller first chunk (burst_gather_ms)."""
        gather_s = self.settings.burst_gather_ms / 1000
        if not gather_s or self._encodings:
            return 0.0
        images = self._waiting_images()
        if not images:
            return 0.0
        waited = time.monotonic() - (images[0].queued_at or 0.0)  # set by add() for every waiting request
        return gather_left(len(images), self.images_on_the_way(), min(self.chunk_images, free), waited, gather_s)

    def _waiting_images(self) -> list[GenRequest]:
        """The waiting requests with an image, oldest first."""
        return [r for r in list(self._waiting) if r.image is not None]

    @property
    def _vision_queue(self) -> int:
        """Image chunks the tower may hold (scheduler.vision_queue_depth)."""
        graphs = self.runner is not None and self.runner.tower_graphs is not None
        return vision_queue_depth(self.settings.vision_queue, self._lane.stream is not None, graphs)

    def _tower_busy(self) -> bool:
        """Whether image newcomers must wait before entering the vision tower. Behind a chunk already there, only
        a full chunk may queue (a burst): a partial one would only make the next arrivals wait a chunk longer
        (an H200, run 19: TTFT p50 at 32 clients 1.13 s queueing any chunk vs 0.66 s one at a time)."""
        queued = len(self._encodings)
        if not queued:
            return False
        if queued >= self._vision_queue:
            return True
        return len(self._waiting_images()) < self.chunk_images

    def _prepared(self, reqs: list[GenRequest]) -> list[GenRequest]:
        """The requests whose inputs are ready (prepared here if they came without ``prepare``: benches, tests)."""
        ok = []
        for req in reqs:
            try:
                self.prepare(req)
            except ValueError as exc:
                _report(req, EngineFailure(str(exc)))
                continue
            ok.append(req)
        return ok

    def _start_encoding(self, reqs: list[GenRequest]) -> None:
        """Vision tower + projector for image newcomers (queued on the vision lane on GPUs: returns at once)."""
        assert self.runner is not None
        reqs = self._prepared(reqs)
        if reqs:
            self._encodings.append(
                self._lane.start(self.runner.vision_states, reqs, [_newcomer(-1, r.prepared) for r in reqs])
            )

    def _join(self, encoding: Encoding) -> None:
        """Encoded image newcomers take slots: their cross K/V, prompt prefill and first token."""
        self._prefill(encoding.reqs, states=self._lane.hand_over(encoding), started=encoding.started)

    def _prefill(self, reqs: list[GenRequest], states: torch.Tensor | None = None, started: float | None = None) -> None:
        """Newcomers into slots; ``states`` = their images' vision states (all have images) if already encoded."""
        assert self.runner is not None
        t0 = time.monotonic() if started is None else started
        seqs = [self._new_sequence(req, slot=len(self._running) + i) for i, req in enumerate(self._prepared(reqs))]
        if not seqs:
            return
        rows = [_newcomer(s.slot, s.prepared) for s in seqs]
        if states is not None:
            self.runner.write_cross(rows, states)
        else:
            with_image = [r for r in rows if r.pixel_values is not None]
            if with_image:
                self.runner.encode_images(with_image)
        self.runner.set_cross_rows(rows)
        logits = self.runner.prefill(rows)
        self._running.extend(seqs)
        assert self._eos_tensor is not None
        chosen = sample_tokens(logits, [s.sampling_next() for s in seqs], self._eos_tensor)
        lengths = [len(s.prepared.input_ids) for s in seqs]
        for s, n in zip(seqs, lengths):
            s.length = n
        first = seqs[0].slot  # newcomers take the slots after the running ones: one range
        assert self._tokens_in is not None and self._positions_in is not None
        self._tokens_in[first : first + len(seqs)].copy_(chosen)
        self._positions_in[first : first + len(seqs)].copy_(torch.tensor(lengths), non_blocking=True)
        with self.host.phase("wait"):
            first_tokens = chosen.tolist()
        self._accept(seqs, [int(t) for t in first_tokens])  # the first tokens go out now (TTFT)
        took = time.monotonic() - t0
        self.prefill_s += took
        if self._state == "ready":  # not the warm-up
            self.batches += 1
            if self.on_batch is not None:
                self.on_batch(len(seqs))
            if self.on_batch_done is not None:
                self.on_batch_done(took)

    def _new_sequence(self, req: GenRequest, slot: int) -> Sequence:
        p = req.params
        generator = None
        if p.do_sample:
            generator = torch.Generator(device=self.hf.device)
            generator.manual_seed(p.seed if p.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        sampling = RowSampling(p.do_sample, p.temperature, p.top_p, generator, block_eos=p.min_new_tokens > 0)
        assert req.prepared is not None
        return Sequence(req, req.prepared, slot, IncrementalText(self.hf.processor.tokenizer), sampling,
                        self._eos_ids)

    def _launch_decode(self) -> _Step:
        """Queue one decode step and its sampling for every running row; nothing here waits for the device.

        The chosen tokens become the rows' next inputs on the device and start their copy to the host."""
        assert self.runner is not None and self._tokens_in is not None and self._positions_in is not None
        assert self._eos_tensor is not None
        t0 = time.monotonic()
        seqs = list(self._running)
        n = len(seqs)
        longest = max(s.length for s in seqs) + 1
        # the chunk in the tower (the oldest queued) first: this step starts on the device when it is done
        if self._tower_first and self._encodings:
            self.tower_holds += self._lane.hold(self._encodings[0])
        tokens_in, positions_in = self._tokens_in, self._positions_in
        if self.graphs is not None:
            rows = bucket(n, self._b_buckets)
            if rows > n:
                positions_in[n:rows].zero_()  # padding rows write into free slots at position 0
            logits = self.graphs.run(rows, bucket(longest, self._l_buckets))[:n]
        else:
            logits = self.runner.decode(tokens_in[:n], positions_in[:n], n, longest)
        chosen = sample_tokens(logits, [s.sampling_next() for s in seqs], self._eos_tensor)
        tokens_in[:n].copy_(chosen)
        positions_in[:n].add_(1)
        for s in seqs:
            s.length += 1
        if chosen.device.type == "cuda":
            host = torch.empty(n, dtype=chosen.dtype, pin_memory=True)
            host.copy_(chosen, non_blocking=True)
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record()
            return _Step(seqs, host, done, t0)
        return _Step(seqs, chosen, None, t0)

    def _process(self, step: _Step) -> None:
        """A launched step's tokens, on the host: record, stream, end; ended rows free their slots."""
        self._accept(step.seqs, step.tokens(self.host))
        self.steps += 1
        now = time.monotonic()
        self.decode_s += now - max(step.launched, self._processed_at)  # steps overlap: count each moment once
        self._processed_at = now

    def _accept(self, seqs: list[Sequence], chosen: list[int]) -> None:
        """Record each row's token and decide who goes on (here); streaming, ends and metrics go to the output
        thread as one job, so the next step can start. Rows already ended (carried by a step launched before
        their end was known) are skipped."""
        now = time.monotonic()
        batch = len(self._running)
        done: list[tuple[Sequence, FinishReason]] = []
        jobs: list[Callable[[], None]] = []
        live = [(s, token) for s, token in zip(seqs, chosen) if not s.ended]
        seqs = [s for s, _ in live]
        for s, token in live:
            if s.req.cancelled:
                done.append((s, "cancelled"))
                continue
            reason = s.record(token, now, batch)
            jobs.append(functools.partial(s.stream, token))
            if reason is None and s.length + 1 > self.max_len:
                reason = "length"
            if reason is not None:
                done.append((s, reason))
        gaps = [now - s.last_at for s in seqs if s.last_at is not None]  # since each row's previous token
        for s in seqs:
            s.last_at = now
        itl = getattr(self.metrics, "inter_token_latency", None)
        if itl is not None and gaps:
            jobs.append(functools.partial(_observe_all, itl, gaps))
        tokenizer = self.hf.processor.tokenizer
        for s, reason in done:
            jobs.append(functools.partial(_finish, s, reason, tokenizer))
        self._out.submit(run_all(jobs))
        for s, _ in done:
            s.ended = True
        if done:
            self._release({s.slot for s, _ in done})

    def _release(self, slots: set[int]) -> None:
        """Free finished slots, keeping running sequences packed at the front (the last one moves in)."""
        assert self.pools is not None
        for slot in sorted(slots, reverse=True):
            last = len(self._running) - 1
            if slot != last:
                moving = self._running[last]
                self.pools.move(last, slot, moving.length, moving.has_image)
                assert self._tokens_in is not None and self._positions_in is not None
                self._tokens_in[slot].copy_(self._tokens_in[last])  # its next input moves with it
                self._positions_in[slot].copy_(self._positions_in[last])
                moving.slot = slot
                self._running[slot] = moving
            self._running.pop()
            self.pools.vacate(last)

    def _fail_running(self, exc: Exception, newcomers: list[GenRequest]) -> None:
        """A step failed: fail the requests it touched (a fatal CUDA error propagates: the process must end)."""
        from llamactl.server.liveness import is_fatal_cuda_error

        if is_fatal_cuda_error(exc):
            raise exc
        log.exception("engine step failed; failing %d running request(s)", len(self._running))
        failure = EngineFailure(f"inference failed ({type(exc).__name__})")
        encodings = list(self._encodings)
        self._encodings.clear()
        self._inflight.clear()
        reported = set()
        for req in [*(s.req for s in self._running), *newcomers, *(r for e in encodings for r in e.reqs)]:
            if id(req) not in reported:
                reported.add(id(req))
                self._out.submit(functools.partial(_report, req, failure))  # after the text already queued
        self._running.clear()


def _compile_vision(vision: Any) -> None:
    """torch.compile each vision encoder layer (layer norms, GELU MLP, residuals fused); chunk size symbolic."""
    for stack in (vision.transformer, vision.global_transformer):
        for layer in stack.layers:
            layer.forward = torch.compile(layer.forward, dynamic=True)


def _newcomer(slot: int, p: Prepared) -> Newcomer:
    return Newcomer(slot, p.input_ids, p.cross_mask, p.pixel_values, p.aspect_ratio_ids, p.aspect_ratio_mask)


@contextlib.contextmanager
def _no_stream() -> Iterator[None]:
    yield


def _finish(s: Sequence, reason: FinishReason, tokenizer: Any) -> None:
    _report(s.req, s.finish(reason, tokenizer))


def _observe_all(histogram: Any, values: list[float]) -> None:
    for v in values:
        histogram.observe(v)


def _report(req: GenRequest, value: GenResult | BaseException) -> None:
    if req.on_finish is not None:
        req.on_finish(value)


def _cancelled_result(req: GenRequest) -> GenResult:
    n = len(req.prepared.input_ids) if req.prepared is not None else 0
    return GenResult(text="", prompt_tokens=n, completion_tokens=0, finish_reason="cancelled")
