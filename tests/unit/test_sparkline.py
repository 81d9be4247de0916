"""Sparklines and the time window behind ``status --watch`` (pure: readings and clock values passed in)."""

from __future__ import annotations

import pytest

from llamactl.health.report import BalancerReport, HealthReport, InstanceReport
from llamactl.health.sparkline import BLOCKS, GAP, History, Series, sparkline


def test_blocks_scale_from_lo_to_the_peak() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([0.0, 7.0], hi=14.0) == "▁▅"
    assert sparkline([0, 100], hi=10) == "▁█"  # clipped at hi
    assert sparkline([-5.0, 1.0]) == "▁█"  # below lo: the lowest block


def test_gaps_and_flat_lines() -> None:
    assert sparkline([None, 1.0, None]) == f"{GAP}█{GAP}"
    assert sparkline([0.0, 0.0, 0.0]) == BLOCKS[0] * 3  # an idle instance is a flat line, not a gap
    assert sparkline([2.0, 2.0]) == BLOCKS[-1] * 2
    assert sparkline([]) == ""
    assert sparkline([float("nan"), 1.0]) == f"{GAP}█"


def test_series_drops_readings_older_than_the_window() -> None:
    s = Series(60.0)
    for t in range(0, 200, 10):
        s.add(float(t), float(t))
    assert [t for t, _ in s.points] == [130.0, 140.0, 150.0, 160.0, 170.0, 180.0, 190.0]
    assert s.last() == 190.0


def test_buckets_average_each_slice_and_leave_empty_slices_empty() -> None:
    s = Series(60.0)
    for t, v in ((1.0, 2.0), (2.0, 4.0), (31.0, 10.0), (59.0, None)):
        s.add(100.0 + t, v)
    # (100, 160] in 3 slices of 20 s: (100,120] holds 2 and 4, (120,140] holds 10, (140,160] only a None
    assert s.buckets(160.0, 3) == [3.0, 10.0, None]
    with pytest.raises(ValueError, match="at least 1"):
        s.buckets(160.0, 0)


def instance(id_: str, rate: float | None, p95: float | None, window: float | None,
             state: str = "ready") -> InstanceReport:
    host, index = id_.split("/")
    return InstanceReport(id=id_, host=host, index=int(index), gpu=None, port=8000, url="http://x", state=state,  # type: ignore[arg-type]
                          requests_per_s=rate, p95_s=p95, rate_window_s=window)


def report(*instances: InstanceReport, lb_rate: float | None = None) -> HealthReport:
    lb = BalancerReport("lb", "http://lb", "ready", 200, None, 0.01, active_connections=1, requests_per_s=lb_rate)
    return HealthReport(list(instances), [lb], "0", 0.1)


def test_history_records_only_windowed_readings() -> None:
    h = History(300.0)
    # first sweep: a lifetime average, not a reading of the last seconds
    h.record(0.0, report(instance("a/0", 0.5, 1.2, None), lb_rate=3.0))
    h.record(2.0, report(instance("a/0", 2.0, 0.8, 2.0), lb_rate=4.0))
    h.record(4.0, report(instance("a/0", 0.0, 1.2, 2.0)))  # no request finished: no p95 reading
    h.record(6.0, report(instance("a/0", None, None, None, state="down")))
    assert h.series["a/0"]["requests_per_s"].values() == [None, 2.0, 0.0, None]
    assert h.series["a/0"]["p95_s"].values() == [None, 0.8, None, None]
    assert h.series["balancer:lb"]["requests_per_s"].values() == [3.0, 4.0, None, None]
    assert h.peak(["a/0"], "requests_per_s") == 2.0 and h.peak(["zz"], "p95_s") is None
    assert h.to_dict()["a/0"]["p95_s"] == [[0.0, None], [2.0, 0.8], [4.0, None], [6.0, None]]


def test_lines_share_one_scale() -> None:
    h = History(8.0)
    for t in range(1, 9):
        h.record(float(t), report(instance("a/0", 1.0, 0.5, 1.0), instance("b/0", 4.0, 0.5, 1.0)))
    peak = h.peak(["a/0", "b/0"], "requests_per_s")
    assert peak == 4.0
    assert h.line("a/0", "requests_per_s", 8.0, 8, peak) == "▃" * 8
    assert h.line("b/0", "requests_per_s", 8.0, 8, peak) == "█" * 8
    assert h.line("nobody", "requests_per_s", 8.0, 4) == GAP * 4


def test_the_watch_table_draws_each_instance_and_the_balancer() -> None:
    from rich.console import Console

    from llamactl.cli.status_watch import sparkline_table

    h = History(60.0)
    for t in range(2, 62, 2):
        h.record(float(t), report(instance("a/0", t / 10, 0.4, 2.0), instance("b/0", 0.0, None, 2.0),
                                  lb_rate=1.5))
    console = Console(width=200, record=True, color_system=None)
    console.print(sparkline_table(h, report(instance("a/0", 6.0, 0.4, 2.0), instance("b/0", 0.0, None, 2.0)),
                                  60.0, width=30))
    text = console.export_text()
    assert "last 1 min, 2 s per character" in text and "req/s (top 6.00)" in text and "p95 (top 0.40 s)" in text
    row_a = next(line for line in text.splitlines() if "a/0" in line)
    assert "▁" in row_a and "█" in row_a and "6.00" in row_a and "0.40 s" in row_a
    row_b = next(line for line in text.splitlines() if "b/0" in line)
    assert "▁" * 30 in row_b and "█" not in row_b  # idle: a flat line at the bottom, no p95
    assert "lb (nginx)" in text and "1.50" in text
