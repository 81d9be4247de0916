"""The processor's work for image requests (tokens, tiles, pixel values) in worker processes, off the server's
interpreter.

Why: measured on an H200 with 32 clients sending straight into the engine (bench/results/
engine_timeline_run3_h200.json, one call): processing each request's image in a thread of the serving process
when it arrives, as the server did, gave 1,159 tok/s and TTFT p95 2.26 s, against 1,301 tok/s and 1.34 s for the
same requests processed beforehand. The processor's Python code holds the interpreter lock that the step loop
needs between its GPU steps; in worker processes it runs beside the loop instead.

Each worker loads the model's processor once (spawned, not forked: the server has CUDA state). A request's
thread sends the image and prompt and waits for the result; what comes back is what ``prepare`` used to compute.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
import os
from typing import Any

log = logging.getLogger("llamactl.server.engine")

_processor: Any = None  # the worker process's own processor


def _load(model: str, revision: str | None) -> None:
    global _processor
    import torch
    from transformers import AutoProcessor

    torch.set_num_threads(1)  # several workers beside the server: no thread pools fighting for cores
    _processor = AutoProcessor.from_pretrained(model, **({"revision": revision} if revision else {}))


def process(image: Any, prompt: str, dtype: str) -> tuple[list[int], Any, Any, Any, Any]:
    """In a worker: prompt ids, the prompt's cross-attention mask [tokens, tiles], pixel values in ``dtype``,
    aspect-ratio ids and mask (as ``ContinuousEngine.prepare`` computes them in-process)."""
    import torch

    out = _processor(images=[[image]], text=[prompt], add_special_tokens=False, return_tensors="pt")
    ids = [int(t) for t in out["input_ids"][0].tolist()]
    pixel = out["pixel_values"].to(getattr(torch, dtype))
    return ids, out["cross_attention_mask"][0, :, 0, :], pixel, out["aspect_ratio_ids"], out["aspect_ratio_mask"]


def auto_workers(device: str) -> int:
    """How many workers ``image_workers`` -1 means: on GPUs half the CPUs (at most 8); on the CPU none (the
    model itself needs the cores there)."""
    if device != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class ImageWorkers:
    """A pool of processor processes; ``process`` blocks the calling (request) thread, not the interpreter."""

    def __init__(self, workers: int, model: str, revision: str | None) -> None:
        self.workers = workers
        self._pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_load,
                                            initargs=(model, revision))

    def warm(self, image: Any, prompt: str, dtype: str) -> None:
        """Start every worker (each loads the processor) and process one image in each; raises what they raise."""
        for future in [self._pool.submit(process, image, prompt, dtype) for _ in range(self.workers)]:
            future.result()

    def process(self, image: Any, prompt: str, dtype: str) -> tuple[list[int], Any, Any, Any, Any]:
        return self._pool.submit(process, image, prompt, dtype).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
