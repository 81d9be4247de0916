"""How soon the opening burst's images are ready for the vision tower: 32 requests' image work, as the server's
request threads do it (`decode_base64_image`, then the image processor), submitted at once to a pool of N threads;
the seconds at which the 8th, 16th, 24th and 32nd are done (the tower takes them in chunks of 8). N = 20 is what
the server gets (asyncio.to_thread's default pool: min(32, cores + 4) on a 16-core GPU machine); fewer threads
finish the first ones sooner if fair sharing of the cores is what holds them back.

Images as engine_bench.py sends them (1120x1120 JPEGs of upscaled noise, 4 tiles); the image processor is the
bench checkpoint's (gpu_smoke.make_processor: transformers' PIL-backend Mllama processor, 560 px tiles, up to 4;
run 1 of this probe used the class's default 224 px tiles by mistake, less work than the server's). Per
``--pixels``: ``processor`` = its pixel values cast to bfloat16 and pinned (the server's path until pixels.py),
``table`` = engine/continuous/pixels.py's equal values (what the continuous engine now does). Text
tokenization is left out (~0.1 ms a prompt).

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
    ap.add_argument("--pixels", default="processor,table")
    args = ap.parse_args()
    import torch
    from gpu_smoke import make_processor

    from llamactl.server.engine.continuous.pixels import FastPixels
    from llamactl.server.images import ImageLimits, decode_base64_image

    processor = make_processor()[0].image_processor
    pin = torch.cuda.is_available()
    table = FastPixels.for_processor(processor, torch.bfloat16)
    assert table is not None
    limits = ImageLimits(max_bytes=20 * 1024 * 1024, max_pixels=40_000_000)  # the server's defaults
    urls = [noise_jpeg(seed, 1120) for seed in range(args.requests)]

    def with_processor(url: str) -> None:
        pixel = processor(images=[[decode_base64_image(url, limits)]], return_tensors="pt")["pixel_values"]
        pixel = pixel.to(torch.bfloat16)
        if pin:
            pixel.pin_memory()

    def with_table(url: str) -> None:
        table(decode_base64_image(url, limits), pin=pin)

    report: dict[str, Any] = {"cpus": os.cpu_count(), "processor": type(processor).__name__,
                              "tile": processor.size["height"], "pinned": pin, "torch_threads": torch.get_num_threads()}
    for name in args.pixels.split(","):
        work = {"processor": with_processor, "table": with_table}[name]
        alone = [time.perf_counter()]
        for url in urls[:8]:
            work(url)
            alone.append(time.perf_counter())
        mine: dict[str, Any] = {"one_image_alone_s": statistics.median(b - a for a, b in itertools.pairwise(alone)),
                                "bursts": {}}
        report[name] = mine
        for threads in [int(t) for t in args.threads.split(",")]:
            runs = [burst(urls, threads, work) for _ in range(args.repeats)]
            mine["bursts"][threads] = {
                f"done_{k}_s": statistics.median(r[k - 1] for r in runs) for k in (8, 16, 24, args.requests)}
            print(name, threads, mine["bursts"][threads], flush=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
