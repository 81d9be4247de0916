"""rolling_restart through a real nginx (temp prefix) in front of real HTTP backends, under load.

The "restart" here is the backends' own (they stop listening, then serve again); the host side is a
RecordingExecutor, so the test also sees which host each restart was sent to.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ops_support import Backend, Load, TempNginx, free_port, write_inventory

from llamactl.errors import UsageError
from llamactl.inventory import Instance, Inventory, load_inventory
from llamactl.plan.nginx import NginxControl
from llamactl.ops.rolling import Checks, Progress, RollingRestartFailed, rolling_restart
from llamactl.plan.render import render_balancer_files
from llamactl.remote.base import Executor
from llamactl.remote.local import LocalExecutor
from llamactl.remote.recording import RecordingExecutor


@pytest.fixture
def three() -> Iterator[list[Backend]]:
    made = [Backend("a", "127.0.0.1"), Backend("b", "127.0.0.2"), Backend("c", "127.0.0.4")]
    for b in made:
        b.infer_delay_s = 0.05  # requests overlap the drain, so waiting for in_flight == 0 matters
    yield made
    for b in made:
        b.close()


class Cluster:
    def __init__(self, tmp: Path, backends: list[Backend], ngx: TempNginx, rollout: dict[str, object]) -> None:
        self.backends = {b.name: b for b in backends}
        self.conf = ngx.conf_d / "llamactl.conf"
        self.listen = free_port()
        self.inv: Inventory = load_inventory(
            write_inventory(tmp / "inventory.yaml", backends, listen=self.listen, config_path=self.conf,
                            rollout=rollout), env={})
        self.conf.write_bytes(render_balancer_files(self.inv)[str(self.conf)].content)
        ngx.start()
        self.control = NginxControl.for_prefix(str(ngx.root), str(ngx.conf))
        self.hosts: dict[str, RecordingExecutor] = {}
        self.events: list[Progress] = []
        self.down_at_restart: dict[str, list[str]] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen}"

    def connect(self, name: str, address: str, ssh: object) -> Executor:
        if name == "lb":
            return LocalExecutor("lb")
        return self.hosts.setdefault(name, RecordingExecutor(name))

    def down_servers(self) -> list[str]:
        return sorted(line.rsplit("#", 1)[1].strip() for line in self.conf.read_text().splitlines()
                      if " down;" in line)

    def restart(self, ready: bool = True, fail: str = "") -> object:
        def fn(executor: Executor, inst: Instance) -> None:
            assert executor.host == inst.host
            self.down_at_restart[inst.id] = self.down_servers()
            self.backends[inst.host].restart(ready=ready and inst.host != fail)
        return fn


def test_rolling_restart_under_load_loses_no_request(tmp_path: Path, three: list[Backend],
                                                      temp_nginx: TempNginx) -> None:
    c = Cluster(tmp_path, three, temp_nginx, {"batch": 1, "max_unavailable": 1, "drain_timeout_s": 10,
                                               "ready_timeout_s": 10, "canary": True})
    with Load(c.url) as load:
        load.wait_for(20)
        result = rolling_restart(c.inv, c.inv.instances(), connect=c.connect, on_event=c.events.append,
                                 restart_fn=c.restart(), nginx=c.control, checks=Checks(interval_s=0.1))
        load.wait_for(20)
    assert result.ok and result.restarted == ["a/0", "b/0", "c/0"]
    assert result.batches == [["a/0"], ["b/0"], ["c/0"]]
    assert [b.restarts for b in three] == [1, 1, 1]
    # each instance was out of the balancer (alone: max_unavailable 1) while it restarted
    assert c.down_at_restart == {"a/0": ["a/0"], "b/0": ["b/0"], "c/0": ["c/0"]}
    assert c.down_servers() == []
    steps = [(e.instance, e.step) for e in c.events if e.instance == "b/0"]
    assert steps == [("b/0", s) for s in ("drain", "idle", "restart", "ready", "canary", "undrain")]
    assert load.failed == [] and load.ok >= 40


def test_first_failure_stops_and_leaves_only_it_drained(tmp_path: Path, three: list[Backend],
                                                        temp_nginx: TempNginx) -> None:
    c = Cluster(tmp_path, three, temp_nginx, {"batch": 1, "max_unavailable": 1, "drain_timeout_s": 5,
                                               "ready_timeout_s": 1.5, "canary": False})
    with Load(c.url) as load:
        with pytest.raises(RollingRestartFailed) as err:
            rolling_restart(c.inv, c.inv.instances(), connect=c.connect, restart_fn=c.restart(fail="b"),
                            nginx=c.control, checks=Checks(interval_s=0.1))
        load.wait_for(20)
    result = err.value.result
    assert result.restarted == ["a/0"] and [f.instance for f in result.failures] == ["b/0"]
    assert result.failures[0].step == "ready"
    assert result.drained == frozenset({"b/0"}) and c.down_servers() == ["b/0"]
    assert three[2].restarts == 0  # c was never touched
    message = str(err.value)
    assert "b/0: ready failed" in message and "Left drained: b/0" in message
    assert load.failed == []


def test_default_restart_is_systemctl_on_the_instance_host(tmp_path: Path, three: list[Backend],
                                                          temp_nginx: TempNginx) -> None:
    c = Cluster(tmp_path, three, temp_nginx, {"batch": 2, "max_unavailable": 2, "ready_timeout_s": 5,
                                               "canary": False})
    lines: list[tuple[str, str]] = []
    result = rolling_restart(c.inv, c.inv.instances()[:2], connect=c.connect, nginx=c.control,
                             progress=lambda where, msg: lines.append((where, msg)),
                             checks=Checks(interval_s=0.1))
    assert result.batches == [["a/0", "b/0"]]  # a subset may go in one batch: c keeps serving
    restart = ["systemctl reset-failed llamactl@0.service", "systemctl restart llamactl@0.service"]
    assert c.hosts["a"].commands == restart and c.hosts["b"].commands == restart
    assert "c" not in c.hosts and c.hosts["a"].closed
    assert ("a/0", "restart: llamactl@0.service restarted") in lines


def test_single_instance_needs_force(tmp_path: Path) -> None:
    solo = Backend("a")
    try:
        inv = load_inventory(write_inventory(tmp_path / "i.yaml", [solo], listen=free_port(),
                                             config_path=tmp_path / "c.conf"), env={})
        with pytest.raises(UsageError, match="a/0 is the only instance of cluster t: .* pass --force"):
            rolling_restart(inv, inv.instances(), connect=lambda *a: RecordingExecutor("x"))
    finally:
        solo.close()


def test_refuses_to_drain_the_last_ready_instance(tmp_path: Path, three: list[Backend],
                                                  temp_nginx: TempNginx) -> None:
    c = Cluster(tmp_path, three, temp_nginx, {"batch": 1, "max_unavailable": 1, "canary": False})
    three[1].close()
    three[2].ready = False  # loading
    before = c.conf.read_bytes()
    with pytest.raises(RollingRestartFailed) as err:
        rolling_restart(c.inv, c.inv.instances()[:1], connect=c.connect, nginx=c.control,
                        checks=Checks(interval_s=0.1))
    assert "a/0: drain failed: no other instance is ready" in str(err.value)
    assert c.hosts == {} and c.conf.read_bytes() == before  # nothing drained, nothing restarted
    assert err.value.result.drained == frozenset()


def test_a_host_lost_during_its_restart_fails_fast_not_at_ready_timeout(tmp_path: Path, three: list[Backend],
                                                                       temp_nginx: TempNginx) -> None:
    c = Cluster(tmp_path, three, temp_nginx, {"batch": 1, "max_unavailable": 1, "ready_timeout_s": 600,
                                               "canary": False})
    restart = c.restart()

    def vanish(executor: Executor, inst: Instance) -> None:
        restart(executor, inst)  # type: ignore[operator]
        if inst.host == "b":  # the host dies under us: its port goes silent, its connection is lost
            three[1].close()
            c.hosts["b"].lost = True

    started = time.monotonic()
    with Load(c.url) as load, pytest.raises(RollingRestartFailed) as err:
        rolling_restart(c.inv, c.inv.instances(), connect=c.connect, restart_fn=vanish, nginx=c.control,
                        checks=Checks(interval_s=0.1))
    assert time.monotonic() - started < 60  # not the 600 s ready timeout
    (failure,) = err.value.result.failures
    assert (failure.instance, failure.step) == ("b/0", "ready")
    assert "the SSH connection to the host was lost" in failure.message
    assert c.hosts["b"].closed  # dropped: a later use reconnects or reports the host unreachable
    assert err.value.result.drained == frozenset({"b/0"}) and three[2].restarts == 0
    assert load.failed == []
