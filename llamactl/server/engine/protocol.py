"""The engine seam: what the HTTP layer needs from whatever generates tokens, and nothing more.

Two levels:
- ``ServingEngine`` is what admission talks to: per-request ``add`` (thread-safe), ``abort``, and a step loop
  (``run_forever`` on the model thread) that reports each request through its own callbacks (``on_text`` with new
  text, ``on_finish`` with the result, timestamps and token counts). The engine owns scheduling: who runs each
  step, when newcomers join, when memory allows it.
- ``Engine`` is the model-level interface of the transformers engine (load, warm up, one batched ``generate``);
  ``llamactl.server.engine.static`` turns it into a ``ServingEngine`` with windowed static batches.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from PIL.Image import Image

EngineState = Literal["loading", "ready", "failed"]
FinishReason = Literal["stop", "length", "cancelled"]


class Stopped(Exception):
    """The engine is shutting down and did not run this request."""


class EngineFailure(Exception):
    """The engine could not run this request (its message is safe to show to the client)."""


@dataclass(frozen=True)
class GenParams:
    """Generation parameters of one request (every engine honours them per row)."""

    max_new_tokens: int
    temperature: float = 0.6
    top_p: float = 0.9
    do_sample: bool = False
    min_new_tokens: int = 0  # > 0 suppresses end-of-sequence until then (fixed-length benchmarks)
    seed: int | None = None  # sampled requests with a seed are reproducible (continuous engine)

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one HF ``generate`` call (the static engine's constraint)."""
        # max_new_tokens is per sequence (enforced by the engine's per-row stopping), so it is not part of the key.
        if not self.do_sample:
            return (False, self.min_new_tokens)
        return (True, self.temperature, self.top_p, self.min_new_tokens)

    def cache_dict(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "temperature": self.temperature if self.do_sample else None,
            "top_p": self.top_p if self.do_sample else None,
            "min_new_tokens": self.min_new_tokens,
            "seed": self.seed if self.do_sample else None,
        }


@dataclass
class GenRequest:
    """One sequence to generate. ``prompt`` is the rendered chat template text."""

    prompt: str
    image: Image | None
    params: GenParams
    # Called on the model thread with each new piece of decoded text (streaming).
    on_text: Callable[[str], None] | None = None
    # Called on the model thread as soon as this sequence is done (a result, or the exception that ended it).
    on_finish: Callable[[GenResult | BaseException], None] | None = None
    deadline: float | None = None  # time.monotonic() value
    cancel_event: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    queued_at: float | None = None  # time.monotonic() when handed to the engine (``add``: after its preparation)
    taken_at: float | None = None  # when the engine took it from its queue (into the vision tower, a prefill, a batch)
    # Engine-specific preprocessed inputs (token ids, pixel tensors), filled by ``ServingEngine.prepare``.
    prepared: Any = None

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set() or (self.deadline is not None and time.monotonic() > self.deadline)


@dataclass(frozen=True)
class GenResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    first_token_at: float | None = None  # time.monotonic() when the first token came out
    batch_size: int = 1  # rows decoding together when this request's first token came out
    finished_at: float | None = None  # time.monotonic() when the last token came out
    started_at: float | None = None  # time.monotonic() when the engine began its prefill (left the queue)


class EngineStatus:
    """The state an engine reports: loading, then ready or failed (with the reason). Reads from any thread."""

    def __init__(self) -> None:
        self._state: EngineState = "loading"
        self._error: str | None = None

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def error(self) -> str | None:
        return self._error


class Engine(Protocol):
    """The model-level interface of the transformers engine. Every method except ``state``/``error``/
    ``gpu_memory``/``render_prompt`` runs on the model thread only."""

    model_name: str

    @property
    def state(self) -> EngineState: ...

    @property
    def error(self) -> str | None: ...

    def load(self) -> None:
        """Load weights and processor; sets state to ready or failed (after warmup)."""

    def warmup(self) -> None:
        """Run one tiny inference so the first user request does not pay for lazy initialisation."""

    def render_prompt(self, messages: list[dict[str, Any]]) -> str:
        """Chat messages (HF format, ``{"type": "image"}`` placeholders) -> prompt text. Thread-safe.

        Raises ``ValueError`` with a user-facing message when the template rejects the conversation.
        """

    def generate_batch(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """Generate every request in ONE batched call; results in request order. Model thread only."""

    def gpu_memory(self) -> tuple[int, int] | None:
        """(used_bytes, total_bytes) of the device, or None without a GPU."""

    def close(self) -> None:
        """Release the model."""


class ServingEngine(Protocol):
    """What admission (``llamactl.server.admission``) needs: per-request add/abort and a step loop.

    ``add``/``abort``/``prepare`` and the read-only properties are thread-safe; ``start`` and ``run_forever`` run
    on the model thread. Every request added ends with exactly one ``on_finish`` call (a ``GenResult``, or an
    exception for a request the engine could not run), except after ``abort``, which may skip it.
    """

    name: str
    model_name: str

    @property
    def state(self) -> EngineState: ...

    @property
    def error(self) -> str | None: ...

    @property
    def waiting(self) -> int:
        """Requests added but not yet running (queued, or waiting for memory)."""

    @property
    def running(self) -> int:
        """Requests being generated now."""

    def start(self) -> None:
        """Load, allocate and warm up (model thread). Raises on failure."""

    def prepare(self, req: GenRequest) -> None:
        """Optional CPU work for one request before ``add`` (tokenise, image tensors); any thread, may be slow.

        Raises ``ValueError`` with a user-facing message when the request cannot run on this engine (too long).
        """

    def add(self, req: GenRequest) -> None: ...

    def abort(self, req: GenRequest) -> None: ...

    def run_forever(self) -> None:
        """Step until ``stop``; model thread."""

    def stop(self) -> None:
        """Stop taking work; fail what is waiting with ``Stopped``; running requests finish or are cancelled."""

    def render_prompt(self, messages: list[dict[str, Any]]) -> str: ...

    def gpu_memory(self) -> tuple[int, int] | None: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...
