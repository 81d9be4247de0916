"""Per-row token choice inside one batch: greedy and sampled rows side by side, each with its own limits.

Greedy rows take the arg-max (as ``generate`` does with ``do_sample=False``). Sampled rows apply temperature and
top-p (nucleus: the smallest set of tokens whose probability reaches top_p; the most likely token always stays),
then draw with the row's own generator, seeded per request: the same seed gives the same answer whatever else
runs in the batch. Rows below their ``min_new_tokens`` cannot pick an end-of-sequence token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowSampling:
    do_sample: bool
    temperature: float
    top_p: float
    generator: torch.Generator | None
    block_eos: bool  # still below min_new_tokens


def sample_tokens(logits: torch.Tensor, rows: list[RowSampling], eos_ids: torch.Tensor) -> torch.Tensor:
    """logits [n, vocab] float32 (device) -> token ids [n] on the device, queued without waiting for it."""
    if any(r.block_eos for r in rows):
        blocked = torch.tensor([r.block_eos for r in rows]).to(logits.device, non_blocking=True)
        logits = logits.clone()
        logits[:, eos_ids] = logits[:, eos_ids].masked_fill(blocked[:, None], float("-inf"))
    chosen = torch.argmax(logits, dim=-1)
    sampled = [i for i, r in enumerate(rows) if r.do_sample]
    if sampled:
        chosen = chosen.clone()
        for i in sampled:
            chosen[i] = _sample_row(logits[i], rows[i])
    return chosen


def _sample_row(logits: torch.Tensor, row: RowSampling) -> torch.Tensor:
    probs = torch.softmax(logits / max(row.temperature, 1e-5), dim=-1)
    if row.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before > row.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=row.generator)[0]
