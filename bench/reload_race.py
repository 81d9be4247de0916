"""Requests lost to nginx reloads, with and without client keep-alive, through the rendered balancer config.

    python bench/reload_race.py --reloads 300 --clients 8 --keepalive 0 75 --out bench/results/reload_race.json

Two stand-in backends (tests/ops Backend) behind a temp-prefix nginx configured by ``render_balancer_files``
from an inventory whose ``balancer.client_keepalive_s`` is each value given; clients POST /infer back to back,
each on one keep-alive ``httpx.Client``, while nginx is reloaded every 0.1 s (as drains, deploys and rolling
restarts do). Every non-200 and transport error is counted as a failed request.
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
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "ops"))


def one_run(keepalive_s: int, reloads: int, clients: int) -> dict[str, object]:
    import yaml
    from ops_support import Backend, TempNginx, free_port, reload_storm, write_inventory

    from llamactl.inventory import load_inventory
    from llamactl.plan.render import render_balancer_files

    root = Path(tempfile.mkdtemp(prefix="reload-race-"))
    backends = [Backend("a", "127.0.0.1"), Backend("b", "127.0.0.2")]
    ngx = TempNginx(root / "nginx")
    try:
        listen, conf = free_port(), ngx.conf_d / "llamactl.conf"
        path = write_inventory(root / "inventory.yaml", backends, listen=listen, config_path=conf)
        doc = yaml.safe_load(path.read_text())
        doc["balancer"]["client_keepalive_s"] = keepalive_s
        path.write_text(yaml.safe_dump(doc))
        conf.write_bytes(render_balancer_files(load_inventory(path, env={}))[str(conf)].content)
        ngx.start()
        start = time.monotonic()
        ok, failed = reload_storm(ngx, f"http://127.0.0.1:{listen}", reloads=reloads, clients=clients)
        return {"client_keepalive_s": keepalive_s, "reloads": reloads, "clients": clients, "ok": ok,
                "failed": len(failed), "failure_kinds": dict(Counter(failed)), "wall_s": round(time.monotonic() - start, 1)}
    finally:
        ngx.stop()
        for b in backends:
            b.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reloads", type=int, default=300)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--keepalive", type=int, nargs="+", default=[0, 75], help="client_keepalive_s values")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False).stderr.strip()
    runs = [one_run(k, args.reloads, args.clients) for k in args.keepalive]
    for r in runs:
        print(json.dumps(r))
    if args.out:
        meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
                "cpus": len(os.sched_getaffinity(0)), "nginx": nginx}
        args.out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
