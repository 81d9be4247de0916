"""The engine seam: what the HTTP layer and the batcher need from a model, and nothing more.

A faster GPU engine (continuous batching, CUDA graphs) can replace the HF ``generate`` engine by implementing
``Engine``; the batcher and the routes only see ``GenRequest``/``GenResult``. Every ``Engine`` method except
``state``/``error``/``gpu_memory``/``render_prompt`` runs on the model thread only.
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


@dataclass(frozen=True)
class GenParams:
    """Generation parameters. Requests with equal ``batch_key`` can share one generate call."""

    max_new_tokens: int
    temperature: float = 0.6
    top_p: float = 0.9
    do_sample: bool = False
    min_new_tokens: int = 0  # > 0 suppresses end-of-sequence until then (fixed-length benchmarks)

    @property
    def batch_key(self) -> tuple[Any, ...]:
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
        }


@dataclass
class GenRequest:
    """One sequence to generate. ``prompt`` is the rendered chat template text."""

    prompt: str
    image: Image | None
    params: GenParams
    # Called on the model thread with each new piece of decoded text (streaming).
    on_text: Callable[[str], None] | None = None
    # Called on the model thread as soon as this sequence is done, possibly before the rest of its batch.
    on_finish: Callable[[GenResult], None] | None = None
    deadline: float | None = None  # time.monotonic() value
    cancel_event: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)

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
    batch_size: int = 1


class Engine(Protocol):
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
