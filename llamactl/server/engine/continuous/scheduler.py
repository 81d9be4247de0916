"""Who joins the running batch at this step boundary: one bounded chunk of the waiting queue, in order.

A chunk holds at most ``chunk_images`` images and ``chunk_tokens`` prompt tokens (at least one request), so the
running sequences wait for at most one chunk's prefill between two of their tokens. Requests take free slots
only. Image requests wait while the vision tower's queue of chunks is full (``images_busy``); the queue keeps
its order, so a text request behind a waiting image waits too. Cancelled requests found at the head
leave the queue and are reported.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from llamactl.server.engine.protocol import GenRequest


def take_chunk(
    waiting: deque[GenRequest], free: int, chunk_images: int, chunk_tokens: int, images_busy: bool,
    on_cancelled: Callable[[GenRequest], None],
) -> list[GenRequest]:
    taken: list[GenRequest] = []
    images = tokens = 0
    while waiting and len(taken) < free:
        req = waiting[0]
        if req.cancelled:
            waiting.popleft()
            on_cancelled(req)
            continue
        has_image = req.image is not None
        if has_image and images_busy:
            break
        n_tokens = len(req.prepared.input_ids) if req.prepared is not None else 0
        if taken and (images + has_image > chunk_images or tokens + n_tokens > chunk_tokens):
            break
        waiting.popleft()
        taken.append(req)
        images += has_image
        tokens += n_tokens
    return taken


def vision_queue_depth(setting: int, on_gpu: bool, tower_graphs: bool) -> int:
    """Image chunks the vision tower may hold (settings.vision_queue). One on the CPU, where the tower runs at
    once and its chunk joins in the same iteration; on GPUs the setting, or with 0 two when the tower runs as
    CUDA graphs (a replay runs on while the model thread launches the previous chunk's join), else one."""
    if not on_gpu:
        return 1
    if setting:
        return setting
    return 2 if tower_graphs else 1
