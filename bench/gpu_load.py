"""Closed-loop load generator for ``llamactl serve`` (directly or through the balancer), used by the GPU benches.

``concurrency`` clients each send one streaming ``/v1/chat/completions`` request with one image, wait for its
last token and send the next, until ``requests`` have been sent. Answers have a fixed length (``ignore_eos``,
so min_new_tokens == max_new_tokens on the server). Every request is accounted for: failures (HTTP status,
transport error, an error event in the stream, or a short answer) are counted, never dropped.
Each outcome keeps the gaps between its streamed content chunks (inter-token latency as the client sees it).
With a ``deadline`` no request starts after it and those still running at ``deadline + grace_s`` are cut:
counted as ``cut`` (the bench ran out of time), apart from ``failed`` (the server failed them).
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import math
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

QUESTION = "Describe this image step by step, then answer briefly."


def noise_jpeg(seed: int, side: int) -> str:
    """A data: URL of a side x side JPEG (upscaled 16x16 noise): 1120 px = 4 tiles of 560 for the 11B processor."""
    from PIL import Image

    rnd = random.Random(seed)
    small = Image.frombytes("RGB", (16, 16), bytes(rnd.randrange(256) for _ in range(16 * 16 * 3)))
    buf = io.BytesIO()
    small.resize((side, side)).save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class Outcome:
    ok: bool
    e2e_s: float
    ttft_s: float | None
    completion_tokens: int
    upstream: str
    error: str = ""
    itl_s: list[float] = field(default_factory=list)  # gaps between successive content chunks
    chunks: int = 0  # content chunks received
    started_at: float = 0.0  # time.time() when it was sent (comparable across load processes)
    arrivals_at: list[float] = field(default_factory=list)  # time.time() of each content chunk
    first_round: bool = False  # among its client's first requests (the burst every closed loop starts with)
    image: int = -1  # the index of the image it carried


async def one_request(client: httpx.AsyncClient, url: str, image: str, max_tokens: int) -> Outcome:
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}},
            {"type": "text", "text": QUESTION},
        ]}],
        "max_tokens": max_tokens, "min_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.monotonic()
    wall0 = time.time()
    ttft: float | None = None
    tokens = 0
    upstream = ""
    arrivals: list[float] = []
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            upstream = r.headers.get("x-upstream", "direct")
            if r.status_code != 200:
                text = (await r.aread())[:200].decode(errors="replace")
                return Outcome(False, time.monotonic() - t0, None, 0, upstream, f"HTTP {r.status_code}: {text}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Outcome(False, time.monotonic() - t0, ttft, tokens, upstream, str(chunk["error"])[:200])
                if chunk.get("usage"):
                    tokens = int(chunk["usage"].get("completion_tokens", 0))
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    arrivals.append(time.monotonic())
                    if ttft is None:
                        ttft = arrivals[0] - t0
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return Outcome(False, time.monotonic() - t0, ttft, tokens, upstream, f"{type(exc).__name__}: {exc}"[:200])
    e2e = time.monotonic() - t0
    itl = gaps(arrivals)
    at = [wall0 + (a - t0) for a in arrivals]
    if tokens != max_tokens:
        return Outcome(False, e2e, ttft, tokens, upstream, f"{tokens} tokens instead of {max_tokens}", itl,
                       len(arrivals), wall0, at)
    return Outcome(True, e2e, ttft, tokens, upstream, "", itl, len(arrivals), wall0, at)


def gaps(times: list[float]) -> list[float]:
    """Differences between successive arrival times (a stream's inter-token latencies)."""
    return [b - a for a, b in itertools.pairwise(times)]


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


CUT = "cut: the bench's deadline passed while it ran"


async def _run(url: str, concurrency: int, requests: int, max_tokens: int, images: list[str],
               timeout_s: float, deadline: float | None = None, grace_s: float = 0.0,
               first_image: int = 0) -> tuple[list[Outcome], float]:
    """``deadline`` is a time.time() value: no request starts after it; running ones are cut at +grace_s."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sent = 0
    outcomes: list[Outcome] = []
    running: dict[int, float] = {}
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:
        async def worker() -> None:
            nonlocal sent
            while sent < requests and (deadline is None or time.time() < deadline):
                i = sent
                sent += 1
                running[i] = time.monotonic()
                outcome = await one_request(client, url, images[(first_image + i) % len(images)], max_tokens)
                outcome.first_round = i < concurrency
                outcome.image = (first_image + i) % len(images)
                outcomes.append(outcome)
                del running[i]

        t0 = time.monotonic()
        everyone = asyncio.gather(*(worker() for _ in range(concurrency)))
        if deadline is None:
            await everyone
        else:
            try:
                await asyncio.wait_for(everyone, max(0.0, deadline + grace_s - time.time()))
            except asyncio.TimeoutError:
                now = time.monotonic()
                outcomes.extend(Outcome(False, now - started, None, 0, "", CUT) for started in running.values())
        wall = time.monotonic() - t0
    return outcomes, wall


def _child(url: str, concurrency: int, requests: int, max_tokens: int, images: list[str], timeout_s: float,
           start_at: float, deadline: float | None = None, grace_s: float = 0.0,
           first_image: int = 0) -> tuple[list[Outcome], float]:
    """One load process: wait for the common start time, run, return outcomes and its end (wall clock)."""
    time.sleep(max(0.0, start_at - time.time()))
    outcomes, _ = asyncio.run(_run(url, concurrency, requests, max_tokens, images, timeout_s, deadline, grace_s,
                                   first_image))
    return outcomes, time.time()


def _run_processes(url: str, concurrency: int, requests: int, max_tokens: int, images: list[str],
                   timeout_s: float, processes: int, deadline: float | None = None,
                   grace_s: float = 0.0, first_image: int = 0) -> tuple[list[Outcome], float]:
    """Split clients and requests over ``processes`` spawned processes that start at one agreed instant."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    shares = [(concurrency // processes + (i < concurrency % processes),
               requests // processes + (i < requests % processes)) for i in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(time.sleep, [0] * processes))  # start the workers before the clock starts
        start_at = time.time() + 0.5
        futures, offset = [], first_image
        for c, r in shares:
            if c:  # each process starts at its own place in the images: concurrent requests differ
                futures.append(pool.submit(_child, url, c, r, max_tokens, images, timeout_s, start_at, deadline,
                                           grace_s, offset))
                offset += r
        results = [f.result() for f in futures]
    return [o for outs, _ in results for o in outs], max(end for _, end in results) - start_at


def steady(outcomes: list[Outcome]) -> dict[str, Any]:
    """Figures of the steady part of a closed-loop run: from the moment every client has finished its first
    request (the opening burst, when all clients sent at once, is over) to the moment the last request was sent
    (after which clients start to run out of work). Output tokens per second within that window (content chunks
    arriving in it, scaled by tokens per chunk) and TTFT of the requests sent within it."""
    good = [o for o in outcomes if o.ok]
    first = [o for o in good if o.first_round]
    if not good or not first:
        return {}
    start = max(o.started_at + o.e2e_s for o in first)
    end = max(o.started_at for o in good)
    if end - start < 1.0:
        return {"steady_note": "too short: rounds >= 3 give a steady window"}
    chunks = sum(1 for o in good for t in o.arrivals_at if start <= t <= end)
    per_chunk = sum(o.completion_tokens for o in good) / max(1, sum(o.chunks for o in good))
    ttft = [o.ttft_s for o in good if start <= o.started_at <= end and o.ttft_s is not None]
    return {
        "steady_window_s": round(end - start, 2), "steady_tok_per_s": round(chunks * per_chunk / (end - start), 1),
        "steady_requests": len(ttft), "steady_ttft_s_p50": _r(pct(ttft, 50)), "steady_ttft_s_p95": _r(pct(ttft, 95)),
    }


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def run_load(url: str, *, concurrency: int, requests: int, max_tokens: int, images: list[str],
             timeout_s: float = 900.0, processes: int = 1, deadline: float | None = None,
             grace_s: float = 0.0, first_image: int = 0) -> dict[str, Any]:
    """Drive ``requests`` fixed-length requests at ``concurrency``; returns the figures as a JSON-able dict.

    ``processes`` > 1 spreads the clients over that many load processes (one Python process can become the
    bottleneck at tens of streams with image uploads), started together; wall time spans all of them.
    Request i carries ``images[(first_image + i) % len(images)]``.
    """
    if processes > 1:
        outcomes, wall = _run_processes(url, concurrency, requests, max_tokens, images, timeout_s, processes,
                                        deadline, grace_s, first_image)
    else:
        outcomes, wall = asyncio.run(_run(url, concurrency, requests, max_tokens, images, timeout_s, deadline,
                                          grace_s, first_image))
    good = [o for o in outcomes if o.ok]
    cut = sum(1 for o in outcomes if o.error == CUT)
    tokens = sum(o.completion_tokens for o in good)
    e2e = [o.e2e_s for o in good]
    ttft = [o.ttft_s for o in good if o.ttft_s is not None]
    itl = [g for o in good for g in o.itl_s]
    tpot = [(o.e2e_s - o.ttft_s) / (o.completion_tokens - 1) for o in good
            if o.ttft_s is not None and o.completion_tokens > 1]

    def r(x: float | None, nd: int = 3) -> float | None:
        return None if x is None else round(x, nd)

    return {
        "concurrency": concurrency, "load_processes": processes, "requests": len(outcomes),
        "max_tokens": max_tokens,
        "ok": len(good), "failed": len(outcomes) - len(good) - cut, "cut": cut,
        "errors": sorted(Counter(o.error for o in outcomes if not o.ok and o.error != CUT).items())[:5],
        "wall_s": r(wall), "completion_tokens": tokens,
        "tok_per_s": r(tokens / wall, 1), "req_per_s": r(len(good) / wall),
        "latency_s_p50": r(pct(e2e, 50)), "latency_s_p95": r(pct(e2e, 95)),
        "latency_s_mean": r(statistics.fmean(e2e)) if e2e else None,
        "ttft_s_p50": r(pct(ttft, 50)), "ttft_s_p95": r(pct(ttft, 95)),
        "itl_s_p50": r(pct(itl, 50), 4), "itl_s_p95": r(pct(itl, 95), 4), "itl_s_max": r(max(itl, default=None), 4),
        "tpot_s_mean": r(statistics.fmean(tpot), 4) if tpot else None,
        "chunks_per_request_mean": r(statistics.fmean(o.chunks for o in good), 1) if good else None,
        "upstreams": dict(Counter(o.upstream for o in outcomes)),
        **steady(outcomes),
        **ttft_split(outcomes),
    }


def ttft_split(outcomes: list[Outcome]) -> dict[str, Any]:
    """TTFT of the opening burst (each client's first request) apart from the rest, and the slowest first tokens
    with when they were sent (seconds after the first send): where a whole-run TTFT tail comes from; and every
    request's send time, TTFT and end-to-end time."""
    good = [o for o in outcomes if o.ok and o.ttft_s is not None]
    if not good:
        return {}
    t0 = min(o.started_at for o in good)
    first = [o.ttft_s for o in good if o.first_round]
    rest = [o.ttft_s for o in good if not o.first_round]
    slowest = sorted(good, key=lambda o: o.ttft_s or 0.0, reverse=True)[:8]
    return {
        "burst_ttft_s_p50": _r(pct(first, 50)), "burst_ttft_s_p95": _r(pct(first, 95)),
        "burst_ttft_s_max": _r(max(first, default=None)),
        "after_burst_ttft_s_p50": _r(pct(rest, 50)), "after_burst_ttft_s_p95": _r(pct(rest, 95)),
        "slowest_ttft": [[_r(o.started_at - t0, 2), _r(o.ttft_s), o.first_round] for o in slowest],
        # every ok request in send order, [sent (s after the first send), TTFT, end to end]: where a median
        # comes from (Session 15: a TTFT p50 that moved with an unchanged mean), without a second run
        "ttft_timeline": [[_r(o.started_at - t0, 3), _r(o.ttft_s), _r(o.e2e_s)]
                          for o in sorted(good, key=lambda o: o.started_at)],
    }
