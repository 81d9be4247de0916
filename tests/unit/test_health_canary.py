"""The canary image and the staged-answer check (pure)."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image

from llamactl.health import canary


def test_pillow_and_hand_built_pngs_decode_to_the_same_pixels() -> None:
    by_pillow = Image.open(io.BytesIO(canary.canary_png()))
    by_hand = Image.open(io.BytesIO(canary._png_by_hand(canary.SIZE)))
    by_hand.load()  # verifies chunk CRCs and the zlib stream
    assert by_pillow.size == by_hand.size == (canary.SIZE, canary.SIZE)
    assert by_hand.mode == "RGB"
    assert by_pillow.convert("RGB").tobytes() == by_hand.tobytes()
    assert by_hand.getpixel((5, 60)) == canary.COLOUR


def good() -> dict[str, Any]:
    return {
        "result": {"summary": "s", "caption": "c", "reasoning": ["a", "b"], "conclusion": " It is red. "},
        "full_response": "...",
    }


def test_well_formed_answer_passes() -> None:
    assert canary.check_answer(good()) == (None, "It is red.", 2)


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda b: b.pop("result"), "answer has no `result` object"),
        (lambda b: b["result"].update(caption=None), "result.caption is not a string"),
        (lambda b: b["result"].update(reasoning="one step"), "result.reasoning is not a list of strings"),
        (lambda b: b["result"].update(conclusion="  "), "the answer has no conclusion stage"),
    ],
)
def test_malformed_answers_fail_with_a_reason(mutate: Any, error: str) -> None:
    body = good()
    mutate(body)
    assert canary.check_answer(body)[0] == error


def test_payload_is_a_deterministic_small_request() -> None:
    payload = canary.infer_payload(b"\x89PNG")
    assert payload == {
        "image": "iVBORw==",
        "question": canary.QUESTION,
        "do_sample": False,
    }
    assert canary.infer_payload(b"x", max_tokens=9)["max_tokens"] == 9


def test_fresh_canaries_differ_in_bytes_not_pixels() -> None:
    from PIL import Image

    a, b = canary._fresh_png(), canary._fresh_png()
    assert a != b
    assert Image.open(io.BytesIO(a)).tobytes() == Image.open(io.BytesIO(b)).tobytes()
    by_hand = canary._png_by_hand(8, "abc")
    assert Image.open(io.BytesIO(by_hand)).tobytes() == Image.open(io.BytesIO(canary.canary_png(8))).tobytes()
