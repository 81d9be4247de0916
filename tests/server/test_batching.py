"""Batcher logic with a recording engine (pure scheduling; the real model is exercised in test_app)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest

from llamactl.server.batching import Batcher, DeadlineExceeded, EngineFailure, QueueFull, Stopped
from llamactl.server.engine import GenParams, GenRequest, GenResult


class RecordingEngine:
    model_name = "fake"
    state = "ready"
    error = None

    def __init__(self, hold: threading.Event | None = None, poison: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.hold = hold
        self.poison = poison

    def generate_batch(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        if self.hold is not None:
            self.hold.wait(10)
        prompts = [r.prompt for r in requests]
        self.calls.append(prompts)
        if self.poison in prompts:
            raise RuntimeError("boom")
        return [GenResult(p.upper(), 1, 1, "stop") for p in prompts]


def greedy(n: int = 8) -> GenParams:
    return GenParams(max_new_tokens=n)


def sampled(t: float) -> GenParams:
    return GenParams(max_new_tokens=8, do_sample=True, temperature=t)


async def _with_batcher(engine: RecordingEngine, coro_fn, **kw):  # type: ignore[no-untyped-def]
    b = Batcher(
        engine,
        max_batch_size=kw.pop("max_batch_size", 4),
        max_wait_ms=kw.pop("max_wait_ms", 50),
        queue_limit=kw.pop("queue_limit", 16),
    )  # type: ignore[arg-type]
    t = threading.Thread(target=b.run_forever, daemon=True)
    t.start()
    try:
        return await coro_fn(b)
    finally:
        b.stop()
        t.join(5)


def test_groups_compatible_requests_up_to_max_batch() -> None:
    engine = RecordingEngine()

    async def go(b: Batcher) -> list[str]:
        reqs = [GenRequest(f"g{i}", None, greedy(4 + i)) for i in range(6)]  # max_new_tokens may differ
        reqs += [
            GenRequest("s1", None, sampled(0.7)),
            GenRequest("s2", None, sampled(0.7)),
            GenRequest("s3", None, sampled(1.0)),
        ]
        results = await asyncio.gather(*(b.submit(r) for r in reqs))
        return [r.text for r in results]

    texts = asyncio.run(_with_batcher(engine, go))
    assert texts == ["G0", "G1", "G2", "G3", "G4", "G5", "S1", "S2", "S3"]
    assert sorted(engine.calls) == sorted([["g0", "g1", "g2", "g3"], ["g4", "g5"], ["s1", "s2"], ["s3"]])


def test_image_and_text_only_requests_are_not_mixed() -> None:
    engine = RecordingEngine()

    async def go(b: Batcher) -> None:
        reqs = [GenRequest("img", object(), greedy()), GenRequest("txt", None, greedy())]  # type: ignore[arg-type]
        await asyncio.gather(*(b.submit(r) for r in reqs))

    asyncio.run(_with_batcher(engine, go))
    assert sorted(engine.calls) == [["img"], ["txt"]]


def test_queue_limit_and_cancellation_free_places() -> None:
    hold = threading.Event()
    engine = RecordingEngine(hold)

    async def go(b: Batcher) -> None:
        running = asyncio.ensure_future(b.submit(GenRequest("r", None, greedy())))
        while b.running == 0:
            await asyncio.sleep(0.01)
        waiting = [asyncio.ensure_future(b.submit(GenRequest(f"w{i}", None, greedy()))) for i in range(2)]
        await asyncio.sleep(0.05)
        assert b.queued == 2
        with pytest.raises(QueueFull) as info:
            b.enqueue(GenRequest("x", None, greedy()))
        assert info.value.retry_after_s >= 1
        waiting[0].cancel()  # e.g. the client disconnected
        await asyncio.sleep(0.05)
        assert b.queued == 1
        b.enqueue(GenRequest("y", None, greedy())).close()  # room again (and close the unawaited waiter)
        hold.set()
        await running
        await waiting[1]

    asyncio.run(_with_batcher(engine, go, max_batch_size=1, queue_limit=2))
    assert ["w0"] not in engine.calls


def test_deadline_raises_and_removes() -> None:
    hold = threading.Event()
    engine = RecordingEngine(hold)

    async def go(b: Batcher) -> None:
        first = asyncio.ensure_future(b.submit(GenRequest("a", None, greedy())))
        while b.running == 0:
            await asyncio.sleep(0.01)
        late = GenRequest("late", None, greedy(), deadline=time.monotonic() + 0.2)
        with pytest.raises(DeadlineExceeded):
            await b.submit(late)
        assert b.queued == 0 and late.cancel_event.is_set()
        hold.set()
        await first

    asyncio.run(_with_batcher(engine, go, max_batch_size=1))
    assert engine.calls == [["a"]]


def test_a_failing_request_does_not_fail_its_batch_neighbours() -> None:
    engine = RecordingEngine(poison="bad")

    async def go(b: Batcher) -> list[object]:
        reqs = [GenRequest(p, None, greedy()) for p in ("ok1", "bad", "ok2")]
        return await asyncio.gather(*(b.submit(r) for r in reqs), return_exceptions=True)

    out = asyncio.run(_with_batcher(engine, go))
    assert [getattr(o, "text", None) for o in out] == ["OK1", None, "OK2"]
    assert isinstance(out[1], EngineFailure)
    assert engine.calls[0] == ["ok1", "bad", "ok2"]  # tried together first, then one by one


def test_stop_fails_queued_and_refuses_new() -> None:
    hold = threading.Event()
    engine = RecordingEngine(hold)

    async def go(b: Batcher) -> None:
        first = asyncio.ensure_future(b.submit(GenRequest("a", None, greedy())))
        while b.running == 0:
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(b.submit(GenRequest("q", None, greedy())))
        await asyncio.sleep(0.05)
        b.stop()
        with pytest.raises(Stopped):
            await queued
        with pytest.raises(Stopped):
            b.enqueue(GenRequest("n", None, greedy()))
        hold.set()
        assert (await first).text == "A"  # the running batch still finishes

    asyncio.run(_with_batcher(engine, go, max_batch_size=1))


class SlowEngine(RecordingEngine):
    def generate_batch(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        time.sleep(0.2)
        return super().generate_batch(requests)


def test_clients_that_resubmit_after_a_batch_join_the_next_one() -> None:
    """Two groups of closed-loop clients, offset in time, must merge instead of alternating for good:
    the batch window starts no earlier than the end of the previous batch."""
    engine = SlowEngine()

    async def client(b: Batcher, name: str, delay: float) -> None:
        await asyncio.sleep(delay)
        for n in range(4):
            await b.submit(GenRequest(f"{name}{n}", None, greedy()))

    async def go(b: Batcher) -> None:
        # c and d come half a window after a+b's window closed (at 0.1 s): never inside the first batch
        await asyncio.gather(client(b, "a", 0), client(b, "b", 0), client(b, "c", 0.15), client(b, "d", 0.15))

    asyncio.run(_with_batcher(engine, go, max_batch_size=4, max_wait_ms=100))
    sizes = [len(c) for c in engine.calls]
    # a+b first; c+d arrive while it runs and wait for a+b's next requests: 4 together from then on
    # (before the fix: 2, 2, 2, 2, ... for good)
    assert sizes[0] == 2 and sizes[1:].count(4) >= 3, sizes


def _batcher_with_admissions(engine: RecordingEngine, admitting: list[int], **kw):  # type: ignore[no-untyped-def]
    """A batcher whose server reports ``admitting[0]`` requests still being admitted (not yet queued)."""
    b: Batcher

    def in_server() -> int:
        return admitting[0] + b.queued + b.running

    b = Batcher(engine, max_batch_size=kw.pop("max_batch_size", 4), max_wait_ms=kw.pop("max_wait_ms", 50),
                queue_limit=16, in_server=in_server)  # type: ignore[arg-type]
    return b


async def _run_admissions(b: Batcher, admitting: list[int], late_after_s: float) -> None:
    t = threading.Thread(target=b.run_forever, daemon=True)
    t.start()
    try:
        early = [asyncio.ensure_future(b.submit(GenRequest(f"e{i}", None, greedy()))) for i in range(2)]
        await asyncio.sleep(late_after_s)  # two more are "being admitted" meanwhile (slow image decode)
        late = [asyncio.ensure_future(b.submit(GenRequest(f"l{i}", None, greedy()))) for i in range(2)]
        admitting[0] = 0
        await asyncio.gather(*early, *late)
    finally:
        b.stop()
        t.join(5)


def test_a_batch_waits_past_its_window_for_requests_still_being_admitted() -> None:
    engine = RecordingEngine()
    admitting = [2]
    b = _batcher_with_admissions(engine, admitting, max_wait_ms=50)
    asyncio.run(_run_admissions(b, admitting, late_after_s=0.3))  # 6x the window, inside the grace
    assert engine.calls == [["e0", "e1", "l0", "l1"]]


def test_without_admission_info_or_past_the_grace_the_batch_starts() -> None:
    engine = RecordingEngine()
    admitting = [2]
    b = _batcher_with_admissions(engine, admitting, max_wait_ms=50)
    b.in_server = None  # a server that cannot say: the plain window
    asyncio.run(_run_admissions(b, admitting, late_after_s=0.3))
    assert engine.calls[0] == ["e0", "e1"]

    engine = RecordingEngine()
    admitting = [2]
    b = _batcher_with_admissions(engine, admitting, max_wait_ms=50)
    b.admit_grace_s = 0.1  # admissions that never finish cannot hold a batch for longer than the grace
    t0 = time.monotonic()
    asyncio.run(_run_admissions(b, admitting, late_after_s=0.6))
    assert engine.calls[0] == ["e0", "e1"] and time.monotonic() - t0 < 5
