"""The transformers engine: AutoProcessor + AutoModelForImageTextToText and one batched ``generate`` per batch.

Per-row stopping is done by a stopping criterion that sees every new token: it enforces each request's own
``max_new_tokens``, stops rows whose client went away or whose deadline passed, streams decoded text, and
reports a row's result the moment it is done rather than when the whole batch is.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from llamactl.server.engine.detok import IncrementalText
from llamactl.server.engine.protocol import (
    EngineStatus,
    FinishReason,
    GenParams,
    GenRequest,
    GenResult,
)
from llamactl.server.settings import Settings

if TYPE_CHECKING:
    import torch

log = logging.getLogger("llamactl.server.engine")

_WARMUP_MESSAGES: list[dict[str, Any]] = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}
]


PROMPT_ALLOWANCE = 1024  # prompt tokens a request may bring beyond the longest answer the server allows


def context_limit(settings: Settings, model: Any) -> int:
    """The most tokens (prompt + answer) one request may take: the server's longest answer plus a prompt
    allowance, within the model's positions. Both engines refuse longer requests with a 400 before any work."""
    positions = int(model.config.get_text_config().max_position_embeddings)
    return min(positions, settings.gen_max_new_tokens + PROMPT_ALLOWANCE)


class HFEngine(EngineStatus):
    def __init__(self, settings: Settings, threads: int | None = None, pillow_images: bool = False) -> None:
        self.settings = settings
        self.threads = threads  # torch intra-op threads (the process's CPU budget); None = torch's default
        # the continuous engine's: Pillow's image processor even where torchvision is installed (_pillow_image_processor);
        # this engine otherwise keeps transformers' choice, whose torchvision backend it may run on the GPU
        self.pillow_images = pillow_images
        self.model_name = settings.model
        super().__init__()
        self._lock = threading.Lock()  # guards state/error only
        self.model: Any = None
        self.processor: Any = None
        self.device = "cpu"
        self.dtype: Any = None
        self._eos_ids: frozenset[int] = frozenset()
        self._pad_id = 0
        self._image_device: str | None = None  # where the image processor runs; set by warmup
        self.prepare_s_total = 0.0  # time spent in the processor (tokenise + images) before generate
        self.progress_hook: Callable[[], None] | None = None  # called once per decode step (stall detection)

    def fail(self, message: str) -> None:
        with self._lock:
            self._state, self._error = "failed", message

    # -- lifetime ----------------------------------------------------------------------------------------

    def load(self) -> None:
        import torch
        import transformers

        tf: Any = transformers  # untyped library: keep mypy's strictness for our own code
        s = self.settings
        if self.threads:
            torch.set_num_threads(self.threads)
        self.device = _resolve_device(s.device)
        self.dtype = _resolve_dtype(s.dtype, self.device)
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if s.revision:
            kwargs["revision"] = s.revision
        has_accelerate = importlib.util.find_spec("accelerate") is not None
        if s.quantization in ("nf4", "int8"):  # fp8 is the continuous engine's own, over the loaded weights
            # bitsandbytes needs accelerate, and its models cannot be moved with .to() after loading.
            if not has_accelerate:
                raise RuntimeError(f"quantization {s.quantization} needs the accelerate package installed")
            from llamactl.server.quant_support import skip_modules

            skip = skip_modules(s.quantization, self.device, s.model, s.revision)  # layers the kernels can't take
            kwargs["quantization_config"] = _bnb_config(s.quantization, self.dtype, skip)
        if has_accelerate:  # load straight onto the device (no full staging copy in host memory)
            kwargs["device_map"] = {"": self.device}
        if self.device == "cuda":
            # Batched rows carry a padding mask, which sends SDPA to cuDNN on Hopper; cuDNN builds a plan for
            # every new shape and every decode step has a new key length. Measured on an H100 (bench/results/
            # multi_gpu.md): a cold 128-token batch took 70-90 s at ~5% GPU use with cuDNN, ~3 s without.
            import torch

            torch.backends.cuda.enable_cudnn_sdp(False)
        t0 = time.monotonic()
        revision = {"revision": s.revision} if s.revision else {}
        images = _pillow_image_processor(tf, s.model, revision) if self.pillow_images else {}
        self.processor = tf.AutoProcessor.from_pretrained(s.model, **images, **revision)
        model = tf.AutoModelForImageTextToText.from_pretrained(s.model, **kwargs)
        if not has_accelerate:
            model = model.to(self.device)
        model.eval()
        self.model = model
        tok = self.processor.tokenizer
        tok.padding_side = "left"  # decoder-only batching: prompts must end at the same position
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self._pad_id = int(tok.pad_token_id)
        self._eos_ids = _eos_ids(model, tok)
        log.info("loaded %s on %s (%s) in %.1fs", s.model, self.device, self.dtype, time.monotonic() - t0)
        del torch

    def warmup(self) -> None:
        from PIL import Image

        req = GenRequest(
            prompt=self.render_prompt(_WARMUP_MESSAGES),
            image=Image.new("RGB", (64, 64), (120, 130, 140)),
            params=GenParams(max_new_tokens=2),
        )
        self._image_device = self._probe_image_device(req)
        self.generate_batch([req])
        with self._lock:
            if self._state == "loading":
                self._state = "ready"

    def _probe_image_device(self, req: GenRequest) -> str:
        """Run the image processor on the GPU when it can (the torchvision backend takes ``device=``).

        On the CPU, resizing, normalising and tiling a batch of 32 four-tile images makes ~0.5 GB of float32
        per batch while the GPU waits, and every server on a multi-GPU host does it at once. The PIL backend
        ignores ``device``; its output then stays on the CPU and the probe says so.
        """
        if self.device != "cuda":
            return "cpu"
        try:
            out = self.processor(images=[[req.image]], text=[req.prompt], add_special_tokens=False,
                                 return_tensors="pt", device=self.device)
        except Exception as exc:  # noqa: BLE001 - any failure here only means: keep the CPU path
            log.warning("image processor cannot run on %s (%s: %s); it stays on the CPU",
                        self.device, type(exc).__name__, exc)
            return "cpu"
        where = str(out["pixel_values"].device.type)
        log.info("image processor %s runs on %s", type(self.processor.image_processor).__name__, where)
        return where

    def describe(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch.") if self.dtype is not None else None,
            "image_processor": None if self.processor is None else type(self.processor.image_processor).__name__,
            "image_preprocessing_on": self._image_device,
            "threads": self.threads,
            "prepare_s_total": round(self.prepare_s_total, 3),
        }

    def close(self) -> None:
        self.model = None
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def gpu_memory(self) -> tuple[int, int] | None:
        if self.device != "cuda":
            return None
        import torch

        free, total = torch.cuda.mem_get_info()
        return int(total - free), int(total)

    # -- inference ---------------------------------------------------------------------------------------

    def check_length(self, req: GenRequest) -> None:
        """Raise ValueError (a 400) when the prompt plus max_new_tokens is beyond ``context_limit``."""
        if self.processor is None or self.model is None:
            raise ValueError("the model is not loaded yet")
        tokens = len(self.processor.tokenizer(req.prompt, add_special_tokens=False)["input_ids"])
        limit = context_limit(self.settings, self.model)
        if tokens + req.params.max_new_tokens > limit:
            raise ValueError(
                f"the prompt ({tokens} tokens) plus max_tokens ({req.params.max_new_tokens}) is longer than "
                f"this server's context of {limit} tokens"
            )

    def render_prompt(self, messages: list[dict[str, Any]]) -> str:
        if self.processor is None:
            raise RuntimeError("the model is not loaded")
        try:
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja's TemplateError carries the template's own user-facing message
            if type(exc).__name__ in ("TemplateError", "TemplateSyntaxError", "UndefinedError"):
                raise ValueError(f"the model's chat template rejected the messages: {exc}") from None
            raise
        return str(text)

    def generate_batch(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        import torch
        from transformers import StoppingCriteriaList

        rows = list(requests)
        t0 = time.monotonic()
        with_image = rows[0].image is not None
        extra: dict[str, Any] = {"device": self.device} if with_image and self._image_device == "cuda" else {}
        inputs = self.processor(
            images=[[r.image] for r in rows] if with_image else None,
            text=[r.prompt for r in rows],
            padding=True,
            add_special_tokens=False,  # the chat template already starts with <|begin_of_text|>
            return_tensors="pt",
            **extra,
        )
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        prompt_lens = [int(n) for n in inputs["attention_mask"].sum(dim=1).tolist()]
        self.prepare_s_total += time.monotonic() - t0
        tracker = _RowTracker(rows, prompt_lens, self._eos_ids, self.processor.tokenizer, self.progress_hook)
        p = rows[0].params
        gen: dict[str, Any] = {
            "max_new_tokens": max(r.params.max_new_tokens for r in rows),
            "do_sample": p.do_sample,
            "pad_token_id": self._pad_id,
            "stopping_criteria": StoppingCriteriaList([tracker]),
        }
        if p.do_sample:
            gen.update(temperature=max(p.temperature, 1e-5), top_p=p.top_p, top_k=0)
        else:  # neutralise sampling defaults from the checkpoint's generation_config (avoids warnings)
            gen.update(temperature=1.0, top_p=1.0, top_k=50)
        if p.min_new_tokens:
            gen["min_new_tokens"] = p.min_new_tokens
        with torch.inference_mode():
            self.model.generate(**inputs, **gen)
        return tracker.finish_all()


class _RowTracker:
    """A stopping criterion that tracks every row: tokens, streaming text, its own limits, early results."""

    def __init__(
        self,
        rows: list[GenRequest],
        prompt_lens: list[int],
        eos: frozenset[int],
        tok: Any,
        on_step: Callable[[], None] | None = None,
    ) -> None:
        self.rows, self.prompt_lens, self.eos, self.tok, self.on_step = rows, prompt_lens, eos, tok, on_step
        n = len(rows)
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.texts = [IncrementalText(tok) for _ in range(n)]
        self.results: list[GenResult | None] = [None] * n
        self.first_at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        import torch

        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
        if self.on_step is not None:
            self.on_step()
        last = input_ids[:, -1].tolist()
        done = []
        for i, row in enumerate(self.rows):
            if self.results[i] is None:
                self._step(i, row, int(last[i]))
            done.append(self.results[i] is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _step(self, i: int, row: GenRequest, token: int) -> None:
        if row.cancelled:
            self._finish(i, "cancelled")
            return
        self.tokens[i].append(token)
        if token in self.eos:
            self._finish(i, "stop")
            return
        piece = self.texts[i].push(token)
        if piece and row.on_text is not None:
            row.on_text(piece)
        if len(self.tokens[i]) >= row.params.max_new_tokens:
            self._finish(i, "length")

    def _finish(self, i: int, reason: FinishReason) -> None:
        row, toks = self.rows[i], self.tokens[i]
        text = self.tok.decode([t for t in toks if t not in self.eos], skip_special_tokens=True)
        tail = self.texts[i].final(text)
        if row.on_text is not None and reason != "cancelled" and tail:
            row.on_text(tail)
        result = GenResult(
            text=text,
            prompt_tokens=self.prompt_lens[i],
            completion_tokens=len(toks),
            finish_reason=reason,
            first_token_at=self.first_at,
            batch_size=len(self.rows),
            finished_at=time.monotonic(),
        )
        self.results[i] = result
        if row.on_finish is not None:
            row.on_finish(result)

    def finish_all(self) -> list[GenResult]:
        for i, row in enumerate(self.rows):
            if self.results[i] is None:  # generate stopped for everyone (global max reached)
                self._finish(i, "cancelled" if row.cancelled else "length")
        return [r for r in self.results if r is not None]


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device is cuda but no CUDA device is visible (check CUDA_VISIBLE_DEVICES and drivers)"
        )
    return device


def _resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":  # the checkpoint is stored in fp32: never let it load as-is on a GPU
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


def _bnb_config(quantization: str, dtype: Any, skip: list[str] | None) -> Any:
    """``skip``: modules kept unquantized (llamactl.server.quant_support decides; None = transformers')."""
    import transformers

    BitsAndBytesConfig: Any = transformers.BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def _pillow_image_processor(tf: Any, model: str, revision: dict[str, str]) -> dict[str, Any]:
    """``{"image_processor": ...}``: the checkpoint's image processor with Pillow's backend, also where torchvision
    is installed (transformers would take it there, as on the GPU test machines; deployments never install it).
    Every continuous-engine host then makes the same pixel values (the backends resize differently), and its
    table pixels (pixels.py: 3x less CPU a request, mostly outside the GIL the step loop needs) apply. Empty (the
    processor's own choice) for a checkpoint without a Pillow variant. Passed as the processor's component: a
    ``backend`` argument to AutoProcessor would reach its tokenizer too."""
    try:
        return {"image_processor": tf.AutoImageProcessor.from_pretrained(model, backend="pil", **revision)}
    except Exception as exc:  # noqa: BLE001 - any checkpoint without one keeps the processor's default
        log.info("image processor: the checkpoint's default backend (no Pillow variant: %s)", exc)
        return {}


def _eos_ids(model: Any, tok: Any) -> frozenset[int]:
    ids: set[int] = set()
    cfg_eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(cfg_eos, int):
        ids.add(cfg_eos)
    elif cfg_eos:
        ids.update(int(x) for x in cfg_eos)
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    for name in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"):
        tid = tok.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid >= 0:
            ids.add(tid)
    return frozenset(ids)
