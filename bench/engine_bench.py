"""Issue 10's benchmark, in one device call: the continuous engine vs the hf engine vs one request at a time.

Stages, each under its own share of ``--budget-s``; JSON, markdown and a log are rewritten in ``--out`` after
every step, so a call stopped at any point still returns what was measured:
1. environment: GPU name and driver (nvidia-smi), package versions, CPUs;
2. ``engine_prep.py`` in its own process: the checkpoint (built unless present), then bare HF ``generate`` at
   batch 1 and 32 as the reference of this call;
3. per design, ``llamactl serve`` of this checkout (this interpreter, the checkout on PYTHONPATH) with
   ``LLAMACTL_ENGINE`` and ``LLAMACTL_MAX_BATCH_SIZE`` set (env vars work with or without the --engine flag;
   /health's ``engine.name`` says what really ran), driven by closed-loop streaming chat-completion clients: one
   different JPEG per request, fixed-length answers (``ignore_eos`` and ``min_tokens = max_tokens``), per level a
   warm-up round then the measured requests (fewer if the level's time share would not hold them);
   designs: ``continuous`` (max batch = the largest level), ``hf`` (max batch 32), ``seed`` (hf, max batch 1:
   one generate per request, the seed article's design; levels 1 and 8 only: its throughput does not change with
   clients, only its queue grows) and ``hf-b64`` (hf, max batch 64, the 64 level; last, as time allows);
4. per level: output tok/s, req/s, TTFT and inter-token latency p50/p95 (ITL from the arrival times of the SSE
   chunks of each stream), failed requests, peak GPU memory (nvidia-smi every 0.5 s and /health), mean GPU
   utilisation, server CPU, and the fraction of the bandwidth roofline (engine_figures.py states the formula);
5. the acceptance rows of the issue.

    python3 bench/engine_bench.py --budget-s 540 --out $OUT         # device (see bench/engine_device.sh)
    python bench/engine_bench.py --tiny --out /tmp/eb                 # CPU dry run, tiny checkpoint
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import httpx
from engine_figures import (
    PEAK_SERIES,
    W_BYTES,
    X_BYTES,
    acceptance,
    bandwidth_for,
    engine_window,
    markdown,
    of_roofline,
    parse_metrics,
    roofline_tok_s,
    summary,
)
from gpu_load import noise_jpeg, run_load
from gpu_stack import CpuMeter, GpuSampler, batch_delta, scrape_batches, stop, wait_ready
from typing_extensions import Self

SAFETY_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class Design:
    name: str
    title: str
    engine: str
    max_batch: int
    levels: list[int]
    rounds: int  # measured requests = max(min_requests, rounds x clients), fewer if time is short
    min_requests: int
    warm: str  # "round": a round of `clients` requests before each level; "first": 1 request before the first
    weight: float  # share of the remaining time
    max_wait_ms: int | None = None  # LLAMACTL_MAX_WAIT_MS (None: the server's default)
    env: dict[str, str] = field(default_factory=dict)  # more server settings of this design
    cwd: Path | None = None  # where its server starts (None: this checkout; `python -m` imports from there first)


# the least time a design needs on a GPU: its server's start (the continuous engine: 31-52 s on an H200 in runs
# 47-50, the hf engine 19-25 s in runs 38 and 41), a warm-up round and a few measured requests
MIN_GPU_DESIGN_S = {"continuous": 75.0, "hf": 35.0}


def design_shares(budget_s: float, prep_s: float, designs: list[Design]) -> list[float]:
    """Each design's seconds if the prep stage takes ``prep_s`` and every design uses its whole share (the run
    loop gives a design's unused time to the later ones; the last 15 s are kept for stopping and writing)."""
    total = sum(d.weight for d in designs)
    return [max(0.0, budget_s - 15 - prep_s) * d.weight / total for d in designs]


def budget_problem(budget_s: float, prep_s: float, designs: list[Design]) -> str | None:
    """Why ``budget_s`` cannot run these designs on a GPU (None: it can). --budget-s is the whole run's; a design
    given less than its server's start records nothing (Session 16 lost 227 device-seconds that way)."""
    least = [MIN_GPU_DESIGN_S.get(d.engine, 75.0) for d in designs]
    short = [(d, s, m) for d, s, m in zip(designs, design_shares(budget_s, prep_s, designs), least) if s < m]
    if not short:
        return None
    total = sum(d.weight for d in designs)
    need = 15 + prep_s + max(m * total / d.weight for d, _, m in short)
    names = ", ".join(f"{d.name} ~{s:.0f} s" for d, s, _ in short)
    return (f"--budget-s {budget_s:.0f} is the whole run's (prep ~{prep_s:.0f} s and every design): it leaves "
            f"{names}, less than a server's start and a level take; give --budget-s {need:.0f} or more, or fewer "
            f"designs")


def designs_from(a: argparse.Namespace) -> list[Design]:
    levels = a.levels
    small = [c for c in levels if c <= a.hf_max_batch]
    big = [c for c in levels if c > a.hf_max_batch]
    table = {
        # weights: the engine under test first and with the most time (its start includes torch.compile and
        # CUDA graph capture); hf-b64 last and least (run 1: its batches of 64 ran near the memory limit, slowly)
        "continuous": Design("continuous", "the continuous-batching engine", "continuous", max(levels), levels,
                             a.rounds, a.min_requests, "round", 4.0),
        # the continuous engine with quantization fp8 (e4m3 text layers, fp8.py), at every level like it
        "continuous-fp8": Design("continuous-fp8", "the continuous engine, FP8 text layers (quantization fp8)",
                                 "continuous", max(levels), levels, a.rounds, a.min_requests, "round", 4.0,
                                 env={"LLAMACTL_QUANTIZATION": "fp8"}),
        # FP8 text layers and FP8 image K/V (fp8_image_kv; runs 30 and 31 ran it as continuous-fp8, when it was
        # on by default, beside continuous-fp8b with it off)
        "continuous-fp8i": Design("continuous-fp8i", "the continuous engine, FP8 text layers and image K/V",
                                  "continuous", max(levels), levels, a.rounds, a.min_requests, "round", 4.0,
                                  env={"LLAMACTL_QUANTIZATION": "fp8", "LLAMACTL_FP8_IMAGE_KV": "1"}),
        # the same with the bf16 weights kept, the faster of cuBLAS and the FP8 kernel per shape and batch
        "continuous-fp8k": Design("continuous-fp8k", "the continuous engine, FP8 copies beside the bf16 weights",
                                  "continuous", max(levels), levels, a.rounds, a.min_requests, "round", 4.0,
                                  env={"LLAMACTL_QUANTIZATION": "fp8", "LLAMACTL_FP8_KEEP_BF16": "1"}),
        "hf": Design("hf", f"hf engine, windowed static batches of up to {a.hf_max_batch}", "hf", a.hf_max_batch,
                     small, a.rounds, a.min_requests, "round", 3.0, a.hf_max_wait_ms),
        # the continuous engine with its vision tower on a green-context SM partition (settings.vision_sms)
        "continuous-sm": Design("continuous-sm", "the continuous engine, vision tower on 2/3 of the SMs",
                                "continuous", max(levels), a.sm_levels, a.rounds,
                                a.min_requests, "round", 2.0, env={"LLAMACTL_VISION_SMS": "-1"}),
        # variants of the continuous engine at --vp-levels: the tower's stream served before the decode steps, or after
        # them (settings.vision_priority), images through the tower two at a time (settings.prefill_chunk_images),
        # both; without its Triton kernels (settings.triton_kernels); two image chunks in the tower
        # (settings.vision_queue), also with the tower first; transformers' vision encoder layers (settings.vision_layers);
        # the tower as CUDA graphs (settings.vision_graphs) with one or two image chunks in the tower; the eager tower;
        # the graphs with the decode steps waiting for the tower's chunk (vision_priority "first"); two decode steps
        # queued ahead of the host (pipeline_depth); a burst gathered into full chunks (burst_gather_ms)
        **{name: Design(name, f"the continuous engine, {title}", "continuous", max(levels), a.vp_levels,
                        a.rounds, a.min_requests, "round", 3.0, env=env)
           for name, title, env in [
               ("continuous-vp", "vision tower's stream first", {"LLAMACTL_VISION_PRIORITY": "high"}),
               ("continuous-vl", "the decode steps (their graphs too) before the tower",
                {"LLAMACTL_VISION_PRIORITY": "low"}),
               ("continuous-c2", "images through the tower two at a time",
                {"LLAMACTL_PREFILL_CHUNK_IMAGES": "2"}),
               ("continuous-c2vp", "images two at a time, tower first",
                {"LLAMACTL_PREFILL_CHUNK_IMAGES": "2", "LLAMACTL_VISION_PRIORITY": "high"}),
               ("continuous-pt", "PyTorch's kernels only (its Triton kernels off)", {"LLAMACTL_TRITON_KERNELS": "0"}),
               # q2, q2vp and vg keep the meaning of their recorded runs (the default is the eager tower, one chunk
               # at a time, except in Session 15: graphs with two chunks): their settings in full
               ("continuous-q2", "a full image chunk may queue behind one in the tower (eager tower)",
                {"LLAMACTL_VISION_QUEUE": "2", "LLAMACTL_VISION_GRAPHS": "0"}),
               ("continuous-q2vp", "a full image chunk may queue behind one, tower first (eager tower)",
                {"LLAMACTL_VISION_QUEUE": "2", "LLAMACTL_VISION_PRIORITY": "high", "LLAMACTL_VISION_GRAPHS": "0"}),
               ("continuous-tl", "transformers' vision encoder layers (not tower.py's)",
                {"LLAMACTL_VISION_LAYERS": "transformers"}),
               ("continuous-vg", "the vision tower as CUDA graphs, one image chunk at a time",
                {"LLAMACTL_VISION_GRAPHS": "1", "LLAMACTL_VISION_QUEUE": "1"}),
               ("continuous-vgq2", "the tower as CUDA graphs, a full chunk may queue behind one (Session 15's default)",
                {"LLAMACTL_VISION_GRAPHS": "1", "LLAMACTL_VISION_QUEUE": "2"}),
               ("continuous-eager", "the eager tower, one image chunk at a time (the default, but in Session 15)",
                {"LLAMACTL_VISION_GRAPHS": "0", "LLAMACTL_VISION_QUEUE": "1"}),
               # the decode steps wait on the device for the chunk in the tower (vision_priority "first")
               ("continuous-vf", "the tower as CUDA graphs and first (decode steps wait for its chunk), two chunks",
                {"LLAMACTL_VISION_GRAPHS": "1", "LLAMACTL_VISION_PRIORITY": "first"}),
               ("continuous-vf1", "the tower as CUDA graphs and first, one chunk at a time",
                {"LLAMACTL_VISION_GRAPHS": "1", "LLAMACTL_VISION_PRIORITY": "first", "LLAMACTL_VISION_QUEUE": "1"}),
               # two decode steps queued ahead of the host instead of one (settings.pipeline_depth)
               ("continuous-pd2", "two decode steps queued ahead of the host", {"LLAMACTL_PIPELINE_DEPTH": "2"}),
               # an idle tower holds up to 150 ms for a burst's images to fill its first chunk (burst_gather_ms)
               ("continuous-gather", "an idle tower waits up to 150 ms for a burst to fill its chunk",
                {"LLAMACTL_BURST_GATHER_MS": "150"}),
           ]},
        "seed": Design("seed", "one request at a time (hf engine, max batch 1: the seed article's design)", "hf", 1,
                       a.seed_levels, 1, a.seed_min_requests, "first", 1.5, a.hf_max_wait_ms),
    }
    if a.prev:
        # the continuous engine of another version of the package (--prev: a folder holding its llamactl/), at
        # --vp-levels: an earlier commit against this one in the same call, with no setting added for it
        table["continuous-prev"] = Design(
            "continuous-prev", f"the continuous engine of the llamactl package in {a.prev}", "continuous",
            max(levels), a.vp_levels, a.rounds, a.min_requests, "round", 3.0,
            env={"PYTHONPATH": os.pathsep.join(p for p in (str(a.prev.resolve()), os.environ.get("PYTHONPATH", ""))
                                               if p)}, cwd=a.prev.resolve())
    if big:
        table[f"hf-b{max(big)}"] = Design(f"hf-b{max(big)}", f"hf engine, static batches of up to {max(big)}",
                                          "hf", max(big), big, a.rounds, a.min_requests, "round", 1.0,
                                          a.hf_max_wait_ms)
    out = []
    for name in a.designs:
        if name == "hf-big":
            out += [d for k, d in table.items() if k.startswith("hf-b")]
        elif name in table:
            out.append(table[name])
        else:
            raise SystemExit(f"--designs: unknown design {name!r} (known: {', '.join(table)}, hf-big)")
    return [d for d in out if d.levels]


class Recorder:
    """info (JSON), its markdown and a log in the output folder, rewritten after every step."""

    def __init__(self, out: Path) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.log_fh = (out / "engine_bench.log").open("a")
        self.info: dict[str, Any] = {}

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.log_fh.write(line + "\n")
        self.log_fh.flush()

    def dump(self) -> None:
        if self.info.get("mode") != "tiny-cpu":  # the GPU targets mean nothing for the tiny model
            self.info["acceptance"] = acceptance(self.info.get("designs", {}),
                                                 self.info.get("env", {}).get("gpu_name", ""))
        for name, text in (("engine_bench.json", json.dumps(self.info, indent=2, default=str) + "\n"),
                           ("engine_bench.md", markdown(self.info))):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text)
            tmp.replace(self.out / name)


def sh(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"({exc})"
    return (r.stdout or r.stderr).strip()


def environment(tiny: bool) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"

    env: dict[str, Any] = {}
    if not tiny and shutil.which("nvidia-smi"):
        row = sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
        first = row.splitlines()[0] if row else ""
        parts = [p.strip() for p in first.split(",")]
        env["gpu_name"] = parts[0] if parts else ""
        env["driver"] = parts[1] if len(parts) > 1 else "-"
        env["gpu"] = f"{first} ({len(row.splitlines())} GPU(s); the servers use GPU 0)"
    cpu_model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), "?") if Path("/proc/cpuinfo").exists() else "?"
    env["cpu"] = (f"{cpu_model}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), load average "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    env["versions"] = (f"Python {sys.version.split()[0]}, torch {v('torch')}, transformers {v('transformers')}, "
                       f"fastapi {v('fastapi')}, uvicorn {v('uvicorn')}, pydantic {v('pydantic')}")
    rev = sh(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    env["git_rev"] = os.environ.get("GIT_REV") or (rev if rev.isalnum() else "?")
    return env


def run_prep(a: argparse.Namespace, rec: Recorder, model_dir: Path, timeout_s: float) -> None:
    """engine_prep.py as a child: its PREP lines go into info as they come; SIGTERM at the timeout, then KILL."""
    argv = [sys.executable, str(REPO / "bench/engine_prep.py"), "--model-dir", str(model_dir),
            "--batches", ",".join(map(str, a.baseline_batches)), "--tokens", str(a.baseline_tokens),
            "--warm-tokens", str(a.baseline_warm_tokens), "--side", str(a.side),
            "--budget-s", str(max(1.0, timeout_s - 60))] + (["--tiny"] if a.tiny else [])
    env = {**os.environ, **SAFETY_ENV, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    env["CUDA_VISIBLE_DEVICES"] = "" if a.tiny else "0"
    base = rec.info.setdefault("baseline", {"runs": []})
    built = "the tiny checkpoint, float32, on the CPU" if a.tiny else (
        "the model built on the GPU from the checkpoint's config (random bf16 weights)")
    base["note"] = (f"`generate` on {built}, one "
                    f"{a.side}px JPEG a row, greedy, {a.baseline_tokens} new tokens (min = max), after a warm run; "
                    "processor time excluded; TTFT = a 1-token generate"
                    + ("" if a.tiny else "; cuDNN SDPA off, as in the hf engine"))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO, text=True)
    deadline = time.monotonic() + timeout_s
    killer = threading.Timer(timeout_s, proc.send_signal, (signal.SIGTERM,))
    killer.start()
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            rec.log_fh.write(line)
            if not line.startswith("PREP "):
                continue
            rec.log(line.strip())
            for key, value in json.loads(line[5:]).items():
                if key == "build":
                    rec.info["build"] = value
                elif key == "baseline_info":
                    base.update(value)
                else:
                    base["runs"].append(value)
            rec.dump()
        proc.wait(timeout=max(5.0, deadline - time.monotonic() + 30))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    finally:
        killer.cancel()
    if proc.returncode != 0:
        base["error"] = f"engine_prep.py exited with {proc.returncode} (see engine_bench.log)"
        rec.log(base["error"])


class HealthPoller:
    """/health and /metrics every 0.5 s during a measured level: peak GPU memory used, statuses seen, the last
    engine block, peaks of the engine's gauges (pools, running, waiting)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.peak = 0
        self.statuses: set[str] = set()
        self.engine: dict[str, Any] | None = None
        self.gpu: dict[str, Any] | None = None  # the last NVML reading /health gave (issue 13)
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                h = httpx.get(self.url + "/health", timeout=5).json()
                mem = h.get("gpu_memory") or {}
                self.peak = max(self.peak, int(mem.get("used_bytes") or 0))
                self.statuses.add(str(h.get("status")))
                self.engine = h.get("engine")
                self.gpu = h.get("gpu") or self.gpu
                m = parse_metrics(httpx.get(self.url + "/metrics", timeout=5).text)
                for k in PEAK_SERIES:
                    if k in m:
                        self.peaks[k] = max(self.peaks.get(k, 0.0), m[k])
            except (httpx.HTTPError, ValueError):
                self.statuses.add("unreachable")
            self._stop.wait(0.5)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def start_ballast(free_gib: float) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """gpu_ballast.py on GPU 0, holding all but ``free_gib`` until its stdin closes; its figures once it holds."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("gpu_ballast.py")), "--leave-gib",
                             str(free_gib)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(30)
        raise RuntimeError(f"the GPU ballast exited ({proc.returncode}) before holding {free_gib} GiB free")
    return proc, json.loads(line)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wall_clock(mono: float) -> float:
    """A time.monotonic() instant as a time.time() one (run_load's deadlines cross processes)."""
    return time.time() + (mono - time.monotonic())


class Bench:
    def __init__(self, a: argparse.Namespace, rec: Recorder, images: list[str], end: float) -> None:
        self.a, self.rec, self.images, self.end = a, rec, images, end
        self.offset = 0  # next image: every request of the run gets the next one, so concurrent ones differ
        self.sampler: GpuSampler | None = None
        self.bw, self.bw_note = bandwidth_for(rec.info["env"].get("gpu_name", ""))
        self.proc: subprocess.Popen[bytes] | None = None

    def load(self, url: str, conc: int, n: int, deadline: float) -> dict[str, Any]:
        procs = 1 if conc < 16 else max(1, min(self.a.load_procs, conc // 16))
        grace = max(0.0, min(self.a.grace_s, self.end - deadline))
        res = run_load(url, concurrency=min(conc, n), requests=n, max_tokens=self.a.max_tokens, images=self.images,
                       timeout_s=900, processes=procs, deadline=wall_clock(deadline), grace_s=grace,
                       first_image=self.offset)
        self.offset += n
        return res

    def server_env(self, d: Design) -> dict[str, str]:
        env = {**os.environ, **SAFETY_ENV, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
               "LLAMACTL_ENGINE": d.engine, "LLAMACTL_MAX_BATCH_SIZE": str(d.max_batch),
               "LLAMACTL_CACHE_MAX_ENTRIES": "0",
               "LLAMACTL_QUEUE_LIMIT": "1024", "LLAMACTL_REQUEST_TIMEOUT_S": "900", "LLAMACTL_DRAIN_TIMEOUT_S": "10",
               "LLAMACTL_GEN_MAX_NEW_TOKENS": "4096", "LLAMACTL_INSTANCE": f"engine-bench/{d.name}",
               "LLAMACTL_DEVICE": "cpu" if self.a.tiny else "cuda"}
        env["CUDA_VISIBLE_DEVICES"] = "" if self.a.tiny else "0"
        env.update(d.env)
        if d.max_wait_ms is not None:
            env["LLAMACTL_MAX_WAIT_MS"] = str(d.max_wait_ms)
        else:
            env.pop("LLAMACTL_MAX_WAIT_MS", None)
        return env

    def design(self, d: Design, model_dir: Path, deadline: float) -> dict[str, Any]:
        out: dict[str, Any] = {"title": d.title, "levels": [], "max_batch_size": d.max_batch,
                               "env_summary": f"LLAMACTL_ENGINE={d.engine} LLAMACTL_MAX_BATCH_SIZE={d.max_batch}"
                                              + ("" if d.max_wait_ms is None else
                                                 f" LLAMACTL_MAX_WAIT_MS={d.max_wait_ms}")}
        self.rec.info["designs"][d.name] = out
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = self.a.work / f"serve-{d.name}.log"
        argv = [sys.executable, "-m", "llamactl", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "warning"]
        self.rec.log(f"== design {d.name}: {out['env_summary']}, levels {d.levels}, "
                     f"{deadline - time.monotonic():.0f}s")
        with log.open("wb") as fh:
            self.proc = proc = subprocess.Popen(argv, env=self.server_env(d), cwd=d.cwd or REPO, stdout=fh,
                                                stderr=subprocess.STDOUT)
        try:
            out["ready_s"] = round(wait_ready(url, proc, log, max(10.0, deadline - time.monotonic())), 1)
            health = httpx.get(url + "/health", timeout=10).json()
            out["health_at_ready"] = health
            engine = health.get("engine") or {}
            out["engine_reported"] = engine.get("name")
            notes = []
            if out["engine_reported"] != d.engine:
                notes.append(f"asked for engine {d.engine!r}; /health engine.name is {out['engine_reported']!r}"
                             + (f" ({engine.get('fallback_reason')})" if engine.get("fallback_reason") else ""))
            if d.max_wait_ms and d.max_batch > 1:
                notes.append(f"its batcher waits up to {d.max_wait_ms} ms for a batch to fill: part of its TTFT "
                             "at low load")
            out["note"] = "; ".join(notes)
            self.rec.log(f"{d.name}: ready in {out['ready_s']}s, engine {out['engine_reported']!r}, "
                         f"GPU memory {health.get('gpu_memory')}")
            self.rec.dump()
            meter = CpuMeter({"server": proc.pid})
            rate: float | None = None
            for i, conc in enumerate(d.levels):
                rest = d.levels[i:]
                weights = [1 + c / 16 for c in rest]
                lvl_end = time.monotonic() + (deadline - time.monotonic()) * weights[0] / sum(weights)
                lv = self.level(d, url, conc, i == 0, lvl_end, rate, meter)
                out["levels"].append(lv)
                rate = lv.get("tok_per_s") or rate
                self.rec.dump()
                if proc.poll() is not None:
                    out["error"] = f"the server exited with {proc.returncode} during the {conc}-client level"
                    break
            out["metrics_end"] = self.metrics(url)
        except Exception as exc:  # noqa: BLE001 - any failure is recorded, the next design still runs
            out["error"] = f"{type(exc).__name__}: {exc}"[:1500]
            self.rec.log(f"{d.name}: {out['error']}")
        finally:
            stop(proc, 30)
            out["server_exit_code"] = proc.returncode
            self.proc = None
        return out

    def status_deep(self, url: str, lv: dict[str, Any]) -> None:
        """`llamactl status --deep` (table and --json) of this one server while the level's load runs: the GPU
        column of a real card under load (issue 13). The inventory names 127.0.0.1 and the server's port; there
        is no balancer and no sshd on the device, so those columns say unreachable."""
        time.sleep(8)
        port = url.rsplit(":", 1)[1]
        inv = self.a.work / "status-inventory.yaml"
        inv.write_text(
            "version: 1\ncluster: device-bench\ndefaults:\n  gpus: 1\n  base_port: " + port + "\n"
            "  model:\n    source: /tmp/llamactl-11b\n    dtype: bfloat16\n  server:\n    user: root\n"
            "groups:\n  gpu:\n    hosts:\n      device:\n        address: 127.0.0.1\n"
            "balancer:\n  hosts:\n    lb:\n      address: 127.0.0.3\n  listen: 8080\n")
        env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200",
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        for key, extra in (("status_deep", []), ("status_deep_json", ["--json"])):
            try:
                r = subprocess.run([sys.executable, "-m", "llamactl", "status", str(inv), "--deep", "--timeout", "5",
                                    *extra], check=False, capture_output=True, text=True, timeout=45, env=env,
                                   cwd=REPO)
                lv[key] = {"exit_code": r.returncode, "stdout": r.stdout[-12000:], "stderr": r.stderr[-3000:]}
                (self.a.out / f"{key}.txt").write_text(r.stdout + "\n---- stderr\n" + r.stderr)
            except (OSError, subprocess.TimeoutExpired) as exc:
                lv[key] = {"error": f"{type(exc).__name__}: {exc}"}

    @staticmethod
    def scrape(url: str) -> dict[str, float] | None:
        try:
            return scrape_batches(url)
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    @staticmethod
    def series(url: str) -> dict[str, float]:
        try:
            return parse_metrics(httpx.get(url + "/metrics", timeout=10).text)
        except httpx.HTTPError:
            return {}

    @staticmethod
    def metrics(url: str) -> list[str]:
        """The server's own llamactl_* series (no histogram buckets): what it saw, for reading the run later."""
        try:
            text = httpx.get(url + "/metrics", timeout=10).text
        except httpx.HTTPError as exc:
            return [f"({exc})"]
        return [ln for ln in text.splitlines() if ln.startswith("llamactl_") and "_bucket{" not in ln][:300]

    def level(self, d: Design, url: str, conc: int, first: bool, lvl_end: float, rate: float | None,
              meter: CpuMeter) -> dict[str, Any]:
        a = self.a
        lv: dict[str, Any] = {"concurrency": conc}
        warm_n = conc if d.warm == "round" else (1 if first else 0)
        if warm_n:
            w = self.load(url, conc, warm_n, lvl_end)
            lv["warm"] = {k: w.get(k) for k in ("requests", "ok", "failed", "cut", "wall_s", "tok_per_s",
                                                "ttft_s_p50", "errors")}
            rate = w.get("tok_per_s") or rate
        n = max(d.min_requests, d.rounds * conc)
        left = lvl_end - time.monotonic()
        if left <= 1:
            lv["skipped"] = "no time left after the warm-up round"
            self.rec.log(f"{d.name} c={conc}: {lv['skipped']}")
            return lv
        if rate:
            while n > conc and n * a.max_tokens / rate > 0.9 * left:
                n = max(conc, n - conc)
            need = n * a.max_tokens / rate
            if need > left + a.grace_s:
                lv["skipped"] = f"needs ~{need:.0f}s for {n} requests at {rate:.0f} tok/s, {left:.0f}s left"
                self.rec.log(f"{d.name} c={conc}: {lv['skipped']}")
                return lv
        if self.sampler:
            self.sampler.mark()
        cpu0 = meter.snapshot()
        batches0, series0 = self.scrape(url), self.series(url)
        status_run = None
        if conc == self.a.status_at and d.engine != "hf" and not self.a.tiny:
            status_run = threading.Thread(target=self.status_deep, args=(url, lv), daemon=True)
        with HealthPoller(url) as hp:
            if status_run is not None:
                status_run.start()
            m = self.load(url, conc, n, lvl_end)
        if status_run is not None:
            status_run.join(timeout=60)
        lv.update(m)
        lv["health_gpu"] = hp.gpu
        batches1, series1 = self.scrape(url), self.series(url)
        if batches0 and batches1:
            lv["batches"] = batch_delta(batches0, batches1)  # the hf engine's generate calls (size, duration)
        cpu = meter.since(cpu0)
        lv["server_cores"] = cpu.get("server", {}).get("cores")
        lv["server_top_threads"] = cpu.get("server", {}).get("top_threads")
        lv["load_generator_cores"] = cpu.get("load_generator_cores")
        lv["gpu_mem_health_peak_bytes"] = hp.peak or None
        lv["health_statuses"] = sorted(hp.statuses)
        lv["engine_end"] = hp.engine
        lv["engine_metrics"] = engine_window(series0, series1, hp.peaks, float(lv.get("wall_s") or 0.0))
        if self.sampler:
            g = self.sampler.mean_util_since_mark().get("0", {})
            lv["gpu_util_mean_pct"] = g.get("util_pct")
            lv["gpu_mem_smi_peak_gb"] = round(g["mem_used_mib_max"] * 2**20 / 1e9, 2) if g else None
            lv["gpu_sm_clock_mhz_mean"], lv["gpu_power_w_mean"] = g.get("sm_clock_mhz_mean"), g.get("power_w_mean")
        lv["roofline_tok_s"] = round(roofline_tok_s(conc, self.bw)) if self.bw else None
        lv["of_roofline"] = of_roofline(lv.get("tok_per_s"), conc, self.bw)
        lv["server_alive_after"] = self.proc is not None and self.proc.poll() is None
        self.rec.log(f"{d.name} c={conc}: " + json.dumps({k: lv.get(k) for k in (
            "requests", "ok", "failed", "cut", "tok_per_s", "req_per_s", "ttft_s_p50", "ttft_s_p95", "itl_s_p50",
            "itl_s_p95", "steady_tok_per_s", "steady_ttft_s_p95", "steady_requests", "burst_ttft_s_p95",
            "after_burst_ttft_s_p95", "slowest_ttft", "gpu_util_mean_pct", "gpu_mem_smi_peak_gb", "gpu_sm_clock_mhz_mean",
            "gpu_power_w_mean", "of_roofline", "errors")}))
        return lv


METHOD = [
    ("- Load: `bench/gpu_load.py`, closed loop: C clients each send a streaming `/v1/chat/completions` with one "
    "image (a different JPEG per request) and wait for its last chunk; answers have a fixed length (`ignore_eos`, "
    "`min_tokens` = `max_tokens`); a request with another token count, an HTTP error or an error event is failed. "
    "Per level one warm-up round of C requests (one request for `seed`), then the measured requests. Cache off."),
    ("- TTFT: request sent to first content chunk. ITL: gaps between successive content chunks of a stream, "
    "pooled over the level's streams (client-side arrival times). tok/s: completion tokens of the ok requests "
    "/ the level's wall time."),
    ("- Server side: its /metrics just before and after the measured requests (engine steps/s, tokens per step, "
     "mean batch = the llamactl_batch_size histogram over the level: rows per generate call for hf) and every "
     "0.5 s during them (peaks of the pool, running and waiting gauges)."),
    ("- GPU: nvidia-smi every 0.5 s (peak memory.used, mean utilization.gpu over the measured phase) and the "
    "server's /health gpu_memory (device-wide used bytes) every 0.5 s. Server cores: CPU seconds of the server "
    "process / wall seconds."),
    ("- Roofline: roofline(B) = B x BW / (W + B x X) tok/s at B = the level's clients, W = {w:.1f} GB and "
    "X = {x:.3f} GB a row fitted to gpu-baseline.md's H100 figures (180 / 2.2k / 3.4k tok/s at 1 / 16 / 32); "
    "'of roofline' = measured / roofline(B)."),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: tiny checkpoint, small levels, 8 tokens")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/engine-bench-out")))
    ap.add_argument("--work", type=Path, help="scratch folder (server logs, GPU samples); default: a temp dir")
    ap.add_argument("--model-dir", type=Path, help="reuse or build the checkpoint here")
    ap.add_argument("--budget-s", type=float, help="the whole run (default 540, tiny 240)")
    ap.add_argument("--prep-s", type=float, help="time for the checkpoint and bare generate (default 200, tiny 90)")
    ap.add_argument("--designs", type=lambda s: s.split(","), default=["continuous", "hf", "seed", "hf-big"],
                    help="in order: continuous, hf, seed, hf-big (the levels above --hf-max-batch)")
    ap.add_argument("--levels", type=ints, help="clients per level (default 1,8,32,64; tiny 1,2,4)")
    ap.add_argument("--sm-levels", type=ints, default=[32], help="levels of the continuous-sm design")
    ap.add_argument("--vp-levels", type=ints, default=[32, 64],
                    help="levels of the continuous-vp, -vl, -c2, -c2vp, -pt, -q2, -q2vp, -tl, -vg, -vgq2, -eager, "
                    "-vf, -vf1, -pd2 and -gather designs")
    ap.add_argument("--seed-levels", type=ints, help="levels of the one-at-a-time design (default 1,8; tiny 1,2)")
    ap.add_argument("--hf-max-batch", type=int, help="the hf design's max batch (default 32; tiny 2)")
    ap.add_argument("--max-tokens", type=int, help="answer length (default 128; tiny 8)")
    ap.add_argument("--rounds", type=int, default=8, help="measured requests = rounds x clients (at least "
                    "--min-requests), fewer when the level's time share is short. 8 since Session 16 (was 2): in "
                    "short runs the opening burst, every client at once, is a quarter to half of the requests and "
                    "sets the whole run's TTFT p95; two tower settings ranked one way by it over 4 rounds "
                    "(Session 15) ranked the other way over 12 (run 50)")
    ap.add_argument("--min-requests", type=int, default=6)
    ap.add_argument("--seed-min-requests", type=int, default=4)
    ap.add_argument("--hf-max-wait-ms", type=int, default=200, help="LLAMACTL_MAX_WAIT_MS of the hf designs "
                    "(200: the window that filled batches of 32 in bench/multi_gpu.py); continuous: the default")
    ap.add_argument("--baseline-batches", type=ints, help="bare generate batches (default 1,32; tiny 1,4; '' none)")
    ap.add_argument("--baseline-tokens", type=int, help="bare generate new tokens (default 128; tiny 8)")
    ap.add_argument("--baseline-warm-tokens", type=int, default=8)
    ap.add_argument("--images", type=int, help="distinct JPEGs, reused in turn (default 256; tiny 32)")
    ap.add_argument("--load-procs", type=int, default=4, help="load processes at most (one per 16 clients)")
    ap.add_argument("--status-at", type=int, default=32, help="clients of the level during which `llamactl "
                    "status --deep` runs against the continuous server (0: never)")
    ap.add_argument("--grace-s", type=float, default=20, help="how long past its time share a level may run")
    ap.add_argument("--prev", type=Path, help="a folder holding another version's llamactl/ package (e.g. `mkdir "
                    ".prev-C && git archive C llamactl | tar -x -C .prev-C`; .gitignore keeps .prev-*/ out of git, "
                    "carry it to the GPU machine): adds the design continuous-prev, served from it")
    ap.add_argument("--gpu-free-gib", type=float, help="before the designs, hold GPU 0's memory but this much in a "
                    "ballast process (gpu_ballast.py), so the servers size their pools for a smaller card: 79.18 is "
                    "what an idle 80 GB H100 reports free (run 11: 85,017,493,504 bytes); memory figures then "
                    "include the ballast")
    a = ap.parse_args()
    if a.prev and not (a.prev / "llamactl" / "__init__.py").is_file():
        ap.error(f"--prev {a.prev}: no llamactl/__init__.py there")
    tiny = a.tiny
    for key, gpu, cpu in (("budget_s", 540.0, 240.0), ("prep_s", 200.0, 90.0), ("levels", [1, 8, 32, 64], [1, 2, 4]),
                          ("seed_levels", [1, 8], [1, 2]), ("hf_max_batch", 32, 2), ("max_tokens", 128, 8),
                          ("baseline_batches", [1, 32], [1, 4]), ("baseline_tokens", 128, 8), ("images", 256, 32)):
        if getattr(a, key) is None:
            setattr(a, key, cpu if tiny else gpu)
    a.side = 112 if tiny else 1120
    if not tiny:
        # the prep stage's time: the checkpoint's build (38-47 s on an H200) unless it is there, bare generate
        built = (a.model_dir or Path("/dev/shm/llamactl-11b")).joinpath("config.json").exists()
        prep = (0.0 if built else 50.0) + (60.0 if a.baseline_batches else 0.0)
        if problem := budget_problem(a.budget_s, prep, designs_from(a)):
            ap.error(problem)
    t0 = time.monotonic()
    end = t0 + a.budget_s - 15  # kept for stopping the last server and writing the files
    a.work = a.work or Path(tempfile.mkdtemp(prefix="engine-bench-"))
    a.work.mkdir(parents=True, exist_ok=True)
    if a.model_dir is None:
        shm = Path("/dev/shm")
        roomy = shm.exists() and shutil.disk_usage(shm).free > 40e9
        a.model_dir = a.work / "tiny-model" if tiny else (shm if roomy else Path("/tmp")) / "llamactl-11b"
    rec = Recorder(a.out)
    rec.info = {"mode": "tiny-cpu" if tiny else "11b-shape-random-bf16",
                "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                "designs": {}, "status": "running"}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally below stops the server and writes
    bench: Bench | None = None
    ballast: subprocess.Popen[str] | None = None
    try:
        rec.info["env"] = environment(tiny)
        rec.log(json.dumps(rec.info["env"]))
        bw, bw_note = bandwidth_for(rec.info["env"].get("gpu_name", ""))
        rec.info["roofline"] = {
            "formula": f"B x BW / ({W_BYTES / 1e9:.2f} GB + B x {X_BYTES / 1e9:.3f} GB)",
            "bandwidth_bytes_s": bw, "bandwidth_note": bw_note,
            "at": {str(c): round(roofline_tok_s(c, bw)) for c in sorted({1, 8, 16, 32, 64, *a.levels})} if bw else {},
        }
        rec.info["method"] = [m.format(w=W_BYTES / 1e9, x=X_BYTES / 1e9) for m in METHOD]
        rec.dump()
        images: list[str] = []
        maker = threading.Thread(target=lambda: images.extend(noise_jpeg(s, a.side) for s in range(a.images)))
        maker.start()  # the JPEGs are made on the CPU while the prep stage uses the GPU
        rec.log(f"== prep: checkpoint {a.model_dir}, bare generate at {a.baseline_batches}")
        run_prep(a, rec, a.model_dir, min(a.prep_s, end - time.monotonic() - 60))
        maker.join()
        if not (a.model_dir / "config.json").exists():
            raise RuntimeError(f"no checkpoint in {a.model_dir} after the prep stage")
        bench = Bench(a, rec, images, end)
        if a.gpu_free_gib:
            ballast, rec.info["gpu_ballast"] = start_ballast(a.gpu_free_gib)
            rec.log(f"== ballast: {rec.info['gpu_ballast']}")
        if not tiny and shutil.which("nvidia-smi"):
            bench.sampler = GpuSampler(a.work / "gpu_samples.csv")
            bench.sampler.start()
        todo = designs_from(a)
        for i, d in enumerate(todo):
            left = end - time.monotonic()
            share = left * d.weight / sum(x.weight for x in todo[i:])
            if share < 30:
                rec.info["designs"][d.name] = {"title": d.title, "levels": [], "error": "skipped: out of time"}
                rec.log(f"== design {d.name}: skipped, {left:.0f}s left")
                continue
            bench.design(d, a.model_dir, time.monotonic() + share)
            rec.dump()
        rec.info["status"] = "complete"
    except Exception as exc:  # noqa: BLE001 - recorded as the status; the files are still written
        rec.info["status"] = f"partial: {type(exc).__name__}: {exc}"[:500]
        rec.log(rec.info["status"])
    finally:
        if rec.info["status"] == "running":
            rec.info["status"] = "partial: stopped (SIGTERM or interrupt)"
        if bench is not None:
            if bench.proc is not None:
                stop(bench.proc, 30)
            if bench.sampler:
                bench.sampler.stop()
                shutil.copy(bench.sampler.path, a.out / "gpu_samples.csv")
        if ballast is not None:
            ballast.communicate(timeout=30)  # closing its stdin lets it go
        rec.info["elapsed_s"] = round(time.monotonic() - t0, 1)
        logs = [f"==== {p.name}\n{p.read_text(errors='replace')[-8000:]}" for p in sorted(a.work.glob("serve-*.log"))]
        (a.out / "server_logs.txt").write_text("\n".join(logs))
        rec.dump()
        rec.log(f"== done after {rec.info['elapsed_s']}s: {rec.info['status']}\n{summary(rec.info)}")


if __name__ == "__main__":
    main()
