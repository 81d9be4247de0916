"""Closed-loop load generator for ``llamactl serve`` (directly or through the balancer), used by the GPU benches.

``concurrency`` clients each send one streaming ``/v1/chat/completions`` request with one image, wait for its
last token and send the next, until ``requests`` have been sent. Answers have a fixed length (``ignore_eos``,
so min_new_tokens == max_new_tokens on the server). Every request is accounted for: failures (HTTP status,
transport error, an error event in the stream, or a short answer) are counted, never dropped.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass
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


async def one_request(client: httpx.AsyncClient, url: str, image: str, max_tokens: int) -> Outcome:
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}},
            {"type": "text", "text": QUESTION},
        ]}],
        "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.monotonic()
    ttft: float | None = None
    tokens = 0
    upstream = ""
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
                if ttft is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    ttft = time.monotonic() - t0
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return Outcome(False, time.monotonic() - t0, ttft, tokens, upstream, f"{type(exc).__name__}: {exc}"[:200])
    e2e = time.monotonic() - t0
    if tokens != max_tokens:
        return Outcome(False, e2e, ttft, tokens, upstream, f"{tokens} tokens instead of {max_tokens}")
    return Outcome(True, e2e, ttft, tokens, upstream)


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def _run(url: str, concurrency: int, requests: int, max_tokens: int, images: list[str],
               timeout_s: float) -> tuple[list[Outcome], float]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sent = 0
    outcomes: list[Outcome] = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:
        async def worker() -> None:
            nonlocal sent
            while sent < requests:
                i = sent
                sent += 1
                outcomes.append(await one_request(client, url, images[i % len(images)], max_tokens))

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.monotonic() - t0
    return outcomes, wall


def _child(url: str, concurrency: int, requests: int, max_tokens: int, images: list[str], timeout_s: float,
           start_at: float) -> tuple[list[Outcome], float]:
    """One load process: wait for the common start time, run, return outcomes and its end (wall clock)."""
    time.sleep(max(0.0, start_at - time.time()))
    outcomes, _ = asyncio.run(_run(url, concurrency, requests, max_tokens, images, timeout_s))
    return outcomes, time.time()


def _run_processes(url: str, concurrency: int, requests: int, max_tokens: int, images: list[str],
                   timeout_s: float, processes: int) -> tuple[list[Outcome], float]:
    """Split clients and requests over ``processes`` spawned processes that start at one agreed instant."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    shares = [(concurrency // processes + (i < concurrency % processes),
               requests // processes + (i < requests % processes)) for i in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(time.sleep, [0] * processes))  # start the workers before the clock starts
        start_at = time.time() + 0.5
        futures = [pool.submit(_child, url, c, r, max_tokens, images, timeout_s, start_at) for c, r in shares if c]
        results = [f.result() for f in futures]
    return [o for outs, _ in results for o in outs], max(end for _, end in results) - start_at


def run_load(url: str, *, concurrency: int, requests: int, max_tokens: int, images: list[str],
             timeout_s: float = 900.0, processes: int = 1) -> dict[str, Any]:
    """Drive ``requests`` fixed-length requests at ``concurrency``; returns the figures as a JSON-able dict.

    ``processes`` > 1 spreads the clients over that many load processes (one Python process can become the
    bottleneck at tens of streams with image uploads), started together; wall time spans all of them.
    """
    if processes > 1:
        outcomes, wall = _run_processes(url, concurrency, requests, max_tokens, images, timeout_s, processes)
    else:
        outcomes, wall = asyncio.run(_run(url, concurrency, requests, max_tokens, images, timeout_s))
    good = [o for o in outcomes if o.ok]
    tokens = sum(o.completion_tokens for o in good)
    e2e = [o.e2e_s for o in good]
    ttft = [o.ttft_s for o in good if o.ttft_s is not None]

    def r(x: float | None, nd: int = 3) -> float | None:
        return None if x is None else round(x, nd)

    return {
        "concurrency": concurrency, "load_processes": processes, "requests": len(outcomes),
        "max_tokens": max_tokens,
        "ok": len(good), "failed": len(outcomes) - len(good),
        "errors": sorted(Counter(o.error for o in outcomes if not o.ok).items())[:5],
        "wall_s": r(wall), "completion_tokens": tokens,
        "tok_per_s": r(tokens / wall, 1), "req_per_s": r(len(good) / wall),
        "latency_s_p50": r(pct(e2e, 50)), "latency_s_p95": r(pct(e2e, 95)),
        "latency_s_mean": r(statistics.fmean(e2e)) if e2e else None,
        "ttft_s_p50": r(pct(ttft, 50)), "ttft_s_p95": r(pct(ttft, 95)),
        "upstreams": dict(Counter(o.upstream for o in outcomes)),
    }
