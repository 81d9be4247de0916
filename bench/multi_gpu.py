"""One server per GPU behind nginx, exactly as the rendered systemd instances run them; throughput vs one GPU.

Steps (one process, one device call):
1. build the 11B-shape random bf16 checkpoint once (bench/gpu_smoke.py's builder) unless --model-dir has one;
2. write an inventory (one host at 127.0.0.1 with --gpus, a balancer at 127.0.0.1:--listen, least_conn) and run
   ``llamactl render`` on it;
3. for each instance: read the rendered /etc/llamactl/instance-<i>.env into the environment (as systemd's
   EnvironmentFile= does) and run the unit's ExecStart in its WorkingDirectory; start nginx with the rendered
   balancer config included in a minimal nginx.conf (private prefix);
4. record GPU pinning (nvidia-smi compute apps per GPU, each process's CUDA_VISIBLE_DEVICES, /health);
5. one GPU: the other instances marked ``down`` in the balancer config (the rolling-restart drain path) and
   nginx reloaded; drive each --single-levels concurrency (a warm round, then --rounds measured rounds);
6. all GPUs: the rendered config back, concurrency = len(gpus) x the best single level;
7. stop everything; repeat 2-6 for each --variant (inventory server settings, e.g. cpu_pinning=true).
Every measured phase also records CPU use (servers and their busiest threads, nginx, load generator, host)
and the servers' batches (mean size, duration, preprocessing time) from /metrics and /health.
Writes JSON (--out) and a markdown summary (--md).

    python bench/multi_gpu.py --nginx-root /tmp/ngx --out bench/results/multi_gpu.json --md ...   # device
    python bench/multi_gpu.py --tiny                                 # CPU dry run: tiny model, 2 CPU instances
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import httpx
from gpu_load import noise_jpeg, run_load
from gpu_stack import (
    CpuMeter,
    GpuSampler,
    Nginx,
    batch_delta,
    gpu_pinning,
    parse_env_file,
    parse_unit,
    scrape_batches,
    start_instance,
    stop,
    wait_ready,
)

# Environment the device's docs require in every process started with its own environment.
SAFETY_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def write_inventory(path: Path, a: argparse.Namespace, install_dir: Path, model_dir: Path,
                    server_extra: dict[str, str]) -> None:
    gpus = ", ".join(str(g) for g in a.gpus)
    extra = "".join(f"    {k}: {v}\n" for k, v in server_extra.items())
    path.write_text(f"""version: 1
cluster: bench
defaults:
  ssh: {{user: root, host_key_policy: accept-new, use_ssh_config: false}}
  install_dir: {install_dir}
  gpus: [{gpus}]
  base_port: {a.base_port}
  bind: 127.0.0.1
  model:
    source: {model_dir}
    dtype: bfloat16
    quantization: none
    generation: {{max_new_tokens: {a.max_tokens}}}
  server:
    max_batch_size: {a.max_batch}
    max_wait_ms: {a.max_wait_ms}
    queue_limit: 512
    request_timeout_s: 900
    user: root
    cache: {{max_entries: 0}}
{extra}    env: {{HF_HUB_OFFLINE: "1"}}
groups:
  gpu:
    hosts:
      gpu-host: {{address: 127.0.0.1}}
balancer:
  hosts:
    lb: {{address: 127.0.0.1}}
  listen: {a.listen}
  server_name: _
  method: least_conn
  keepalive: 64
  proxy_read_timeout_s: 900
  config_path: /etc/nginx/conf.d/llamactl.conf
  prometheus_targets_path: /etc/prometheus/file_sd/llamactl.json
""")


def build_model(model_dir: Path, tiny: bool) -> dict[str, Any]:
    if (model_dir / "config.json").exists():
        return {"reused": str(model_dir)}
    if tiny:
        from llamactl.server.tiny import build_tiny_checkpoint

        build_tiny_checkpoint(model_dir)
        return {"built": "tiny"}
    from gpu_smoke import build_random_11b

    return build_random_11b(model_dir)


def procs_for(conc: int, a: argparse.Namespace) -> int:
    return max(1, min(a.load_procs, conc // 8)) if a.load_procs > 1 else 1


def level(url: str, conc: int, a: argparse.Namespace, images: list[str], sampler: GpuSampler | None,
          meter: CpuMeter | None, backends: list[str]) -> dict[str, Any]:
    procs = procs_for(conc, a)
    run_load(url, concurrency=conc, requests=conc, max_tokens=a.max_tokens, images=images, processes=procs)
    if sampler:
        sampler.mark()
    before_cpu = meter.snapshot() if meter else None
    before = [scrape_batches(b) for b in backends]
    res = run_load(url, concurrency=conc, requests=conc * a.rounds, max_tokens=a.max_tokens, images=images,
                   processes=procs)
    res["batches"] = {b: batch_delta(x, scrape_batches(b)) for b, x in zip(backends, before)}
    if meter and before_cpu:
        res["cpu"] = meter.since(before_cpu)
    if sampler:
        res["gpu_util_mean_pct"] = sampler.mean_util_since_mark()
    print(json.dumps(res), flush=True)
    return res


def prewarm(urls: list[str], levels: list[int], a: argparse.Namespace, images: list[str]) -> list[dict[str, Any]]:
    """One round per level on every instance directly, all instances at once, before anything is measured.

    Each instance meets the batch shapes of the measured phases here (first batches of a shape are slower),
    in parallel to save device time.
    """
    from concurrent.futures import ThreadPoolExecutor

    def warm(url: str) -> list[dict[str, Any]]:
        out = []
        for c in levels:
            r = run_load(url, concurrency=c, requests=c, max_tokens=a.max_tokens, images=images)
            out.append({"url": url, "concurrency": c, "wall_s": r["wall_s"], "failed": r["failed"]})
        return out

    with ThreadPoolExecutor(len(urls)) as pool:
        res = [row for rows in pool.map(warm, urls) for row in rows]
    print(json.dumps({"prewarm": res}), flush=True)
    return res


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``pin:cpu_pinning=true,cpu_threads=4`` -> ("pin", {...}): inventory server settings for one variant."""
    name, _, rest = text.partition(":")
    extra = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    return name, extra


def run_variant(name: str, server_extra: dict[str, str], a: argparse.Namespace, work: Path, model_dir: Path,
                install_dir: Path, images: list[str], sampler: GpuSampler | None) -> dict[str, Any]:
    """Render the inventory with these server settings, start every instance from its rendered files behind
    the rendered nginx, measure one GPU (others drained) and all GPUs, stop everything."""
    out: dict[str, Any] = {"variant": name, "server_settings": server_extra}
    vdir = work / name
    vdir.mkdir(parents=True, exist_ok=True)
    inv_path = vdir / "inventory.yaml"
    write_inventory(inv_path, a, install_dir, model_dir, server_extra)
    rendered = vdir / "rendered"
    subprocess.run([sys.executable, "-m", "llamactl", "render", str(inv_path), "--out", str(rendered)],
                   check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                       p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)})
    unit = parse_unit(rendered / "gpu-host/etc/systemd/system/llamactl@.service")
    out["unit"] = unit
    exec_argv = shlex.split(unit["ExecStart"])
    make_shim(Path(exec_argv[0]))
    state_dir = work / "state" if a.tiny else Path(unit["WorkingDirectory"])
    state_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    nginx: Nginx | None = None
    try:
        envs = []
        for i, _gpu in enumerate(a.gpus):
            env_file = rendered / "gpu-host" / unit["EnvironmentFile"].replace("%i", str(i)).lstrip("/")
            env = parse_env_file(env_file)
            if a.tiny:  # no GPU here: same files, CPU device, state under work
                env = {k: v.replace("/var/lib/llamactl", str(state_dir)) for k, v in env.items()}
                env.update(LLAMACTL_DEVICE="cpu", CUDA_VISIBLE_DEVICES="")
            envs.append(env)
            base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", **SAFETY_ENV}
            procs.append(start_instance(exec_argv, {**base, **env}, state_dir, vdir / f"instance-{i}.log"))
        out["instance_env"] = [{k: v for k, v in e.items() if "API_KEY" not in k} for e in envs]
        lb_conf = rendered / "lb/etc/nginx/conf.d/llamactl.conf"
        nginx = Nginx(vdir / "nginx", a.nginx_root, lb_conf.read_text())
        out["nginx_version"] = nginx.version()
        nginx.start()
        urls = [f"http://127.0.0.1:{e['LLAMACTL_PORT']}" for e in envs]
        out["ready_s"] = [round(wait_ready(u, p, vdir / f"instance-{i}.log", 1200), 1)
                          for i, (u, p) in enumerate(zip(urls, procs))]
        out["health"] = [httpx.get(u + "/health").json() for u in urls]
        out["pinning"] = gpu_pinning(procs, a.tiny)
        print(json.dumps({"variant": name, "ready_s": out["ready_s"], "pinning": out["pinning"],
                          "cpu": [h.get("cpu") for h in out["health"]],
                          "engine": [h.get("engine") for h in out["health"]]}), flush=True)
        meter = CpuMeter({f"server{i}": p.pid for i, p in enumerate(procs)})
        lb_url = f"http://127.0.0.1:{a.listen}"
        if a.prewarm:
            out["prewarm"] = prewarm(urls, a.single_levels, a, images)

        from llamactl.inventory import load_inventory
        from llamactl.plan.render import render_balancer_files

        inv = load_inventory(inv_path)
        others = frozenset(i.id for i in inv.instances()[1:])
        drained = render_balancer_files(inv, drained=others)[inv.balancer.config_path].content.decode()
        nginx.reload(drained)
        out["single_gpu_config"] = f"instances {sorted(others)} marked down; gpu {a.gpus[0]} serves"
        out["single"] = [level(lb_url, c, a, images, sampler, meter, urls[:1]) for c in a.single_levels]
        best = max(out["single"], key=lambda r: r["tok_per_s"] or 0)
        nginx.reload(lb_conf.read_text())
        conc = best["concurrency"] * len(a.gpus)
        out["multi"] = level(lb_url, conc, a, images, sampler, meter, urls)
        out["health_end"] = [httpx.get(u + "/health").json() for u in urls]
        ratio = (out["multi"]["tok_per_s"] or 0) / (best["tok_per_s"] or 1)
        out["result"] = {
            "variant": name, "gpus": len(a.gpus), "best_single_concurrency": best["concurrency"],
            "single_tok_per_s": best["tok_per_s"], "multi_tok_per_s": out["multi"]["tok_per_s"],
            "speedup": round(ratio, 3), "failed": sum(r["failed"] for r in [*out["single"], out["multi"]]),
            "pass": ratio >= 0.95 * len(a.gpus) and out["multi"]["failed"] == 0
            and all(r["failed"] == 0 for r in out["single"]),
        }
        print(json.dumps(out["result"]), flush=True)
    finally:
        for p in procs:
            stop(p, 120)
        out["server_exit_codes"] = [p.returncode for p in procs]
        if nginx:
            nginx.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU dry run (tiny checkpoint, LLAMACTL_DEVICE=cpu)")
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--work", type=Path, help="scratch directory (default: a new temp dir)")
    ap.add_argument("--nginx-root", type=Path, help="unpacked nginx .debs (bench/nginx_carry/unpack.sh); "
                    "default: nginx on PATH")
    ap.add_argument("--gpus", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    ap.add_argument("--base-port", type=int, default=8000)
    ap.add_argument("--listen", type=int, default=8080)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--single-levels", type=lambda s: [int(x) for x in s.split(",")], default=[32])
    ap.add_argument("--rounds", type=int, default=3, help="measured requests = rounds x concurrency")
    ap.add_argument("--load-procs", type=int, default=4,
                    help="load generator processes at most (one per 8 clients); 1 = one asyncio process")
    ap.add_argument("--no-prewarm", dest="prewarm", action="store_false",
                    help="skip warming every instance at every level first")
    ap.add_argument("--variant", action="append", type=parse_variant, default=[],
                    help="NAME:key=value,... inventory server settings for one run (repeatable); "
                    "default: one variant with the inventory defaults")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="skip the remaining variants once this many seconds have passed (0: no limit)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--md", type=Path)
    a = ap.parse_args()
    variants = a.variant or [("defaults", {})]

    t_start = time.monotonic()
    work = a.work or Path(tempfile.mkdtemp(prefix="llamactl-multi-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = a.model_dir or work / "model"
    # On the device the unit's own paths are used (it is a throwaway root machine); in --tiny they move under work.
    install_dir = work / "opt-llamactl" if a.tiny else Path("/opt/llamactl")
    info: dict[str, Any] = {"mode": "tiny-cpu" if a.tiny else "11b-shape-random-bf16", "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}}
    info["device"], info["versions"] = describe(a.tiny)
    info["host_cpus"] = host_cpus()
    t0 = time.monotonic()
    info["model_build"] = build_model(model_dir, a.tiny)
    info["model_build"]["wall_s"] = round(time.monotonic() - t0, 1)
    side = 112 if a.tiny else 1120
    images = [noise_jpeg(s, side) for s in range(64)]
    sampler = None if a.tiny else GpuSampler(work / "gpu_samples.csv")
    info["variants"] = []
    try:
        if sampler:
            sampler.start()
        for name, extra in variants:
            if a.budget_s and time.monotonic() - t_start > a.budget_s:
                info["variants"].append({"variant": name, "skipped": "out of --budget-s"})
                continue
            info["variants"].append(run_variant(name, extra, a, work, model_dir, install_dir, images, sampler))
    finally:
        if sampler:
            sampler.stop()
            info["gpu_samples_tail"] = sampler.tail()
        info["results"] = [v.get("result") for v in info["variants"]]
        dump(info, a)


def host_cpus() -> dict[str, Any]:
    from llamactl.server.cpus import physical_cores, read_topology

    allowed = sorted(os.sched_getaffinity(0))
    cores = physical_cores(allowed, read_topology())
    return {"cpus": len(allowed), "physical_cores": len(cores), "first_cores": cores[:4]}


def make_shim(path: Path) -> None:
    """Stand in for the release venv's ``llamactl`` entry script: this interpreter + this checkout (+ carry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pypath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    path.write_text(f"#!/bin/sh\nPYTHONPATH={shlex.quote(pypath)} exec {shlex.quote(sys.executable)} "
                    "-m llamactl \"$@\"\n")
    path.chmod(0o755)


def describe(tiny: bool) -> tuple[str, str]:
    import platform

    import fastapi
    import torch
    import transformers
    import uvicorn

    # nvidia-smi, not torch.cuda: this process must not put a CUDA context on the servers' GPUs.
    device = f"CPU ({os.cpu_count()} cores)" if tiny else ", ".join(subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
        check=False).stdout.split("\n")[:-1])
    return device, (f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
                    f"{transformers.__version__}, fastapi {fastapi.__version__}, uvicorn {uvicorn.__version__}")


def dump(info: dict[str, Any], a: argparse.Namespace) -> None:
    text = json.dumps(info, indent=2, default=str)
    print(json.dumps(info.get("results") or {"incomplete": True}), flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    if a.md:
        from gpu_report import multi_gpu_markdown

        a.md.parent.mkdir(parents=True, exist_ok=True)
        a.md.write_text(multi_gpu_markdown(info))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally: stop servers and nginx
    main()
