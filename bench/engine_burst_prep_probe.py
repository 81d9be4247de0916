"""How soon the opening burst's images are ready for the vision tower: 32 requests' image work, as the server's
request threads do it (`decode_base64_image`, then the image processor), submitted at once to a pool of N threads;
the seconds at which the 8th, 16th, 24th and 32nd are done (the tower takes them in chunks of 8). N = 20 is what
the server gets (asyncio.to_thread's default pool: min(32, cores + 4) on a 16-core GPU machine); fewer threads
finish the first ones sooner if fair sharing of the cores is what holds them back.

Images as engine_bench.py sends them (1120x1120 JPEGs of upscaled noise, 4 tiles); the processor is
transformers' MllamaImageProcessor with the 11B checkpoint's defaults (560 px tiles, up to 4), in whichever
backend this machine's transformers picks (recorded). Text tokenization is left out (~0.1 ms a prompt).

    python3 bench/engine_burst_prep_probe.py --out $OUT/engine_burst_prep_probe.json   # CPU only, ~30 s
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_load import noise_jpeg


def burst(urls: list[str], threads: int, work: Any) -> list[float]:
    """Seconds from submitting all of ``urls`` at once until each is done, sorted."""
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        done = list(pool.map(lambda u: (work(u), time.perf_counter() - start)[1], urls))
    return sorted(done)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--threads", default="20,8,4,2,1")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import MllamaImageProcessor

    from llamactl.server.images import ImageLimits, decode_base64_image

    processor = MllamaImageProcessor()
    limits = ImageLimits(max_bytes=20 * 1024 * 1024, max_pixels=40_000_000)  # the server's defaults
    urls = [noise_jpeg(seed, 1120) for seed in range(args.requests)]

    def work(url: str) -> None:
        image = decode_base64_image(url, limits)
        processor(images=[[image]], return_tensors="pt")

    one = [time.perf_counter()]
    for url in urls[:8]:
        work(url)
        one.append(time.perf_counter())
    report: dict[str, Any] = {
        "cpus": os.cpu_count(), "processor": type(processor).__name__,
        "one_image_alone_s": statistics.median(b - a for a, b in itertools.pairwise(one)), "bursts": {}}
    for threads in [int(t) for t in args.threads.split(",")]:
        runs = [burst(urls, threads, work) for _ in range(args.repeats)]
        report["bursts"][threads] = {
            f"done_{k}_s": statistics.median(r[k - 1] for r in runs) for k in (8, 16, 24, args.requests)}
        print(threads, report["bursts"][threads], flush=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
