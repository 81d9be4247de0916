"""The vision tower as CUDA graphs (engine/continuous/tower_graphs.py) on a GPU: 11B-shape tower with random bf16
weights, the engine's split-mask attention with the kernel the start picks (FlashAttention 4 where installed).

Measures: capture (seconds per graph, all chunk sizes x padding widths); a replay's distance from the eager tower
(mixed chunks); for chunks of 1 and 8 images the device time and the host's wall time from the call to the
result, eager vs replay, and for 1 image beside 1 or 2 threads that hold the GIL (pure-Python loops: an extreme
of what a server's request threads do while a burst's images are decoded); then tower replays (8 images, vision
stream) beside replays of a decode-like graph (cuBLAS GEMMs of one-row shapes, captured on torch.cuda.graph's
default stream as the engine's decode graphs are, replayed on a high-priority stream): first with the tower
captured on its own stream (the engine's way), then, with --shared-stream, on that default stream (Session 14's
first version, which hung in the server): a step not done within 30 s counts as hung and the probe exits.
Stacks of all threads go to the log every minute. The JSON is written after each part.

    python3 bench/engine_tower_graphs_probe.py --out $OUT/engine_tower_graphs_probe.json [--shared-stream]
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from engine_tower_probe import vision_models


def python_load(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(i * i for i in range(2000))


def wall_and_device(call: Any, reps: int = 3, cap_s: float = 20.0) -> tuple[float, float]:
    """Median wall seconds from the call to the synchronized result, and median device seconds (CUDA events);
    fewer calls once one took ``cap_s``."""
    walls, devices = [], []
    for _ in range(reps):
        if walls and max(walls) > cap_s:
            break
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
        devices.append(start.elapsed_time(end) / 1000)
    return sorted(walls)[len(walls) // 2], sorted(devices)[len(devices) // 2]


def decode_like_graphs() -> Any:
    """One-row GEMMs at the text model's shapes (q/k/v, o, MLP, x 8 layers) as the engine's DecodeGraphs (the same
    capture code: torch.cuda.graph's default stream), captured now; ``.run(1, 128)`` replays."""
    from llamactl.server.engine.continuous.graphs import DecodeGraphs

    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / 64
               for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))]

    def step(tokens: torch.Tensor, positions: torch.Tensor, rows: int, length: int) -> torch.Tensor:
        h = x
        for _ in range(8):
            qkv = h @ weights[0].t()
            h = h + (qkv[:, :4096] @ weights[1].t())
            up = h @ weights[2].t()
            h = h + (up[:, :14336] * torch.sigmoid(up[:, 14336:])) @ weights[3].t()
        return h

    graphs = DecodeGraphs(step, 1, "cuda")
    graphs.run(1, 128)
    return graphs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shared-stream", action="store_true",
                    help="last: the tower captured on torch.cuda.graph's default stream beside the decode-like graph")
    args = ap.parse_args()
    log = args.out.with_suffix(".log").open("w", buffering=1)
    faulthandler.dump_traceback_later(60, repeat=True, file=log)

    from llamactl.server.engine.continuous.kernel_choice import relative_l2
    from llamactl.server.engine.continuous.tower_graphs import TowerGraphs, cuda_capture
    from llamactl.server.engine.continuous.vision import VisionEncoder, choose_backend

    def say(*parts: Any) -> None:
        print(*parts, flush=True)
        print(*parts, file=log, flush=True)

    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    torch.backends.cuda.enable_cudnn_sdp(True)
    _, _, vision, projector = vision_models()
    dtype = torch.bfloat16
    encoder = VisionEncoder(vision, projector, split_mask=True)
    with torch.inference_mode():
        report["attention_timings_2_images_s"] = choose_backend(encoder, 2, 4, 560, dtype)
        report["attention"] = "flash-attn-4" if encoder.flash4 else str(encoder.backends)
        say("attention", report["attention"], report["attention_timings_2_images_s"])
        base = cuda_capture()
        per_graph: list[float] = []

        def capture(body: Any) -> Any:
            t0 = time.perf_counter()
            replay = base(body)
            per_graph.append(time.perf_counter() - t0)
            say(f"captured graph {len(per_graph)} in {per_graph[-1]:.2f} s")
            return replay

        decode_graphs = decode_like_graphs()  # first: it makes torch.cuda.graph's default stream
        graphs = TowerGraphs(encoder, 8, 4, 560, dtype, "cuda", capture)
        graphs.capture_all()
        torch.cuda.empty_cache()
        report["graphs"] = graphs.count
        report["widths"] = graphs.widths
        report["capture_s"] = round(graphs.capture_s, 2)
        report["capture_per_graph_s"] = [round(s, 3) for s in per_graph]
        report["reserved_gib_after_capture"] = round(torch.cuda.memory_reserved() / 2**30, 2)  # tower + graphs
        say("capture", report["capture_s"], "s for", graphs.count)

        def chunk(n: int, used: list[int], seed: int) -> tuple[list[torch.Tensor], ...]:
            gen = torch.Generator().manual_seed(seed)
            pixels = [torch.randn(1, 1, 4, 3, 560, 560, generator=gen).to(dtype).pin_memory() for _ in range(n)]
            ids = [torch.ones(1, 1, dtype=torch.long) for _ in range(n)]
            masks = [torch.tensor([[[1] * u + [0] * (4 - u)]]) for u in used]
            return pixels, ids, masks

        def eager(c: tuple[list[torch.Tensor], ...]) -> torch.Tensor:
            pixels, ids, masks = c
            pixel = torch.cat([p.to("cuda", non_blocking=True) for p in pixels])
            mask = torch.cat(masks)
            return encoder(pixel, torch.cat(ids).to("cuda"), mask.to("cuda"), mask)

        distances = {}
        for n, used in ((1, [4]), (2, [4, 1]), (3, [2, 3, 4]), (8, [4] * 8), (8, [1, 2, 3, 4, 4, 4, 4, 4])):
            c = chunk(n, used, n)
            got = graphs.encode(*c)
            assert got is not None
            distances[f"{n} images, tiles {used}"] = relative_l2(got.float(), eager(c).float())
        report["replay_vs_eager_rel_l2"] = distances
        say("distances", distances)
        args.out.write_text(json.dumps(report, indent=1))

        timings: dict[str, Any] = {}
        for load in (0, 1, 2):
            stop = threading.Event()
            threads = [threading.Thread(target=python_load, args=(stop,), daemon=True) for _ in range(load)]
            for t in threads:
                t.start()
            try:
                for n in (1, 8) if load == 0 else (1,):  # under load: the burst's first chunk
                    c = chunk(n, [4] * n, 100 + n)
                    for form, call in (("eager", lambda c=c: eager(c)), ("replay", lambda c=c: graphs.encode(*c))):
                        wall, device = wall_and_device(call, cap_s=5.0)
                        timings[f"{n} images, {form}, {load} GIL threads"] = {"wall_s": round(wall, 4),
                                                                             "device_s": round(device, 4)}
                        say(n, form, load, f"wall {wall * 1000:.1f} ms device {device * 1000:.1f} ms")
            finally:
                stop.set()
                for t in threads:
                    t.join()
        report["timings"] = timings
        args.out.write_text(json.dumps(report, indent=1))

        def concurrent(tower: TowerGraphs, label: str) -> None:
            """8-image tower replays on a low-priority stream, decode-like replays on a high-priority one."""
            vision = torch.cuda.Stream(priority=0)
            main = torch.cuda.Stream(priority=-1)
            c = chunk(8, [4] * 8, 7)
            steps, towers = 0, 0
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 10:
                with torch.cuda.stream(vision):
                    tower.encode(*c)
                    tower_done = torch.cuda.Event()
                    tower_done.record()
                towers += 1
                while not tower_done.query():
                    with torch.cuda.stream(main):
                        decode_graphs.run(1, 128)
                        done = torch.cuda.Event()
                        done.record()
                    deadline = time.perf_counter() + 30
                    while not done.query():
                        if time.perf_counter() > deadline:
                            report[f"concurrent_{label}"] = {"hung_after_steps": steps, "towers": towers}
                            args.out.write_text(json.dumps(report, indent=1))
                            say("HUNG", label, steps, towers)
                            log.flush()
                            os._exit(3)  # the GPU does not come back; leave without waiting for it
                        time.sleep(0.0005)
                    steps += 1
            torch.cuda.synchronize()
            report[f"concurrent_{label}"] = {"steps": steps, "towers": towers, "seconds": 10}
            say("concurrent", label, steps, towers)
            args.out.write_text(json.dumps(report, indent=1))

        concurrent(graphs, "own_capture_stream")
        if args.shared_stream:
            shared = TowerGraphs(encoder, 8, 4, 560, dtype, "cuda",
                                 cuda_capture(stream=torch.cuda.graph.default_capture_stream))
            shared._replays[(8, shared.widths[0])] = shared._capture(shared._body(8, shared.widths[0]))
            concurrent(shared, "shared_capture_stream")
    faulthandler.cancel_dump_traceback_later()
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
