"""When the GPU idles under load, and what the step loop was doing then.

Runs closed-loop load straight into the continuous engine (engine_direct.py's load, 11B shape, 4-tile images,
128-token answers) and records a few seconds of the steady state with PyTorch's profiler: every kernel on the
device and, on the host, the step loop's phases (``HostTime``) and the calls inside them, marked as ranges. Then:
- the device's busy fraction (the union of kernel intervals, both streams) and kernel time per stream;
- its idle gaps, by size, and which host phase (innermost mark) each gap's time fell in;
- the CUDA runtime calls that block the host (synchronizations, pageable copies) counted per phase.
Optionally first the teacher-forced logit check of engine_direct.py (``--logits``).

    python3 bench/engine_timeline_probe.py --logits --out $OUT/engine_timeline.json     # GPU
    python3 bench/engine_timeline_probe.py --tiny --out /tmp/timeline.json              # CPU: the path only
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch

MARK = "llamactl:"  # prefix of the ranges this probe adds
BLOCKING = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy")


def instrument(engine: Any) -> None:
    """Mark the step loop's phases and the calls inside them as profiler ranges (this process only)."""
    from torch.profiler import record_function

    from llamactl.server.engine.continuous import engine as engine_module

    clock = engine.host
    plain_phase = clock.phase

    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:
        with record_function(MARK + name), plain_phase(name):
            yield

    clock.phase = phase  # type: ignore[method-assign]

    def wrap(owner: Any, attr: str, label: str) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def marked(*a: Any, **kw: Any) -> Any:
            with record_function(MARK + label):
                return fn(*a, **kw)

        setattr(owner, attr, marked)

    runner = engine.runner
    for attr in ("write_cross", "prefill", "set_cross_rows", "vision_states"):
        wrap(runner, attr, attr)
    for attr in ("_accept", "_release", "_take_newcomers"):
        wrap(engine, attr, attr.lstrip("_"))
    if engine.graphs is not None:
        wrap(engine.graphs, "run", "graph_replay")
    wrap(engine_module, "sample_tokens", "sample_tokens")


class Window:
    """The profiler, started and stopped from the step loop's own thread (``step_hook``)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.wanted, self.done = threading.Event(), threading.Event()
        self.events: list[Any] = []
        self._prof: Any = None
        self._until = 0.0

    def hook(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        if self.done.is_set() or not self.wanted.is_set():
            return
        if self._prof is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._prof = profile(activities=activities)
            self._prof.__enter__()
            self._until = time.monotonic() + self.seconds
        elif time.monotonic() >= self._until:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the window's kernels have ended
            self._prof.__exit__(None, None, None)
            self.events = list(self._prof.profiler.kineto_results.events())
            self.done.set()


def _union(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _length(intervals: list[tuple[int, int]]) -> int:
    return sum(e - s for s, e in intervals)


def analyse(events: list[Any]) -> dict[str, Any]:
    """Busy fraction, gaps and their host phases, blocking calls per phase, from kineto events."""
    kernels: list[tuple[int, int, int]] = []  # (start, end, stream) in ns
    marks: list[tuple[int, int, str]] = []
    runtime: list[tuple[int, int, str]] = []
    for e in events:
        start, dur, name = e.start_ns(), e.duration_ns(), e.name()
        if e.device_type().name == "CUDA":
            if "memcpy" in name.lower() or "memset" in name.lower():
                continue
            kernels.append((start, start + dur, e.device_resource_id()))
        elif name.startswith(MARK):
            marks.append((start, start + dur, name[len(MARK):]))
        elif name.startswith(BLOCKING):
            runtime.append((start, start + dur, name))
    if not kernels:
        return {"kernels": 0, "marks": len(marks)}
    kernels.sort()
    t0, t1 = kernels[0][0], max(k[1] for k in kernels)
    per_stream: dict[str, float] = {}
    for s, e, stream in kernels:
        per_stream[str(stream)] = per_stream.get(str(stream), 0.0) + (e - s) / 1e9
    active = {stream: _union([(s, e) for s, e, st in kernels if st == stream]) for stream in {k[2] for k in kernels}}
    busy, gaps = 0, []
    cur_s, cur_e = kernels[0][0], kernels[0][1]
    for s, e, _ in kernels[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append((cur_e, s))
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = t1 - t0

    def innermost(t: int) -> str:
        best, width = "no phase (between phases / loop overhead)", None
        for s, e, name in marks:  # marks are few (thousands): a linear scan per gap is fine
            if s <= t < e and (width is None or e - s < width):
                best, width = name, e - s
        return best

    def label(t: int) -> str:
        names = sorted(((e - s, name) for s, e, name in marks if s <= t < e))
        return " > ".join(n for _, n in reversed(names)) or "no phase"

    sizes = {"<20us": 0.0, "20-100us": 0.0, "0.1-1ms": 0.0, "1-5ms": 0.0, ">=5ms": 0.0}
    counts = dict.fromkeys(sizes, 0)
    by_phase: dict[str, float] = {}
    by_path: dict[str, float] = {}
    marks.sort()
    for s, e in gaps:
        d = e - s
        key = ("<20us" if d < 2e4 else "20-100us" if d < 1e5 else "0.1-1ms" if d < 1e6 else "1-5ms" if d < 5e6
               else ">=5ms")
        sizes[key] += d / 1e9
        counts[key] += 1
        if d >= 2e4:  # attribute the gaps that matter, at a few points inside each
            for frac in (0.1, 0.5, 0.9):
                t = s + int(d * frac)
                share = d / 3 / 1e9
                by_phase[innermost(t)] = by_phase.get(innermost(t), 0.0) + share
                path = label(t)
                by_path[path] = by_path.get(path, 0.0) + share
    blocking: dict[str, dict[str, float]] = {}
    for s, e, name in runtime:
        if e - s < 5_000:  # returned at once: nothing was waited for
            continue
        where = label(s)
        slot = blocking.setdefault(f"{name} in {where}", {"calls": 0, "s": 0.0})
        slot["calls"] += 1
        slot["s"] += (e - s) / 1e9
    phase_totals: dict[str, float] = {}
    for s, e, name in marks:
        phase_totals[name] = phase_totals.get(name, 0.0) + (e - s) / 1e9
    top = lambda d, n=14: dict(sorted(((k, round(v, 4)) for k, v in d.items()), key=lambda kv: -kv[1])[:n])
    return {
        "span_s": round(span / 1e9, 3),
        "busy_s": round(busy / 1e9, 3),
        "busy_fraction": round(busy / span, 4),
        "kernel_s_per_stream": {k: round(v, 3) for k, v in per_stream.items()},
        "kernels_per_stream": {str(st): sum(1 for k in kernels if k[2] == st) for st in active},
        # how long each stream had a kernel running, and how long two or more streams did at once
        "stream_active_s": {str(st): round(_length(iv) / 1e9, 3) for st, iv in active.items()},
        "streams_together_s": round((sum(_length(iv) for iv in active.values()) - busy) / 1e9, 3),
        "gap_s_by_size": {k: round(v, 4) for k, v in sizes.items()},
        "gap_count_by_size": counts,
        "gap_s_by_phase": top(by_phase),
        "gap_s_by_phase_path": top(by_path, 20),
        "blocking_calls": {k: {"calls": int(v["calls"]), "s": round(v["s"], 4)}
                           for k, v in sorted(blocking.items(), key=lambda kv: -kv[1]["s"])[:20]},
        "host_marks_s": top(phase_totals, 30),
    }


def measure(engine: Any, args: argparse.Namespace, new: int, arrival: bool = False) -> dict[str, Any]:
    """A warm level, then the measured one with a profiled window inside its steady state (``arrival``: each
    request's image processed when it is sent, in a thread of its own, as in the server)."""
    from engine_direct import load_level

    window = Window(args.window_s)
    engine.step_hook = window.hook  # the profiler runs in the step loop's thread: its ranges are that thread's
    load_level(engine, args.clients, args.clients, args.side, new, 1)  # warm: this level's graphs
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(
        load_level(engine, args.clients, args.requests, args.side, new, 2, prepare_at_arrival=arrival)))
    steps_before = engine.steps
    runner.start()
    while engine.steps == steps_before and runner.is_alive():  # its requests are prepared first (processor)
        time.sleep(0.01)
    time.sleep(args.settle_s)  # past the opening burst
    steps0, host0 = engine.steps, engine.host.snapshot()
    window.wanted.set()
    window.done.wait()
    steps1, host1 = engine.steps, engine.host.snapshot()
    runner.join()
    engine.step_hook = None
    return {
        "level": result,
        "window": {"steps": steps1 - steps0,
                   "host_s": {k: round(host1.get(k, 0.0) - host0.get(k, 0.0), 3) for k in host1}},
        "timeline": analyse(window.events),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--logits", action="store_true", help="engine_direct's teacher-forced logit check first")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--settle-s", type=float, default=6.0, help="load before the recording starts")
    ap.add_argument("--window-s", type=float, default=3.0)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--side", type=int, default=1120)
    ap.add_argument("--variants", default="default", help="default (the tower on its own stream), serial (the tower on the decode stream), arrival (images "
                         "processed as requests are sent, in their threads)")
    args = ap.parse_args()
    from engine_direct import build, logits_check

    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                              "torch": torch.__version__, "args": vars(args) | {"out": str(args.out)}}
    engine, model = build(args.tiny, 64, 2048)
    engine.start()
    model = engine.hf.model
    report["engine"] = engine.describe()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    dump = lambda: args.out.write_text(json.dumps(report, indent=1, default=str))
    if args.logits:
        report["logits"] = logits_check(engine, model, args.side, 16)
        dump()
    instrument(engine)
    threading.Thread(target=engine.run_forever, daemon=True).start()
    new = args.new if not args.tiny else 16
    report["variants"] = {}
    default_lane = engine._lane
    for name in args.variants.split(","):
        if name == "serial":  # the tower's kernels queued on the decode stream: one after the other, never beside
            from llamactl.server.engine.continuous.encoding import VisionLane

            engine._lane = VisionLane(engine._main_stream, "the decode stream (serial)")
        elif name not in ("default", "arrival"):
            raise SystemExit(f"unknown variant {name!r}: default, serial or arrival")
        report["variants"][name] = measure(engine, args, new, arrival=name == "arrival")
        engine._lane = default_lane
        dump()
        print(name, json.dumps(report["variants"][name], indent=1), flush=True)
    engine.stop()


if __name__ == "__main__":
    main()
