"""How much a burst's image work slows the model thread's kernel launches through the GIL, per switch interval.

The burst probe (engine_burst_probe.py) showed the first tower chunk of a 32-request burst taking 0.2-0.45 s for
one image on an H200 host, where the same image alone takes ~40 ms: the model thread launched its kernels
slowly while the request threads decoded and prepared images. Each PyTorch call releases the GIL and takes it
back; while other threads run Python code (or C code that keeps the GIL, such as Pillow's decoders), each
take-back can wait up to the interpreter's switch interval (5 ms by default): the convoy effect.

Here a stand-in for the model thread (slices of 2,000 small torch calls, each releasing and re-taking the GIL
as a kernel launch does) runs beside ``--requests`` images' work, and reports how many times slower its slices
ran than alone: first each part of one request's image work in ONE other thread (on a machine with cores to
spare, the slowdown is then the GIL's alone), then whole bursts in ``--threads`` threads per
``sys.setswitchinterval`` value (with more threads than cores, CPU sharing adds to it).

    python3 bench/engine_gil_probe.py --out /tmp/gil.json                      # CPU only, ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_load import noise_jpeg


def launches(ops: int) -> float:
    """Seconds for ``ops`` small torch calls (each drops and re-takes the GIL)."""
    import torch

    x = torch.zeros(16)
    t0 = time.perf_counter()
    for _ in range(ops):
        x.add_(1.0)
    return time.perf_counter() - t0


def slowdown(burst: Callable[[], None], slice_ops: int = 2000) -> tuple[float, float]:
    """(how many times slower the stand-in's slices ran while ``burst`` ran in other threads, burst seconds)."""
    alone = statistics.median(launches(slice_ops) for _ in range(20))
    done: dict[str, float] = {}

    def timed() -> None:
        t0 = time.perf_counter()
        burst()
        done["s"] = time.perf_counter() - t0

    thread = threading.Thread(target=timed)
    thread.start()
    slices = []
    while thread.is_alive():
        slices.append(launches(slice_ops))
    thread.join()
    return (statistics.fmean(slices) / alone if slices else float("nan")), done["s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--threads", default="1,8")
    ap.add_argument("--intervals-ms", default="5,0.5")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    import base64

    import torch
    from gpu_smoke import make_processor

    from llamactl.server.engine.continuous.pixels import FastPixels
    from llamactl.server.images import ImageLimits, decode_base64_image, decode_image

    torch.set_num_threads(1)
    table = FastPixels.for_processor(make_processor()[0].image_processor, torch.bfloat16)
    assert table is not None
    limits = ImageLimits(max_bytes=20 * 1024 * 1024, max_pixels=40_000_000)
    urls = [noise_jpeg(seed, 1120) for seed in range(a.requests)]
    raw = [base64.b64decode(u.split(",", 1)[1]) for u in urls]
    images = [decode_base64_image(u, limits) for u in urls]
    parts: dict[str, Callable[[int], Any]] = {
        "base64 + decode (the route's decode_image)": lambda i: decode_base64_image(urls[i], limits),
        "decode from bytes (Pillow, checks, RGB)": lambda i: decode_image(raw[i], limits),
        "pixels.py table": lambda i: table(images[i]),
        "both (one request's image work)": lambda i: table(decode_base64_image(urls[i], limits)),
        "time.sleep(5 ms) (control)": lambda i: time.sleep(0.005),
    }
    report: dict[str, Any] = {"cpus": os.cpu_count(), "requests": a.requests, "parts": {}, "bursts": {}}
    for name, part in parts.items():  # one thread beside the stand-in: GIL, not cores
        factor, seconds = slowdown(lambda part=part: [part(i) for i in range(a.requests)])
        report["parts"][name] = {"stand_in_slower_x": round(factor, 2),
                                 "ms_each": round(seconds / a.requests * 1e3, 2)}
        print(f"{name}: {report['parts'][name]}", flush=True)
    work = parts["both (one request's image work)"]
    for threads in [int(t) for t in a.threads.split(",")]:
        for ms in [float(x) for x in a.intervals_ms.split(",")]:
            sys.setswitchinterval(ms / 1000)

            def burst(threads: int = threads) -> None:
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(work, range(a.requests)))

            runs = [slowdown(burst) for _ in range(a.repeats)]
            row = {"stand_in_slower_x": round(statistics.median(r[0] for r in runs), 2),
                   "burst_s": round(statistics.median(r[1] for r in runs), 3)}
            report["bursts"][f"{threads} threads, switch interval {ms} ms"] = row
            print(f"{threads} threads, switch interval {ms} ms: {row}", flush=True)
    sys.setswitchinterval(0.005)
    a.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
