"""Who holds the server process's GIL under steady HTTP load, sampled from outside with py-spy.

Straight into the engine (engine_direct.py, inputs prepared beforehand) an H200 made 1,709.7 tok/s at 32
clients, while the same code over HTTP (engine_bench.py, same call) made 1,523.0, with the GPU busy 84.9 % of
the time instead of ~96 % and the step loop's host phases 2-3x longer (bench/results/engine.md, Session 17).
This starts `llamactl serve` (engine_bench's server environment plus ``--env``), drives closed-loop streamed
chat completions at ``--clients`` (gpu_load.py), and while the load is steady runs py-spy three times on the server:
``record --gil`` (only the thread holding the GIL is sampled), ``record`` (every thread that is not idle) and
``record --idle`` (every thread: where a thread waits, e.g. to take the GIL back after a PyTorch call).
Both are written as collapsed stacks (``--format raw``: ``frame;frame;... count``) for offline reading, and
summarised here per thread role (model thread, event loop, image threads, output thread, other) and by the
innermost llamactl/transformers frames.

    python3 bench/engine_server_gil_probe.py --py-spy /tmp/site/bin/py-spy --out $OUT/gil.json   # GPU machine
    python3 bench/engine_server_gil_probe.py --tiny --py-spy .venv/bin/py-spy --out /tmp/gil.json  # CPU path
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# a stack is put in the first role whose marker one of its frames contains (py-spy frames read
# "function (path:line)")
ROLES = [
    ("model thread", ("ContinuousEngine.run_forever",)),
    ("output thread", ("continuous/output.py",)),
    ("image threads", ("concurrent/futures/thread.py",)),  # the image pool (decode, processor/pixels, prepare)
    ("event loop", ("asyncio", "uvicorn")),
]


def role(stack: str) -> str:
    for name, markers in ROLES:
        if any(m in stack for m in markers):
            return name
    return "other"


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            rows.append((stack.split(";"), int(count)))
    return rows


def summarize(path: Path, top: int = 25) -> dict[str, Any]:
    """Samples per role, and per role the innermost frames of this project and of transformers/torch/PIL."""
    rows = read_collapsed(path)
    total = sum(c for _, c in rows)
    roles: Counter[str] = Counter()
    leaves: dict[str, Counter[str]] = {}
    ours: dict[str, Counter[str]] = {}
    for frames, count in rows:
        r = role(";".join(frames))
        roles[r] += count
        leaves.setdefault(r, Counter())[frames[-1]] += count
        mine = [f for f in frames if "llamactl/" in f or "/bench/" in f]
        ours.setdefault(r, Counter())[mine[-1] if mine else "(none of ours)"] += count
    return {
        "samples": total,
        "by_role": {r: {"samples": n, "share": round(n / total, 4) if total else None} for r, n in roles.most_common()},
        "leaf_frames": {r: c.most_common(top) for r, c in leaves.items()},
        "innermost_own_frames": {r: c.most_common(top) for r, c in ours.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True, help="JSON summary; the raw stacks go beside it")
    ap.add_argument("--py-spy", required=True, help="the py-spy executable")
    ap.add_argument("--work", type=Path, default=Path("/tmp/engine-server-gil-probe"))
    ap.add_argument("--model-dir", type=Path, help="default /dev/shm/llamactl-11b (tiny: /tmp/llamactl-tiny)")
    ap.add_argument("--tiny", action="store_true", help="CPU: the tiny checkpoint, 4 clients, 8 tokens")
    ap.add_argument("--clients", type=int, help="default 32 (tiny 4)")
    ap.add_argument("--max-tokens", type=int, help="default 128 (tiny 8)")
    ap.add_argument("--rounds", type=int, default=24, help="requests per client in the measured load")
    ap.add_argument("--settle-s", type=float, default=8.0, help="load before the first recording starts")
    ap.add_argument("--record-s", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--env", default="", help="server settings, KEY=VALUE,...")
    ap.add_argument("--load-procs", type=int, default=4)
    a = ap.parse_args()
    a.clients = a.clients or (4 if a.tiny else 32)
    a.max_tokens = a.max_tokens or (8 if a.tiny else 128)
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    import httpx
    from engine_bench import free_port
    from engine_burst_probe import checkpoint, server_env
    from gpu_load import noise_jpeg, run_load
    from gpu_stack import stop, wait_ready

    model_dir = checkpoint(a.model_dir, a.tiny)
    env_extra = dict(item.split("=", 1) for item in a.env.split(",") if item)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = server_env(a.tiny, a.clients, env_extra)
    argv = [sys.executable, "-m", "llamactl", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning"]
    images = [noise_jpeg(seed, 448 if a.tiny else 1120) for seed in range(64)]
    result: dict[str, Any] = {"git": os.environ.get("GIT_REV", ""), "clients": a.clients, "env": env_extra,
                              "rate": a.rate, "record_s": a.record_s}
    log = a.work / "serve.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    try:
        result["ready_s"] = round(wait_ready(url, proc, log, 300), 1)
        run_load(url, concurrency=a.clients, requests=a.clients, max_tokens=a.max_tokens, images=images,
                 processes=a.load_procs)  # warm: this level's graphs and kernels
        load: dict[str, Any] = {}

        def drive() -> None:
            load.update(run_load(url, concurrency=a.clients, requests=a.clients * a.rounds,
                                 max_tokens=a.max_tokens, images=images, processes=a.load_procs, first_image=7))

        driver = threading.Thread(target=drive)
        driver.start()
        time.sleep(a.settle_s)
        for name, flags in (("gil", ["--gil"]), ("all", []), ("idle", ["--idle"])):
            raw = a.out.parent / f"{a.out.stem}_{name}.txt"
            cmd = [a.py_spy, "record", "--pid", str(proc.pid), "--duration", str(int(a.record_s)), "--rate",
                   str(a.rate), "--format", "raw", "--nonblocking", "--output", str(raw), *flags]
            ran = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=a.record_s + 60)
            result[f"py_spy_{name}"] = {"rc": ran.returncode, "stderr": ran.stderr[-1500:]}
            if raw.exists():
                result[name] = summarize(raw)
            a.out.write_text(json.dumps(result, indent=1))
        health = httpx.get(url + "/health", timeout=10).json().get("engine") or {}
        driver.join()
        result["load"] = {k: load.get(k) for k in ("requests", "ok", "failed", "wall_s", "tok_per_s", "ttft_s_p50",
                                                   "ttft_s_p95", "itl_s_p50", "itl_s_p95")}
        result["engine_host_s"] = health.get("host_s")
    except Exception as exc:  # noqa: BLE001 - recorded with what was measured
        result["error"] = f"{type(exc).__name__}: {exc}"[:1500]
    finally:
        stop(proc, 30)
        result["log_tail"] = log.read_text(errors="replace")[-2000:]
    a.out.write_text(json.dumps(result, indent=1))
    for name in ("gil", "all", "idle"):
        if name in result:
            print(name, json.dumps(result[name]["by_role"]), flush=True)
    print(json.dumps(result.get("load")), result.get("error", ""), flush=True)


if __name__ == "__main__":
    main()
