"""The ``prometheus:`` section: defaults, exact errors, the rendered config (checked by the real promtool and
a real Prometheus binary's own flag parser) and the plan for each host state: install, preflight errors,
reload on new rules, restart on new flags, nothing on an unchanged host."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from llamactl.inventory import Inventory, load_inventory
from llamactl.plan import prometheus as prom
from llamactl.plan.deploy import Run, Upload
from tests.inventory_support import inventory_yaml, load_problems, load_text

BASE = inventory_yaml({"node-1": "10.0.0.11", "node-2": "10.0.0.12, gpus: 2"}, {"lb-01": "10.0.0.2"},
                      balancer="  listen: 8080\n",
                      sections="health:\n  alerts: {enabled: true}\n")  # prometheus: starts on line 17


def load(tmp_path: Path, extra: str, base: str = BASE) -> Inventory:
    return load_text(tmp_path, base + extra, env={})


def problems(tmp_path: Path, extra: str, base: str = BASE) -> list[str]:
    return load_problems(tmp_path, base + extra, env={})


def test_defaults(tmp_path: Path) -> None:
    p = load(tmp_path, "prometheus: {}\n").prometheus
    assert p is not None
    assert (p.port, p.scrape_interval_s, p.scrape_timeout_s, p.retention_time, p.retention_size) == (
        9090, 15, 10, "15d", None)
    assert (p.install, p.nginx_exporter, p.nginx_exporter_port, p.data_dir) == (
        True, True, 9113, "/var/lib/llamactl-prometheus")
    assert load(tmp_path, "").prometheus is None


def test_exact_errors(tmp_path: Path) -> None:
    assert problems(tmp_path, """\
prometheus:
  retention_time: 15 days
  retention_size: 10G
  evaluation_interval_s: 0
  data_dir: var/lib/p
  scrape_intervall_s: 3
""") == [
        'INV:18:19: prometheus.retention_time: found string "15 days", expected a Prometheus duration such as '
        '"15d", "12h" or "2w"',
        'INV:19:19: prometheus.retention_size: found string "10G", expected a size such as "512MB" or "10GB" '
        '(B, KB, MB, GB, TB, PB or EB)',
        "INV:20:26: prometheus.evaluation_interval_s: found integer 0, expected an integer from 1 to 3600",
        'INV:21:13: prometheus.data_dir: found string "var/lib/p", expected an absolute path of letters, digits '
        "and ._/@+=,~- (no spaces)",
        'INV:22:3: prometheus.scrape_intervall_s: found unknown key "scrape_intervall_s", did you mean '
        '"scrape_interval_s"?',
    ]


def test_cross_checks(tmp_path: Path) -> None:
    assert problems(tmp_path, """\
prometheus:
  port: 8080
  scrape_interval_s: 5
  scrape_timeout_s: 6
  nginx_exporter_port: 8089
""") == [
        "INV:18:9: prometheus.port: found port 8080, also used by balancer.listen on the balancer host, "
        "expected a free port",
        "INV:20:21: prometheus.scrape_timeout_s: found 6, expected at most scrape_interval_s (5)",
        "INV:21:24: prometheus.nginx_exporter_port: found port 8089, also used by balancer.stub_status_port on "
        "the balancer host, expected a free port",
    ]


def test_exporter_needs_stub_status(tmp_path: Path) -> None:
    base = BASE.replace("  listen: 8080\n", "  listen: 8080\n  stub_status_port: null\n")
    assert problems(tmp_path, "prometheus: {}\n", base) == [
        "INV:18:1: prometheus.nginx_exporter: found true with balancer.stub_status_port off, expected "
        "balancer.stub_status_port set (the exporter reads nginx stub_status) or nginx_exporter: false"]
    assert load(tmp_path, "prometheus: {nginx_exporter: false}\n", base).prometheus is not None


def test_port_of_an_instance_on_the_balancer_host(tmp_path: Path) -> None:
    base = BASE.replace("node-1: {address: 10.0.0.11}", "node-1: {address: 10.0.0.2, base_port: 9090}")
    assert problems(tmp_path, "prometheus: {}\n", base) == [
        "INV:17:1: prometheus.port: found port 9090, also used by instance node-1/0 on the balancer host, "
        "expected a free port"]


def test_config_scrapes_instances_balancer_and_loads_the_rules(tmp_path: Path) -> None:
    inv = load(tmp_path, "prometheus: {scrape_interval_s: 5, scrape_timeout_s: 4}\n")
    rules = b"groups: []\n"
    text = prom.config(inv, "lb-01", rules).decode()
    assert f"# rules sha256: {hashlib.sha256(rules).hexdigest()}" in text
    doc = yaml.safe_load(text)
    assert doc["global"]["scrape_interval"] == "5s" and doc["global"]["scrape_timeout"] == "4s"
    assert doc["rule_files"] == ["/etc/prometheus/rules/llamactl.yml"]
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    assert jobs["llamactl"]["file_sd_configs"][0]["files"] == ["/etc/prometheus/file_sd/llamactl.json"]
    assert jobs["llamactl-balancer"]["static_configs"][0]["targets"] == ["127.0.0.1:9113"]
    assert prom.config(inv, "lb-01", b"other\n") != prom.config(inv, "lb-01", rules)  # new rules: new config
    assert "rule_files" not in yaml.safe_load(prom.config(inv, "lb-01", None))


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus) not installed")
def test_promtool_accepts_the_rendered_config_with_its_rules(tmp_path: Path) -> None:
    """The real promtool reads the config and the rules file it names (paths moved into tmp_path)."""
    from llamactl.ops.prometheus import rules_content

    inv = load(tmp_path, "prometheus: {}\n")
    rules = rules_content(inv)
    assert rules is not None
    (tmp_path / "rules.yml").write_bytes(rules)
    (tmp_path / "targets.json").write_bytes(b"[]\n")
    text = prom.config(inv, "lb-01", rules).decode()
    text = text.replace("/etc/prometheus/rules/llamactl.yml", str(tmp_path / "rules.yml"))
    text = text.replace("/etc/prometheus/file_sd/llamactl.json", str(tmp_path / "targets.json"))
    (tmp_path / "prometheus.yml").write_text(text)
    out = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr and "rules found" in out.stdout + out.stderr


def test_unit_flags_are_what_prometheus_accepts(tmp_path: Path) -> None:
    inv = load(tmp_path, "prometheus: {retention_time: 30d, retention_size: 20GB, listen_address: 10.0.0.2}\n")
    unit = prom.files(inv, "lb-01", None)["/etc/systemd/system/llamactl-prometheus.service"].content.decode()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start == (
        "ExecStart=/usr/bin/prometheus --config.file=/etc/llamactl/prometheus/prometheus.yml "
        "--storage.tsdb.path=/var/lib/llamactl-prometheus --storage.tsdb.retention.time=30d "
        "--storage.tsdb.retention.size=20GB --web.listen-address=10.0.0.2:9090")
    exporter = prom.files(inv, "lb-01", None)["/etc/systemd/system/llamactl-nginx-exporter.service"].content
    assert b"-nginx.scrape-uri=http://127.0.0.1:8089/nginx_status -web.listen-address=127.0.0.1:9113" in exporter
    if shutil.which("systemd-analyze") and Path("/usr/bin/prometheus").exists():
        for name, content in prom.files(inv, "lb-01", None).items():
            if name.endswith(".service"):
                (tmp_path / Path(name).name).write_bytes(content.content)
                out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / Path(name).name)],
                                     capture_output=True, text=True, timeout=60, check=False)
                relevant = [line for line in out.stderr.splitlines() if Path(name).name in line]
                assert out.returncode == 0 and not relevant, out.stderr


def facts(inv: Inventory, *, binary: bool = True, exporter: bool = True, apt: bool = True, user: bool = True,
          same: bool = True, running: bool = True, rules: bytes | None = b"r\n",
          distro: str = "inactive") -> prom.PromFacts:
    wanted = prom.files(inv, "lb-01", rules)
    digests = {p: hashlib.sha256(f.content).hexdigest() if same else None for p, f in wanted.items()}
    state = prom.UnitState("active", "enabled") if running else prom.UnitState("inactive", "disabled")
    units = {u: state for u in prom.units(inv.prometheus)}  # type: ignore[arg-type]
    units["prometheus.service"] = prom.UnitState(distro, "disabled")
    return prom.PromFacts(binary, exporter, apt, user, digests, units)


def commands(plan: object) -> list[str]:
    return [s.command.display() for s in plan.steps if isinstance(s, Run)]  # type: ignore[attr-defined]


def test_unchanged_host_gets_no_step(tmp_path: Path) -> None:
    inv = load(tmp_path, "prometheus: {}\n")
    plan = prom.plan(inv, "lb-01", b"r\n", facts(inv))
    assert (plan.problems, plan.steps, plan.changes) == ([], [], [])


def test_new_rules_reload_and_never_restart(tmp_path: Path) -> None:
    inv = load(tmp_path, "prometheus: {}\n")
    plan = prom.plan(inv, "lb-01", b"new rules\n", facts(inv, rules=b"r\n"))
    assert plan.changes == ["updated /etc/llamactl/prometheus/prometheus.yml",
                            "reload llamactl-prometheus.service (config or rules changed)"]
    cmds = commands(plan)
    assert "systemctl reload llamactl-prometheus.service" in cmds
    assert not any("restart" in c or "daemon-reload" in c for c in cmds)
    assert any(c.startswith("if [ -x /usr/bin/promtool ]") for c in cmds)  # checked before the reload
    assert cmds.index("systemctl reload llamactl-prometheus.service") == len(cmds) - 1


def test_new_flags_restart(tmp_path: Path) -> None:
    old = load(tmp_path, "prometheus: {}\n")
    inv = load(tmp_path, "prometheus: {retention_time: 30d}\n")
    plan = prom.plan(inv, "lb-01", b"r\n", facts(old))
    assert "restart llamactl-prometheus.service (unit changed)" in plan.changes
    assert commands(plan)[-2:] == ["systemctl daemon-reload", "systemctl restart llamactl-prometheus.service"]


def test_fresh_host_installs_uploads_enables_starts(tmp_path: Path) -> None:
    inv = load(tmp_path, "prometheus: {}\n")
    plan = prom.plan(inv, "lb-01", b"r\n", facts(inv, binary=False, exporter=False, user=False, same=False,
                                                   running=False))
    assert plan.problems == []
    cmds = commands(plan)
    assert cmds[0].startswith("mkdir -p")
    assert "apt-get install -y --no-install-recommends prometheus prometheus-nginx-exporter" in cmds[1]
    assert "systemctl disable --now prometheus.service prometheus-nginx-exporter.service" in cmds[1]
    assert not any(c.startswith("useradd") for c in cmds)  # the package creates the user
    uploads = [s.remote_path for s in plan.steps if isinstance(s, Upload)]
    assert sorted(uploads) == ["/etc/llamactl/prometheus/prometheus.yml",
                               "/etc/systemd/system/llamactl-nginx-exporter.service",
                               "/etc/systemd/system/llamactl-prometheus.service"]
    assert cmds[-2:] == ["systemctl start llamactl-prometheus.service",
                         "systemctl start llamactl-nginx-exporter.service"]
    assert "systemctl enable llamactl-prometheus.service llamactl-nginx-exporter.service" in cmds


def test_missing_package_without_install_names_the_command(tmp_path: Path) -> None:
    inv = load(tmp_path, "prometheus: {install: false}\n")
    plan = prom.plan(inv, "lb-01", None, facts(inv, binary=False))
    assert plan.problems == ["prometheus not installed (prometheus.install is false): run `apt-get install -y "
                             "--no-install-recommends prometheus prometheus-nginx-exporter` on lb-01, or set "
                             "prometheus.install: true"]
    assert plan.steps == []
    no_apt = prom.plan(load(tmp_path, "prometheus: {nginx_exporter: false}\n"), "lb-01", None,
                       facts(load(tmp_path, "prometheus: {nginx_exporter: false}\n"), binary=False, apt=False))
    assert no_apt.problems == ["prometheus not installed and lb-01 has no apt-get: install Prometheus with the "
                               "host's package manager (binaries at /usr/bin/prometheus)"]


def test_the_distributions_own_prometheus_on_the_same_port_is_reported(tmp_path: Path) -> None:
    inv = load(tmp_path, "prometheus: {}\n")
    plan = prom.plan(inv, "lb-01", None, facts(inv, running=False, distro="active"))
    assert plan.problems == ["the distribution's prometheus.service runs on lb-01 and would hold port 9090: "
                             "`systemctl disable --now prometheus.service`, or set prometheus.port"]
    moved = load(tmp_path, "prometheus: {port: 9091}\n")
    assert prom.plan(moved, "lb-01", None, facts(moved, running=False, distro="active")).problems == []


def test_user_created_when_the_binary_came_another_way(tmp_path: Path) -> None:
    inv = load(tmp_path, "prometheus: {}\n")
    plan = prom.plan(inv, "lb-01", b"r\n", facts(inv, user=False))
    assert commands(plan)[0].startswith("useradd --system --user-group")


def test_facts_parser_round_trip() -> None:
    out = ("binary=yes\nexporter=no\napt=yes\nuser=yes\nfile=/etc/a.yml=abc\nfile=/etc/b=\n"
           "unit=llamactl-prometheus.service=active,enabled\nunit=prometheus.service=inactive,masked\n")
    f = prom.parse_facts(out)
    assert (f.binary, f.exporter, f.apt, f.user) == (True, False, True, True)
    assert f.files == {"/etc/a.yml": "abc", "/etc/b": None}
    assert f.units["llamactl-prometheus.service"] == prom.UnitState("active", "enabled")
    with pytest.raises(ValueError, match="lack"):
        prom.parse_facts("binary=yes\n")


def test_facts_command_runs_in_a_real_shell(tmp_path: Path) -> None:
    """The facts script through /bin/sh on this machine, parsed: it is valid shell and reads what exists."""
    there = tmp_path / "there.yml"
    there.write_text("x\n")
    cmd = prom.facts_command([str(there), str(tmp_path / "absent")], ["llamactl-no-such.service"], "/bin/sh")
    out = subprocess.run(list(cmd.argv), capture_output=True, text=True, timeout=30, check=True).stdout
    f = prom.parse_facts(out)
    assert f.binary is True
    assert f.files == {str(there): hashlib.sha256(b"x\n").hexdigest(), str(tmp_path / "absent"): None}
    assert f.units["llamactl-no-such.service"].active in ("inactive", "unknown")


def test_the_examples_commented_section_is_valid(tmp_path: Path) -> None:
    """inventory.example.yaml documents every key of `prometheus:` in a commented block: uncommented, it loads."""
    example = (Path(__file__).parents[2] / "inventory.example.yaml").read_text()
    lines = example.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# prometheus:"))
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        if line.startswith(("#   ", "# prometheus:")):
            block.append(line[2:])
    text = "\n".join(lines[:start] + block + lines[start + len(block):]) + "\n"
    path = tmp_path / "example.yaml"
    path.write_text(text)
    inv = load_inventory(path, env={"LLAMACTL_API_KEYS": "k" * 32})
    p = inv.prometheus
    assert p is not None and (p.retention_size, p.listen_address, p.nginx_exporter_port) == ("20GB", "10.0.0.2", 9113)
    assert set(type(p).model_fields) <= {line.split(":")[0].strip() for line in block}


def test_render_writes_the_prometheus_files_on_each_balancer_host(tmp_path: Path) -> None:
    from llamactl.plan.render import render_all

    inv = load(tmp_path, "prometheus: {}\n")
    files = render_all(inv)["lb-01"]
    rules = files["/etc/prometheus/rules/llamactl.yml"].content
    assert files["/etc/llamactl/prometheus/prometheus.yml"].content == prom.config(inv, "lb-01", rules)
    assert "/etc/systemd/system/llamactl-prometheus.service" in files
    assert not any("prometheus" in p for p in render_all(inv)["node-1"])
    assert "/etc/llamactl/prometheus/prometheus.yml" not in render_all(load(tmp_path, ""))["lb-01"]
