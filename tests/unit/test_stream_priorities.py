"""Which CUDA priority each kind of the continuous engine's GPU work gets per settings.vision_priority (pure: the
engine creates its streams and graph capture streams from it; CUDA serves a lower number first)."""

from __future__ import annotations

import pytest
import torch

from llamactl.server.engine.continuous.encoding import (
    Encoding,
    VisionLane,
    decode_waits_for_tower,
    stream_priorities,
)


def test_equal_is_what_the_engine_did_before_the_setting_meant_it() -> None:
    # the decode graphs on torch.cuda.graph's default capture stream (priority 0, the tower's), the joins first
    p = stream_priorities("equal")
    assert (p.main, p.lane, p.decode_graphs, p.tower_graphs) == (-1, 0, None, 0)


def test_low_captures_the_decode_graphs_above_the_tower() -> None:
    p = stream_priorities("low")
    assert p.decode_graphs is not None and p.decode_graphs < p.tower_graphs and p.decode_graphs < p.lane
    assert p.main < p.lane


def test_high_puts_the_tower_and_its_graphs_first() -> None:
    p = stream_priorities("high")
    assert p.lane < p.main and p.tower_graphs < (p.decode_graphs or 0) and p.tower_graphs == p.lane


def test_first_keeps_equals_priorities_and_orders_by_a_wait_instead() -> None:
    assert stream_priorities("first") == stream_priorities("equal")
    assert [decode_waits_for_tower(s) for s in ("equal", "low", "high", "first")] == [False, False, False, True]


class _Event:
    def __init__(self, done: bool) -> None:
        self.done = done

    def query(self) -> bool:
        return self.done


class _Stream:
    def __init__(self) -> None:
        self.waited: list[object] = []

    def wait_event(self, event: object) -> None:
        self.waited.append(event)


def test_a_hold_makes_the_stream_wait_only_for_a_tower_still_running() -> None:
    running, finished = _Event(False), _Event(True)
    lane, stream = VisionLane(stream="the tower's stream"), _Stream()
    assert lane.hold(Encoding([], torch.zeros(1), running, 0.0), stream) is True
    assert lane.hold(Encoding([], torch.zeros(1), finished, 0.0), stream) is False
    assert stream.waited == [running]
    # the CPU's tower runs at once, on the loop's thread: nothing to wait for
    assert VisionLane().hold(Encoding([], torch.zeros(1), None, 0.0), stream) is False
    assert stream.waited == [running]


def test_an_unknown_value_is_refused() -> None:
    with pytest.raises(ValueError, match="expected equal, low, high or first"):
        stream_priorities("last")


def test_the_default_setting_is_equal() -> None:
    from llamactl.server.settings import Settings

    assert Settings.model_fields["vision_priority"].default == "equal"
