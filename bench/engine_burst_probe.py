"""Where the opening burst's time to first token goes, request by request, over HTTP.

engine_bench.py's 32-client level starts with every client sending at once; that burst's TTFT p95 (1.6-1.9 s on
an H200) sets the whole run's, while straight into the engine with inputs prepared beforehand (engine_direct.py)
the same 32 requests get their first tokens within 1.3 s. This probe serves the checkpoint with `llamactl serve`
in a child process whose functions are wrapped to stamp each request's way through the server (wall clock):
image decode (start, end), preparation (start, end: the processor), hand-over to the engine, the engine taking
it (into a tower chunk), the chunk's tower on the device (CUDA events around it on the vision stream, dated
against a reference event done at a known wall time: how long it waited on the stream behind earlier work, and
its own time), the join (cross K/V, prefill) and the first token. The parent sends bursts of ``--clients``
simultaneous streamed requests (gpu_load.py, as engine_bench does, different JPEGs each), waits for them to
end, and lines up the client's send / first-chunk times with the server's stamps per request (matched by
image).

Per burst: the requests sorted by client TTFT, each stage's seconds; the chunks (size, taken, tower ms, joined);
the step loop's iterations during the burst. Summary: per stage, the median over bursts of the p95 request's
and of the mean request's seconds. Variants (``--variants``) serve with other settings in the same call.

``--rounds R`` makes each "burst" engine_bench's closed loop instead: every client sends R requests one after
another (the first round is the burst), and the summary adds the mean request of the later rounds
(``mean_request_after_burst``): where the steady state's first-token time goes (Session 15: the tower's CUDA
graphs raised the mean TTFT at 32 clients by 0.1-0.2 s, not explained by its device time).

    python3 bench/engine_burst_probe.py --out $OUT/engine_burst_probe.json            # GPU, ~2.5 min a variant
    python3 bench/engine_burst_probe.py --tiny --out /tmp/burst.json                  # CPU: the path only
    python3 bench/engine_burst_probe.py --rounds 4 --bursts 2 --out $OUT/loop.json   # GPU: closed loops
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

STAGES = ("upload", "decode", "prepare_wait", "prepare", "queue", "tower_wait", "tower", "join_wait", "join",
          "delivery")
COLUMNS = (*STAGES, "ttft")  # a request's stages and its client TTFT


# -- the child: `llamactl serve` with stamps --------------------------------------------------------------------

def _child(trace: Path, images: list[str]) -> None:
    """Wrap the server's functions, then run the CLI's serve (argv after ``--``)."""
    import faulthandler

    import torch

    if os.environ.get("BURST_PROBE_STACKS_S"):  # every thread's stack into the serve log now and then (hangs)
        faulthandler.dump_traceback_later(float(os.environ["BURST_PROBE_STACKS_S"]), repeat=True)

    from llamactl.server import images as images_mod
    from llamactl.server.engine.continuous import encoding as encoding_mod
    from llamactl.server.engine.continuous.engine import ContinuousEngine

    index = {data: i for i, data in enumerate(images)}
    by_image: dict[int, int] = {}  # id(PIL image) -> image index
    lock = threading.Lock()
    out = trace.open("a", buffering=1)
    iterations: list[list[float]] = []

    def emit(record: dict[str, Any]) -> None:
        with lock:
            out.write(json.dumps(record) + "\n")

    decode = images_mod.decode_base64_image

    @functools.wraps(decode)
    def stamped_decode(s: str, limits: Any) -> Any:
        t0 = time.time()
        image = decode(s, limits)
        i = index.get(s)
        if i is not None:
            by_image[id(image)] = i
            emit({"kind": "decode", "image": i, "start": t0, "end": time.time()})
        return image

    images_mod.decode_base64_image = stamped_decode

    def wrap(name: str, before: Any = None, after: Any = None) -> None:
        original = getattr(ContinuousEngine, name)

        @functools.wraps(original)
        def wrapped(self: Any, *args: Any) -> Any:
            t0 = time.time()
            if before is not None:
                before(self, t0, *args)
            result = original(self, *args)
            if after is not None:
                after(self, t0, time.time(), *args)
            return result

        setattr(ContinuousEngine, name, wrapped)

    def image_of(req: Any) -> int | None:
        return by_image.get(id(req.image)) if req.image is not None else None

    def prepared(self: Any, t0: float, t1: float, req: Any) -> None:
        if getattr(req, "probe_image", None) is None and (i := image_of(req)) is not None:  # the first call
            req.probe_image = i
            emit({"kind": "prepare", "image": i, "start": t0, "end": t1})

    def added(self: Any, t0: float, t1: float, req: Any) -> None:
        if (i := getattr(req, "probe_image", None)) is not None:
            emit({"kind": "add", "image": i, "at": t0})

    def joined(self: Any, t0: float, t1: float, encoding: Any) -> None:
        tower_ms = tower_begin = tower_end = None
        if getattr(encoding, "probe_events", None) is not None:
            start, end = encoding.probe_events
            end.synchronize()  # recorded right behind the engine's own event, which the join waited for
            tower_ms = start.elapsed_time(end)
            ref, ref_wall = clock
            # when the tower began and ended on the device, in wall time (the events' own times against the
            # reference's: a host thread stamping them would wait for the GIL)
            tower_begin = ref_wall + ref.elapsed_time(start) / 1e3
            tower_end = ref_wall + ref.elapsed_time(end) / 1e3
        taken = [getattr(r, "taken_at", None) for r in encoding.reqs]
        mono_to_wall = time.time() - time.monotonic()
        emit({"kind": "chunk", "images": [getattr(r, "probe_image", None) for r in encoding.reqs],
              "taken": min((t for t in taken if t is not None), default=0.0) + mono_to_wall,
              "started": encoding.started + mono_to_wall, "joined": t0, "first_tokens": t1,
              "tower_ms": tower_ms, "tower_begin": tower_begin, "tower_end": tower_end,
              "running_after": len(self._running)})

    def iterated(self: Any, t0: float, t1: float, newcomers: list[Any]) -> None:
        iterations.append([round(t0, 4), round(t1 - t0, 4), len(self._running), len(newcomers)])
        if len(iterations) >= 200:
            emit({"kind": "iterations", "rows": iterations[:]})
            iterations.clear()

    wrap("prepare", after=prepared)
    wrap("add", after=added)
    wrap("_join", after=joined)
    wrap("_iterate", after=iterated)

    start = encoding_mod.VisionLane.start
    clock: list[Any] = []  # [an event done at a known wall time, that time]: the device's clock on the host's

    @functools.wraps(start)
    def timed_start(self: Any, encode: Any, reqs: list[Any], rows: list[Any]) -> Any:
        if self.stream is None:
            return start(self, encode, reqs, rows)
        if not clock:  # the first chunk: the engine's start is over, the device idle
            ref = torch.cuda.Event(enable_timing=True)
            ref.record(torch.cuda.Stream())  # type: ignore[no-untyped-call]
            ref.synchronize()
            clock.extend([ref, time.time()])
        with torch.cuda.stream(self.stream):
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
        encoding = start(self, encode, reqs, rows)
        with torch.cuda.stream(self.stream):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        encoding.probe_events = (begin, end)
        return encoding

    encoding_mod.VisionLane.start = timed_start

    def flush_iterations() -> None:  # the parent asks by SIGUSR1 (the loop may be idle between bursts)
        emit({"kind": "iterations", "rows": iterations[:]})
        iterations.clear()

    import signal

    signal.signal(signal.SIGUSR1, lambda *_: flush_iterations())
    from llamactl.cli.main import main

    sys.argv = ["llamactl", *sys.argv[sys.argv.index("--") + 1:]]
    main()


# -- the parent: bursts and the line-up ------------------------------------------------------------------------

def lineup(outcomes: list[Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per request of one burst: each stage's seconds, from the client's send to its first content chunk."""
    decode = {r["image"]: r for r in records if r["kind"] == "decode"}
    prepare = {r["image"]: r for r in records if r["kind"] == "prepare"}
    add = {r["image"]: r for r in records if r["kind"] == "add"}
    chunks = [r for r in records if r["kind"] == "chunk"]
    chunk_of = {i: c for c in chunks for i in c["images"] if i is not None}
    t0 = min(o.started_at for o in outcomes)
    rows = []
    for o in sorted(outcomes, key=lambda o: o.ttft_s or 1e9):
        i = o.image
        if o.ttft_s is None or i not in decode or i not in prepare or i not in add or i not in chunk_of:
            rows.append({"image": i, "ttft": o.ttft_s, "missing": True})
            continue
        d, p, a, c = decode[i], prepare[i], add[i], chunk_of[i]
        # the device's begin and end of the chunk's tower (older traces: its launch plus its device time)
        tower_end = c.get("tower_end") or c["started"] + (c["tower_ms"] or 0.0) / 1e3
        tower_begin = c.get("tower_begin") or c["started"]
        first_chunk = o.started_at + o.ttft_s
        rows.append({
            "image": i, "sent": round(o.started_at - t0, 4), "ttft": round(o.ttft_s, 4), "first_round": o.first_round,
            "upload": d["start"] - o.started_at,  # send -> the route decodes (upload, JSON, validation)
            "decode": d["end"] - d["start"],
            "prepare_wait": p["start"] - d["end"],  # the worker thread hop (and any queue for a thread)
            "prepare": p["end"] - p["start"],
            "queue": c["taken"] - a["at"],  # in the engine's queue (the tower busy, or the loop in a step)
            "tower_wait": max(0.0, tower_begin - c["started"]),  # on the tower's stream behind earlier work
            "tower": (c["tower_ms"] or 0.0) / 1e3,  # its chunk's tower on the device
            "join_wait": max(0.0, c["joined"] - max(tower_end, c["taken"])),  # done -> seen by the loop
            "join": c["first_tokens"] - c["joined"],  # cross K/V + prefill + first token
            "delivery": first_chunk - c["first_tokens"],  # first token -> the client's first chunk
            "chunk_size": len(c["images"]),
        })
    for r in rows:
        for k in STAGES:
            if k in r:
                r[k] = round(r[k], 4)
    t_chunks = [{"size": len(c["images"]), "taken": round(c["taken"] - t0, 3),
                 "tower_ms": None if c["tower_ms"] is None else round(c["tower_ms"], 1),
                 "joined": round(c["joined"] - t0, 3), "first_tokens": round(c["first_tokens"] - t0, 3),
                 "running_after": c["running_after"]} for c in sorted(chunks, key=lambda c: c["taken"])]
    return {"requests": rows, "chunks": t_chunks}


def summarize(bursts: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage: median over bursts of the p95 request's seconds (nearest rank by client TTFT) and of the mean."""
    p95_rows: list[dict[str, Any]] = []
    means: dict[str, list[float]] = {k: [] for k in COLUMNS}
    later: dict[str, list[float]] = {k: [] for k in COLUMNS}
    for b in bursts:
        rows = [r for r in b["requests"] if not r.get("missing")]
        if not rows:
            continue
        p95_rows.append(rows[max(0, -(-95 * len(rows) // 100) - 1)])
        after = [r for r in rows if r.get("first_round") is False]  # closed loops (--rounds): the later rounds
        for k, values in means.items():
            values.append(statistics.fmean(r[k] for r in rows))
            if after:
                later[k].append(statistics.fmean(r[k] for r in after))
    out = {
        "p95_request": {k: round(statistics.median(r[k] for r in p95_rows), 4) for k in COLUMNS}
        if p95_rows else {},
        "mean_request": {k: round(statistics.median(v), 4) for k, v in means.items() if v},
        "ttft_p95": [r["ttft"] for r in p95_rows],
    }
    if any(later.values()):
        out["mean_request_after_burst"] = {k: round(statistics.median(v), 4) for k, v in later.items() if v}
    return out


def pythonpath() -> str:
    """This checkout first, then what the caller had (the device's carried packages)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def checkpoint(model_dir: Path | None, tiny: bool) -> Path:
    """The checkpoint to serve (default /dev/shm/llamactl-11b, tiny: /tmp/llamactl-tiny), built if missing."""
    model_dir = model_dir or Path("/tmp/llamactl-tiny" if tiny else "/dev/shm/llamactl-11b")
    if not (model_dir / "config.json").exists():
        subprocess.run([sys.executable, str(REPO / "bench/engine_prep.py"), "--model-dir", str(model_dir),
                        "--batches", ""] + (["--tiny"] if tiny else []), check=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": pythonpath()})
    return model_dir


def server_env(tiny: bool, clients: int, extra: dict[str, str]) -> dict[str, str]:
    """`llamactl serve`'s environment for the probes: the continuous engine with a slot per client (64 at least),
    no cache, limits out of the way; ``extra`` on top (the variant's settings)."""
    from engine_bench import SAFETY_ENV

    return {**os.environ, **SAFETY_ENV, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath(),
            "LLAMACTL_ENGINE": "continuous", "LLAMACTL_MAX_BATCH_SIZE": str(max(64, clients)),
            "LLAMACTL_CACHE_MAX_ENTRIES": "0", "LLAMACTL_QUEUE_LIMIT": "1024", "LLAMACTL_REQUEST_TIMEOUT_S": "900",
            "LLAMACTL_GEN_MAX_NEW_TOKENS": "4096", "LLAMACTL_DEVICE": "cpu" if tiny else "cuda",
            "CUDA_VISIBLE_DEVICES": "" if tiny else "0", **extra}


def run_variant(a: argparse.Namespace, name: str, env_extra: dict[str, str], images: list[str],
                model_dir: Path) -> dict[str, Any]:
    import signal

    import httpx
    from engine_bench import free_port
    from gpu_load import _run_processes
    from gpu_stack import stop, wait_ready

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    trace = a.work / f"trace-{name}.jsonl"
    trace.unlink(missing_ok=True)
    images_file = a.work / "images.json"
    images_file.write_text(json.dumps(images))
    env = server_env(a.tiny, a.clients, env_extra)
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(trace), "--images-file", str(images_file),
            "--", "serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning"]
    log = a.work / f"serve-{name}.log"
    out: dict[str, Any] = {"env": env_extra, "bursts": []}
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    try:
        out["ready_s"] = round(wait_ready(url, proc, log, a.ready_timeout_s), 1)
        out["engine"] = {k: v for k, v in (httpx.get(url + "/health", timeout=10).json().get("engine") or {}).items()
                         if k in ("name", "vision_attention", "vision_layers", "quantization")}
        first = 0
        for b in range(a.warm + a.bursts):
            seen = sum(1 for _ in trace.open()) if trace.exists() else 0
            requests = a.clients * a.rounds
            outcomes, wall = _run_processes(url, a.clients, requests, a.max_tokens, images, a.request_timeout_s,
                                            a.load_procs, first_image=first)
            first += requests
            if not any(o.ok for o in outcomes):  # e.g. a server that stopped on the GPU: the next variant runs
                out["hung"] = f"burst {b + 1}: none of {len(outcomes)} requests answered in {a.request_timeout_s} s"
                print(name, out["hung"], flush=True)
                break
            time.sleep(a.pause_s)
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.3)
            if b < a.warm:
                continue
            lines = trace.read_text().splitlines()[seen:]
            records = [json.loads(x) for x in lines]
            burst = lineup(outcomes, records)
            t0 = min(o.started_at for o in outcomes)
            burst["iterations"] = [[round(r[0] - t0, 4), *r[1:]] for rec in records if rec["kind"] == "iterations"
                                   for r in rec["rows"] if t0 <= r[0] <= t0 + (3.0 if a.rounds == 1 else wall)]
            burst["failed"] = sum(1 for o in outcomes if not o.ok)
            burst["wall_s"] = round(wall, 2)
            out["bursts"].append(burst)
            one = summarize([burst])
            chunks = [(c["size"], c["tower_ms"]) for c in burst["chunks"]]
            print(f"{name} burst {len(out['bursts'])}: ttft p95 {one['ttft_p95']}, "
                  + (f"chunks {chunks}" if a.rounds == 1 else
                     f"{len(chunks)} chunks, later rounds' mean {one.get('mean_request_after_burst')}"), flush=True)
        out["summary"] = summarize(out["bursts"])
    except Exception as exc:  # noqa: BLE001 - recorded; the next variant still runs
        out["error"] = f"{type(exc).__name__}: {exc}"[:1500]
    finally:
        stop(proc, 30)
        out["log_tail"] = log.read_text(errors="replace")[-3000:]
    return out


def main() -> None:
    if "--child" in sys.argv:
        at = sys.argv.index("--child")
        images = json.loads(Path(sys.argv[sys.argv.index("--images-file") + 1]).read_text())
        _child(Path(sys.argv[at + 1]), images)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/engine-burst-probe"))
    ap.add_argument("--model-dir", type=Path, help="default /dev/shm/llamactl-11b (tiny: /tmp/llamactl-tiny)")
    ap.add_argument("--tiny", action="store_true", help="CPU: the tiny checkpoint, 4 clients, 8 tokens")
    ap.add_argument("--clients", type=int, help="default 32 (tiny 4)")
    ap.add_argument("--max-tokens", type=int, help="default 128 (tiny 8)")
    ap.add_argument("--bursts", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1,
                    help="requests per client in each burst, one after another (>1: engine_bench's closed loop)")
    ap.add_argument("--warm", type=int, default=1, help="bursts before the recorded ones")
    ap.add_argument("--pause-s", type=float, default=1.0)
    ap.add_argument("--load-procs", type=int, default=4)
    ap.add_argument("--ready-timeout-s", type=float, default=300)
    ap.add_argument("--request-timeout-s", type=float, default=900,
                    help="a request's limit; a burst with no answer ends the variant (its server is stopped)")
    ap.add_argument("--variants", default="default",
                    help="';'-separated name[:KEY=VALUE,...] (server env), e.g. 'default;q2:LLAMACTL_VISION_QUEUE=2'")
    a = ap.parse_args()
    a.clients = a.clients or (4 if a.tiny else 32)
    a.max_tokens = a.max_tokens or (8 if a.tiny else 128)
    a.work.mkdir(parents=True, exist_ok=True)
    model_dir = checkpoint(a.model_dir, a.tiny)
    from gpu_load import noise_jpeg

    images = [noise_jpeg(seed, 1120) for seed in range((a.warm + a.bursts) * a.clients * a.rounds)]
    result: dict[str, Any] = {"git": os.environ.get("GIT_REV", ""), "clients": a.clients, "rounds": a.rounds,
                              "max_tokens": a.max_tokens, "variants": {}}
    try:
        import torch

        result["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        result["device"] = "?"
    for spec in a.variants.split(";"):
        name, _, kv = spec.partition(":")
        env = dict(item.split("=", 1) for item in kv.split(",") if item)
        result["variants"][name] = run_variant(a, name, env, images, model_dir)
        a.out.write_text(json.dumps(result, indent=1))
        print(name, json.dumps(result["variants"][name].get("summary")), flush=True)


if __name__ == "__main__":
    main()
