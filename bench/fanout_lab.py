"""Bytes the controller sends during a first deploy to a real lab, with and without the fan-out.

For each mode (``--no-fanout``: the controller uploads to every host, as before issue 14; ``--fanout``): a
fresh lab of N hosts (default 8) whose model directory also holds a 1 GB file, one first
``llamactl deploy --json`` as a subprocess, and around it the lab bridge's ``tx_bytes``: what this machine
sent into the lab network (frames the bridge forwards between hosts are not counted there). Then the
sha256 of every shipped file on every host is compared with the controller's, and the lab goes down.

Run as root, holding the lab lock:
    flock /tmp/llamactl-lab.lock .venv/bin/python bench/fanout_lab.py [--hosts 8] [--big-mb 1024]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llamactl.inventory import load_inventory
from llamactl.lab.state import load_state
from llamactl.ops.connect import HostPool
from llamactl.ops.deploy import prepare
from llamactl.plan.command import Command

LLAMACTL = [sys.executable, "-m", "llamactl"]
NAME, SUBNET = "fanb", "10.231.0.0/24"
RESULTS = ROOT / "bench" / "results"
DIGESTS = ("import hashlib, json, sys\n"
           "def h(p):\n"
           "    try:\n"
           "        d = hashlib.sha256()\n"
           "        with open(p, 'rb') as f:\n"
           "            for c in iter(lambda: f.read(1 << 20), b''):\n"
           "                d.update(c)\n"
           "        return d.hexdigest()\n"
           "    except OSError:\n"
           "        return None\n"
           "print(json.dumps({p: h(p) for p in json.loads(sys.stdin.read())}))")


def run(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LLAMACTL, *args], capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "NO_COLOR": "1"})


def shipped(inventory: Path) -> tuple[dict[str, str], int]:
    inv = load_inventory(inventory)
    spec, ship = inv.hosts[0], prepare(inv)
    rel, model = ship.release_for(spec), ship.model_for(spec)
    assert model is not None
    want = {f"{spec.install_dir}/wheels/{rel.wheel.name}": rel.wheel.sha256}
    want.update({f"{spec.install_dir}/wheelhouse/{a.name}": a.sha256 for a in rel.wheelhouse})
    want.update({f"{spec.model.source}/{a.name}": a.sha256 for a in model.files})
    size = rel.wheel.size + sum(a.size for a in rel.wheelhouse) + sum(a.size for a in model.files)
    return want, size


def verify(inventory: Path, want: dict[str, str]) -> dict[str, int]:
    """Per host: how many shipped files have the wrong sha256 (or are missing)."""
    inv = load_inventory(inventory)
    bad = {}
    with HostPool(inv) as pool:
        for spec in inv.hosts:
            out = pool.executor(spec.name).run(Command.of("python3", "-c", DIGESTS),
                                               stdin=json.dumps(sorted(want)).encode()).stdout
            got = json.loads(out)
            bad[spec.name] = sum(1 for p, d in want.items() if got.get(p) != d)
    return bad


def one(mode: str, hosts: int, big_mb: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fanout-lab-") as tmp:
        d = Path(tmp)
        run("lab", "down", "--dir", str(d), "--name", NAME)
        t0 = time.monotonic()
        up = run("lab", "up", str(hosts), "--dir", str(d), "--name", NAME, "--subnet", SUBNET)
        if up.returncode != 0:
            raise SystemExit(f"lab up failed:\n{up.stdout}\n{up.stderr}")
        up_s = time.monotonic() - t0
        try:
            with (d / "model" / "big.bin").open("wb") as f:
                block = os.urandom(1 << 20)
                for _ in range(big_mb):
                    f.write(block)
            inventory = d / "inventory.yaml"
            want, size = shipped(inventory)
            state = load_state(d)
            assert state is not None
            counter = Path(f"/sys/class/net/{state.bridge}/statistics/tx_bytes")
            before = int(counter.read_text())
            t0 = time.monotonic()
            proc = run("deploy", str(inventory), "--json", mode)
            wall = time.monotonic() - t0
            sent = int(counter.read_text()) - before
            result = json.loads(proc.stdout) if proc.stdout.strip() else {}
            bad = verify(inventory, want)
            return {
                "mode": mode, "exit_code": proc.returncode, "ok": result.get("ok"),
                "lab_up_s": round(up_s, 1), "deploy_wall_s": round(wall, 1),
                "artifact_files": len(want), "artifact_bytes": size,
                "controller_tx_bytes": sent, "controller_tx_over_artifacts": round(sent / size, 3),
                "transfer": result.get("transfer"),
                "files_with_wrong_sha256_per_host": bad,
                "host_durations_s": {h: v["duration_s"] for h, v in result.get("hosts", {}).items()},
                "stderr_tail": proc.stderr[-2000:] if proc.returncode else "",
            }
        finally:
            run("lab", "down", "--dir", str(d), "--name", NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--big-mb", type=int, default=1024)
    parser.add_argument("--modes", default="--no-fanout,--fanout")
    parser.add_argument("--machine", default="the project's 2-core Debian dev box, shared with other work")
    parser.add_argument("--out", type=Path, default=RESULTS / "fanout_lab.json")
    args = parser.parse_args()
    runs = []
    for mode in args.modes.split(","):
        r = one(mode, args.hosts, args.big_mb)
        print(json.dumps({k: v for k, v in r.items() if k != "transfer"}, indent=2), flush=True)
        runs.append(r)
    doc = {"benchmark": "fanout_lab", "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
           "machine": args.machine, "cpus_usable": len(os.sched_getaffinity(0)),
           "python": f"{platform.python_implementation()} {platform.python_version()}",
           "hosts": args.hosts, "big_file_mb": args.big_mb, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
