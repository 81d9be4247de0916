"""Prometheus on the balancer hosts (inventory ``prometheus:``). Pure: the files, the facts command and its
parser, and the plan that closes the gap.

Each balancer host runs the distribution's Prometheus as ``llamactl-prometheus.service`` (its own unit,
config and data directory, so a Prometheus the host already runs is left alone) scraping every instance
through the file_sd targets ``render`` writes, its own nginx through ``prometheus-nginx-exporter`` reading
stub_status on loopback, and itself; the rules of ``health.alerts`` are loaded. The config carries the
rules' digest, so new rules change the config and the plan reloads Prometheus (SIGHUP: no restart, no
lost samples). Unit changes (flags: port, retention) restart it; nothing changed, nothing is touched.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import yaml

from llamactl.plan.command import Command, quote
from llamactl.plan.deploy import HostPlan, Run, Upload
from llamactl.plan.render import RenderedFile, _hostport, _render
from llamactl.plan.stubstatus import STATUS_PATH

if TYPE_CHECKING:
    from llamactl.inventory import Inventory
    from llamactl.inventory.model import PrometheusSettings

UNIT = "llamactl-prometheus.service"
EXPORTER_UNIT = "llamactl-nginx-exporter.service"
UNIT_DIR = "/etc/systemd/system"
EXPORTER_BINARY = "/usr/bin/prometheus-nginx-exporter"
PROMTOOL = "/usr/bin/promtool"
PACKAGE = "prometheus"
EXPORTER_PACKAGE = "prometheus-nginx-exporter"
USER = "prometheus"
DISTRO_UNITS = ("prometheus.service", "prometheus-nginx-exporter.service")
BALANCER_JOB = "llamactl-balancer"
INSTANCES_JOB = "llamactl"


def _settings(inv: Inventory) -> PrometheusSettings:
    assert inv.prometheus is not None
    return inv.prometheus


def listen(p: PrometheusSettings) -> str:
    return _hostport(p.listen_address, p.port) if p.listen_address else f":{p.port}"


def local_url(p: PrometheusSettings) -> str:
    """Where Prometheus answers on its own host."""
    host = p.listen_address if p.listen_address and p.listen_address not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"http://{_hostport(host, p.port)}"


def url(p: PrometheusSettings, balancer_address: str) -> str:
    """Where a user points a browser (or the API) for the Prometheus of one balancer host."""
    host = p.listen_address if p.listen_address and p.listen_address not in ("0.0.0.0", "::") else balancer_address
    return f"http://{_hostport(host, p.port)}"


def config(inv: Inventory, balancer_host: str, rules: bytes | None) -> bytes:
    """prometheus.yml for one balancer host. ``rules``: the rules file it loads (its digest goes in the
    header, so new rules make a new config and a reload)."""
    p = _settings(inv)
    labels = {"cluster": inv.cluster}
    scrapes: list[dict[str, object]] = [
        {"job_name": INSTANCES_JOB, "metrics_path": "/metrics",
         "file_sd_configs": [{"files": [inv.balancer.prometheus_targets_path], "refresh_interval": "30s"}]},
    ]
    if p.nginx_exporter:
        scrapes.append({"job_name": BALANCER_JOB, "static_configs": [{
            "targets": [f"127.0.0.1:{p.nginx_exporter_port}"],
            "labels": {**labels, "host": balancer_host, "instance": f"{balancer_host}/nginx"}}]})
    scrapes.append({"job_name": "prometheus", "static_configs": [{
        "targets": [local_url(p).removeprefix("http://")], "labels": {**labels, "host": balancer_host}}]})
    doc: dict[str, object] = {
        "global": {
            "scrape_interval": f"{p.scrape_interval_s}s",
            "scrape_timeout": f"{p.scrape_timeout_s}s",
            "evaluation_interval": f"{p.evaluation_interval_s}s",
            "external_labels": {**labels, "prometheus": balancer_host},
        },
    }
    if rules is not None:
        doc["rule_files"] = [inv.health.alerts.rules_path]
    doc["scrape_configs"] = scrapes
    header = (f"# Prometheus of llamactl cluster {inv.cluster} on {balancer_host}; rendered by llamactl, "
              "do not edit.\n")
    if rules is not None:
        header += f"# rules sha256: {hashlib.sha256(rules).hexdigest()}\n"
    body: str = yaml.safe_dump(doc, sort_keys=False, width=120)
    return (header + body).encode()


def files(inv: Inventory, balancer_host: str, rules: bytes | None) -> dict[str, RenderedFile]:
    """Every file of the service on one balancer host: config and units."""
    p = _settings(inv)
    out = {
        p.config_path: RenderedFile(config(inv, balancer_host, rules), 0o644),
        posixpath.join(UNIT_DIR, UNIT): RenderedFile(
            _render("llamactl-prometheus.service.j2", cluster=inv.cluster, p=p, listen=listen(p)), 0o644),
    }
    if p.nginx_exporter:
        out[posixpath.join(UNIT_DIR, EXPORTER_UNIT)] = RenderedFile(_render(
            "llamactl-nginx-exporter.service.j2", cluster=inv.cluster, p=p, exporter_binary=EXPORTER_BINARY,
            stub_status_port=inv.balancer.stub_status_port, stub_status_path=STATUS_PATH), 0o644)
    return out


def units(p: PrometheusSettings) -> list[str]:
    return [UNIT] + ([EXPORTER_UNIT] if p.nginx_exporter else [])


def install_command(p: PrometheusSettings) -> str:
    """What installs the missing packages (also shown in the preflight error when ``install: false``)."""
    packages = [PACKAGE] + ([EXPORTER_PACKAGE] if p.nginx_exporter else [])
    return f"apt-get install -y --no-install-recommends {' '.join(packages)}"


# --- facts: one round trip, a pure parser -------------------------------------------------------------

@dataclass(frozen=True)
class UnitState:
    active: str
    enabled: str


@dataclass(frozen=True)
class PromFacts:
    binary: bool
    exporter: bool
    apt: bool
    user: bool
    files: dict[str, str | None] = field(default_factory=dict)  # path -> sha256 (None: absent)
    units: dict[str, UnitState] = field(default_factory=dict)


def facts_command(paths: list[str], unit_names: list[str], binary: str) -> Command:
    lines = [
        f"echo binary=$(test -x {quote(binary)} && echo yes || echo no)",
        f"echo exporter=$(test -x {quote(EXPORTER_BINARY)} && echo yes || echo no)",
        "echo apt=$(command -v apt-get >/dev/null 2>&1 && echo yes || echo no)",
        f"echo user=$(id -u {USER} >/dev/null 2>&1 && echo yes || echo no)",
    ]
    for path in paths:
        q = quote(path)
        lines.append(f"echo file={q}=$(sha256sum {q} 2>/dev/null | cut -d' ' -f1)")
    for unit in unit_names:
        q = quote(unit)
        lines.append(f"echo unit={q}=$(systemctl is-active {q} 2>/dev/null | head -n1),"
                     f"$(systemctl is-enabled {q} 2>/dev/null | head -n1)")
    return Command.sh("; ".join(lines), "read Prometheus facts")


def parse_facts(stdout: str) -> PromFacts:
    flags: dict[str, bool] = {}
    digests: dict[str, str | None] = {}
    states: dict[str, UnitState] = {}
    for line in stdout.splitlines():
        key, _, rest = line.strip().partition("=")
        if key in ("binary", "exporter", "apt", "user"):
            flags[key] = rest == "yes"
        elif key == "file":
            path, _, digest = rest.rpartition("=")
            digests[path] = digest or None
        elif key == "unit":
            name, _, state = rest.rpartition("=")
            active, _, enabled = state.partition(",")
            states[name] = UnitState(active or "unknown", enabled or "not-found")
    missing = [k for k in ("binary", "exporter", "apt", "user") if k not in flags]
    if missing:
        raise ValueError(f"Prometheus facts lack {', '.join(missing)}: {stdout.strip()[:200]!r}")
    return PromFacts(flags["binary"], flags["exporter"], flags["apt"], flags["user"], digests, states)


def host_facts_command(inv: Inventory, balancer_host: str) -> Command:
    p = _settings(inv)
    return facts_command(sorted(files(inv, balancer_host, None)), units(p) + [DISTRO_UNITS[0]], p.binary)


# --- the plan -------------------------------------------------------------------------------------------

def _running(state: UnitState | None) -> bool:
    return state is not None and state.active in ("active", "activating", "reloading")


def plan(inv: Inventory, balancer_host: str, rules: bytes | None, facts: PromFacts) -> HostPlan:
    """The steps that make one balancer host run the cluster's Prometheus as the inventory says."""
    p = _settings(inv)
    out = HostPlan(host=balancer_host)
    wanted = files(inv, balancer_host, rules)
    missing = [what for what, present in (("prometheus", facts.binary),
                                          ("prometheus-nginx-exporter", facts.exporter or not p.nginx_exporter))
               if not present]
    install = bool(missing)
    if install and not p.install:
        out.problems.append(f"{' and '.join(missing)} not installed (prometheus.install is false): run "
                            f"`{install_command(p)}` on {balancer_host}, or set prometheus.install: true")
    elif install and not facts.apt:
        out.problems.append(f"{' and '.join(missing)} not installed and {balancer_host} has no apt-get: install "
                            f"Prometheus {'and prometheus-nginx-exporter ' if p.nginx_exporter else ''}with the "
                            "host's package manager (binaries at " f"{p.binary}"
                            f"{', ' + EXPORTER_BINARY if p.nginx_exporter else ''})")
    distro = facts.units.get(DISTRO_UNITS[0])
    if p.port == 9090 and _running(distro) and not _running(facts.units.get(UNIT)):
        out.problems.append(f"the distribution's {DISTRO_UNITS[0]} runs on {balancer_host} and would hold port "
                            f"9090: `systemctl disable --now {DISTRO_UNITS[0]}`, or set prometheus.port")
    if out.problems:
        return out
    if install:
        # The package starts its own units (default config, port 9090): ours replace them.
        script = (f"DEBIAN_FRONTEND=noninteractive {install_command(p)} >/dev/null && "
                  f"systemctl disable --now {' '.join(DISTRO_UNITS)} 2>/dev/null; true")
        out.run(Command.sh(f"set -e; {script}", "install Prometheus"), "install Prometheus",
                f"installed {', '.join(missing)} (apt-get)")
    elif not facts.user:
        out.run(Command.of("useradd", "--system", "--user-group", "--no-create-home", "--home-dir", p.data_dir,
                           "--shell", "/usr/sbin/nologin", USER), "create the prometheus user",
                f"created system user {USER}")
    changed = [path for path in sorted(wanted) if facts.files.get(path) != _digest(wanted[path])]
    if changed:
        out.steps.insert(0, _mkdir(sorted({posixpath.dirname(path) for path in changed})))
    for path in changed:
        out.steps.append(Upload(path, "Prometheus file", mode=wanted[path].mode, content=wanted[path].content))
        out.changes.append(f"{'created' if facts.files.get(path) is None else 'updated'} {path}")
    if p.config_path in changed:
        out.run(Command.sh(f"if [ -x {PROMTOOL} ]; then {PROMTOOL} check config {quote(p.config_path)}; fi",
                           "promtool check config"), "check the Prometheus config")
    unit_changed = {posixpath.basename(path) for path in changed if path.startswith(UNIT_DIR + "/")}
    if unit_changed:
        out.run(Command.of("systemctl", "daemon-reload"), "units changed", "reloaded systemd units")
    to_enable = [u for u in units(p) if facts.units.get(u, UnitState("", "")).enabled != "enabled"]
    if to_enable:
        out.run(Command.of("systemctl", "enable", *to_enable), "enable units", f"enabled {', '.join(to_enable)}")
    for unit in units(p):
        state = facts.units.get(unit)
        if not _running(state):
            out.run(Command.of("systemctl", "start", unit), f"start {unit}", f"start {unit} (not running)")
        elif unit in unit_changed:
            out.run(Command.of("systemctl", "restart", unit), f"restart {unit}", f"restart {unit} (unit changed)")
        elif unit == UNIT and p.config_path in changed:
            out.run(Command.of("systemctl", "reload", unit), f"reload {unit}",
                    f"reload {unit} (config or rules changed)")
    return out


def _digest(f: RenderedFile) -> str:
    return hashlib.sha256(f.content).hexdigest()


def _mkdir(dirs: list[str]) -> Run:
    return Run(Command.of("mkdir", "-p", *dirs), "directories")


def remove_command() -> Command:
    """Without ``prometheus:``: stop and remove a service an earlier deploy installed (its data stays);
    prints ``removed`` if there was one."""
    paths = " ".join(quote(posixpath.join(UNIT_DIR, u)) for u in (UNIT, EXPORTER_UNIT))
    script = (f"if [ -e {quote(posixpath.join(UNIT_DIR, UNIT))} ]; then "
              f"systemctl disable --now {UNIT} {EXPORTER_UNIT} 2>/dev/null; rm -f {paths} && "
              "systemctl daemon-reload && echo removed; fi")
    return Command.sh(script, "remove the Prometheus service")
