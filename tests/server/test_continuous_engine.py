"""The continuous engine on the tiny real checkpoint (float32, CPU): token-exact against transformers' generate.

Greedy answers must equal ``generate``'s token ids for one request and for 16 requests with different images,
prompt lengths and max_tokens that arrive at different times, with sampled requests in the same batch; sampling
with a seed is reproducible; a short request does not wait for long ones; more requests than slots wait for
memory and all finish; a blocked step loop is reported as stalled.
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

from llamactl.server.engine.continuous import ContinuousEngine
from llamactl.server.engine.continuous.encoding import Encoding, VisionLane
from llamactl.server.engine.continuous.pixels import prompt_ids
from llamactl.server.engine.continuous.pools import PoolShape, plan_slots
from llamactl.server.engine.protocol import GenParams, GenRequest, GenResult
from llamactl.server.tiny import trained_image, trained_messages

from ._support import ThreadServer, make_settings, png_b64, start_thread_server


@contextlib.contextmanager
def running_engine(tiny_checkpoint: Path, pipelined: bool | None = None, **settings: Any) -> Iterator[ContinuousEngine]:
    """A started engine with its step loop on a thread, stopped afterwards.

    ``pipelined`` True runs the GPU loop's order on the CPU: each step launched before the previous step's
    tokens are read back, so a row that ended rides along one more step (its token dropped)."""
    eng = ContinuousEngine(make_settings(tiny_checkpoint, **settings))
    eng.pipelined = pipelined
    eng.start()
    thread = threading.Thread(target=eng.run_forever, daemon=True)
    thread.start()
    try:
        yield eng
    finally:
        eng.stop()
        thread.join(10)


@pytest.fixture(scope="module", params=["stepwise", "pipelined"])
def engine(tiny_checkpoint: Path, request: pytest.FixtureRequest) -> Iterator[ContinuousEngine]:
    pipelined = request.param == "pipelined"
    with running_engine(tiny_checkpoint, pipelined=pipelined, max_batch_size=8, gen_max_new_tokens=512) as eng:
        assert eng.pipelined is pipelined
        yield eng


def reference_ids(eng: ContinuousEngine, req: GenRequest) -> list[int]:
    """What transformers' generate answers for this request alone (greedy), without its stop token."""
    hf = eng.hf
    inputs = hf.processor(images=[[req.image]] if req.image is not None else None, text=[req.prompt],
                          add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = hf.model.generate(**inputs, max_new_tokens=req.params.max_new_tokens, do_sample=False,
                                pad_token_id=hf._pad_id, temperature=1.0, top_p=1.0, top_k=50)
    return [t for t in out[0, inputs["input_ids"].shape[1]:].tolist() if t not in hf._eos_ids]


def run_all(eng: ContinuousEngine, reqs: list[GenRequest], gaps_s: list[float] | None = None,
            timeout_s: float = 120) -> list[GenResult]:
    results: dict[int, Any] = {}
    done = threading.Event()

    def finisher(i: int) -> Any:
        def finish(value: Any) -> None:
            results[i] = value
            if len(results) == len(reqs):
                done.set()
        return finish

    for i, r in enumerate(reqs):
        r.on_finish = finisher(i)
    for i, r in enumerate(reqs):
        eng.prepare(r)
        eng.add(r)
        if gaps_s:
            time.sleep(gaps_s[i % len(gaps_s)])
    assert done.wait(timeout_s), f"only {len(results)} of {len(reqs)} finished"
    out = [results[i] for i in range(len(reqs))]
    assert all(isinstance(r, GenResult) for r in out), out
    return out


def answer_ids(eng: ContinuousEngine, result: GenResult) -> list[int]:
    return list(eng.hf.processor.tokenizer(result.text, add_special_tokens=False)["input_ids"])


def image_prompt(eng: ContinuousEngine, text: str | None = None) -> str:
    msgs = trained_messages() if text is None else [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
    ]
    return eng.render_prompt(msgs)


def test_one_greedy_request_equals_generate(engine: ContinuousEngine) -> None:
    req = GenRequest(prompt=image_prompt(engine), image=trained_image("red"), params=GenParams(max_new_tokens=40))
    [result] = run_all(engine, [req])
    ref = reference_ids(engine, GenRequest(prompt=req.prompt, image=req.image, params=req.params))
    got_text = result.text
    ref_text = engine.hf.processor.tokenizer.decode(ref, skip_special_tokens=True)
    assert got_text == ref_text and got_text
    assert result.finish_reason in ("stop", "length") and result.first_token_at is not None


@pytest.mark.parametrize("layers", ["fused", "transformers"])
def test_vision_layers_setting_picks_the_towers_layers_and_both_equal_generate(tiny_checkpoint: Path,
                                                                               layers: str) -> None:
    """settings.vision_layers: tower.py's regrouped encoder layers or transformers' own; /health names the one
    running, and greedy tokens equal generate's either way (float32: the same arithmetic)."""
    with running_engine(tiny_checkpoint, vision_layers=layers) as eng:
        assert eng.describe()["vision_layers"] == layers
        assert eng.runner is not None and eng.runner.encoder.fused == (layers == "fused")
        req = GenRequest(prompt=image_prompt(eng), image=trained_image("blue"), params=GenParams(max_new_tokens=24))
        [result] = run_all(eng, [req])
        ref = reference_ids(eng, GenRequest(prompt=req.prompt, image=req.image, params=req.params))
        assert result.text == eng.hf.processor.tokenizer.decode(ref, skip_special_tokens=True) and result.text


def test_sixteen_staggered_requests_mixed_with_sampling_equal_generate(engine: ContinuousEngine) -> None:
    """Different images (colours, sizes, tile counts), prompts, lengths; text-only rows; sampled rows between."""
    sizes = [(56, 56), (120, 40), (40, 130), (200, 200), (90, 60)]
    questions = [None, "What colour is it?", "Describe every detail of this picture in words.", "Say something."]
    greedy: list[GenRequest] = []
    reqs: list[GenRequest] = []
    for i in range(16):
        if i % 5 == 4:  # sampled rows in the same batch must not disturb the greedy ones
            reqs.append(GenRequest(prompt=image_prompt(engine), image=trained_image("blue"),
                                   params=GenParams(max_new_tokens=30, do_sample=True, temperature=0.9, seed=i)))
            continue
        if i % 7 == 3:
            prompt = engine.render_prompt([{"role": "user", "content": [{"type": "text", "text": f"Count to {i}"}]}])
            req = GenRequest(prompt=prompt, image=None, params=GenParams(max_new_tokens=8 + i))
        else:
            colour = ("red", (30, 200, 60), "blue")[i % 3]
            img = trained_image(colour) if isinstance(colour, str) else Image.new("RGB", sizes[i % 5], colour)
            req = GenRequest(prompt=image_prompt(engine, questions[i % 4]), image=img.resize(sizes[i % 5]),
                             params=GenParams(max_new_tokens=10 + 3 * i))
        greedy.append(req)
        reqs.append(req)
    results = run_all(engine, reqs, gaps_s=[0.0, 0.05, 0.0, 0.15])
    tok = engine.hf.processor.tokenizer
    for req, result in zip(reqs, results):
        if req.params.do_sample:
            assert result.completion_tokens > 0
            continue
        ref = reference_ids(engine, GenRequest(prompt=req.prompt, image=req.image, params=req.params))
        assert result.text == tok.decode(ref, skip_special_tokens=True), req.prompt[-60:]
    assert max(r.batch_size for r in results) > 1  # they really ran together


def test_sampling_with_a_seed_is_reproducible(engine: ContinuousEngine) -> None:
    def sampled(seed: int) -> GenRequest:
        return GenRequest(prompt=image_prompt(engine), image=trained_image("red"),
                          params=GenParams(max_new_tokens=40, min_new_tokens=40, do_sample=True,
                                           temperature=1.5, top_p=0.95, seed=seed))

    first = run_all(engine, [sampled(7), sampled(8)])
    again = run_all(engine, [sampled(7)])
    assert first[0].text == again[0].text
    assert first[0].text != first[1].text  # a different seed draws differently (40 tokens at temperature 1.5)


def test_a_short_request_does_not_wait_for_long_ones(engine: ContinuousEngine) -> None:
    longs = [GenRequest(prompt=image_prompt(engine), image=trained_image("blue"),
                        params=GenParams(max_new_tokens=1400, min_new_tokens=1400)) for _ in range(3)]
    short = GenRequest(prompt=image_prompt(engine), image=trained_image("red"),
                       params=GenParams(max_new_tokens=4, min_new_tokens=4))
    done: dict[str, float] = {}
    for i, r in enumerate(longs):
        r.on_finish = lambda v, i=i: done.__setitem__(f"long{i}", time.monotonic())
        engine.prepare(r)
        engine.add(r)
    while engine.running < 3:
        time.sleep(0.005)
    time.sleep(0.1)  # the long ones are decoding
    engine.prepare(short)
    t0 = time.monotonic()
    short.on_finish = lambda v: done.__setitem__("short", time.monotonic())
    engine.add(short)
    deadline = time.monotonic() + 120
    while len(done) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(done) == 4
    short_s = done["short"] - t0
    long_left_s = min(done[f"long{i}"] for i in range(3)) - t0
    # about its own time (a prefill and 3 decode steps), not the batch's (hundreds of steps still to go)
    assert short_s < long_left_s / 5, (short_s, long_left_s)


class HostWaits(TorchFunctionMode):
    """Records the calls that, on CUDA, make the host wait for all the work queued on the stream: a single
    element set from a Python number (a blocking copy of a CPU scalar) and a tensor made from data straight onto
    a device (``torch.tensor(..., device=...)``, also a blocking copy). In the step loop such a wait empties the
    pipeline (one step queued ahead). The CPU cannot show the wait itself; bench/engine_gpu_check.py counts the
    real ones on a GPU (CUDA's sync debug mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.__setitem__ and isinstance(args[2], (bool, int, float)) and args[0][args[1]].dim() == 0:
            self.seen.append(f"element set from a number: {_caller()}")
        elif func is torch.tensor and kwargs.get("device") is not None:
            self.seen.append(f"torch.tensor onto a device: {_caller()}")
        return func(*args, **kwargs)


def _caller() -> str:
    """file:line of the code that made the torch call being recorded (two frames up)."""
    frame = traceback.extract_stack(limit=3)[0]
    return f"{Path(frame.filename).name}:{frame.lineno}"


def test_the_step_loop_makes_no_blocking_copies_to_the_device(tiny_checkpoint: Path) -> None:
    """Finished rows released (slots moved and vacated), image and text rows joined (masks, prefill inputs):
    none of it through a call that would wait for the queued steps on a GPU."""
    eng = ContinuousEngine(make_settings(tiny_checkpoint, max_batch_size=4, gen_max_new_tokens=64))
    eng.pipelined = True
    eng.start()
    waits = HostWaits()

    def loop() -> None:
        with waits:
            eng.run_forever()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        text = eng.render_prompt([{"role": "user", "content": [{"type": "text", "text": "Count to 5"}]}])
        reqs = [GenRequest(prompt=image_prompt(eng), image=trained_image(("red", "blue")[i % 2]),
                           params=GenParams(max_new_tokens=3 + 2 * i)) for i in range(5)]
        reqs += [GenRequest(prompt=text, image=None, params=GenParams(max_new_tokens=4 + i)) for i in range(3)]
        results = run_all(eng, reqs, gaps_s=[0.0, 0.03])
    finally:
        eng.stop()
        thread.join(10)
    assert max(r.batch_size for r in results) > 1  # rows joined a running batch and left it
    assert waits.seen == []


@pytest.mark.parametrize("depth", [2, 3])
def test_with_more_steps_queued_ahead_answers_stay_equal(tiny_checkpoint: Path, depth: int) -> None:
    """settings.pipeline_depth: the newest ``depth`` steps stay queued while older ones are read back, so rows that
    ended ride along ``depth`` steps and rows join between queued steps; greedy answers still equal generate."""
    with running_engine(tiny_checkpoint, pipelined=True, pipeline_depth=depth, max_batch_size=6,
                        gen_max_new_tokens=64) as eng:
        assert eng.describe()["pipeline_depth"] == depth
        text = eng.render_prompt([{"role": "user", "content": [{"type": "text", "text": "Count to 9"}]}])
        reqs = []
        for i in range(10):
            if i % 4 == 3:
                reqs.append(GenRequest(prompt=text, image=None, params=GenParams(max_new_tokens=2 + i)))
            else:
                reqs.append(GenRequest(prompt=image_prompt(eng), image=trained_image(("red", "blue")[i % 2]),
                                       params=GenParams(max_new_tokens=1 + 3 * i)))
        results = run_all(eng, reqs, gaps_s=[0.0, 0.02, 0.0, 0.05])
        tok = eng.hf.processor.tokenizer
        for req, result in zip(reqs, results):
            ref = reference_ids(eng, GenRequest(prompt=req.prompt, image=req.image, params=req.params))
            assert result.text == tok.decode(ref, skip_special_tokens=True), req.params
            assert result.completion_tokens == len(ref) + (result.finish_reason == "stop")
        assert max(r.batch_size for r in results) > 1


def test_a_request_at_the_context_limit_finishes_with_steps_queued_ahead(tiny_checkpoint: Path) -> None:
    """The steps queued past a row's end write one position each: with pipeline_depth 3 a request's context is two
    tokens shorter (the slot's K/V stays in bounds), one exactly at it generates all its tokens, one token more is a
    clear error."""
    with running_engine(tiny_checkpoint, pipelined=True, pipeline_depth=3, max_batch_size=2,
                        gen_max_new_tokens=8) as eng:
        limit = eng.max_len - 2

        def prompt_of(words: int) -> tuple[str, int]:
            prompt = eng.render_prompt([{"role": "user", "content": [{"type": "text", "text": "ab " * words}]}])
            return prompt, len(prompt_ids(eng.hf.processor, prompt))

        low, high = 1, 4 * limit  # the most words whose prompt leaves room for 8 new tokens
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if prompt_of(mid)[1] + 8 <= limit else (low, mid - 1)
        prompt, length = prompt_of(low)
        room = limit - length
        assert 1 <= room <= 8, (length, limit)
        fits = GenRequest(prompt=prompt, image=None, params=GenParams(max_new_tokens=room, min_new_tokens=room))
        (result,) = run_all(eng, [fits])
        assert result.completion_tokens == room and result.finish_reason == "length"
        too_long = GenRequest(prompt=prompt, image=None, params=GenParams(max_new_tokens=room + 1))
        with pytest.raises(ValueError, match=f"context of {limit} tokens"):
            eng.prepare(too_long)


def test_more_requests_than_slots_wait_for_memory_and_all_finish(tiny_checkpoint: Path) -> None:
    with running_engine(tiny_checkpoint, pipelined=True, max_batch_size=2, gen_max_new_tokens=64) as eng:
        reqs = [GenRequest(prompt=image_prompt(eng), image=trained_image("red"), params=GenParams(max_new_tokens=12))
                for _ in range(6)]
        seen_waiting: list[float] = []
        watcher = threading.Thread(target=lambda: [seen_waiting.append(eng.waiting_for_memory) or time.sleep(0.002)
                                                   for _ in range(200)], daemon=True)
        watcher.start()
        results = run_all(eng, reqs)
        assert len({r.text for r in results}) == 1 and all(r.finish_reason != "cancelled" for r in results)
        assert max(r.batch_size for r in results) <= 2 and max(seen_waiting) > 0
        with pytest.raises(ValueError, match="longer than this server's context"):
            eng.prepare(GenRequest(prompt=image_prompt(eng), image=trained_image("red"),
                                   params=GenParams(max_new_tokens=10_000)))


@pytest.mark.parametrize("chunk", [1, 0])
def test_prefill_chunk_images_bounds_how_many_images_join_together(tiny_checkpoint: Path, chunk: int) -> None:
    """settings.prefill_chunk_images: images arriving together go through the tower and join in chunks of at
    most that many (0 = the engine's default: 4 on the CPU); the answers do not change."""
    with running_engine(tiny_checkpoint, max_batch_size=8, gen_max_new_tokens=64, prefill_chunk_images=chunk) as eng:
        assert eng.describe()["prefill_chunk_images"] == (chunk or 4)
        reqs = [GenRequest(prompt=image_prompt(eng), image=trained_image("red"), params=GenParams(max_new_tokens=6))
                for _ in range(6)]
        for r in reqs:
            eng.prepare(r)
        joined: list[int] = []
        eng.on_batch = joined.append
        results = run_all(eng, reqs)
        assert len({r.text for r in results}) == 1
        assert sum(joined) == 6 and max(joined) <= (chunk or 4)
        assert len(joined) >= (6 if chunk == 1 else 2)


class _LaterEvent:
    """Stands in for the CUDA event of a tower queued on its own stream: ready after a few polls."""

    def __init__(self, polls: int) -> None:
        self.polls = polls

    def query(self) -> bool:
        self.polls -= 1
        return self.polls < 0


class _LaterLane(VisionLane):
    """The GPU's vision lane on the CPU: each chunk's states are computed at once but reported ready only a few
    loop iterations later, as a tower still running on its stream would be. Records the queue's depth."""

    def __init__(self) -> None:
        super().__init__(stream="a stand-in stream", description="test")
        self.depths: list[int] = []
        self.order: list[list[GenRequest]] = []
        self.holds = 0

    def hold(self, encoding: Encoding, stream: Any = None) -> bool:
        """A decode step would wait for this chunk on the device (vision_priority "first"): counted."""
        held = encoding.done.polls > 0  # still "running" (looked at without using up a poll)
        self.holds += held
        return held

    def start(self, encode: Any, reqs: list[GenRequest], rows: list[Any]) -> Encoding:
        self.order.append(reqs)
        return Encoding(reqs, encode(rows), _LaterEvent(3), time.monotonic())

    @staticmethod
    def hand_over(encoding: Encoding) -> torch.Tensor:
        return encoding.states


@pytest.mark.parametrize("queue", [2, 1])
def test_image_chunks_queue_in_the_tower_and_join_in_order(tiny_checkpoint: Path, queue: int) -> None:
    """settings.vision_queue: the next chunk of images enters the tower while the previous one is still there (up
    to ``queue`` chunks); they join in arrival order and every answer stays equal to generate's."""
    with running_engine(tiny_checkpoint, max_batch_size=8, gen_max_new_tokens=64, prefill_chunk_images=1,
                        vision_queue=queue) as eng:
        lane = _LaterLane()
        eng._lane = lane
        eng.step_hook = lambda: lane.depths.append(len(eng._encodings))
        colours = ["red", "blue", (30, 200, 60), "red", (200, 30, 60)]
        reqs = [GenRequest(prompt=image_prompt(eng), image=trained_image(c) if isinstance(c, str)
                           else Image.new("RGB", (64, 64), c), params=GenParams(max_new_tokens=8 + 2 * i))
                for i, c in enumerate(colours)]
        for r in reqs:
            eng.prepare(r)
        joined: list[int] = []
        eng.on_batch = joined.append
        results = run_all(eng, reqs)
        eng.step_hook = None
        assert max(lane.depths) == queue and not eng._encodings
        assert [r for chunk in lane.order for r in chunk] == reqs and joined == [1] * 5
        firsts = [r.first_token_at for r in results]
        assert firsts == sorted(firsts)  # joined in the order they entered the tower
        tok = eng.hf.processor.tokenizer
        for req, result in zip(reqs, results):
            ref = reference_ids(eng, GenRequest(prompt=req.prompt, image=req.image, params=req.params))
            assert result.text == tok.decode(ref, skip_special_tokens=True)


def test_with_the_tower_first_decode_steps_wait_for_its_chunk_and_answers_stay_equal(tiny_checkpoint: Path) -> None:
    """settings.vision_priority "first": while an image chunk is in the tower each decode step is made to wait
    for it (counted in /health engine.tower_holds); the answers stay equal to generate's."""
    with running_engine(tiny_checkpoint, max_batch_size=8, gen_max_new_tokens=64, prefill_chunk_images=1,
                        vision_priority="first") as eng:
        lane = _LaterLane()
        eng._lane = lane
        reqs = [GenRequest(prompt=image_prompt(eng), image=trained_image(c), params=GenParams(max_new_tokens=12))
                for c in ("red", "blue", "red", "blue")]
        for r in reqs:
            eng.prepare(r)
        results = run_all(eng, reqs)
        assert lane.holds > 0 and eng.describe()["tower_holds"] == lane.holds
        tok = eng.hf.processor.tokenizer
        for req, result in zip(reqs, results):
            ref = reference_ids(eng, GenRequest(prompt=req.prompt, image=req.image, params=req.params))
            assert result.text == tok.decode(ref, skip_special_tokens=True)
    with running_engine(tiny_checkpoint, max_batch_size=8, gen_max_new_tokens=64, prefill_chunk_images=1) as eng:
        lane = _LaterLane()
        eng._lane = lane
        reqs = [GenRequest(prompt=image_prompt(eng), image=trained_image(c), params=GenParams(max_new_tokens=12))
                for c in ("red", "blue")]
        for r in reqs:
            eng.prepare(r)
        run_all(eng, reqs)
        assert lane.holds == 0 and eng.describe()["tower_holds"] == 0  # "equal" (the default) never holds


def test_an_idle_tower_waits_for_a_bursts_images_to_fill_its_first_chunk(tiny_checkpoint: Path) -> None:
    """settings.burst_gather_ms: with the tower idle, one image waiting and three more on their way (the server's
    count: being decoded or prepared), the waiting one is held until they arrive, and the four go through the
    tower and join as one chunk; a lone request never waits; the wait is bounded by the setting."""
    on_the_way = [0]
    with running_engine(tiny_checkpoint, max_batch_size=8, gen_max_new_tokens=64, prefill_chunk_images=4,
                        burst_gather_ms=1000) as eng:
        assert eng.describe()["burst_gather_ms"] == 1000
        # longer than the setting allows (1 s), so that a slow test machine cannot run out the hold
        eng.settings = eng.settings.model_copy(update={"burst_gather_ms": 20_000})
        eng.images_on_the_way = lambda: on_the_way[0]
        make = lambda: GenRequest(prompt=image_prompt(eng), image=trained_image("red"),
                                  params=GenParams(max_new_tokens=6))
        lone = run_all(eng, [make()])[0]
        assert eng.describe()["host_s"].get("gather", 0.0) == 0.0  # nothing on its way: no hold

        first, rest = make(), [make() for _ in range(3)]
        joined: list[int] = []
        eng.on_batch = joined.append
        done: list[Any] = []
        for r in [first, *rest]:
            eng.prepare(r)
            r.on_finish = done.append
        on_the_way[0] = 3
        eng.add(first)
        time.sleep(0.5)
        assert not done and list(eng._waiting) == [first]  # held while the other three are on their way
        for r in rest:
            on_the_way[0] -= 1
            eng.add(r)
        deadline = time.monotonic() + 60
        while len(done) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(done) == 4 and joined == [4]  # one chunk of four
        assert {r.text for r in done} == {lone.text}
        assert eng.describe()["host_s"]["gather"] >= 0.4

    with running_engine(tiny_checkpoint, max_batch_size=8, gen_max_new_tokens=64, prefill_chunk_images=2,
                        burst_gather_ms=300) as eng:
        eng.images_on_the_way = lambda: 1  # one more always on its way: enough to fill a chunk of two
        t0 = time.monotonic()
        run_all(eng, [GenRequest(prompt=image_prompt(eng), image=trained_image("red"),
                                 params=GenParams(max_new_tokens=6))])
        assert time.monotonic() - t0 >= 0.3  # it waited the setting's 300 ms for the other one, then went alone


def test_only_a_full_chunk_queues_behind_one_in_the_tower(tiny_checkpoint: Path) -> None:
    """Behind a chunk in the tower a partial chunk waits (queueing it would only delay the next arrivals by a
    chunk); a full one (a burst) queues, up to vision_queue chunks; nothing is queued on the CPU's own lane."""
    eng = ContinuousEngine(make_settings(tiny_checkpoint, vision_queue=2))
    eng.chunk_images = 2
    image_req = lambda: GenRequest(prompt="p", image=trained_image("red"), params=GenParams(max_new_tokens=4))
    in_tower = Encoding([image_req()], torch.zeros(1), _LaterEvent(100), 0.0)
    assert not eng._tower_busy()  # nothing in the tower
    eng._encodings.append(in_tower)
    eng._waiting.append(image_req())
    assert eng._tower_busy()  # CPU lane: one chunk at a time
    eng._lane = _LaterLane()
    assert eng._tower_busy()  # one image waiting: a partial chunk
    eng._waiting.append(GenRequest(prompt="p", image=None, params=GenParams(max_new_tokens=4)))
    assert eng._tower_busy()  # text requests do not fill an image chunk
    eng._waiting.append(image_req())
    assert not eng._tower_busy()  # a full chunk of two may queue
    eng._encodings.append(in_tower)
    assert eng._tower_busy()  # vision_queue reached


def test_by_default_a_second_chunk_queues_only_behind_a_tower_of_graphs(tiny_checkpoint: Path) -> None:
    """settings.vision_queue 0 (the default): on a GPU lane one chunk at a time with the eager tower, two when the
    tower replays CUDA graphs (scheduler.vision_queue_depth, tested alone in tests/unit)."""
    from types import SimpleNamespace

    eng = ContinuousEngine(make_settings(tiny_checkpoint))
    assert eng.settings.vision_queue == 0
    eng.chunk_images = 1
    eng._lane = _LaterLane()
    eng._encodings.append(Encoding([], torch.zeros(1), _LaterEvent(100), 0.0))
    eng._waiting.append(GenRequest(prompt="p", image=trained_image("red"), params=GenParams(max_new_tokens=4)))
    assert eng._tower_busy()  # a full chunk waits: the eager tower holds one
    eng.runner = SimpleNamespace(tower_graphs=object())  # type: ignore[assignment]
    assert not eng._tower_busy()  # the graphed tower takes a second
    eng._encodings.append(Encoding([], torch.zeros(1), _LaterEvent(100), 0.0))
    assert eng._tower_busy()


def test_plan_slots_sizes_pools_from_free_memory() -> None:
    shape = PoolShape(self_layers=32, cross_layers=8, kv_heads=8, head_dim=128, max_len=3072, cross_len=6404,
                      element_bytes=2)
    assert shape.cross_bytes_per_slot == 2 * 8 * 8 * 6404 * 128 * 2  # ~210 MB per 4-tile image
    per_slot = shape.bytes_per_slot
    assert plan_slots(shape, 64, None, 0) == 64
    assert plan_slots(shape, 64, 10 * per_slot + 5, 5) == 10
    assert plan_slots(shape, 8, 100 * per_slot, 0) == 8
    with pytest.raises(ValueError, match="not enough GPU memory for one sequence"):
        plan_slots(shape, 8, per_slot, per_slot)


@pytest.fixture
def hooked(tiny_checkpoint: Path) -> Iterator[ThreadServer]:
    srv = start_thread_server(make_settings(tiny_checkpoint, stall_timeout_s=1.0, max_batch_size=4))
    yield srv
    srv.state.engine.step_hook = None
    srv.stop()


def test_a_blocked_step_loop_is_reported_stalled_then_recovers(hooked: ThreadServer) -> None:
    srv = hooked
    gate = threading.Event()
    srv.state.engine.step_hook = lambda: gate.wait(30)
    assert httpx.get(srv.url + "/ready").status_code == 200  # idle is never stalled
    pending = threading.Thread(
        target=lambda: httpx.post(srv.url + "/infer", json={"image": png_b64("red"), "max_tokens": 4}, timeout=60),
        daemon=True,
    )
    pending.start()
    deadline = time.monotonic() + 20
    while httpx.get(srv.url + "/health").json()["status"] != "stalled":
        assert time.monotonic() < deadline, "never reported stalled"
        time.sleep(0.1)
    ready = httpx.get(srv.url + "/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "stalled"
    health = httpx.get(srv.url + "/health").json()
    assert health["engine"]["name"] == "continuous" and "stalled" in health["error"]
    assert "llamactl_engine_stalled 1.0" in httpx.get(srv.url + "/metrics").text
    srv.state.engine.step_hook = None
    gate.set()
    pending.join(60)
    assert httpx.get(srv.url + "/ready").status_code == 200


def test_the_server_counts_image_requests_on_their_way_to_the_engine(hooked: ThreadServer) -> None:
    """What burst_gather_ms reads (Inference.images_on_the_way, wired to the engine): an image request counts
    from its decoding until it is handed to the engine (so during its preparation), and none stays counted
    after an answer, a refused prompt or an image that does not decode."""
    srv = hooked
    eng, svc = srv.state.engine, srv.state.inference
    assert eng.images_on_the_way == svc.images_on_the_way
    seen: list[int] = []
    real = eng.prepare

    def prepare(req: GenRequest) -> None:
        if req.prepared is None:  # the server's call (the step loop's find it prepared)
            seen.append(svc.images_on_the_way())
        real(req)

    eng.prepare = prepare  # type: ignore[method-assign]
    try:
        ok = httpx.post(srv.url + "/infer", json={"image": png_b64("red"), "max_tokens": 4}, timeout=60)
        assert ok.status_code == 200 and seen == [1] and svc.images_on_the_way() == 0
        too_long = httpx.post(srv.url + "/infer", json={"image": png_b64("red"), "max_tokens": 4,
                                                         "question": "why " * 5000}, timeout=60)
        assert too_long.status_code == 400, too_long.text
        assert "context" in too_long.text and svc.images_on_the_way() == 0  # refused in its preparation
        bad = httpx.post(srv.url + "/infer", json={"image": "bm90IGFuIGltYWdl", "max_tokens": 4}, timeout=60)
        assert bad.status_code == 415 and svc.images_on_the_way() == 0  # not an image
    finally:
        eng.prepare = real  # type: ignore[method-assign]


@pytest.fixture
def short_deadline(tiny_checkpoint: Path) -> Iterator[ThreadServer]:
    srv = start_thread_server(make_settings(tiny_checkpoint, request_timeout_s=0.5, max_batch_size=4,
                                            gen_max_new_tokens=4000))
    yield srv
    srv.stop()


def wait_idle(eng: Any, what: str, within_s: float = 10) -> None:
    deadline = time.monotonic() + within_s
    while eng.running:
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_request_past_its_deadline_gets_504_and_frees_its_slot(short_deadline: ThreadServer) -> None:
    srv = short_deadline
    assert srv.state.engine.name == "continuous"
    slow = {"image": png_b64("red"), "max_tokens": 4000, "ignore_eos": True}  # seconds of work, 0.5 s deadline
    r = httpx.post(srv.url + "/infer", json=slow, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    wait_idle(srv.state.engine, "the expired request kept its slot", within_s=1.5)
    assert httpx.get(srv.url + "/ready").status_code == 200


@pytest.fixture
def long_answers(tiny_checkpoint: Path) -> Iterator[ThreadServer]:
    srv = start_thread_server(make_settings(tiny_checkpoint, max_batch_size=4, gen_max_new_tokens=4000))
    yield srv
    srv.stop()


def test_a_streamed_client_that_hangs_up_frees_its_slot(long_answers: ThreadServer) -> None:
    srv = long_answers
    chat = {"messages": [{"role": "user", "content": "Count slowly."}], "max_tokens": 4000, "stream": True,
            "ignore_eos": True}  # seconds of decoding: the slot must come back long before it could finish
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=chat, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                break  # the first token arrived: hang up
    wait_idle(srv.state.engine, "the disconnected stream kept its slot", within_s=1.5)
    assert httpx.get(srv.url + "/ready").status_code == 200


def test_quantized_models_fall_back_to_the_hf_engine_and_health_says_why(tiny_checkpoint: Path) -> None:
    from llamactl.server.state import choose_engine

    engine, reason = choose_engine(make_settings(tiny_checkpoint, quantization="nf4"), None)
    assert engine.name == "hf" and reason is not None and "quantization nf4" in reason
    engine, reason = choose_engine(make_settings(tiny_checkpoint), None)
    assert engine.name == "continuous" and reason is None
    engine, reason = choose_engine(make_settings(tiny_checkpoint, engine="hf"), None)
    assert engine.name == "hf" and reason is None  # asked for: no fallback to explain

    srv = start_thread_server(make_settings(tiny_checkpoint, quantization="int8"))
    try:
        health = httpx.get(srv.url + "/health").json()
        assert health["engine"]["name"] == "hf" and health["engine"]["requested"] == "auto"
        assert "quantization int8 runs on the hf engine" in health["engine"]["fallback_reason"]
        r = httpx.post(srv.url + "/infer", json={"image": png_b64("red"), "max_tokens": 8}, timeout=120)
        assert r.status_code == 200
    finally:
        srv.stop()


def test_a_single_slot_engine_starts_and_serves_in_turn(tiny_checkpoint: Path) -> None:
    with running_engine(tiny_checkpoint, max_batch_size=1, gen_max_new_tokens=64) as eng:
        reqs = [GenRequest(prompt=image_prompt(eng), image=trained_image(c), params=GenParams(max_new_tokens=10))
                for c in ("red", "blue", "red")]
        results = run_all(eng, reqs)
        assert results[0].text == results[2].text and all(r.batch_size == 1 for r in results)
