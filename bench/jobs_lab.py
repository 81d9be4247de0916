"""Jobs through the balancer of a 3-host lab with Redis, across a rolling restart, a redeploy, a kill -9 of a
server and a Redis restart: how many accepted jobs are lost (the answer must be 0).

    flock /tmp/llamactl-lab.lock .venv/bin/python bench/jobs_lab.py --jobs-per-phase 15 \
        --out bench/results/jobs_lab.json

Brings up its own lab (name ``jobsb``, 10.216.0.0/24), deploys it (the lab inventory enables ``redis:``),
runs the four phases with ``tests/e2e/jobload.py`` (jobs posted 0.4 s apart while the disruption runs, then
each followed through the balancer to its end), writes JSON and a Markdown table, and tears the lab down.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.jobload import JobLoad, PhaseResult

LLAMACTL = [sys.executable, "-m", "llamactl"]
NAME, SUBNET = "jobsb", "10.216.0.0/24"


def llamactl(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*LLAMACTL, *args], capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "NO_COLOR": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"llamactl {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    return proc


def on_host(inventory: Path, host: str, script: str) -> str:
    from llamactl.inventory import load_inventory
    from llamactl.ops.connect import HostPool
    from llamactl.plan.command import Command

    with HostPool(load_inventory(inventory)) as pool:
        return pool.executor(host).run(Command.sh(script)).stdout


def wait_ready(inventory: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if subprocess.run([*LLAMACTL, "status", str(inventory), "--json"], capture_output=True,
                          timeout=60, check=False).returncode == 0:
            return
        time.sleep(1)
    raise SystemExit(f"instances not all ready within {timeout_s:g} s")


def machine() -> dict[str, object]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem_kb / 1024**2, 1),
            "os": platform.platform(), "python": platform.python_version(),
            "note": "a 2-core Debian dev box shared with other engineers' test runs"}


def redeploy(inventory: Path, work: Path) -> Callable[[], None]:
    """A deploy with one server setting changed: every instance restarts through the balancer."""
    import yaml

    def run() -> None:
        data = yaml.safe_load(inventory.read_text())
        data["defaults"]["server"]["max_wait_ms"] = int(data["defaults"]["server"]["max_wait_ms"]) + 1
        changed = work / "inventory-changed.yaml"
        changed.write_text(yaml.safe_dump(data, sort_keys=False))
        llamactl("deploy", str(changed), "--json")
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs-per-phase", type=int, default=15)
    ap.add_argument("--max-tokens", type=int, default=96, help="tokens per job, exactly (ignore_eos): long "
                    "enough to be running when the disruption hits (the lab's limit is 96)")
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between two POSTs")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/jobs_lab.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="jobs-lab-"))
    lab = work / "lab"
    started = time.monotonic()
    subprocess.run([*LLAMACTL, "lab", "down", "--dir", str(lab), "--name", NAME], capture_output=True, check=False)
    try:
        llamactl("lab", "up", "3", "--dir", str(lab), "--name", NAME, "--subnet", SUBNET)
        inv = lab / "inventory.yaml"
        t = time.monotonic()
        llamactl("deploy", str(inv), "--json")
        deploy_s = time.monotonic() - t
        endpoint = (lab / "endpoint").read_text().strip()
        wait_ready(inv)
        load = JobLoad(endpoint, max_tokens=args.max_tokens, ignore_eos=True)
        phases: list[PhaseResult] = []
        try:
            # (name, disruption, accepted jobs before it starts): the long ones start early and jobs keep
            # arriving during them; the instant ones hit once every job of the phase is in (the most open)
            n = args.jobs_per_phase
            steps: list[tuple[str, Callable[[], None], int]] = [
                ("rolling restart", lambda: llamactl("restart", str(inv), "--rolling", "--yes"), 3),
                ("redeploy (a setting changed: every instance restarted)", redeploy(inv, work), 3),
                ("kill -9 of a server", lambda: on_host(inv, "lab-host1",
                                                        "systemctl kill -s KILL llamactl@0.service"), n),
                ("Redis restart", lambda: on_host(inv, "lab-lb", "systemctl restart llamactl-redis.service"), n),
            ]
            for name, disrupt, hit_after in steps:
                print(f"phase: {name}", flush=True)
                phase = load.run(name, n, disrupt, interval_s=args.interval, settle_timeout_s=300,
                                 hit_after=hit_after)
                print(json.dumps(phase.summary()), flush=True)
                phases.append(phase)
                wait_ready(inv)
        finally:
            load.close()
    finally:
        subprocess.run([*LLAMACTL, "lab", "down", "--dir", str(lab), "--name", NAME], capture_output=True,
                       check=False)
    summaries = [p.summary() for p in phases]
    total = {k: sum(int(s[k]) for s in summaries) for k in ("accepted", "not_accepted", "succeeded", "failed",
                                                             "lost")}
    result = {"benchmark": "jobs through the balancer of a 3-host lab with Redis, across disruptions",
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
              "jobs_per_phase": args.jobs_per_phase, "max_tokens": args.max_tokens,
              "interval_s": args.interval, "first_deploy_s": round(deploy_s, 1),
              "total": total, "phases": summaries, "wall_s": round(time.monotonic() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {s['phase']} | {s['accepted']} | {s['open_at_disruption']} | {s['succeeded']} | "
                     f"{s['failed']} | {s['lost']} | "
                     f"{s['not_accepted']} | {s['post_retries']} | {s['get_retries']} | {s['disruption_s']} | "
                     f"{s['settle_s']} |" for s in summaries)
    m = result["machine"]
    assert isinstance(m, dict)
    md = f"""# Jobs across disruptions (lab, Redis): {total['lost']} of {total['accepted']} accepted jobs lost

`flock /tmp/llamactl-lab.lock .venv/bin/python bench/jobs_lab.py --jobs-per-phase {args.jobs_per_phase} \
--max-tokens {args.max_tokens} --interval {args.interval:g}` on {result['date']}.

Machine: {m['cpus']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, {m['os']}, Python {m['python']}; {m['note']}.
Lab (`llamactl lab up 3`): 3 server hosts + a balancer host running nginx and Redis (deployed by
`llamactl deploy`), the tiny CPU model, one instance per host, jobs of exactly {args.max_tokens} tokens (ignore_eos) posted
{args.interval:g} s apart through the balancer while the disruption runs (a restart starts once 3 are accepted, a
kill -9 or Redis restart once all of the phase's are; "open when hit" = accepted jobs still queued or running then); each accepted job (202) is then followed through the
balancer until it ends. Lost = a 404 or no end within 300 s. Retries = 429/502/503/504 or refused connections.

| phase | accepted | open when hit | succeeded | failed | lost | never accepted | POST retries | GET retries | disruption s | settle s |
|---|---|---|---|---|---|---|---|---|---|---|
{rows}
| **total** | **{total['accepted']}** | | **{total['succeeded']}** | **{total['failed']}** | **{total['lost']}** | {total['not_accepted']} | | | | |

First deploy of the lab: {result['first_deploy_s']} s; whole run {result['wall_s']} s.
"""
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
