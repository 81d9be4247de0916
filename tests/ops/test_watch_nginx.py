"""The watch loop against real backends behind a real nginx: a stopped server is drained, restarted
(the RecordingExecutor's answer to `systemctl restart` brings the backend back) and put back."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ops_support import Backend, Load, TempNginx, free_port, write_inventory

from llamactl.inventory import load_inventory
from llamactl.plan.nginx import NginxControl
from llamactl.ops.watch import JsonLog, WatchLoop
from llamactl.plan.command import Command
from llamactl.plan.render import render_balancer_files
from llamactl.plan.watch import Policy, State
from llamactl.remote.base import Executor
from llamactl.remote.local import LocalExecutor
from llamactl.remote.recording import RecordingExecutor, Reply


@pytest.fixture
def pair() -> Iterator[list[Backend]]:
    made = [Backend("a", "127.0.0.1"), Backend("b", "127.0.0.2")]
    yield made
    for b in made:
        b.close()


def test_watch_heals_a_stopped_server_while_traffic_flows(tmp_path: Path, pair: list[Backend],
                                                          temp_nginx: TempNginx) -> None:
    a = pair[0]
    conf = temp_nginx.conf_d / "llamactl.conf"
    listen = free_port()
    inv = load_inventory(write_inventory(tmp_path / "inventory.yaml", pair, listen=listen, config_path=conf),
                         env={})
    conf.write_bytes(render_balancer_files(inv)[str(conf)].content)
    temp_nginx.start()

    def on_restart(command: Command) -> Reply | None:
        if command.shell() == "systemctl restart llamactl@0.service":
            a.restart(down_s=0.1)
            return Reply(0)
        return None

    hosts = {"a": RecordingExecutor("a", responder=on_restart), "b": RecordingExecutor("b")}

    def connect(name: str, address: str, ssh: object) -> Executor:
        return LocalExecutor("lb") if name == "lb" else hosts[name]

    out = io.StringIO()
    log = JsonLog(out, str(tmp_path / "watch.log"))
    policy = Policy(fall=2, rise=2, startup_grace_s=5, backoff_base_s=1, budget=3, window_s=60, settle_s=0.2)
    loop = WatchLoop(inv, policy, log, connect=connect,
                     nginx=NginxControl.for_prefix(str(temp_nginx.root), str(temp_nginx.conf)))

    def down() -> list[str]:
        return [ln.rsplit("#", 1)[1].strip() for ln in conf.read_text().splitlines() if " down;" in ln]

    with Load(f"http://127.0.0.1:{listen}") as load:
        loop.tick()
        assert loop.watcher.state("a/0") is State.HEALTHY
        a.close()  # the server stops: connections refused (as after `systemctl stop`)
        seen_down = False
        for _ in range(40):
            loop.tick()
            seen_down = seen_down or down() == ["a/0"]
            if hosts["a"].commands and loop.watcher.state("a/0") is State.HEALTHY:
                break
            time.sleep(0.2)
        load.wait_for(10)
    log.close()
    assert seen_down, "a/0 was never drained in nginx"
    assert hosts["a"].commands == ["systemctl reset-failed llamactl@0.service", "systemctl restart llamactl@0.service"]
    assert hosts["b"].commands == []
    assert loop.watcher.state("a/0") is State.HEALTHY and down() == []
    events = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    for name in ("probe_failed", "drained", "restart", "restarted", "undrained", "balancer_applied"):
        assert name in events, (name, events)
    assert events.index("drained") < events.index("restart") < events.index("undrained")
    assert (tmp_path / "watch.log").read_text() == out.getvalue()
    assert load.failed == [], load.failed  # nginx retried what a refused on b
