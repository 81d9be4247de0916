"""``llamactl watch``: probe every instance; drain and restart failing ones, put them back when healthy."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from llamactl.cli.inventory_arg import inventory_argument


def watch(
    inventory: Path | None = inventory_argument(),
    once: bool = typer.Option(False, "--once", help="One probe round (and its actions), then exit."),
    interval: float | None = typer.Option(
        None, "--interval", min=0.1, help="Seconds between probe rounds (default: health.interval_s)."),
    log_file: Path | None = typer.Option(
        None, "--log-file", help="Also append the JSON event lines to this file."),
    budget: int = typer.Option(3, "--budget", min=1, help="Restarts allowed per instance within --window."),
    window: float = typer.Option(1800.0, "--window", min=1.0, help="Restart budget window in seconds."),
    backoff: float = typer.Option(10.0, "--backoff", min=0.0,
                                  help="First wait between restarts of an instance; doubles each time."),
) -> None:
    """Auto-heal: after health.fall failed probes an instance is drained from the balancer and its unit
    restarted over SSH; after health.rise passes it goes back. Restarts back off exponentially and stop
    after --budget per --window (logged as an error; the instance stays drained). An instance still
    loading within health.startup_grace_s is never restarted. While a deploy or restart holds the deploy
    lock, nothing is drained, restarted or put back (a heal_skipped event says who holds it); watch itself
    never takes the lock. Every event is one JSON line on stdout.

    Example: llamactl watch inventory.yaml --log-file /var/log/llamactl/watch.log
    """
    from llamactl.cli.inventory_arg import load
    from llamactl.ops.watch import JsonLog, WatchLoop
    from llamactl.plan.watch import Policy, State

    inv = load(inventory)
    h = inv.health
    policy = Policy(fall=h.fall, rise=h.rise, startup_grace_s=h.startup_grace_s, backoff_base_s=backoff,
                    backoff_max_s=max(backoff, 600.0), budget=budget, window_s=window)
    log = JsonLog(sys.stdout, str(log_file) if log_file else None)
    loop = WatchLoop(inv, policy, log)
    try:
        loop.run(once=once, interval_s=interval if interval is not None else h.interval_s)
    except KeyboardInterrupt:
        log({"event": "watch_stopped", "level": "info", "reason": "interrupted"})
    finally:
        log.close()
    if once:
        healthy = all(loop.watcher.state(i.id) is State.HEALTHY for i in loop.instances)
        raise typer.Exit(0 if healthy else 1)


def register(app: typer.Typer) -> None:
    app.command("watch")(watch)
