"""nginx stub_status: the sampling command, the parser on captured output, and the balancer row of `status`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from llamactl.cli.status import render_table
from llamactl.health.probe import HttpOutcome
from llamactl.health.report import balancer_report, health_report
from llamactl.health import sweep as sweep_mod
from llamactl.health.sweep import SweepPlan, balancer_figures
from llamactl.inventory import load_inventory
from llamactl.ops import connect as connect_mod
from llamactl.plan.stubstatus import (
    BalancerFigures,
    StubStatus,
    StubStatusError,
    parse_samples,
    parse_stub_status,
    sample_command,
)
from llamactl.remote.recording import RecordingExecutor, Reply

# nginx 1.22.1's stub_status, captured
FIRST = "Active connections: 3 \nserver accepts handled requests\n 120 120 250 \nReading: 0 Writing: 2 Waiting: 1 \n"
SECOND = "Active connections: 5 \nserver accepts handled requests\n 131 131 271 \nReading: 0 Writing: 3 Waiting: 2 \n"
SAMPLES = f"1764280000.100000000\n{FIRST}--- llamactl sample ---\n1764280001.100000000\n{SECOND}"


def test_the_parser_reads_every_counter() -> None:
    assert parse_stub_status(FIRST) == StubStatus(3, 120, 120, 250, 0, 2, 1)
    with pytest.raises(StubStatusError) as err:
        parse_stub_status("<html>404 Not Found</html>")
    assert str(err.value) == "not nginx stub_status output: '<html>404 Not Found</html>'"


def test_two_samples_give_the_rate_without_the_probes_own_requests() -> None:
    figures = parse_samples(SAMPLES)
    assert figures.active_connections == 4  # 5 minus this probe's connection
    assert figures.requests_per_s == pytest.approx(20.0)  # 271 - 250 - 1 over 1 s
    with pytest.raises(StubStatusError):
        parse_samples(FIRST)


def test_the_command_samples_twice_from_the_host_itself() -> None:
    shell = sample_command(8089).shell()
    assert shell.count("http://127.0.0.1:8089/nginx_status") == 6  # curl, wget, python3, twice
    assert "sleep 1" in shell and shell.count("date +%s.%N") == 2


def test_the_balancer_row_shows_connections_and_rate_or_why_not() -> None:
    ok = HttpOutcome("http://10.9.0.100:80/healthz", 200, "ok\n", None, 0.01)
    read = balancer_report("lb", ok, BalancerFigures(4, 20.0, StubStatus(5, 131, 131, 271, 0, 3, 2)))
    failed = balancer_report("lb2", ok, "stub_status: exit 7: connection refused")
    assert (read.active_connections, read.requests_per_s, read.figures_error) == (4, 20.0, None)
    assert (failed.active_connections, failed.figures_error) == (None, "stub_status: exit 7: connection refused")
    assert failed.state == "ready"  # the figures never fail the balancer
    table = render_table(health_report([], [read, failed], "0.1.0", 0.1, deep=True))
    cells = [[str(c) for c in col.cells] for col in table.columns]
    row = [col[0] for col in cells]
    assert row[:4] == ["lb", "balancer", "80", "ready"]
    assert row[8] == "4" and row[10] == "20.00" and row[-1] == ""
    assert [col[1] for col in cells][-1] == "stub_status: exit 7: connection refused"


def test_status_deep_samples_each_balancer_over_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inv_text = (Path(__file__).resolve().parents[1] / "fixtures/inventories/two-cpu-hosts.yaml").read_text()
    (tmp_path / "inv.yaml").write_text(inv_text)
    inv = load_inventory(tmp_path / "inv.yaml", env={})
    lb = RecordingExecutor("lb", responses={sample_command(8089).shell(): Reply(0, SAMPLES)})
    monkeypatch.setattr(connect_mod, "connect_host", lambda name, address, ssh: {"lb": lb}[name])
    monkeypatch.setattr(sweep_mod, "_connect_once", lambda name, address, ssh: {"lb": lb}[name])
    plan = SweepPlan([], [("lb", "http://10.9.0.100:80")], inv)
    figures = asyncio.run(balancer_figures(plan, 1.0))
    assert figures == {"lb": parse_samples(SAMPLES)}
    assert lb.commands == [sample_command(8089).display()]
