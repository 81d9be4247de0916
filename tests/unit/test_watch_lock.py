"""WatchLoop and the deploy lock, with fake executors and scripted probes: while a deploy or restart
holds the lock, watch neither restarts nor touches the balancer; once it is free, it heals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llamactl.inventory import Inventory, load_inventory
from llamactl.ops import lock
from llamactl.ops import watch as watch_mod
from llamactl.ops.watch import WatchLoop
from llamactl.plan.command import Command
from llamactl.plan.watch import Observation, Policy, State
from llamactl.remote.base import Executor
from llamactl.remote.local import LocalExecutor
from llamactl.remote.recording import RecordingExecutor, Reply

# Two CPU hosts and a balancer: every address unreachable, nothing here may connect for real.
INVENTORY = (Path(__file__).resolve().parents[1] / "fixtures/inventories/two-cpu-hosts.yaml").read_text()
HOLDER = {"owner": "alice@laptop", "since": "2026-01-01T10:00", "command": "llamactl deploy inv.yaml"}
RESTART = "systemctl restart llamactl@0.service"
LIST_FAULTS = "if [ -d /var/lib/llamactl/gpu-faults ]; then ls -1 /var/lib/llamactl/gpu-faults; fi"


class FakeNginx:
    """Just enough of a systemd nginx for apply_balancer_config: workers change on each reload."""

    def __init__(self) -> None:
        self.worker = 101

    def __call__(self, command: Command) -> Reply | None:
        text = command.shell()
        if text.startswith("systemctl show"):
            return Reply(0, "100\n")
        if text.startswith("ps -o pid= --ppid 100"):
            return Reply(0, f"{self.worker}\n")
        if text == "systemctl reload nginx.service":
            self.worker += 1
        return None


@pytest.fixture
def inv(tmp_path: Path) -> Inventory:
    (tmp_path / "inventory.yaml").write_text(INVENTORY)
    return load_inventory(tmp_path / "inventory.yaml", env={})


def make_loop(inv: Inventory, hosts: dict[str, Executor], monkeypatch: pytest.MonkeyPatch,
              outcome: dict[str, Observation]) -> tuple[WatchLoop, list[dict[str, Any]]]:
    monkeypatch.setattr(watch_mod, "probe_all", lambda instances, timeout_s: dict(outcome))
    events: list[dict[str, Any]] = []
    policy = Policy(fall=2, rise=1, startup_grace_s=0, backoff_base_s=0, budget=5, window_s=60, settle_s=0)
    times = iter(range(0, 10_000, 5))
    loop = WatchLoop(inv, policy, events.append, connect=lambda name, address, ssh: hosts[name],
                     clock=lambda: float(next(times)), wall=lambda: 0.0)
    return loop, events


def test_watch_does_not_heal_while_the_lock_is_held_then_heals(inv: Inventory,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    lb = RecordingExecutor("lb", responder=FakeNginx(), files={lock.LOCK_PATH: json.dumps(HOLDER).encode()})
    h1, h2 = RecordingExecutor("h1"), RecordingExecutor("h2")
    outcome = {"h1/0": Observation("failed", "connection refused"), "h2/0": Observation("ready")}
    loop, events = make_loop(inv, {"lb": lb, "h1": h1, "h2": h2}, monkeypatch, outcome)
    for _ in range(4):
        loop.tick()
    assert h1.commands == [] and h2.commands == []
    # read the lock (and, once at start, the GPU fault records) only: no nginx change, no lock taken
    assert lb.commands == [LIST_FAULTS] and lb.uploads == []
    assert loop.watcher.state("h1/0") is State.FAILING
    skipped = [e for e in events if e["event"] == "heal_skipped"]
    assert len(skipped) == 3  # every tick from the `fall`th failure on
    assert skipped[0]["instance"] == "h1/0" and skipped[0]["detail"] == (
        "deploy in progress (held by alice@laptop since 2026-01-01T10:00 (llamactl deploy inv.yaml)), "
        "not healing")

    del lb.files[lock.LOCK_PATH]  # the deploy is done
    loop.tick()
    assert h1.commands == ["systemctl reset-failed llamactl@0.service", RESTART] and h2.commands == []
    assert [u.path for u in lb.uploads][-1] == inv.balancer.config_path  # h1/0 drained first
    names = [e["event"] for e in events]
    assert names.index("drained") < names.index("balancer_applied") < names.index("restarted")


def test_a_lock_taken_between_the_decision_and_the_restart_skips_it(inv: Inventory,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    lb = RecordingExecutor("lb", responder=FakeNginx())
    h1 = RecordingExecutor("h1")
    reads = {"n": 0}
    real_read = lb.read_bytes

    def read_bytes(path: str) -> bytes | None:
        if path == lock.LOCK_PATH:
            reads["n"] += 1
            # free at the checks before each tick's decisions (reads 1 and 2), taken before the restart (3)
            return json.dumps(HOLDER).encode() if reads["n"] == 3 else None
        return real_read(path)

    lb.read_bytes = read_bytes  # type: ignore[method-assign]
    outcome = {"h1/0": Observation("failed", "connection refused"), "h2/0": Observation("ready")}
    loop, events = make_loop(inv, {"lb": lb, "h1": h1, "h2": RecordingExecutor("h2")}, monkeypatch, outcome)
    loop.tick()
    loop.tick()  # second failure: drain (applied) and restart, but the re-check finds the lock
    assert h1.commands == [] and reads["n"] == 3
    assert loop.watcher.state("h1/0") is State.RECOVERING
    assert [e["event"] for e in events][-1] == "heal_skipped"
    loop.tick()  # free again: restarted at once
    assert h1.commands[-1] == RESTART


def test_all_healthy_ticks_do_not_read_the_lock(inv: Inventory, monkeypatch: pytest.MonkeyPatch) -> None:
    lb = RecordingExecutor("lb")
    outcome = {"h1/0": Observation("ready"), "h2/0": Observation("ready")}
    loop, _ = make_loop(inv, {"lb": lb, "h1": RecordingExecutor("h1"), "h2": RecordingExecutor("h2")},
                        monkeypatch, outcome)
    loop.tick()
    loop.tick()
    assert lb.commands == [LIST_FAULTS]  # the GPU fault records, once at start; never the lock
    assert [c.kind for c in lb.calls] == ["run"]


def test_a_real_lock_file_stops_healing(inv: Inventory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The lock taken for real by lock.acquire (noclobber, through a shell) on a local 'balancer'."""
    monkeypatch.setattr(lock, "LOCK_PATH", str(tmp_path / "lib" / "deploy.lock"))
    lb = LocalExecutor("lb")
    lock.acquire(lb, "llamactl restart inv.yaml --rolling")
    h1 = RecordingExecutor("h1")
    outcome = {"h1/0": Observation("failed", "connection refused"), "h2/0": Observation("ready")}
    loop, events = make_loop(inv, {"lb": lb, "h1": h1, "h2": RecordingExecutor("h2")}, monkeypatch, outcome)
    loop.tick()
    loop.tick()
    assert h1.commands == []
    skipped = [e for e in events if e["event"] == "heal_skipped"]
    assert len(skipped) == 1 and "(llamactl restart inv.yaml --rolling)), not healing" in skipped[0]["detail"]
    assert (tmp_path / "lib" / "deploy.lock").exists()  # watch never removes or takes it
