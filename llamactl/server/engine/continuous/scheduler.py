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


def gather_left(waiting_images: int, images_on_the_way: int, chunk_images: int, oldest_wait_s: float,
                gather_s: float) -> float:
    """Seconds an idle vision tower should still hold its waiting images for a fuller chunk (settings.
    burst_gather_ms), else 0. Only in a burst: fewer than a chunk waiting, but enough still on their way (being
    decoded or prepared in the server's image threads) to fill one. Launching the first ready image alone there
    costs the rest a whole tower pass and join (an H200, 32 clients at once: first tokens in groups of 1, 8, 8, 8
    and 7, one group a chunk, the last 1.72 s after the first send; bench/results/engine_bench_run56_h200.json).
    A steady trickle never holds: a chunk's worth is rarely on its way at once. Bounded by ``gather_s`` from the
    oldest waiting image's arrival."""
    if gather_s <= 0 or not 0 < waiting_images < chunk_images:
        return 0.0
    if waiting_images + images_on_the_way < chunk_images:
        return 0.0
    return max(0.0, gather_s - oldest_wait_s)


def vision_queue_depth(setting: int, on_gpu: bool, tower_graphs: bool) -> int:
    """Image chunks the vision tower may hold (settings.vision_queue). One on the CPU, where the tower runs at
    once and its chunk joins in the same iteration; on GPUs the setting, or with 0 two when the tower runs as
    CUDA graphs (a replay runs on while the model thread launches the previous chunk's join), else one."""
    if not on_gpu:
        return 1
    if setting:
        return setting
    return 2 if tower_graphs else 1
