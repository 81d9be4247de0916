"""GPU faults on the controller side: the report's gpu_fault state and flags, watch drains a faulted instance
once and never restarts it, the fault records on the balancer host, and `llamactl undrain` (lock + audit)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from llamactl.cli.main import app
from llamactl.errors import UsageError
from llamactl.health.probe import HttpOutcome, InstanceProbe
from llamactl.health.report import Target, gpu_flags, instance_report
from llamactl.inventory import Inventory, load_inventory
from llamactl.ops import connect as connect_mod
from llamactl.ops import gpufault, lock
from llamactl.ops import watch as watch_mod
from llamactl.ops.watch import WatchLoop, observation
from llamactl.plan import gpufault as plan
from llamactl.plan.command import Command
from llamactl.plan.watch import Action, Observation, Policy, State, Watcher
from llamactl.remote.base import RunResult
from llamactl.remote.recording import FakeFile, RecordingExecutor, Reply

INVENTORY = (Path(__file__).resolve().parents[1] / "fixtures/inventories/two-cpu-hosts.yaml").read_text()
I = "h1/0"
XID = "GPU fault: Xid 79 critical error"
FAULT_DETAILS = {
    "xid": XID,
    "ecc": "GPU fault: 2 uncorrectable ECC error(s) since the driver loaded",
    "row_remap": "GPU fault: row remap pending: the GPU needs a reset",
}
POLICY = Policy(fall=2, rise=1, startup_grace_s=0, backoff_base_s=0, budget=100, window_s=60, settle_s=0)


# --- the state machine -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(FAULT_DETAILS))
def test_every_fault_kind_drains_once_and_never_restarts(kind: str) -> None:
    w = Watcher([I, "h2/0"], POLICY)
    step = w.observe(0.0, I, Observation("gpu_fault", FAULT_DETAILS[kind], uptime_s=50.0))
    assert step.actions == [Action("drain", I), Action("record_fault", I)]
    (event,) = step.events
    assert (event.event, event.level, event.state) == ("gpu_fault", "error", "gpu-fault")
    assert event.fields["detail"] == FAULT_DETAILS[kind]
    assert w.state(I) is State.GPU_FAULT and w.drained == {I} and w.faulted == {I}
    # whatever it says afterwards (still faulted, down after a crash, even ready), nothing more happens
    for t in range(1, 200):
        outcome = ("gpu_fault", "failed", "stalled", "ready", "loading")[t % 5]
        step = w.observe(float(t), I, Observation(outcome, "x"))  # type: ignore[arg-type]
        assert step.actions == [] and step.events == []
    assert w.state(I) is State.GPU_FAULT and w.drained == {I}


def test_a_fault_while_already_drained_for_restarts_is_recorded_without_a_second_drain() -> None:
    w = Watcher([I], POLICY)
    w.observe(0.0, I, Observation("failed", "refused"))
    step = w.observe(1.0, I, Observation("failed", "refused"))
    assert [a.kind for a in step.actions] == ["drain", "restart"]
    w.restart_done(2.0, I, ok=True)
    step = w.observe(3.0, I, Observation("gpu_fault", XID))
    assert step.actions == [Action("record_fault", I)] and w.state(I) is State.GPU_FAULT
    assert w.restart_done(4.0, I, ok=True).events == [] and w.state(I) is State.GPU_FAULT


def test_a_fault_during_a_deploy_is_skipped_then_drained() -> None:
    w = Watcher([I], POLICY)
    step = w.observe(0.0, I, Observation("gpu_fault", XID), deploy_lock="held by bob")
    assert step.actions == [] and [e.event for e in step.events] == ["heal_skipped"]
    assert step.events[0].fields["action"] == "drain" and w.state(I) is State.HEALTHY
    assert w.observe(1.0, I, Observation("gpu_fault", XID)).actions == [Action("drain", I), Action("record_fault", I)]


def test_cleared_puts_it_back_and_a_still_faulted_gpu_is_drained_again() -> None:
    w = Watcher([I], POLICY)
    assert w.cleared(0.0, I).actions == []  # not faulted: nothing to clear
    w.observe(0.0, I, Observation("gpu_fault", XID))
    step = w.cleared(5.0, I)
    assert step.actions == [Action("undrain", I)] and [e.event for e in step.events] == ["gpu_fault_cleared"]
    assert w.state(I) is State.HEALTHY and w.drained == frozenset()
    assert w.observe(6.0, I, Observation("gpu_fault", XID)).actions == [Action("drain", I), Action("record_fault", I)]


def test_a_recorded_fault_is_restored_drained() -> None:
    w = Watcher([I], POLICY)
    step = w.restore_fault(0.0, I)
    assert [e.event for e in step.events] == ["gpu_fault_restored"] and w.drained == {I}
    assert w.restore_fault(1.0, I).events == []
    assert w.observe(2.0, I, Observation("ready")).actions == []


# --- probes to observations and reports -------------------------------------------------------------------

URL = "http://10.9.0.1:8000"


def probe(body: dict[str, Any], ready: int) -> InstanceProbe:
    ready_body = {"ready": True} if ready == 200 else {"ready": False, "status": body["status"]}
    return InstanceProbe(URL, HttpOutcome(URL + "/health", 200, json.dumps(body), None, 0.01),
                         HttpOutcome(URL + "/ready", ready, json.dumps(ready_body), None, 0.01),
                         HttpOutcome(URL + "/metrics", 404, "", None, 0.01), 1.0)


GPU_OK = {"status": "ok", "faults": [], "error": None, "temperature_c": 83.0, "power_w": 690.0,
          "utilization_pct": 99.0, "throttle_reasons": ["gpu_idle", "sw_power_cap", "hw_thermal_slowdown"],
          "ecc": {"volatile_corrected": 4, "volatile_uncorrected": 0}, "row_remap": {"correctable": 2,
          "uncorrectable": 0, "pending": False, "failed": False}}


def test_a_gpu_fault_health_answer_is_a_gpu_fault_observation_and_report() -> None:
    body = {"status": "gpu_fault", "error": XID, "uptime_s": 300.0, "version": "0.1.0",
            "gpu": {**GPU_OK, "status": "fault", "faults": ["Xid 79 critical error"]}}
    p = probe(body, 503)
    assert observation(p) == Observation("gpu_fault", XID, 300.0)
    rep = instance_report(Target(I, "h1", 0, 0, "10.9.0.1", 8000, URL), p, "0.1.0")
    assert rep.state == "gpu_fault" and rep.last_error == f"server: {XID}"
    assert rep.gpu_status == "fault" and rep.gpu_flags[0] == "FAULT"
    assert not rep.healthy(canary_required=False)


def test_gpu_flags() -> None:
    assert gpu_flags(GPU_OK) == ["power-cap", "hw-thermal", "ecc-corr:4", "remapped:2"]
    assert gpu_flags({"status": "unavailable", "reason": "CPU instance"}) == ["no-nvml"]
    assert gpu_flags({"status": "ok", "error": "NVMLError_Unknown: Unknown Error"}) == ["read-error"]


# --- the watch loop and the records on the balancer host ---------------------------------------------------

class Lb(RecordingExecutor):
    """A balancer host: systemd nginx (new workers on each reload), a noclobber lock, a kept audit log and
    a fault record directory listed from the files written to it."""

    def __init__(self, records: tuple[str, ...] = ()) -> None:
        files = {plan.record_path(i): b"{}" for i in records}
        super().__init__("lb", files=files, responder=self._answer)
        self.worker = 101
        self.audit: list[dict[str, Any]] = []

    def _answer(self, command: Command) -> Reply | None:
        text = command.shell()
        if text.startswith("systemctl show"):
            return Reply(0, "100\n")
        if text.startswith("ps -o pid= --ppid 100"):
            return Reply(0, f"{self.worker}\n")
        if text == "systemctl reload nginx.service":
            self.worker += 1
        if command == plan.list_command():
            names = [p.rsplit("/", 1)[1] for p in self.files if p.startswith(plan.FAULT_DIR + "/")]
            return Reply(0, "".join(n + "\n" for n in sorted(names)))
        if command.argv[:2] == ("rm", "-f"):
            self.files.pop(command.argv[2], None)
        if command.description == "take the deploy lock":
            if lock.LOCK_PATH in self.files:
                return Reply(1, "", "File exists")
            self.files[lock.LOCK_PATH] = FakeFile(b'{"owner": "me"}')
        return None

    def run(self, command: Command, *, check: bool = True, timeout_s: float | None = None,
            stdin: bytes | None = None) -> RunResult:
        if command.description == "append to the audit log" and stdin:
            self.audit.append(json.loads(stdin))
        return super().run(command, check=check, timeout_s=timeout_s, stdin=stdin)

    def nginx_conf(self, inv: Inventory) -> str:
        return self.files[inv.balancer.config_path].content.decode()


@pytest.fixture
def inv(tmp_path: Path) -> Inventory:
    (tmp_path / "inventory.yaml").write_text(INVENTORY)
    return load_inventory(tmp_path / "inventory.yaml", env={})


def loop_for(inv: Inventory, hosts: dict[str, RecordingExecutor], monkeypatch: pytest.MonkeyPatch,
             outcome: dict[str, Observation]) -> tuple[WatchLoop, list[dict[str, Any]]]:
    monkeypatch.setattr(watch_mod, "probe_all", lambda instances, timeout_s: dict(outcome))
    events: list[dict[str, Any]] = []
    times = iter(range(0, 100_000, 5))
    loop = WatchLoop(inv, POLICY, events.append, connect=lambda name, address, ssh: hosts[name],
                     clock=lambda: float(next(times)), wall=lambda: 0.0)
    return loop, events


def down(conf: str, address: str) -> bool:
    return any(address in line and " down" in line for line in conf.splitlines())


def test_watch_drains_a_faulted_instance_once_records_it_and_never_restarts_it(
        inv: Inventory, monkeypatch: pytest.MonkeyPatch) -> None:
    lb, h1, h2 = Lb(), RecordingExecutor("h1"), RecordingExecutor("h2")
    outcome = {I: Observation("gpu_fault", XID), "h2/0": Observation("ready")}
    loop, events = loop_for(inv, {"lb": lb, "h1": h1, "h2": h2}, monkeypatch, outcome)
    for _ in range(30):
        loop.tick()
    assert h1.commands == [] and h2.commands == []  # never restarted
    assert [e["event"] for e in events].count("gpu_fault") == 1
    assert [e["event"] for e in events].count("balancer_applied") == 1  # drained once
    assert down(lb.nginx_conf(inv), "10.9.0.1:8000") and not down(lb.nginx_conf(inv), "10.9.0.2:8000")
    record = json.loads(lb.files[plan.record_path(I)].content)
    assert record["instance"] == I and record["detail"] == XID
    assert lb.files[plan.record_path(I)].mode == 0o644 and plan.record_path(I).endswith("/h1@0")


def test_a_new_watch_keeps_a_recorded_instance_drained_even_when_it_answers_ready(
        inv: Inventory, monkeypatch: pytest.MonkeyPatch) -> None:
    lb = Lb(records=(I,))
    outcome = {I: Observation("ready"), "h2/0": Observation("ready")}
    h1 = RecordingExecutor("h1")
    loop, events = loop_for(inv, {"lb": lb, "h1": h1, "h2": RecordingExecutor("h2")}, monkeypatch, outcome)
    for _ in range(5):
        loop.tick()
    assert [e["event"] for e in events] == ["gpu_fault_restored", "balancer_applied"]
    assert down(lb.nginx_conf(inv), "10.9.0.1:8000") and loop.watcher.state(I) is State.GPU_FAULT
    assert h1.commands == []


def test_a_record_that_could_not_be_written_is_written_next_tick_not_cleared(
        inv: Inventory, monkeypatch: pytest.MonkeyPatch) -> None:
    lb = Lb()
    real_put = lb.put_bytes
    fail = {"on": True}

    def put_bytes(data: bytes, path: str, mode: int = 0o644) -> None:
        if fail["on"] and path.startswith(plan.FAULT_DIR):
            raise OSError("disk full")
        real_put(data, path, mode)

    lb.put_bytes = put_bytes  # type: ignore[method-assign]
    outcome = {I: Observation("gpu_fault", XID), "h2/0": Observation("ready")}
    loop, events = loop_for(inv, {"lb": lb, "h1": RecordingExecutor("h1"), "h2": RecordingExecutor("h2")},
                            monkeypatch, outcome)
    loop.tick()
    assert next(e for e in events if e["event"] == "gpu_fault_record_failed")["detail"] == (
        "cannot record the GPU fault on lb: disk full")
    fail["on"] = False
    loop.tick()
    assert plan.record_path(I) in lb.files and loop.watcher.state(I) is State.GPU_FAULT


def test_undrain_clears_the_record_puts_it_back_and_audits(inv: Inventory, monkeypatch: pytest.MonkeyPatch) -> None:
    lb, h1, h2 = Lb(), RecordingExecutor("h1"), RecordingExecutor("h2")
    hosts = {"lb": lb, "h1": h1, "h2": h2}
    outcome = {I: Observation("gpu_fault", XID), "h2/0": Observation("ready")}
    loop, events = loop_for(inv, hosts, monkeypatch, outcome)
    loop.tick()
    assert down(lb.nginx_conf(inv), "10.9.0.1:8000")

    monkeypatch.setattr(connect_mod, "connect_host", lambda name, address, ssh: hosts[name])
    result = CliRunner().invoke(app, ["undrain", str(inv.path), I])
    assert result.exit_code == 0, result.output
    assert f"{I}: undrained (still drained for GPU faults: none)" in result.stdout
    assert plan.record_path(I) not in lb.files and lock.LOCK_PATH not in lb.files
    assert not down(lb.nginx_conf(inv), "10.9.0.1:8000")
    (entry,) = lb.audit
    assert entry["command"] == f"llamactl undrain {inv.path} {I}" and entry["ok"] is True
    assert entry["changed"] == 1 and entry["changes"] == {"h1": [f"undrained {I}"]}
    assert h1.commands == []

    outcome[I] = Observation("ready")  # the GPU was fixed and the instance restarted by the operator
    loop.tick()
    assert [e["event"] for e in events][-2:] == ["gpu_fault_cleared", "balancer_applied"]
    assert loop.watcher.state(I) is State.HEALTHY and not down(lb.nginx_conf(inv), "10.9.0.1:8000")
    loop.tick()
    assert h1.commands == []


def test_undrain_is_refused_while_the_lock_is_held_and_names_unknown_instances(
        inv: Inventory, monkeypatch: pytest.MonkeyPatch) -> None:
    lb = Lb(records=(I,))
    lb.files[lock.LOCK_PATH] = FakeFile(json.dumps({"owner": "alice@laptop", "since": "10:00",
                                                    "command": "llamactl deploy inv.yaml"}).encode())
    monkeypatch.setattr(connect_mod, "connect_host", lambda name, address, ssh: {"lb": lb}[name])
    with pytest.raises(lock.LockHeld):
        gpufault.undrain(inv, I, command_line="llamactl undrain")
    assert plan.record_path(I) in lb.files and lb.audit == []
    with pytest.raises(UsageError) as err:
        gpufault.undrain(inv, "h1/7", command_line="llamactl undrain")
    assert str(err.value) == f"h1/7: no such instance in {inv.path} (instances: h1/0, h2/0)"
    result = CliRunner().invoke(app, ["undrain"])
    assert isinstance(result.exception, UsageError) and result.exception.exit_code == 2
    assert str(result.exception) == "missing argument INSTANCE (host/index, e.g. gpu-01/0)"


def test_the_record_listing_ignores_upload_temporaries() -> None:
    assert plan.parse_list("h1@0\nh1@0.tmp-3f2a1b\ngpu-02@3\n\n") == {"h1/0", "gpu-02/3"}


def test_the_status_table_gpu_column_shows_flags_and_under_deep_the_readings() -> None:
    from llamactl.cli.status import render_table
    from llamactl.health.report import health_report

    body = {"status": "gpu_fault", "error": XID, "uptime_s": 300.0, "version": "0.1.0",
            "gpu": {**GPU_OK, "status": "fault", "faults": ["Xid 79 critical error"]}}
    rep = instance_report(Target(I, "h1", 0, 0, "10.9.0.1", 8000, URL), probe(body, 503), "0.1.0")

    def gpu_cell(deep: bool) -> str:
        table = render_table(health_report([rep], [], "0.1.0", 0.1, deep=deep))
        column = next(c for c in table.columns if c.header == "GPU")
        return str(next(iter(column.cells)))

    assert gpu_cell(False) == "power-cap hw-thermal ecc-corr:4 remapped:2 FAULT"
    assert gpu_cell(True) == "83C 690W 99% power-cap hw-thermal ecc-corr:4 remapped:2 FAULT"
    state = next(c for c in render_table(health_report([rep], [], "0.1.0", 0.1)).columns if c.header == "state")
    assert str(next(iter(state.cells))) == "gpu_fault"
