"""`llamactl restart` without --rolling holds the deploy lock and writes the audit log, as --rolling does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from llamactl.cli.main import app
from llamactl.ops import connect as connect_mod
from llamactl.ops import lock
from llamactl.plan.command import Command
from llamactl.remote.base import Executor, RunResult
from llamactl.remote.local import LocalExecutor
from llamactl.remote.recording import FakeFile, RecordingExecutor, Reply

# Two CPU hosts and a balancer: every address unreachable, nothing here may connect for real.
INVENTORY = (Path(__file__).resolve().parents[1] / "fixtures/inventories/two-cpu-hosts.yaml").read_text()
HOLDER = {"owner": "alice@laptop", "since": "2026-01-01T10:00", "command": "llamactl deploy inv.yaml"}
TAKE = "take the deploy lock"


class Lb(RecordingExecutor):
    """A balancer host whose lock file behaves like the real one (noclobber) and whose audit log is kept."""

    def __init__(self, held: bool, log: list[str]) -> None:
        files = {lock.LOCK_PATH: json.dumps(HOLDER).encode()} if held else {}
        super().__init__("lb", files=files, responder=self._answer)
        self.audit: list[dict[str, object]] = []
        self.log = log

    def _answer(self, command: Command) -> Reply | None:
        if command.description == TAKE:
            if lock.LOCK_PATH in self.files:
                return Reply(1, "", f"sh: cannot create {lock.LOCK_PATH}: File exists")
            self.files[lock.LOCK_PATH] = FakeFile(b'{"owner": "me"}')
        if command.shell() == f"rm -f {lock.LOCK_PATH}":
            self.files.pop(lock.LOCK_PATH, None)
        return None

    def run(self, command: Command, *, check: bool = True, timeout_s: float | None = None,
            stdin: bytes | None = None) -> RunResult:
        self.log.append(f"lb: {command.description or command.display()}")
        if command.description == "append to the audit log" and stdin:
            self.audit.append(json.loads(stdin))
        return super().run(command, check=check, timeout_s=timeout_s, stdin=stdin)


class Host(RecordingExecutor):
    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        reply = {"systemctl restart llamactl@0.service": Reply(5, "", "Job failed")} if fail else {}
        super().__init__(name, responses=reply)
        self.log = log

    def run(self, command: Command, *, check: bool = True, timeout_s: float | None = None,
            stdin: bytes | None = None) -> RunResult:
        self.log.append(f"{self.host}: {command.display()}")
        return super().run(command, check=check, timeout_s=timeout_s, stdin=stdin)


@pytest.fixture
def inventory(tmp_path: Path) -> str:
    (tmp_path / "inventory.yaml").write_text(INVENTORY)
    return str(tmp_path / "inventory.yaml")


def use(monkeypatch: pytest.MonkeyPatch, hosts: dict[str, Executor]) -> None:
    monkeypatch.setattr(connect_mod, "connect_host", lambda name, address, ssh: hosts[name])


def restart(monkeypatch: pytest.MonkeyPatch, *args: str, held: bool = False,
            failing: str = "") -> tuple[Result, Lb, list[str]]:
    """``llamactl restart ARGS`` against a recorded balancer and hosts h1, h2 (``failing`` cannot restart)."""
    log: list[str] = []
    lb = Lb(held=held, log=log)
    use(monkeypatch, {"lb": lb, **{h: Host(h, log, fail=h == failing) for h in ("h1", "h2")}})
    return CliRunner().invoke(app, ["restart", *args]), lb, log


def test_all_at_once_is_refused_while_a_deploy_holds_the_lock(inventory: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    result, lb, log = restart(monkeypatch, inventory, "--yes", held=True)
    assert isinstance(result.exception, lock.LockHeld) and result.exception.exit_code == 1
    assert str(result.exception) == (
        f"another deploy or restart is running: the lock {lock.LOCK_PATH} on lb is held by alice@laptop since "
        "2026-01-01T10:00 (llamactl deploy inv.yaml). If it is gone, re-run with --force-unlock.")
    assert log == [f"lb: {TAKE}"]  # no host touched, and someone else's lock is not removed
    assert lock.LOCK_PATH in lb.files and lb.audit == []


def test_all_at_once_takes_the_lock_restarts_audits_and_releases(inventory: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    result, lb, log = restart(monkeypatch, inventory, "--yes")
    assert result.exit_code == 0, result.output
    assert log[0] == f"lb: {TAKE}" and log[-2:] == ["lb: append to the audit log", f"lb: rm -f {lock.LOCK_PATH}"]
    assert sorted(log[1:-2]) == sorted(f"{h}: systemctl {verb} llamactl@0.service"
                                       for h in ("h1", "h2") for verb in ("reset-failed", "restart"))
    assert lock.LOCK_PATH not in lb.files
    (entry,) = lb.audit
    assert entry["command"] == f"llamactl restart {inventory}" and entry["ok"] is True and entry["changed"] == 2
    assert entry["changes"] == {"h1": ["restart llamactl@0.service"], "h2": ["restart llamactl@0.service"]}


def test_all_at_once_failure_still_audits_and_releases(inventory: str, monkeypatch: pytest.MonkeyPatch) -> None:
    result, lb, log = restart(monkeypatch, inventory, "--yes", "--limit", "h1,h2", failing="h2")
    assert result.exit_code == 1 and "restart failed on: h2" in str(result.exception)
    (entry,) = lb.audit
    assert entry["ok"] is False and entry["changes"] == {"h1": ["restart llamactl@0.service"]}
    assert log[-1] == f"lb: rm -f {lock.LOCK_PATH}" and lock.LOCK_PATH not in lb.files


def test_force_unlock_removes_a_stale_lock(inventory: str, monkeypatch: pytest.MonkeyPatch) -> None:
    result, lb, log = restart(monkeypatch, inventory, "--yes", "--force-unlock", held=True)
    assert result.exit_code == 0, result.output
    assert log[:2] == [f"lb: rm -f {lock.LOCK_PATH}", f"lb: {TAKE}"] and len(lb.audit) == 1


def test_real_lock_file_on_a_local_balancer(inventory: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The real lock (noclobber through a shell) and audit file, on a 'balancer' that is this machine."""
    monkeypatch.setattr(lock, "LOCK_PATH", str(tmp_path / "lib" / "deploy.lock"))
    monkeypatch.setattr(lock, "AUDIT_PATH", str(tmp_path / "log" / "audit.log"))
    log: list[str] = []
    h1, h2 = Host("h1", log), Host("h2", log)
    use(monkeypatch, {"lb": LocalExecutor("lb"), "h1": h1, "h2": h2})
    lock.acquire(LocalExecutor("lb"), "llamactl deploy inv.yaml")  # a deploy is running
    held = (tmp_path / "lib" / "deploy.lock").read_bytes()
    result = CliRunner().invoke(app, ["restart", inventory, "--yes", "--instance", "h1/0"])
    assert isinstance(result.exception, lock.LockHeld) and "(llamactl deploy inv.yaml)" in str(result.exception)
    assert h1.commands == [] and (tmp_path / "lib" / "deploy.lock").read_bytes() == held
    lock.release(LocalExecutor("lb"))  # the deploy is done
    result = CliRunner().invoke(app, ["restart", inventory, "--yes", "--instance", "h1/0"])
    assert result.exit_code == 0, result.output
    assert h1.commands[-1] == "systemctl restart llamactl@0.service" and h2.commands == []
    assert not (tmp_path / "lib" / "deploy.lock").exists()
    entry = json.loads((tmp_path / "log" / "audit.log").read_text())
    assert entry["command"] == f"llamactl restart {inventory} --instance h1/0" and entry["ok"] is True


def test_rolling_holds_the_lock_and_audits_too(inventory: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from llamactl.ops import rolling
    from llamactl.ops.rolling import Failure, RollingRestartFailed, RollingResult

    log: list[str] = []
    lb = Lb(held=False, log=log)
    use(monkeypatch, {"lb": lb})

    def fake(inv: object, instances: list[object], **kw: object) -> RollingResult:
        log.append("rolling restart")
        result = RollingResult([["h1/0"], ["h2/0"]], restarted=["h1/0"],
                               failures=[Failure("h2/0", "ready", "not ready in 5 s")], drained=frozenset({"h2/0"}))
        raise RollingRestartFailed(result)

    monkeypatch.setattr(rolling, "rolling_restart", fake)
    result = CliRunner().invoke(app, ["restart", inventory, "--rolling", "--batch", "1"])
    assert result.exit_code == 1 and isinstance(result.exception, RollingRestartFailed)
    assert log == [f"lb: {TAKE}", "rolling restart", "lb: append to the audit log", f"lb: rm -f {lock.LOCK_PATH}"]
    (entry,) = lb.audit
    assert entry["command"] == f"llamactl restart {inventory} --rolling --batch 1" and entry["ok"] is False
    assert entry["changes"] == {"h1": ["restart llamactl@0.service"]}


class Releases(Host):
    """A host with releases r1 (older) and r2 (active) installed."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__(name, log)
        facts = {"python": [3, 11, 2], "venv": True, "free_bytes": None, "systemd": True, "files": {},
                 "wheelhouse": {}, "releases": ["r1", "r2"], "history": ["r1", "r2"], "current": "r2",
                 "model_manifest": None, "model_present": None, "units": {}}
        self.responder = lambda command: Reply(0, json.dumps(facts)) if "-c" in command.argv[:2] else None


def test_rollback_holds_the_lock_and_audits(inventory: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from llamactl.inventory import load_inventory
    from llamactl.ops import rolling
    from llamactl.ops.rollback import rollback
    from llamactl.ops.rolling import RollingResult

    log: list[str] = []
    lb = Lb(held=False, log=log)
    use(monkeypatch, {"lb": lb, "h1": Releases("h1", log), "h2": Releases("h2", log)})

    def fake(inv: object, instances: list[object], **kw: object) -> RollingResult:
        log.append("rolling restart")
        return RollingResult([["h1/0"], ["h2/0"]], restarted=["h1/0", "h2/0"])

    monkeypatch.setattr(rolling, "rolling_restart", fake)
    results, error = rollback(load_inventory(inventory, env={}), command_line="llamactl rollback inv.yaml")
    assert error is None and [(r.host, r.ok, r.frm, r.to) for r in results] == [("h1", True, "r2", "r1"),
                                                                                ("h2", True, "r2", "r1")]
    assert log[0] == f"lb: {TAKE}" and log[-3:] == ["rolling restart", "lb: append to the audit log",
                                                    f"lb: rm -f {lock.LOCK_PATH}"]
    (entry,) = lb.audit
    assert entry["command"] == "llamactl rollback inv.yaml" and entry["ok"] is True and entry["release"] == "r1"
    assert entry["changes"] == {"h1": ["restart llamactl@0.service"], "h2": ["restart llamactl@0.service"]}


def test_rollback_is_refused_while_a_deploy_holds_the_lock(inventory: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from llamactl.inventory import load_inventory
    from llamactl.ops.rollback import rollback

    log: list[str] = []
    use(monkeypatch, {"lb": Lb(held=True, log=log), "h1": Releases("h1", log), "h2": Releases("h2", log)})
    with pytest.raises(lock.LockHeld):
        rollback(load_inventory(inventory, env={}))
    assert log == [f"lb: {TAKE}"]
