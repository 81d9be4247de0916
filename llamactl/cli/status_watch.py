"""``llamactl status --watch``: sweep every interval, redraw the table live, and under it per-instance
sparklines of req/s and p95 latency over the last minutes (``llamactl.health.sparkline``).

With ``--json`` one compact JSON report per line instead, each with the history kept so far. ``--count N``
stops after N sweeps (scripts, tests); otherwise it runs until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import TYPE_CHECKING

import typer
from rich.console import Console, Group
from rich.table import Table

from llamactl.health.sparkline import History

if TYPE_CHECKING:
    from llamactl.health.report import HealthReport
    from llamactl.health.sweep import SweepOptions, SweepPlan

WIDTH = 30  # characters per sparkline


def _scale(peak: float | None, fmt: str) -> str:
    return "" if peak is None else f" (top {fmt.format(peak)})"


def sparkline_table(history: History, report: HealthReport, now: float, width: int = WIDTH) -> Table:
    """Per instance (and balancer): req/s and p95 over the window, every line on one scale per figure."""
    minutes = history.window_s / 60
    ids = [i.id for i in report.instances]
    rate_peak = history.peak(ids, "requests_per_s")
    p95_peak = history.peak(ids, "p95_s")
    per_char = history.window_s / width
    table = Table(title=f"last {minutes:g} min, {per_char:g} s per character (mean of the sweeps in it; blank: "
                  "no reading)", title_justify="left", expand=False)
    table.add_column("instance", no_wrap=True)
    table.add_column("req/s" + _scale(rate_peak, "{:.2f}"), no_wrap=True)
    table.add_column("now", justify="right", no_wrap=True)
    table.add_column("p95" + _scale(p95_peak, "{:.2f} s"), no_wrap=True)
    table.add_column("now", justify="right", no_wrap=True)
    for i in report.instances:
        rate = history.series.get(i.id, {}).get("requests_per_s")
        p95 = history.series.get(i.id, {}).get("p95_s")
        table.add_row(
            i.id,
            history.line(i.id, "requests_per_s", now, width, rate_peak),
            "-" if rate is None or rate.last() is None else f"{rate.last():.2f}",
            history.line(i.id, "p95_s", now, width, p95_peak),
            "-" if p95 is None or p95.last() is None else f"{p95.last():.2f} s",
        )
    for b in report.balancers:
        key = f"balancer:{b.name}"
        series = history.series.get(key, {}).get("requests_per_s")
        if series is None or series.last() is None:
            continue
        table.add_row(f"{b.name} (nginx)", history.line(key, "requests_per_s", now, width),
                      f"{series.last():.2f}", "", "")
    return table


async def watch(plan: SweepPlan, options: SweepOptions, interval_s: float, console: Console, as_json: bool,
                count: int | None, history_s: float) -> HealthReport:
    """Sweep every ``interval_s`` until Ctrl-C or ``count`` sweeps; rates come from consecutive scrapes."""
    from rich.live import Live

    from llamactl.cli.status import balancer_lines, render_table
    from llamactl.health.probe import InstanceProbe, make_client
    from llamactl.health.sweep import sweep

    previous: dict[str, InstanceProbe] = {}
    history = History(history_s)
    report: HealthReport | None = None
    sweeps = 0
    live = contextlib.nullcontext() if as_json else Live(console=console, auto_refresh=False)
    async with make_client(len(plan.targets) + len(plan.balancers), options.timeout_s) as client:
        with live:
            try:
                while count is None or sweeps < count:
                    report, previous = await sweep(plan, options, client, previous)
                    now = time.monotonic()
                    history.record(now, report)
                    sweeps += 1
                    if isinstance(live, Live):
                        lines = [*balancer_lines(report)]
                        live.update(Group(render_table(report), *lines,
                                          sparkline_table(history, report, now)), refresh=True)
                    else:
                        typer.echo(json.dumps({**report.to_dict(), "history": history.to_dict()}))
                    if count is not None and sweeps >= count:
                        break
                    await asyncio.sleep(max(0.0, interval_s - report.elapsed_s))
            except (KeyboardInterrupt, asyncio.CancelledError):
                pass
    if report is None:
        raise KeyboardInterrupt
    return report
