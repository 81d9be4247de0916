"""Deploy wall time to 1, 3 and 8 lab hosts: first run and no-op rerun, with the controller's overhead.

For each N: a fresh lab of N hosts, `deploy` (first run), `deploy` again (no-op), lab down.
Controller overhead = deploy wall time - (the slowest host's time spent connecting, inside remote commands
and uploads, and waiting for its instances' /ready) - the balancer host's time inside remote commands.
Every one of those is measured around the executor call (or the readiness wait) itself. That is the wall
time the same host-side work would take if run directly over parallel SSH, so the difference is what
llamactl itself adds (planning, rendering, hashing, threads, progress).

Run as root:  .venv/bin/python bench/deploy_bench.py [--sizes 1,3,8] [--out bench/results/deploy.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llamactl.inventory import load_inventory  # noqa: E402
from llamactl.ops.connect import connect_host  # noqa: E402
from llamactl.ops.deploy import deploy  # noqa: E402


class TimedExecutor:
    """Wraps an executor; adds the wall time of every call to its host's bucket."""

    def __init__(self, inner: Any, buckets: dict[str, float], lock: threading.Lock) -> None:
        self.inner, self.buckets, self.lock = inner, buckets, lock

    @property
    def host(self) -> str:
        return str(self.inner.host)

    def _timed(self, fn: Any, *a: Any, **kw: Any) -> Any:
        t0 = time.monotonic()
        try:
            return fn(*a, **kw)
        finally:
            with self.lock:
                self.buckets[self.host] += time.monotonic() - t0

    def run(self, *a: Any, **kw: Any) -> Any:
        return self._timed(self.inner.run, *a, **kw)

    def put_bytes(self, *a: Any, **kw: Any) -> Any:
        return self._timed(self.inner.put_bytes, *a, **kw)

    def put_file(self, *a: Any, **kw: Any) -> Any:
        return self._timed(self.inner.put_file, *a, **kw)

    def read_bytes(self, *a: Any, **kw: Any) -> Any:
        return self._timed(self.inner.read_bytes, *a, **kw)

    def connected(self) -> bool:
        return bool(self.inner.connected())

    def close(self) -> None:
        self.inner.close()


def timed_deploy(inventory: Path) -> dict[str, Any]:
    inv = load_inventory(inventory)
    buckets: dict[str, float] = defaultdict(float)
    connect_time: dict[str, float] = defaultdict(float)
    lock = threading.Lock()

    def connector(name: str, address: str, ssh: Any) -> TimedExecutor:
        t0 = time.monotonic()
        ex = connect_host(name, address, ssh)
        with lock:
            connect_time[name] += time.monotonic() - t0
        return TimedExecutor(ex, buckets, lock)

    import llamactl.ops.deploy as deploy_module

    url_host = {i.url: i.host for i in inv.instances()}
    real_wait = deploy_module.wait_instances_ready

    def timed_wait(urls: list[str], **kw: Any) -> dict[str, str]:
        t0 = time.monotonic()
        try:
            return real_wait(urls, **kw)
        finally:
            with lock:
                buckets[url_host[urls[0]]] += time.monotonic() - t0

    deploy_module.wait_instances_ready = timed_wait  # type: ignore[assignment]
    try:
        t0 = time.monotonic()
        result = deploy(inv, connector=connector)
        wall = time.monotonic() - t0
    finally:
        deploy_module.wait_instances_ready = real_wait
    server_hosts = [h.name for h in inv.hosts]
    slowest = max(buckets[h] + connect_time[h] for h in server_hosts)
    balancer = sum(buckets[b.name] + connect_time[b.name] for b in inv.balancer.hosts)
    return {
        "ok": result.ok,
        "changed": result.changed,
        "wall_s": round(wall, 3),
        "slowest_host_remote_s": round(slowest, 3),
        "balancer_remote_s": round(balancer, 3),
        "controller_overhead_s": round(wall - slowest - balancer, 3),
        "per_host_remote_s": {h: round(buckets[h] + connect_time[h], 3) for h in server_hosts},
        "deploy_json": result.to_json(),
    }


def llamactl(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "llamactl", *args], check=True, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,3,8")
    ap.add_argument("--out", default=str(ROOT / "bench/results/deploy.json"))
    ap.add_argument("--dir", default="/tmp/llamactl-bench-lab")
    args = ap.parse_args()
    results = []
    for n in [int(x) for x in args.sizes.split(",")]:
        d = Path(args.dir)
        llamactl("lab", "down", "--dir", str(d), "--name", "bench")
        llamactl("lab", "up", str(n), "--dir", str(d), "--name", "bench", "--subnet", "10.215.0.0/24")
        try:
            first = timed_deploy(d / "inventory.yaml")
            noop = [timed_deploy(d / "inventory.yaml") for _ in range(3)]
        finally:
            llamactl("lab", "down", "--dir", str(d), "--name", "bench")
        noop_walls = sorted(r["wall_s"] for r in noop)
        entry = {"hosts": n, "first_run": first, "noop_runs": noop, "noop_median_wall_s": noop_walls[1]}
        results.append(entry)
        print(json.dumps({"hosts": n, "first_wall_s": first["wall_s"],
                          "first_overhead_s": first["controller_overhead_s"],
                          "noop_median_wall_s": noop_walls[1]}), flush=True)
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
                   "lab hosts share the controller's cores",
        "method": __doc__,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
