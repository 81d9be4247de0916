"""``llamactl status`` end to end over loopback: table, JSON, exit codes, --limit, --canary, --watch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamactl.health.simulate import Behaviour, Endpoint, running
from llamactl.health.sweep import plan_from_inventory
from llamactl.inventory import load_inventory
from tests.health.helpers import free_base_port, run_cli, write_inventory

HOSTS = {"sim-a": "127.0.0.31", "sim-b": "127.0.0.32"}


class Cluster:
    """Two hosts x 2 instances plus a balancer, simulated, each reporting the config hash the inventory expects."""

    def __init__(self, tmp: Path) -> None:
        self.base = free_base_port([*HOSTS.values(), "127.0.0.2"], 3)
        self.inventory = write_inventory(tmp / "inventory.yaml", HOSTS, 2, self.base, self.base + 2)
        plan = plan_from_inventory(load_inventory(self.inventory))
        self.endpoints = {
            t.id: Endpoint(
                t.address, t.port, Behaviour(config_hash=t.expected_config_hash or "", requests=10)
            )
            for t in plan.targets
        }
        self.balancer = Endpoint("127.0.0.2", self.base + 2, Behaviour(status="balancer"))

    def all(self) -> list[Endpoint]:
        return [*self.endpoints.values(), self.balancer]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    yield Cluster(tmp_path)


def test_all_ready_exits_0_with_a_table(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with running(cluster.all()):
        code, out, err = run_cli(["status", str(cluster.inventory)], capsys, monkeypatch)
    assert code == 0, out + err
    assert "4/4 instances ready, 1/1 balancers ready" in out
    for header in ("host", "inst/GPU", "port", "state", "model", "version config", "GPU mem", "in flight",
                   "queued", "req/s", "p50/p95", "last error"):  # fmt: skip
        assert header in out
    assert "sim-a" in out and "1/gpu1" in out and "Llama-3.2V-11B-cot" in out and "21.0/80.0 GiB" in out
    assert "DRIFT" not in out
    assert "\x1b[" not in out  # NO_COLOR


def test_json_report_and_exit_1_when_one_instance_loads(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.endpoints["sim-b/1"].behaviour.status = "loading"
    cluster.endpoints["sim-a/0"].behaviour.config_hash = "feedfacefeedface"
    with running(cluster.all()):
        code, out, _ = run_cli(["status", str(cluster.inventory), "--json"], capsys, monkeypatch)
    assert code == 1
    doc = json.loads(out)
    assert doc["ok"] is False
    states = {i["id"]: i["state"] for i in doc["instances"]}
    assert states == {"sim-a/0": "ready", "sim-a/1": "ready", "sim-b/0": "ready", "sim-b/1": "loading"}
    drifted = [i for i in doc["instances"] if i["drift"]]
    assert [i["id"] for i in drifted] == ["sim-a/0"]
    assert drifted[0]["drift_reasons"][0].startswith("config feedfacefeedface != ")
    assert doc["balancers"][0]["state"] == "ready"


def test_a_stalled_instance_is_shown_and_fails_the_status(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.endpoints["sim-a/1"].behaviour.status = "stalled"
    with running(cluster.all()):
        code, out, err = run_cli(["status", str(cluster.inventory)], capsys, monkeypatch)
    assert code == 1, out + err
    assert "3/4 instances ready, 1/1 balancers ready" in out
    row = next(line for line in out.splitlines() if "1/gpu1" in line and "sim-a" in line)
    assert "stalled" in row and "engine stalled" in row


def test_balancer_down_fails_the_status(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with running(list(cluster.endpoints.values())):  # nothing on the balancer port
        code, out, _ = run_cli(["status", str(cluster.inventory), "--json"], capsys, monkeypatch)
    assert code == 1
    balancer = json.loads(out)["balancers"][0]
    assert balancer["state"] == "down" and balancer["error"] == "connection refused"


def test_limit_and_canary(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.endpoints["sim-a/0"].behaviour.status = "silent"  # outside --limit: must not be probed
    with running(cluster.all()):
        code, out, _ = run_cli(["status", str(cluster.inventory), "--limit", "sim-b", "--canary", "--json"], capsys,
                               monkeypatch)  # fmt: skip
    doc = json.loads(out)
    assert code == 0, doc["summary"]
    assert [i["id"] for i in doc["instances"]] == ["sim-b/0", "sim-b/1"]
    assert all(i["canary"]["ok"] and i["canary"]["reasoning_steps"] == 2 for i in doc["instances"])
    assert doc["elapsed_s"] < 1.0


def test_silent_instance_costs_one_timeout(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for ep in cluster.endpoints.values():
        ep.behaviour.status = "silent"
    with running(cluster.all()):
        start = time.monotonic()
        code, out, _ = run_cli(["status", str(cluster.inventory), "--timeout", "0.5"], capsys, monkeypatch)
        wall = time.monotonic() - start
    assert code == 1
    assert "0/4 instances ready" in out and "no answer within 0.5 s" in out
    assert wall < 1.5, wall


def test_bad_limit_and_timeout_are_usage_errors(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run_cli(["status", str(cluster.inventory), "--limit", "nope"], capsys, monkeypatch)
    assert code == 2 and "'nope' matches no host" in err
    code, _, err = run_cli(["status", str(cluster.inventory), "--timeout", "0"], capsys, monkeypatch)
    assert code == 2 and "--timeout must be positive" in err
    code, _, err = run_cli(["status", str(cluster.inventory.parent / "missing.yaml")], capsys, monkeypatch)
    assert code == 2 and "missing.yaml" in err and "Traceback" not in err


# ``python -m llamactl`` with Ctrl-C as in a terminal: a test run started in the background (``cmd &`` in a script,
# nohup) has SIGINT ignored, children inherit an ignored signal, and the CLI would never see it.
CLI_WITH_CTRL_C = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                   "runpy.run_module('llamactl', run_name='__main__', alter_sys=True)")


def test_watch_json_streams_reports_with_rates_until_ctrl_c(cluster: Cluster) -> None:
    env = {**os.environ, "NO_COLOR": "1"}
    with running(cluster.all()):
        proc = subprocess.Popen(
            [sys.executable, "-c", CLI_WITH_CTRL_C, "status", str(cluster.inventory), "--watch", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        second = json.loads(proc.stdout.readline())
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=20)
    assert first["ok"] and second["ok"]
    assert first["instances"][0]["rate_window_s"] is None
    # second sweep: the rate comes from two scrapes about health.interval_s (1 s) apart
    assert 0.8 < second["instances"][0]["rate_window_s"] < 3.0
    assert second["instances"][0]["requests_per_s"] == 0.0
    assert rc == 0, proc.stderr.read() if proc.stderr else ""
