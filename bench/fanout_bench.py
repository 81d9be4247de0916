"""Deploy fan-out at fleet scale: the real planner and executor against N simulated hosts (default 300).

What is real: the inventory (generated, N hosts), ``prepare`` (wheel, hashed wheelhouse and model), every
host's fact parsing and ``plan_host``, ``plan_fanout``, the ``Distributor`` (threads, per-round barriers,
fallbacks, byte accounting) and ``apply_plan`` of the rest of each host's plan, all through
``ops.fanout_deploy.deploy_hosts_fanout`` with a ``HostPool``. What is simulated: the hosts. ``SimHost``
is a ``RecordingExecutor`` whose replies cost time: every command ``--latency-ms``; a file the controller
sends ``size / --uplink-mbps`` on one link shared by all uploads (the operator's uplink); a peer fetch
``size / --peer-mbps`` per transfer (the hosts' own network). The simulated facts say "fresh host,
instances already running" so no instance start waits on HTTP (their restarts go through the balancer in
a real deploy, which is not part of this bench).

Recorded: wall time, controller CPU (user+sys of this process), peak RSS, the most SSH connections
(simulated executors) open at once, the most threads, bytes the controller sent and bytes peers sent.
The same run without the fan-out would send N x the artifacts from the controller; its wall time is
bounded below by that volume over the uplink, which is what the report gives for comparison.

    .venv/bin/python bench/fanout_bench.py [--hosts 300] [--model-mb 1024] [--parallel 16] [--no-fanout] [--label L]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llamactl.inventory import load_inventory
from llamactl.ops.connect import HostPool
from llamactl.ops.deploy import HostJob, HostOutcome, deploy_host, prepare
from llamactl.ops.fanout import HostTransfer, TransferReport
from llamactl.ops.fanout_deploy import deploy_hosts_fanout
from llamactl.plan.command import Command
from llamactl.remote.parallel import run_parallel
from llamactl.remote.recording import RecordingExecutor, Reply

RESULTS = ROOT / "bench" / "results"
WHEELHOUSE = Path("/var/cache/llamactl-lab/wheelhouse")


class Link:
    """A link shared by every transfer on it: each one waits for the bytes queued before it."""

    def __init__(self, mbps: float) -> None:
        self.bytes_s = mbps * 1e6 / 8
        self.free_at = 0.0
        self.lock = threading.Lock()

    def send(self, n: int) -> None:
        with self.lock:
            start = max(time.monotonic(), self.free_at)
            self.free_at = start + n / self.bytes_s
            until = self.free_at
        time.sleep(max(0.0, until - time.monotonic()))


class Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = self.max_open = self.connects = 0
        self.controller_bytes = 0

    def opened(self) -> None:
        with self.lock:
            self.open += 1
            self.connects += 1
            self.max_open = max(self.max_open, self.open)

    def closed(self) -> None:
        with self.lock:
            self.open -= 1


def fresh_facts(units: list[str]) -> str:
    return json.dumps({
        "python": [3, 11, 2], "venv": True, "free_bytes": 500 * 1024**3, "systemd": True, "user_exists": True,
        "files": {}, "wheelhouse": {}, "releases": [], "history": [], "env_files": [], "current": None,
        "model_manifest": None, "model_present": False,
        "units": {u: {"active": "active", "enabled": "enabled"} for u in units},
    })


class SimHost(RecordingExecutor):
    def __init__(self, name: str, args: argparse.Namespace, uplink: Link, counters: Counters) -> None:
        super().__init__(name, responder=self._answer)
        self.latency = args.latency_ms / 1000
        self.peer_bytes_s = args.peer_mbps * 1e6 / 8
        self.uplink, self.counters = uplink, counters
        self._stdin: bytes | None = None
        counters.opened()

    def run(self, command: Command, *, check: bool = True, timeout_s: float | None = None,
            stdin: bytes | None = None) -> Any:
        self._stdin = stdin
        time.sleep(self.latency)
        return super().run(command, check=check, timeout_s=timeout_s, stdin=stdin)

    def _answer(self, command: Command) -> Reply | None:
        argv = command.argv
        if command.description == "gather host facts":
            return Reply(stdout=fresh_facts(json.loads(argv[-1])["units"]))
        if argv[-1] == "serve":
            return Reply(stdout=json.dumps({"port": 41000, "pid": 4242}))
        if argv[-1] == "fetch":
            lines = []
            for item in json.loads(self._stdin or b"{}")["items"]:
                res = {"dest": item["dest"], "digest": item["digest"], "ok": True, "bytes": item["size"],
                       "seconds": 0.0, "errors": [], "source": None}
                if item.get("staged"):
                    res["how"] = "controller"
                elif item["sources"]:
                    time.sleep(item["size"] / self.peer_bytes_s)
                    res.update(how="peer", source=item["sources"][0]["host"])
                else:
                    res.update(ok=False, how=None, bytes=0)
                lines.append(json.dumps(res))
            return Reply(stdout="\n".join(lines) + "\n")
        return None

    def put_bytes(self, data: bytes, path: str, mode: int = 0o644) -> None:
        time.sleep(self.latency)
        self.uplink.send(len(data))
        with self.counters.lock:
            self.counters.controller_bytes += len(data)

    def put_file(self, local_path: str | Path, path: str, mode: int = 0o644) -> None:
        size = Path(local_path).stat().st_size  # never read: the bytes only cost time on the uplink
        time.sleep(self.latency)
        self.uplink.send(size)
        with self.counters.lock:
            self.counters.controller_bytes += size

    def close(self) -> None:
        if not self.closed:
            self.counters.closed()
        super().close()


def write_inputs(d: Path, hosts: int, model_mb: int) -> Path:
    model = d / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "mllama"}\n')
    with (model / "model.safetensors").open("wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(model_mb):
            f.write(block)
    lines = "\n".join(f"      sim-{i:03d}: {{address: 10.77.{i // 250}.{i % 250 + 2}}}" for i in range(hosts))
    inv = d / "inventory.yaml"
    inv.write_text(
        "version: 1\ncluster: fanout-bench\ndefaults:\n  gpus: 0\n  python: /usr/bin/python3\n"
        "  ssh: {user: root, host_key_policy: accept-new, use_ssh_config: false}\n"
        f"  model: {{source: /srv/models/m, upload_from: {model}}}\n"
        f"  pip: {{no_index: true, wheelhouse: {WHEELHOUSE}}}\n"
        "  server: {user: root}\n"
        f"groups:\n  sim:\n    hosts:\n{lines}\n"
        "balancer:\n  hosts:\n    lb: {address: 10.77.9.1}\n"
    )
    return inv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=300)
    parser.add_argument("--model-mb", type=int, default=1024)
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--uplink-mbps", type=float, default=1000.0, help="the controller's uplink")
    parser.add_argument("--peer-mbps", type=float, default=10000.0, help="one host-to-host transfer")
    parser.add_argument("--no-fanout", action="store_true",
                        help="the deploy before issue 14: each host gets every file from the controller")
    parser.add_argument("--label", default="shared-2-core")
    parser.add_argument("--machine", default="the project's 2-core Debian dev box, shared with other work")
    parser.add_argument("--out", type=Path, default=RESULTS / "fanout_300.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        inv_path = write_inputs(Path(tmp), args.hosts, args.model_mb)
        inv = load_inventory(inv_path)
        t_prep = time.monotonic()
        shipment = prepare(inv)
        prep_s = time.monotonic() - t_prep
        spec = inv.hosts[0]
        rel, model = shipment.release_for(spec), shipment.model_for(spec)
        assert model is not None
        artifact_bytes = rel.wheel.size + sum(a.size for a in rel.wheelhouse) + sum(a.size for a in model.files)
        uplink, counters = Link(args.uplink_mbps), Counters()
        messages = [0]

        def progress(host: str, msg: str) -> None:
            messages[0] += 1

        peak_threads = [threading.active_count()]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                peak_threads[0] = max(peak_threads[0], threading.active_count())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        before = resource.getrusage(resource.RUSAGE_SELF)
        rss_before = before.ru_maxrss
        t0 = time.monotonic()
        with HostPool(inv, lambda name, address, ssh: SimHost(name, args, uplink, counters)) as pool:
            job = HostJob(inv, shipment, pool, False, progress, not args.no_fanout)
            names = [h.name for h in inv.hosts]
            if args.no_fanout:
                done = run_parallel(names, lambda n: deploy_host(job, n), max_workers=args.parallel)
                outcomes = [o.value if o.ok else HostOutcome(n, error=str(o.error))  # type: ignore[union-attr]
                            for n, o in zip(names, done)]
                report = TransferReport(hosts={n: HostTransfer() for n in names})
                report.hosts[names[0]].from_controller = counters.controller_bytes
            else:
                outcomes, report = deploy_hosts_fanout(job, names, args.parallel)
        wall = time.monotonic() - t0
        after = resource.getrusage(resource.RUSAGE_SELF)
        stop.set()
    failed = [o.host for o in outcomes if not o.ok]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    baseline_bytes = args.hosts * artifact_bytes
    result = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "machine": args.machine, "cpus_usable": len(os.sched_getaffinity(0)),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "fanout": not args.no_fanout, "hosts": args.hosts, "parallel": args.parallel, "latency_ms": args.latency_ms,
        "uplink_mbps": args.uplink_mbps, "peer_mbps": args.peer_mbps,
        "artifact_files": 1 + len(rel.wheelhouse) + len(model.files), "artifact_bytes": artifact_bytes,
        "prepare_s": round(prep_s, 3),
        "wall_s": round(wall, 3), "fanout_s": round(report.duration_s, 3), "rounds": report.rounds,
        "controller_cpu_s": round(cpu, 3), "controller_cpu_share_of_wall": round(cpu / wall, 3),
        "peak_rss_mib": round(after.ru_maxrss / 1024, 1), "rss_before_mib": round(rss_before / 1024, 1),
        "max_open_connections": counters.max_open, "connections_opened": counters.connects,
        "max_threads": peak_threads[0], "progress_messages": messages[0],
        "controller_bytes": report.controller_bytes, "controller_bytes_uploaded": counters.controller_bytes,
        "peer_bytes": report.peer_bytes,
        "controller_bytes_over_artifacts": round(report.controller_bytes / artifact_bytes, 3),
        "hosts_failed": failed,
        "without_fanout": {"controller_bytes": baseline_bytes,
                           "uplink_time_lower_bound_s": round(baseline_bytes / (args.uplink_mbps * 1e6 / 8), 1)},
    }  # fmt: skip
    doc: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {"benchmark": "fanout",
                                                                                      "results": {}}
    doc["results"][args.label] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
