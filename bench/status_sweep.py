"""Benchmark: one ``llamactl status`` sweep over 100 simulated instances, 10 of which never answer
(``--hosts 100``: 1,000 instances, 100 silent).

The instances are simulated on loopback by one separate process (``llamactl.health.simulate``), 10 hosts
127.0.0.101-110 x 10 instances each (100 hosts: 127.0.1.1-100), plus a balancer on 127.0.0.2. The sweep runs through the same code
as ``llamactl status`` (load inventory -> plan -> ``sweep`` with the client status builds), with a 1 s
probe timeout. Target: under 1.5 s wall. Also timed: the whole CLI as a subprocess (``--json``), and one
serial sweep (one instance after another, as the seed's monitor does) for reference.

    .venv/bin/python bench/status_sweep.py [--runs 5] [--no-serial] [--hosts 100 --target-s 2]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from llamactl.health.probe import make_client, probe_instance
from llamactl.health.simulate import Behaviour, Endpoint, spec_json
from llamactl.health.sweep import SweepOptions, plan_from_inventory, sweep
from llamactl.inventory import load_inventory

HOSTS = [f"127.0.0.{101 + h}" for h in range(10)]
PER_HOST = 10
SILENT = {(h, 9 - h) for h in range(10)}  # one silent instance per host, at a different index on each


def set_layout(hosts: int) -> None:
    """``hosts`` simulated hosts of PER_HOST instances, one silent on each (10 % silent)."""
    global HOSTS, SILENT
    HOSTS = [f"127.0.0.{101 + h}" for h in range(hosts)] if hosts <= 10 else [f"127.0.1.{1 + h}" for h in range(hosts)]
    SILENT = {(h, (PER_HOST - 1 - h) % PER_HOST) for h in range(hosts)}
TIMEOUT_S = float(os.environ.get("SWEEP_TIMEOUT_S", "1.0"))
RESULTS = Path(__file__).parent / "results"


def free_base(span: int) -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + span > 64000:
            continue
        try:
            held = []
            for addr in [*HOSTS, "127.0.0.2"]:
                for port in range(base, base + span):
                    sock = socket.socket()
                    held.append(sock)
                    sock.bind((addr, port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise SystemExit("no free port range on loopback")


def write_inventory(path: Path, base: int) -> None:
    hosts = "\n".join(f"      sim-{i + 1:02d}: {{address: {a}}}" for i, a in enumerate(HOSTS))
    path.write_text(
        f"version: 1\ncluster: bench\ndefaults:\n  gpus: {PER_HOST}\n  base_port: {base}\n"
        f"  model: {{source: /srv/models/Llama-3.2V-11B-cot}}\n  ssh: {{host_key_policy: accept-new}}\n"
        f"groups:\n  sim:\n    hosts:\n{hosts}\n"
        f"balancer:\n  hosts:\n    lb: {{address: 127.0.0.2}}\n  listen: {base + PER_HOST}\n"
        f"health: {{timeout_s: {TIMEOUT_S}, interval_s: 5}}\n"
    )


def endpoints(inventory: Path) -> list[Endpoint]:
    plan = plan_from_inventory(load_inventory(inventory))
    eps = []
    for t in plan.targets:
        silent = (HOSTS.index(t.address), t.index) in SILENT
        b = Behaviour(
            status="silent" if silent else "ready", config_hash=t.expected_config_hash or "", requests=50
        )
        eps.append(Endpoint(t.address, t.port, b))
    lb = plan.balancers[0][1].rsplit(":", 1)
    eps.append(Endpoint("127.0.0.2", int(lb[1]), Behaviour(status="balancer")))
    return eps


def httpcore_client(targets: int, timeout_s: float) -> httpx.AsyncClient:
    """For comparison only: httpx with its default transport (httpcore pool), limits sized the same way."""
    n = max(32, targets * 3 + 8)
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s), trust_env=False,
        limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
    )  # fmt: skip


async def one_sweep(inventory: Path, transport: str = "asyncio") -> tuple[float, dict[str, Any]]:
    """Exactly what ``llamactl status INVENTORY`` does between parsing options and printing."""
    start = time.monotonic()
    plan = plan_from_inventory(load_inventory(inventory))
    options = SweepOptions(timeout_s=TIMEOUT_S)
    factory = make_client if transport == "asyncio" else httpcore_client
    async with factory(len(plan.targets) + len(plan.balancers), options.timeout_s) as client:
        report, _ = await sweep(plan, options, client)
    wall = time.monotonic() - start
    ready = sum(1 for i in report.instances if i.state == "ready")
    down = [i.id for i in report.instances if i.state == "down"]
    return wall, {"ready": ready, "down": len(down), "sweep_elapsed_s": report.elapsed_s}


async def serial_sweep(inventory: Path) -> float:
    """Reference: the same probes, one instance after another."""
    plan = plan_from_inventory(load_inventory(inventory))
    start = time.monotonic()
    async with make_client(1, TIMEOUT_S) as client:
        for t in plan.targets:
            await probe_instance(client, t.url, TIMEOUT_S)
    return time.monotonic() - start


def cli_run(inventory: Path) -> tuple[float, int]:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "llamactl", "status", str(inventory), "--json"],
        capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"}, check=False,
    )  # fmt: skip
    return time.monotonic() - start, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-serial", action="store_true", help="skip the serial reference sweep (~12 s)")
    parser.add_argument(
        "--transport",
        choices=("asyncio", "httpcore"),
        default="asyncio",
        help="asyncio: what status uses; httpcore: httpx's default transport, for comparison",
    )
    parser.add_argument("--no-cli", action="store_true", help="skip timing the CLI as a subprocess")
    parser.add_argument("--label", default="shared-2-core", help="key of this result in the results file")
    parser.add_argument("--machine", default=None, help="machine description to record")
    parser.add_argument("--out", type=Path, default=RESULTS / "status_sweep.json")
    parser.add_argument("--hosts", type=int, default=10, choices=range(1, 251), metavar="N",
                        help="simulated hosts of 10 instances each, one silent per host (default 10)")
    parser.add_argument("--target-s", type=float, default=1.5, help="the sweep's wall-time target")
    args = parser.parse_args()
    set_layout(args.hosts)
    with tempfile.TemporaryDirectory() as tmp:
        inventory = Path(tmp) / "inventory.yaml"
        write_inventory(inventory, free_base(PER_HOST + 1))
        spec = Path(tmp) / "spec.json"
        spec.write_text(spec_json(endpoints(inventory)))
        sim = subprocess.Popen(
            [sys.executable, "-m", "llamactl.health.simulate", str(spec)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert sim.stdout is not None and sim.stdout.readline().startswith(f"listening {len(HOSTS) * PER_HOST + 1}")
            sweeps = [asyncio.run(one_sweep(inventory, args.transport)) for _ in range(args.runs)]
            clis = [] if args.no_cli else [cli_run(inventory) for _ in range(args.runs)]
            serial = None if args.no_serial else asyncio.run(serial_sweep(inventory))
        finally:
            sim.terminate()
            sim.wait(timeout=10)
    walls = [w for w, _ in sweeps]
    load = os.getloadavg()
    result = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "machine": args.machine or f"{os.cpu_count()}-core CPU box",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "cpus_usable": len(os.sched_getaffinity(0)), "load_average_1m_after": round(load[0], 2),
        "instances": len(HOSTS) * PER_HOST, "silent_instances": len(SILENT), "balancers": 1,
        "probe_timeout_s": TIMEOUT_S, "runs": args.runs, "transport": args.transport,
        "sweep_wall_s": {"median": round(statistics.median(walls), 3), "min": round(min(walls), 3),
                         "max": round(max(walls), 3), "all": [round(w, 3) for w in walls]},
        "cli_wall_s": {"median": round(statistics.median(w for w, _ in clis), 3), "all": [round(w, 3) for w, _ in clis],
                       "exit_codes": sorted({rc for _, rc in clis})} if clis else None,
        "serial_reference_s": round(serial, 3) if serial is not None else None,
        "counts": sweeps[-1][1],
        "target_s": args.target_s, "met": statistics.median(walls) <= args.target_s,
    }  # fmt: skip
    doc: dict[str, Any] = (
        json.loads(args.out.read_text())
        if args.out.exists()
        else {"benchmark": "status_sweep", "results": {}}
    )
    doc["results"][args.label] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
