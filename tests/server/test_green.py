"""The vision tower's SM partition (engine/continuous/green.py): its automatic share; without CUDA, a clear error."""

from __future__ import annotations

import pytest
import torch


def test_the_towers_automatic_sm_share_is_two_thirds_in_eights() -> None:
    from llamactl.server.engine.continuous.green import GreenContextError, auto_sms, sm_stream

    assert [auto_sms(n) for n in (132, 144, 78, 8)] == [88, 96, 48, 8]
    if not torch.cuda.is_available():
        with pytest.raises((GreenContextError, RuntimeError, AssertionError)):
            sm_stream(8)
