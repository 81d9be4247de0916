"""Which CUDA priority each kind of the continuous engine's GPU work gets per settings.vision_priority (pure: the
engine creates its streams and graph capture streams from it; CUDA serves a lower number first)."""

from __future__ import annotations

import pytest

from llamactl.server.engine.continuous.encoding import stream_priorities


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


def test_an_unknown_value_is_refused() -> None:
    with pytest.raises(ValueError, match="expected equal, low or high"):
        stream_priorities("first")


def test_the_default_setting_is_equal() -> None:
    from llamactl.server.settings import Settings

    assert Settings.model_fields["vision_priority"].default == "equal"
