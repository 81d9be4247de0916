"""Backpressure over real HTTP: 429 when the queue is full, 504 past the deadline, a disconnect frees its place.

The engine is the real HF engine on the tiny checkpoint, with a gate in front of ``generate_batch`` so the test
decides when the model thread may run: that makes "the queue is full now" deterministic on a loaded machine.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from llamactl.server.engine import GenRequest, GenResult
from llamactl.server.hf_engine import HFEngine

from ._support import ThreadServer, make_settings, png_b64, start_thread_server


class GatedEngine(HFEngine):
    gate = threading.Event()

    def generate_batch(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        self.gate.wait(60)
        return super().generate_batch(requests)


def gated_server(checkpoint: Path, request_timeout_s: float) -> Iterator[ThreadServer]:
    settings = make_settings(
        checkpoint,
        max_batch_size=1,
        max_wait_ms=0,
        queue_limit=2,
        request_timeout_s=request_timeout_s,
        cache_max_entries=0,
    )
    GatedEngine.gate.set()  # open for the warm-up
    server = start_thread_server(settings, GatedEngine(settings))
    yield server
    GatedEngine.gate.set()
    server.stop()


@pytest.fixture(scope="module")
def srv(tiny_checkpoint: Path) -> Iterator[ThreadServer]:
    """Deadlines far beyond any test step, so a slow machine cannot turn an expected 200 into a 504."""
    yield from gated_server(tiny_checkpoint, 120)


@pytest.fixture(scope="module")
def impatient(tiny_checkpoint: Path) -> Iterator[ThreadServer]:
    yield from gated_server(tiny_checkpoint, 4)


def wait_for(cond: Callable[[], bool], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def body(tokens: int = 4) -> dict[str, object]:
    return {"image": png_b64("red"), "max_tokens": tokens}


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        yield ex
    GatedEngine.gate.set()


def test_full_queue_gets_429_with_retry_after(
    srv: ThreadServer, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    GatedEngine.gate.clear()
    b = srv.state.batcher
    first = pool.submit(httpx.post, srv.url + "/infer", json=body(), timeout=30)
    wait_for(lambda: b.running == 1)
    queued = [pool.submit(httpx.post, srv.url + "/infer", json=body(), timeout=30) for _ in range(2)]
    wait_for(lambda: b.queued == 2)
    r = httpx.post(srv.url + "/infer", json=body(), timeout=30)
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "queue_full"
    assert int(r.headers["retry-after"]) >= 1
    assert httpx.get(srv.url + "/health").json()["queued"] == 2
    GatedEngine.gate.set()
    assert [f.result().status_code for f in [first, *queued]] == [200, 200, 200]


def test_deadline_gives_504_and_frees_the_queue(
    impatient: ThreadServer, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    srv = impatient
    GatedEngine.gate.clear()
    b = srv.state.batcher
    first = pool.submit(httpx.post, srv.url + "/infer", json=body(), timeout=30)
    wait_for(lambda: b.running == 1)
    t0 = time.monotonic()
    late = httpx.post(srv.url + "/infer", json=body(), timeout=30)  # waits behind the gate past its 4 s
    assert late.status_code == 504 and late.json()["error"]["type"] == "timeout"
    assert 3.5 < time.monotonic() - t0 < 15
    assert b.queued == 0  # the expired request left the queue
    GatedEngine.gate.set()
    # the running one's deadline passed too: it is stopped rather than generating for nobody
    assert first.result().status_code == 504
    assert httpx.get(srv.url + "/ready").status_code == 200
    ok = httpx.post(srv.url + "/infer", json=body(), timeout=30)
    assert ok.status_code == 200


def test_disconnected_client_frees_its_place(
    srv: ThreadServer, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    GatedEngine.gate.clear()
    b = srv.state.batcher
    first = pool.submit(httpx.post, srv.url + "/infer", json=body(), timeout=30)
    wait_for(lambda: b.running == 1)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(srv.url + "/infer", json=body(), timeout=httpx.Timeout(30, read=0.5))
    wait_for(lambda: b.queued == 0, timeout_s=5)  # removed from the queue before it ran
    metrics = httpx.get(srv.url + "/metrics").text
    line = next(ln for ln in metrics.splitlines() if 'request_errors_total{reason="client_disconnect"}' in ln)
    assert float(line.rsplit(" ", 1)[1]) >= 1
    batches = srv.state.engine.batches
    GatedEngine.gate.set()
    assert first.result().status_code == 200
    time.sleep(0.3)
    assert srv.state.engine.batches == batches  # counted when it started: only the first request ran, the abandoned one never did
