"""One device call for the GPU benches: environment report, model build, gpu_smoke.py (1 GPU), multi_gpu.py.

Each stage runs under its own time budget inside one overall budget, and whatever a stage wrote stays in $OUT
even when a later one fails, so one call (the device time is scarce) always returns something to read.

    python3 bench/gpu_device.py --budget-s 570      # on the device, after installing the carried wheels
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("OUT", "/tmp/gpu-out"))
T0 = time.monotonic()


def left(budget: float) -> float:
    return budget - (time.monotonic() - T0)


def stage(name: str, argv: list[str], timeout_s: float, log: Path, env: dict[str, str] | None = None) -> int:
    """Run argv with output teed to log; SIGTERM at the timeout (the benches clean up and dump), then SIGKILL."""
    print(f"== {name} (timeout {timeout_s:.0f}s, {time.monotonic() - T0:.0f}s elapsed)", flush=True)
    if timeout_s < 20:
        print(f"== {name}: skipped, no time left", flush=True)
        return -1
    with log.open("ab") as fh:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        deadline = time.monotonic() + timeout_s
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        while proc.poll() is None:
            chunk = proc.stdout.read() or b""
            fh.write(chunk)
            sys.stdout.buffer.write(chunk[-4000:])
            if time.monotonic() > deadline:
                print(f"== {name}: timeout, SIGTERM", flush=True)
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    proc.kill()
                break
            time.sleep(0.5)
        fh.write(proc.stdout.read() or b"")
    print(f"== {name}: exit {proc.returncode} after {time.monotonic() - T0:.0f}s", flush=True)
    return proc.returncode if proc.returncode is not None else -9


def sh(cmd: str) -> str:
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60, check=False)
    return f"$ {cmd}\n{r.stdout}{r.stderr}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=570)
    ap.add_argument("--skip-smoke", action="store_true")
    ap.add_argument("--sdpa-check", action="store_true", help="run bench/gpu_sdpa_check.py on GPU 1 during the build")
    ap.add_argument("--smoke-s", type=float, default=150, help="time kept for gpu_smoke.py after multi_gpu.py")
    ap.add_argument("--multi-args", default="", help="extra arguments for multi_gpu.py")
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    report = [sh(c) for c in (
        "nvidia-smi -L", "nvidia-smi topo -m", "nproc", "lscpu | head -24",
        "cat /sys/devices/system/cpu/cpu0/topology/thread_siblings_list", "free -g", "df -h /tmp /dev/shm", "uname -r",
        f"{py} --version",
        (f"{py} -c 'import torch,transformers,fastapi,uvicorn,pydantic,starlette,huggingface_hub,tokenizers;"
         "print(torch.__version__, torch.version.cuda, transformers.__version__, fastapi.__version__,"
         " uvicorn.__version__, pydantic.__version__, starlette.__version__, huggingface_hub.__version__,"
         " tokenizers.__version__, torch.cuda.device_count(), torch.cuda.get_device_name(0))'"),
        f"PYTHONPATH={REPO}:$PYTHONPATH {py} -m llamactl --version",
        f"sh {REPO}/bench/nginx_carry/unpack.sh {REPO}/.nginx /tmp/ngx",
    )]
    (OUT / "env.txt").write_text("\n".join(report) + f"\nGIT_REV={os.environ.get('GIT_REV', '?')}\n")
    print("\n".join(report), flush=True)

    shm_free = shutil.disk_usage("/dev/shm").free if Path("/dev/shm").exists() else 0
    model = Path("/dev/shm/llamactl-11b") if shm_free > 40e9 else Path("/tmp/llamactl-11b")
    build = (f"import sys,json,time; sys.path[:0]=['{REPO}','{REPO}/bench']; from pathlib import Path; "
             f"from gpu_smoke import build_random_11b; t=time.monotonic(); "
             f"r=build_random_11b(Path('{model}')); r['wall_s']=round(time.monotonic()-t,1); "
             f"r['dir']='{model}'; print('BUILD', json.dumps(r))")
    diag = None
    if a.sdpa_check:  # direct HF generate on GPU 1 while GPU 0 builds the checkpoint (mostly a disk write)
        diag = subprocess.Popen([py, "bench/gpu_sdpa_check.py"],  # its JSON goes to the log
                                cwd=REPO, stdout=(OUT / "sdpa_check.log").open("wb"), stderr=subprocess.STDOUT,
                                env={**os.environ, "CUDA_VISIBLE_DEVICES": "1"})
    if not (model / "config.json").exists():
        stage("build", [py, "-c", build], min(240, left(a.budget_s)), OUT / "smoke.log",
              {"PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"})
    if diag is not None:
        try:
            diag.wait(timeout=max(10, min(90, left(a.budget_s) - 330)))
        except subprocess.TimeoutExpired:
            diag.kill()
            diag.wait()
        print(f"== sdpa_check: exit {diag.returncode} after {time.monotonic() - T0:.0f}s", flush=True)
        print((OUT / "sdpa_check.log").read_text(errors="replace")[-3000:], flush=True)
    # The multi-GPU run (issue 6's acceptance) first; the smoke run (about 2 minutes) gets what is left.
    stage("multi_gpu", [py, "bench/multi_gpu.py", "--model-dir", str(model), "--work", "/tmp/mg",
                        "--nginx-root", "/tmp/ngx", "--out", str(OUT / "multi_gpu.json"),
                        "--md", str(OUT / "multi_gpu.md"), *a.multi_args.split()],
          left(a.budget_s) - (5 if a.skip_smoke else a.smoke_s), OUT / "multi.log")
    if not a.skip_smoke:
        stage("gpu_smoke", [py, "bench/gpu_smoke.py", "--model-dir", str(model), "--out",
                            str(OUT / "gpu_smoke.json")], left(a.budget_s) - 5, OUT / "smoke.log",
              {"CUDA_VISIBLE_DEVICES": "0", "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"})
    logs = []
    for f in sorted(Path("/tmp/mg").glob("*/instance-*.log")) + sorted(Path("/tmp/mg").glob("*/nginx/error.log")):
        if f.exists():
            logs.append(f"==== {f}\n{f.read_text(errors='replace')[-6000:]}")
    (OUT / "server_logs.txt").write_text("\n".join(logs))
    if Path("/tmp/mg/gpu_samples.csv").exists():
        shutil.copy("/tmp/mg/gpu_samples.csv", OUT / "gpu_samples.csv")
    print(f"== done after {time.monotonic() - T0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
