"""The vision tower as CUDA graphs (tower_graphs.py): which graph a chunk takes, and that everything the tower reads
travels through the static buffers a graph is captured on.

CUDA graphs need a GPU (bench/engine_tower_graphs_probe.py, bench/engine_burst_probe.py and the engine's start
check, which keeps the graphs only if a replay equals the eager tower, run them there). Here the real tiny tower runs on the CPU with a stand-in capture
whose "replay" runs the captured body again, eagerly, from the static buffers: if any input stayed outside them (a
tensor of the first call kept by the body, a padding width too narrow), the states differ from the eager tower's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from llamactl.server.engine.continuous.kernel_choice import relative_l2
from llamactl.server.engine.continuous.tower_graphs import Body, TowerGraphs
from llamactl.server.engine.continuous.vision import VisionEncoder, padding_rows
from llamactl.server.hf_engine import HFEngine

from ._support import make_settings


def test_padding_widths_cover_every_image_and_rows_pad_with_the_last_row() -> None:
    encoder = VisionEncoder.__new__(VisionEncoder)  # the row arithmetic only: no tower
    encoder.patches, encoder.padded = 5, 8
    assert encoder.row_widths(4) == [12, 17, 22, 27]  # 4, 3, 2 and 1 used tiles
    for used in range(1, 5):
        mask = torch.tensor([[1] * used + [0] * (4 - used)])
        assert encoder.padding_width(mask) == len(padding_rows(mask, 5, 8)[0])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert encoder.padding_width(mask) == 22
    rows, bias = encoder.host_rows(mask, torch.bfloat16, width=27)
    assert rows.shape == (2, 27) and rows[0].tolist() == [5, 6, 7, 13, 14, 15, 21, 22, 23, 29, 30, 31] + [31] * 15
    assert rows[1, :22].tolist() == padding_rows(mask, 5, 8)[1] and set(rows[1, 22:].tolist()) == {31}
    assert bias.shape == (2, 1, 1, 32) and int((bias[1] < 0).sum()) == 22 and int((bias[0] < 0).sum()) == 12


def tiny_tower(checkpoint: Path) -> tuple[VisionEncoder, list[dict[str, torch.Tensor]]]:
    hf = HFEngine(make_settings(checkpoint))
    hf.load()
    images = [Image.new("RGB", size, colour) for size, colour in
              (((112, 112), (200, 40, 40)), ((56, 56), (20, 20, 220)), ((224, 56), (30, 160, 90)),
               ((56, 112), (90, 90, 10)))]
    inputs = [hf.processor(images=[[im]], text=["<|image|>What is this?"], return_tensors="pt") for im in images]
    encoder = VisionEncoder(hf.model.model.vision_model, hf.model.model.multi_modal_projector, split_mask=True)
    return encoder, inputs


@pytest.mark.parametrize("fused", [True, False])
def test_replays_from_the_static_buffers_equal_the_eager_tower_for_every_chunk(tiny_checkpoint: Path,
                                                                             fused: bool) -> None:
    encoder, inputs = tiny_tower(tiny_checkpoint)
    encoder.fused = fused
    vision = encoder.vision
    tiles, size = int(vision.max_num_tiles), int(vision.image_size)
    bodies: list[Body] = []

    def capture(body: Body) -> Body:
        bodies.append(body)
        return body

    graphs = TowerGraphs(encoder, 3, tiles, size, torch.float32, "cpu", capture)
    with torch.inference_mode():
        graphs.capture_all()
        assert graphs.count == len(bodies) == 3 * len(encoder.row_widths(tiles))
        for chunk in ([0], [1], [0, 1], [2, 0, 3], [3, 1], [0, 0]):
            rows = [inputs[i] for i in chunk]
            want = encoder(torch.cat([r["pixel_values"] for r in rows]), torch.cat([r["aspect_ratio_ids"] for r in rows]),
                           torch.cat([r["aspect_ratio_mask"] for r in rows]),
                           torch.cat([r["aspect_ratio_mask"] for r in rows]))
            got = graphs.encode([r["pixel_values"] for r in rows], [r["aspect_ratio_ids"] for r in rows],
                                [r["aspect_ratio_mask"] for r in rows])
            assert got is not None and got.shape == want.shape
            assert relative_l2(got, want) < 1e-6, (chunk, relative_l2(got, want))
            # what encode returns is a copy: the next replay writes the static states, not the caller's
            again = graphs.encode([inputs[1]["pixel_values"]], [inputs[1]["aspect_ratio_ids"]],
                                  [inputs[1]["aspect_ratio_mask"]])
            assert again is not None and relative_l2(got, want) < 1e-6
        # more images than the largest graph: None (the caller's eager tower takes the chunk)
        four = [inputs[i] for i in (0, 1, 2, 3)]
        assert graphs.encode([r["pixel_values"] for r in four], [r["aspect_ratio_ids"] for r in four],
                             [r["aspect_ratio_mask"] for r in four]) is None


def test_a_chunk_takes_the_narrowest_graph_wide_enough_for_its_padding_rows(tiny_checkpoint: Path) -> None:
    encoder, inputs = tiny_tower(tiny_checkpoint)
    vision = encoder.vision
    tiles, size = int(vision.max_num_tiles), int(vision.image_size)
    ran: list[tuple[int, int]] = []

    class Recording(TowerGraphs):
        def _body(self, n: int, width: int) -> Body:
            body = super()._body(n, width)
            return lambda: (ran.append((n, width)), body())[1]

    graphs = Recording(encoder, 2, tiles, size, torch.float32, "cpu", lambda body: body)
    widths = encoder.row_widths(tiles)
    with torch.inference_mode():
        graphs.capture_all()
        ran.clear()
        for chunk in ([0], [1], [0, 1]):
            rows = [inputs[i] for i in chunk]
            graphs.encode([r["pixel_values"] for r in rows], [r["aspect_ratio_ids"] for r in rows],
                          [r["aspect_ratio_mask"] for r in rows])
    used = [int(inputs[i]["aspect_ratio_mask"].sum()) for i in (0, 1)]
    assert used == [4, 1]  # the 112 px square fills 4 tiles, the 56 px one 1
    assert ran == [(1, widths[0]), (1, widths[-1]), (2, widths[-1])]


def test_the_engine_encodes_its_image_chunks_by_replay_and_answers_as_generate(tiny_checkpoint: Path) -> None:
    """The engine's path through the graphs (model.vision_states -> TowerGraphs.encode), the stand-in capture on
    the CPU: every chunk of a mixed burst (tile counts 1 to 4, text rows between) goes through a replay, and the
    greedy answers equal generate's."""
    from llamactl.server.engine.protocol import GenParams, GenRequest
    from llamactl.server.tiny import trained_image

    from .test_continuous_engine import image_prompt, reference_ids, run_all, running_engine

    replayed: list[int] = []

    class Counting(TowerGraphs):
        def encode(self, pixels, ar_ids, ar_masks):  # type: ignore[no-untyped-def]
            states = super().encode(pixels, ar_ids, ar_masks)
            replayed.append(len(pixels) if states is not None else 0)
            return states

    with running_engine(tiny_checkpoint) as eng:
        assert eng.describe()["vision_graphs"] == "off (CPU)" and eng.runner is not None
        assert eng.describe()["stream_priorities"] is None  # no CUDA streams on the CPU
        vision = eng.runner.encoder.vision
        graphs = Counting(eng.runner.encoder, eng.chunk_images, int(vision.max_num_tiles), int(vision.image_size),
                          torch.float32, "cpu", lambda body: body)
        with torch.inference_mode():
            graphs.capture_all()
        eng.runner.tower_graphs = graphs
        reqs = []
        for i, (colour, size) in enumerate((("red", (56, 56)), ("blue", (200, 200)), ("red", (120, 40)),
                                            ("red", (40, 130)), ("blue", (90, 60)))):
            reqs.append(GenRequest(prompt=image_prompt(eng), image=trained_image(colour).resize(size),
                                   params=GenParams(max_new_tokens=12)))
            if i % 2:
                text = eng.render_prompt([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
                reqs.append(GenRequest(prompt=text, image=None, params=GenParams(max_new_tokens=6)))
        results = run_all(eng, reqs)
        for req, result in zip(reqs, results, strict=True):
            ref = reference_ids(eng, GenRequest(prompt=req.prompt, image=req.image, params=req.params))
            assert result.text == eng.hf.processor.tokenizer.decode(ref, skip_special_tokens=True)
    assert replayed and 0 not in replayed and sum(replayed) == 5
