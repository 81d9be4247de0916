"""The continuous engine's choice of newcomers at a step boundary (pure: a queue in, a chunk out)."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace
from typing import Any

from llamactl.server.engine.continuous.scheduler import gather_left, take_chunk, vision_queue_depth


def req(tokens: int, image: bool = False, cancelled: bool = False) -> Any:
    return SimpleNamespace(image=object() if image else None, cancelled=cancelled,
                           prepared=SimpleNamespace(input_ids=[0] * tokens))


def take(queue: deque[Any], free: int = 8, images: int = 2, tokens: int = 100, busy: bool = False) -> list[Any]:
    return take_chunk(queue, free, images, tokens, images_busy=busy, on_cancelled=lambda r: None)


def test_a_chunk_stops_at_the_image_limit_and_keeps_the_rest_in_order() -> None:
    reqs = [req(10, image=True) for _ in range(3)] + [req(5)]
    queue = deque(reqs)
    assert take(queue) == reqs[:2]
    assert list(queue) == reqs[2:]


def test_a_chunk_stops_at_the_token_limit_but_always_takes_one() -> None:
    big, small = req(500), req(10)
    queue = deque([big, small])
    assert take(queue, tokens=100) == [big]  # alone it may exceed the chunk
    assert take(queue, tokens=100) == [small]


def test_free_slots_bound_the_chunk() -> None:
    queue = deque([req(1) for _ in range(5)])
    assert len(take(queue, free=3)) == 3
    assert len(queue) == 2
    assert take(queue, free=0) == []


def test_images_wait_while_the_tower_is_busy_and_the_queue_keeps_its_order() -> None:
    text1, image, text2 = req(5), req(5, image=True), req(5)
    queue = deque([text1, image, text2])
    assert take(queue, busy=True) == [text1]
    assert list(queue) == [image, text2]
    assert take(queue, busy=False) == [image, text2]


def test_cancelled_requests_at_the_head_are_reported_and_dropped() -> None:
    gone, kept = req(5, cancelled=True), req(5)
    reported: list[Any] = []
    queue = deque([gone, kept])
    assert take_chunk(queue, 4, 2, 100, images_busy=False, on_cancelled=reported.append) == [kept]
    assert reported == [gone]


def test_vision_queue_depth_is_two_only_for_a_graphed_tower_on_a_gpu_unless_set() -> None:
    assert vision_queue_depth(0, on_gpu=True, tower_graphs=True) == 2
    assert vision_queue_depth(0, on_gpu=True, tower_graphs=False) == 1
    assert vision_queue_depth(3, on_gpu=True, tower_graphs=False) == 3
    assert vision_queue_depth(1, on_gpu=True, tower_graphs=True) == 1
    # the CPU's tower runs at once and its chunk joins in the same iteration: nothing to queue behind
    assert vision_queue_depth(0, on_gpu=False, tower_graphs=True) == 1
    assert vision_queue_depth(4, on_gpu=False, tower_graphs=False) == 1


def test_the_tower_runs_eagerly_with_the_queue_chosen_by_default() -> None:
    from llamactl.server.settings import Settings

    fields = Settings.model_fields
    assert fields["vision_graphs"].default is False and fields["vision_queue"].default == 0
    assert vision_queue_depth(fields["vision_queue"].default, on_gpu=True, tower_graphs=False) == 1


def test_an_idle_tower_holds_only_while_a_bursts_images_can_fill_its_chunk() -> None:
    # 2 waiting, 6 being prepared, chunks of 8, the oldest waited 10 ms of 50: hold 40 ms more
    assert abs(gather_left(2, 6, 8, 0.010, 0.050) - 0.040) < 1e-9
    assert gather_left(2, 5, 8, 0.010, 0.050) == 0.0  # not enough on its way to fill the chunk
    assert gather_left(8, 9, 8, 0.010, 0.050) == 0.0  # a full chunk is waiting: go
    assert gather_left(0, 9, 8, 0.010, 0.050) == 0.0  # nothing waiting, nothing to hold
    assert gather_left(2, 6, 8, 0.060, 0.050) == 0.0  # held long enough
    assert gather_left(2, 6, 8, 0.010, 0.0) == 0.0  # the setting off (the default)
    assert gather_left(1, 30, 1, 0.0, 0.050) == 0.0  # chunks of one (or one free slot) are always full


def test_burst_gathering_is_off_by_default() -> None:
    from llamactl.server.settings import Settings

    assert Settings.model_fields["burst_gather_ms"].default == 0
