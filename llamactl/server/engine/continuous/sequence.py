"""One request inside the continuous engine: its prepared inputs, its slot, its tokens and its text so far."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from llamactl.server.engine.continuous.sampler import RowSampling
from llamactl.server.engine.detok import IncrementalText
from llamactl.server.engine.protocol import FinishReason, GenRequest, GenResult


@dataclass
class Prepared:
    """The processor's output for one request (CPU tensors), made before it reaches the model thread."""

    input_ids: list[int]
    cross_mask: torch.Tensor | None  # [prompt_len, tiles]
    pixel_values: torch.Tensor | None
    aspect_ratio_ids: torch.Tensor | None
    aspect_ratio_mask: torch.Tensor | None


@dataclass
class Sequence:
    req: GenRequest
    prepared: Prepared
    slot: int
    text: IncrementalText
    sampling: RowSampling
    eos: frozenset[int]
    started_at: float = field(default_factory=time.monotonic)
    length: int = 0  # tokens whose K/V are in the slot or queued to it (the position the next step writes)
    sampled: int = 0  # tokens chosen on the device, read back or not (``tokens`` lags by the step in flight)
    ended: bool = False  # its end is decided; a step launched before that still carries the row (ignored)
    tokens: list[int] = field(default_factory=list)
    first_at: float | None = None
    last_at: float | None = None  # when its previous token came out (inter-token latency)
    batch_at_first: int = 1
    result: GenResult | None = None

    @property
    def has_image(self) -> bool:
        return self.prepared.cross_mask is not None

    def sampling_next(self) -> RowSampling:
        """The row's sampling for the token about to be chosen (end-of-sequence blocked below min_new_tokens)."""
        self.sampling.block_eos = self.sampled < self.req.params.min_new_tokens
        self.sampled += 1
        return self.sampling

    def record(self, token: int, now: float, batch: int) -> FinishReason | None:
        """Record a sampled token (model thread, cheap): return why the sequence ends, or None to go on."""
        if self.first_at is None:
            self.first_at, self.batch_at_first = now, batch
        self.tokens.append(token)
        params = self.req.params
        if token in self.eos:
            return "stop"
        if len(self.tokens) >= params.max_new_tokens:
            return "length"
        return None

    def stream(self, token: int) -> None:
        """Detokenize one recorded token and send its text on (output thread, in token order)."""
        if token in self.eos:
            return
        piece = self.text.push(token)
        if piece and self.req.on_text is not None:
            self.req.on_text(piece)

    def finish(self, reason: FinishReason, tokenizer: Any) -> GenResult:
        text = tokenizer.decode([t for t in self.tokens if t not in self.eos], skip_special_tokens=True)
        tail = self.text.final(text)
        if tail and reason != "cancelled" and self.req.on_text is not None:
            self.req.on_text(tail)
        self.result = GenResult(
            text=text,
            prompt_tokens=len(self.prepared.input_ids),
            completion_tokens=len(self.tokens),
            finish_reason=reason,
            first_token_at=self.first_at,
            batch_size=self.batch_at_first,
            finished_at=time.monotonic(),
            started_at=self.started_at,
        )
        return self.result
