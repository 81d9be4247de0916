"""Losing the active balancer host under load through the VIP (``balancer.vip``, keepalived), on a lab.

    sudo llamactl lab up 1 --balancers 2 --dir /tmp/vip && llamactl deploy /tmp/vip/inventory.yaml
    python bench/vip_failover.py /tmp/vip --out bench/results/vip_failover

Clients send GET /health through the VIP continuously (a new connection each, nginx proxies it to an
instance) while, in turn: the active balancer host's link goes down (the root-side end of its veth, so
the host sees carrier loss), then comes back; nginx on the active host stops, then starts again. For each
it records when the VIP moved (from the fault until another host holds it), the failed requests and the
span they cover, that requests flow again with no failure after the switch, and that the first host's
return leaves the VIP where it is (no flap). ``--out P`` writes ``P.json`` and ``P.md``.
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llamactl.lab.state import LabHost, LabState, load_state


@dataclass
class Sample:
    start: float
    end: float
    ok: bool
    detail: str


class Load:
    """``clients`` threads sending GET {endpoint}/health, one connection per request, until stopped."""

    def __init__(self, endpoint: str, clients: int = 4, timeout_s: float = 1.0, pause_s: float = 0.02) -> None:
        self.url = endpoint.rstrip("/") + "/health"
        self.clients, self.timeout_s, self.pause_s = clients, timeout_s, pause_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                resp = httpx.get(self.url, timeout=self.timeout_s, trust_env=False)
                ok, detail = resp.status_code == 200, str(resp.status_code)
            except httpx.HTTPError as exc:
                ok, detail = False, type(exc).__name__
            with self._lock:
                self.samples.append(Sample(t0, time.monotonic(), ok, detail))
            time.sleep(self.pause_s)

    def __enter__(self) -> Load:  # noqa: PYI034 - not subclassed
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)

    def between(self, t0: float, t1: float) -> list[Sample]:
        with self._lock:
            return [s for s in self.samples if t0 <= s.start < t1]


def holders(state: LabState) -> list[str]:
    """Balancer hosts holding the VIP now, read in their network namespaces (the lab's own)."""
    out = []
    for h in state.balancers:
        res = subprocess.run(["ip", "netns", "exec", h.netns, "ip", "-o", "-4", "addr", "show"],
                             capture_output=True, text=True, check=False)
        if f" {state.vip}/" in res.stdout:
            out.append(h.name)
    return out


def wait_for(cond: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step_s)
    return cond()


def on_host(h: LabHost, *argv: str) -> None:
    """Run a command on a lab host through its own PID 1's namespaces (systemctl talks to its systemd)."""
    from llamactl.lab.host import nsenter_argv

    assert h.pid is not None
    cmd = nsenter_argv(h.pid, *argv)
    assert cmd is not None, f"{h.name}: not running"
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@dataclass
class Scenario:
    fault: str
    active_before: str
    active_after: str | None = None
    switch_s: float | None = None  # fault -> another host holds the VIP
    failed_requests: int = 0
    failed_span_s: float = 0.0  # first failed request's start -> last failed request's end
    ok_requests_during: int = 0
    first_ok_after_fault_s: float | None = None  # fault -> first success after the last failure
    failures_after_switch_settled: int = 0  # from 1 s after the last failure for `settle_s`
    return_holders: list[list[str]] = field(default_factory=list)  # polled while the first host is back
    failures_after_return: int = 0
    flapped: bool = False


def run_scenario(state: LabState, load: Load, fault: str, *, settle_s: float = 5.0, back_s: float = 6.0) -> Scenario:
    by_name = {h.name: h for h in state.balancers}
    assert wait_for(lambda: len(holders(state)) == 1, 20), f"no single VIP holder: {holders(state)}"
    assert wait_for(lambda: bool(load.samples) and all(s.ok for s in load.between(time.monotonic() - 1.0,
                                                                                   time.monotonic())), 20), \
        "load through the VIP is not flowing before the fault"
    active = by_name[holders(state)[0]]
    sc = Scenario(fault, active.name)
    t0 = time.monotonic()
    if fault == "link down":
        subprocess.run(["ip", "link", "set", active.veth, "down"], check=True)
    else:
        on_host(active, "systemctl", "stop", "nginx.service")
    moved = wait_for(lambda: (hs := holders(state)) != [] and active.name not in hs, 30, 0.02)
    t_moved = time.monotonic()
    if moved:
        sc.switch_s, sc.active_after = t_moved - t0, holders(state)[0]
    time.sleep(settle_s)
    t_settled = time.monotonic()
    window = load.between(t0 - 0.5, t_settled)
    failed = [s for s in window if not s.ok]
    sc.failed_requests = len(failed)
    sc.ok_requests_during = sum(1 for s in window if s.ok)
    last_fail = max((s.end for s in failed), default=t0)
    if failed:
        sc.failed_span_s = last_fail - min(s.start for s in failed)
    first_ok = min((s.end for s in window if s.ok and s.start >= last_fail), default=None)
    sc.first_ok_after_fault_s = None if first_ok is None else first_ok - t0
    sc.failures_after_switch_settled = sum(1 for s in load.between(last_fail + 1.0, t_settled) if not s.ok)
    # The first host comes back: the VIP must stay where it is.
    t_back = time.monotonic()
    if fault == "link down":
        subprocess.run(["ip", "link", "set", active.veth, "up"], check=True)
    else:
        on_host(active, "systemctl", "start", "nginx.service")
    while time.monotonic() - t_back < back_s:
        sc.return_holders.append(holders(state))
        time.sleep(0.1)
    sc.flapped = any(hs != [sc.active_after] for hs in sc.return_holders)
    sc.failures_after_return = sum(1 for s in load.between(t_back, time.monotonic()) if not s.ok)
    return sc


def machine() -> dict[str, object]:
    keepalived = subprocess.run(["keepalived", "--version"], capture_output=True, text=True, check=False)
    return {"host": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release(),
            "os": _os_release(), "keepalived": (keepalived.stderr or keepalived.stdout).splitlines()[0],
            "note": "2-core Debian dev box shared with other engineers' work; lab hosts are network "
                    "namespaces with systemd on this machine"}


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def run(lab_dir: Path, clients: int = 4) -> dict[str, object]:
    state = load_state(lab_dir)
    assert state is not None and state.vip is not None, f"{lab_dir}: no lab with a VIP (lab up N --balancers 2)"
    endpoint = f"http://{state.vip}:80"
    from llamactl.inventory import load_inventory

    vip = load_inventory(lab_dir / "inventory.yaml").balancer.vip
    assert vip is not None
    with Load(endpoint, clients=clients) as load:
        scenarios = [run_scenario(state, load, "link down"), run_scenario(state, load, "nginx stopped")]
        total = len(load.samples)
        total_failed = sum(1 for s in load.samples if not s.ok)
    return {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "setup": {"endpoint": endpoint, "balancers": [h.name for h in state.balancers], "clients": clients,
                  "request": "GET /health through nginx to the instance, a new connection each, 1 s timeout",
                  "advert_interval_s": vip.advert_interval_s, "nopreempt": vip.nopreempt,
                  "vrrp_version": 2 if vip.auth else 3, "check": "GET /healthz on loopback, interval 1 s, fall 1, rise 2"},
        "scenarios": [asdict(s) | {"return_holders": sorted({",".join(h) for h in s.return_holders})}
                      for s in scenarios],
        "requests_total": total,
        "requests_failed_total": total_failed,
    }


def to_markdown(result: dict[str, object]) -> str:
    m: dict[str, object] = result["machine"]  # type: ignore[assignment]
    setup: dict[str, object] = result["setup"]  # type: ignore[assignment]
    lines = [
        "# Losing the active balancer host under load through the VIP (bench/vip_failover.py)",
        "",
        f"Machine: {m['host']}, {m['cpus']} CPUs, {m['os']}, kernel {m['kernel']}, {m['keepalived']} "
        f"({m['note']}). Run {result['when']}.",
        "",
        f"Setup: balancer hosts {', '.join(setup['balancers'])} (lab, `--balancers 2`), VIP {setup['endpoint']}, "  # type: ignore[arg-type]
        f"VRRPv{setup['vrrp_version']} adverts every {setup['advert_interval_s']} s, nopreempt "
        f"{setup['nopreempt']}, check: {setup['check']}. Load: {setup['clients']} clients, {setup['request']}.",
        "",
        "Run by `LLAMACTL_VIP_BENCH_OUT=bench/results/vip_failover flock /tmp/llamactl-lab.lock python -m pytest "
        "tests/e2e/test_vip_lab.py` (lab up 1 --balancers 2, deploy, then this script's `run`), or by hand on a "
        "deployed lab: `python bench/vip_failover.py LAB_DIR --out bench/results/vip_failover`.",
        "",
        "VIP moved after: from the fault until the other host holds the address. Failed requests: any error or "
        "non-200 answer (connection refused while nginx is down, or the 1 s client timeout of a connection "
        "sent towards the address while it moves). Span: the first failed request's start to the last one's "
        "end. Failures after the switch: from 1 s after the last failure for 5 s. Return: the host's link "
        "(or nginx) comes back; the holder is polled every 0.1 s for 6 s.",
        "",
        "| fault on the active host | VIP moved after | failed requests | span of the failures | first success "
        "after the fault | failures after the switch | VIP on the host's return | failures after return |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in result["scenarios"]:  # type: ignore[attr-defined]
        moved = f"{s['switch_s']:.2f} s ({s['active_before']} -> {s['active_after']})" if s["switch_s"] else "never"
        first_ok = f"{s['first_ok_after_fault_s']:.2f} s" if s["first_ok_after_fault_s"] is not None else "-"
        stays = "flapped" if s["flapped"] else f"stayed on {s['active_after']}"
        lines.append(f"| {s['fault']} | {moved} | {s['failed_requests']} | {s['failed_span_s']:.2f} s | {first_ok} | "
                     f"{s['failures_after_switch_settled']} | {stays} | {s['failures_after_return']} |")
    lines += ["", f"Requests in all: {result['requests_total']}, failed: {result['requests_failed_total']}.", "",
              "Acceptance (issue 15): at most 3 s of failed requests, then 0 failures; the first host's return "
              "does not move the VIP.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lab_dir", type=Path, help="a deployed lab brought up with --balancers 2")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    result = run(args.lab_dir, args.clients)
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
