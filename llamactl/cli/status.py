"""``llamactl status``: a concurrent health sweep of every instance and balancer, as a table or JSON."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from llamactl.cli.inventory_arg import inventory_argument

if TYPE_CHECKING:
    from llamactl.health.redis_state import RedisState
    from llamactl.health.report import HealthReport, InstanceReport
    from llamactl.health.sweep import SweepOptions, SweepPlan
    from llamactl.ops.vip import VipState

_STATE_STYLE = {
    "ready": "green", "loading": "yellow", "draining": "cyan", "stalled": "bold red", "gpu_fault": "bold red",
    "down": "bold red",
}  # fmt: skip
GIB = 1024**3


def _console() -> Console:
    from llamactl.cli.console import console_for

    return console_for(stderr=False)


def _num(value: float | None, fmt: str = "{:g}") -> str:
    return "-" if value is None else fmt.format(value)


def _latency(i: InstanceReport) -> str:
    if i.p50_s is None:
        return "-"
    return f"{i.p50_s:.2f}/{_num(i.p95_s, '{:.2f}')} s"


def _gpu(i: InstanceReport) -> str:
    if i.gpu_memory_total_bytes is None:
        return "-"
    used = (i.gpu_memory_used_bytes or 0) / GIB
    return f"{used:.1f}/{i.gpu_memory_total_bytes / GIB:.1f} GiB"


def _gpu_health(i: InstanceReport, deep: bool) -> Text:
    """The GPU column: flags; with --deep also temperature, power and utilisation from NVML."""
    g = i.gpu_health
    if g is None:
        return Text("-")
    parts: list[str] = []
    if deep and g.get("status") != "unavailable":
        for key, fmt in (("temperature_c", "{:.0f}C"), ("power_w", "{:.0f}W"), ("utilization_pct", "{:.0f}%")):
            if isinstance(g.get(key), (int, float)):
                parts.append(fmt.format(g[key]))
    flags = i.gpu_flags or (["ok"] if g.get("status") == "ok" else [])
    text = Text(" ".join(parts + [f for f in flags if f != "FAULT"]))
    if "FAULT" in flags:
        text.append((" " if len(text) else "") + "FAULT", style="bold red")
    return text


def _version(i: InstanceReport) -> Text:
    if i.version is None:
        return Text("-")
    text = Text(f"{i.version} {i.config_hash or '?'}")
    if i.drift:
        text.append(" DRIFT", style="bold magenta")
    return text


def render_table(report: HealthReport) -> Table:
    """The human view of a report (pure: builds a rich Table)."""
    table = Table(title=report.summary(), title_justify="left", expand=False)
    for name in (
        "host",
        "inst/GPU",
        "port",
        "state",
        "model",
        "version config",
        "GPU mem",
        "GPU",
        "in flight",
        "queued",
        "req/s",
        "p50/p95",
    ):
        table.add_column(name, no_wrap=name not in ("model",))
    if report.deep:
        table.add_column("systemd")
    if report.canary:
        table.add_column("canary")
    table.add_column("last error", overflow="fold")
    for i in report.instances:
        gpu = "cpu" if i.gpu is None else f"gpu{i.gpu}"
        row: list[str | Text] = [
            i.host,
            f"{i.index}/{gpu}",
            str(i.port),
            Text(i.state, style=_STATE_STYLE[i.state]),
            Path(i.model).name if i.model else "-",
            _version(i),
            _gpu(i),
            _gpu_health(i, report.deep),
            _num(i.in_flight),
            _num(i.queued),
            _num(i.requests_per_s, "{:.2f}"),
            _latency(i),
        ]
        if report.deep:
            row.append(i.systemd.display() if i.systemd else "-")
        if report.canary:
            ok = i.canary is not None and i.canary.ok
            took = f" {i.canary.elapsed_s:.1f}s" if i.canary else ""
            took += " (cached)" if i.canary and i.canary.cached else ""
            row.append(Text(("pass" if ok else "FAIL") + took, style="green" if ok else "bold red"))
        problems = Text(i.last_error or "", style="red")
        if i.drift:
            problems.append(
                ("; " if i.last_error else "") + "drift: " + "; ".join(i.drift_reasons), style="magenta"
            )
        row.append(problems)
        table.add_row(*row)
    for b in report.balancers:
        state = Text(b.state, style=_STATE_STYLE[b.state])
        url = urlsplit(b.url)
        port = url.port or (443 if url.scheme == "https" else 80)
        cells: list[str | Text] = [b.name, "balancer", str(port), state]
        # in flight: clients connected to nginx; req/s: through nginx (stub_status)
        cells += ["-"] * 4 + [_num(b.active_connections), "-", _num(b.requests_per_s, "{:.2f}"), "-"]
        cells += ["-"] * (int(report.deep) + int(report.canary))
        cells.append(Text("; ".join(e for e in (b.error, b.figures_error) if e), style="red"))
        table.add_row(*cells)
    return table


def balancer_lines(report: HealthReport) -> list[str]:
    """One compact line per balancer whose nginx figures were read (stub_status over SSH)."""
    return [f"balancer {b.name}: {b.active_connections} active connection(s), {b.requests_per_s:.2f} req/s "
            "(nginx stub_status)" for b in report.balancers
            if b.active_connections is not None and b.requests_per_s is not None]


def _build(inventory: Path | None, limit: str | None) -> SweepPlan:
    from llamactl.cli.inventory_arg import load
    from llamactl.health.sweep import plan_from_inventory
    from llamactl.inventory.select import limit as select_limit

    inv = load(inventory)
    hosts = {h.name for h in select_limit(inv, limit)}
    return plan_from_inventory(inv, hosts)


async def _once(plan: SweepPlan, options: SweepOptions) -> HealthReport:
    from llamactl.health.probe import make_client
    from llamactl.health.sweep import sweep

    async with make_client(len(plan.targets) + len(plan.balancers), options.timeout_s) as client:
        report, _ = await sweep(plan, options, client)
    return report


def status(
    inventory: Path | None = inventory_argument(),
    watch: bool = typer.Option(
        False, "--watch", "-w", help="Refresh live every health.interval_s until Ctrl-C, with sparklines of "
        "each instance's req/s and p95 over the last minutes."
    ),
    count: int | None = typer.Option(None, "--count", min=1, help="With --watch: stop after this many sweeps."),
    interval: float | None = typer.Option(
        None, "--interval", help="With --watch: seconds between sweeps (default: the inventory's health.interval_s)."
    ),
    history: float = typer.Option(
        5.0, "--history", help="With --watch: minutes of req/s and p95 the sparklines show."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the machine-readable report."),
    canary: bool = typer.Option(
        False, "--canary", help="Run a real small-image inference on every instance."
    ),
    deep: bool = typer.Option(False, "--deep", help="Add systemd state and restart count, and GPU temperature, "
                              "power and utilisation (over SSH)."),
    limit: str | None = typer.Option(
        None, "--limit", help="Only these hosts (comma-separated names or globs)."
    ),
    timeout: float | None = typer.Option(
        None, "--timeout", help="Per-probe timeout in seconds (default: the inventory's health.timeout_s)."
    ),
    keys: bool = typer.Option(False, "--keys", help="With inventory redis:, add the cluster-wide usage per API "
                              "key name (requests, refused, prompt and completion tokens)."),
    api_key_env: str = typer.Option(
        "LLAMACTL_API_KEY",
        "--api-key-env",
        help="Env var holding the canary's API key (unset: the inventory's first key).",
    ),
) -> None:
    """Show the health of every instance and balancer, probed concurrently.

    Exit code 0 only when everything is ready (and every canary passed, with --canary).

    Example: llamactl status inventory.yaml --watch --history 10
    """
    from llamactl.errors import UsageError
    from llamactl.health.sweep import SweepOptions

    if timeout is not None and timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {timeout:g}")
    if interval is not None and interval <= 0:
        raise UsageError(f"--interval must be positive, got {interval:g}")
    if history <= 0:
        raise UsageError(f"--history must be a positive number of minutes, got {history:g}")
    if not watch and (count is not None or interval is not None):
        raise UsageError("--count and --interval go with --watch")
    plan = _build(inventory, limit)
    assert plan.inventory is not None
    health = plan.inventory.health
    options = SweepOptions(
        timeout_s=timeout if timeout is not None else float(health.timeout_s),
        canary=canary,
        deep=deep,
        balancer_figures=True,
        api_key=os.environ.get(api_key_env) or _inventory_key(plan),
    )
    console = _console()
    if watch:
        from llamactl.cli.status_watch import watch as watch_loop

        every = interval if interval is not None else float(health.interval_s)
        report = asyncio.run(watch_loop(plan, options, every, console, as_json, count, history * 60))
    else:
        report = asyncio.run(_once(plan, options))
        watch_state = _watch_service(plan, options.timeout_s)
        redis = _redis_state(plan, options.timeout_s, keys)
        vip = _vip_state(plan, options.timeout_s)
        if as_json:
            extra: dict[str, object] = {k: v for k, v in (
                ("watch_service", watch_state), ("redis", None if redis is None else redis.to_dict()),
                ("vip", None if vip is None else vip.to_json())) if v is not None}
            typer.echo(json.dumps({**json.loads(report.to_json()), **extra}, indent=2) if extra
                       else report.to_json())
        else:
            if redis is not None:
                _print_redis(console, redis, keys)
            console.print(render_table(report))
            for line in balancer_lines(report):
                console.print(line, markup=False, highlight=False)
            if watch_state is not None:
                style = "green" if watch_state == "active" else "red"
                console.print(f"watch service on {plan.inventory.balancer.hosts[0].name}: {watch_state}",
                              style=style, markup=False)
            if vip is not None:
                console.print(_vip_line(vip), style="green" if vip.ok else "red", markup=False)
        if vip is not None and not vip.ok:
            raise typer.Exit(1)
    for problem in plan.problems:
        Console(stderr=True, no_color="NO_COLOR" in os.environ or None).print(
            f"warning: {problem}", markup=False
        )
    raise typer.Exit(0 if report.ok else 1)


def _watch_service(plan: SweepPlan, timeout_s: float) -> str | None:
    """With ``health.watch``, the state of the watch service on the balancer host (read over SSH)."""
    from llamactl.health.sweep import watch_service_state

    inv = plan.inventory
    return watch_service_state(inv, max(timeout_s, 5.0)) if inv is not None and inv.health.watch else None


def _redis_state(plan: SweepPlan, timeout_s: float, keys: bool) -> RedisState | None:
    """With inventory ``redis:``, its state read over SSH on its host (``llamactl.health.redis_state``)."""
    from llamactl.errors import UsageError
    from llamactl.health.redis_state import read_redis_state

    inv = plan.inventory
    if inv is None or inv.redis is None:
        if keys:
            raise UsageError("--keys needs the inventory's redis: section (usage per key is kept in Redis)")
        return None
    return read_redis_state(inv, timeout_s, keys)


def _print_redis(console: Console, redis: RedisState, keys: bool) -> None:
    console.print(redis.line(), style="green" if redis.answers else "bold red", markup=False)
    if not keys:
        return
    table = Table(title="usage per API key (cluster-wide, since Redis' data began)", title_justify="left")
    for name in ("key", "requests", "refused (429)", "prompt tokens", "completion tokens"):
        table.add_column(name, justify="left" if name == "key" else "right")
    for name, u in sorted(redis.usage.items()):
        table.add_row(name, str(u["requests"]), str(u["rejected"]), str(u["prompt_tokens"]),
                      str(u["completion_tokens"]))
    console.print(table)


def _vip_state(plan: SweepPlan, timeout_s: float) -> VipState | None:
    """With ``balancer.vip``: keepalived and the address on each balancer host (read over SSH)."""
    from llamactl.ops.vip import vip_state

    inv = plan.inventory
    return vip_state(inv, max(timeout_s, 5.0)) if inv is not None and inv.balancer.vip is not None else None


def _vip_line(vip: VipState) -> str:
    held = {0: "held by NO balancer host", 1: f"held by {''.join(vip.holders)}"}.get(
        len(vip.holders), f"held by {', '.join(vip.holders)} AT ONCE")
    hosts = ", ".join(f"{h.host} {h.keepalived}" for h in vip.hosts)
    return f"VIP {vip.address}: {held}; keepalived: {hosts}"


def _inventory_key(plan: SweepPlan) -> str | None:
    """The first API key the rendered env files would carry (the controller holds them, from its env)."""
    if plan.inventory is None or not plan.targets:
        return None
    try:
        from llamactl.inventory import expected_env

        first = plan.inventory.instances()[0]
        keys = str(expected_env(plan.inventory, first).get("LLAMACTL_API_KEYS", ""))
    except Exception:  # noqa: BLE001 - the key is a convenience; a missing one shows up as a 401 canary
        return None
    first_entry = next((k.strip() for k in keys.split(",") if k.strip()), None)
    if first_entry is None:
        return None
    from llamactl.state.keys import KeySpecError, parse_entry

    try:
        return parse_entry(first_entry, "key 1").key  # a named entry: name=... key=... rpm=...
    except KeySpecError:
        return None


def register(app: typer.Typer) -> None:
    app.command("status")(status)
