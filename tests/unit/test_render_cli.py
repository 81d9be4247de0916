"""`llamactl validate` / `llamactl render` as a user runs them: exit codes, output, never a traceback."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "inventory.example.yaml"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("LLAMACTL_")}
    full.update(env or {})
    result = subprocess.run(
        [sys.executable, "-m", "llamactl", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=full,
        cwd=ROOT,
    )
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


def test_validate_example() -> None:
    result = run("validate", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"{EXAMPLE}: valid: cluster vision-prod, 3 hosts, 14 instances (14 GPU, 0 CPU), "
        "balancer lb-01 at http://10.0.0.2:80\n"
    )


def test_validate_json() -> None:
    result = run("validate", str(EXAMPLE), "--json")
    assert result.returncode == 0
    data = json.loads(result.stdout)
    assert data["valid"] is True and len(data["instances"]) == 14 and data["endpoint"] == "http://10.0.0.2:80"


def test_validate_invalid_prints_one_line_per_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        EXAMPLE.read_text()
        .replace("  base_port: 8000", "  base_port: 80000")
        .replace("    max_batch_size: 8 ", "    max_bach_size: 8 ")
        .replace("  server_name: vision.example.com", "  server_name: ${SOME_UNSET_VARIABLE_NAME}")
    )
    result = run("validate", str(bad))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 3, result.stderr  # long problems stay on one line each (no console wrapping)
    assert lines[0].startswith(f"{bad}:") and "defaults.base_port: found integer 80000" in lines[0]
    assert 'did you mean "max_batch_size"?' in lines[1]
    assert "SOME_UNSET_VARIABLE_NAME is not set" in lines[2]
    as_json = json.loads(run("validate", str(bad), "--json").stdout)
    assert as_json["valid"] is False and [p["path"] for p in as_json["problems"]] == [
        "defaults.base_port",
        "defaults.server.max_bach_size",
        "balancer.server_name",
    ]


def test_validate_missing_file_and_syntax_error(tmp_path: Path) -> None:
    result = run("validate", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "no such inventory file" in result.stderr
    (tmp_path / "syntax.yaml").write_text("version: 1\ncluster: [x\n")
    result = run("validate", str(tmp_path / "syntax.yaml"))
    assert result.returncode == 2 and result.stderr.startswith(
        f"{tmp_path / 'syntax.yaml'}:3:1: found invalid YAML"
    )


def test_render_writes_every_host(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run("render", str(EXAMPLE), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote 21 files for 4 hosts under {out}\n"  # the example turns alert rules on
    env = out / "gpu-03" / "etc" / "llamactl" / "instance-1.env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert "LLAMACTL_PORT=8001\n" in env.read_text()
    assert (out / "lb-01" / "etc" / "nginx" / "conf.d" / "llamactl.conf").is_file()
    assert (out / "lb-01" / "etc" / "prometheus" / "rules" / "llamactl.yml").is_file()
    assert (
        stat.S_IMODE((out / "gpu-01" / "etc" / "systemd" / "system" / "llamactl@.service").stat().st_mode)
        == 0o644
    )


def test_render_one_host_and_unknown_host(tmp_path: Path) -> None:
    result = run("render", str(EXAMPLE), "--out", str(tmp_path / "o"), "--host", "lb-01")
    assert result.returncode == 0 and sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        ".llamactl-render.json", "lb-01"]
    result = run("render", str(EXAMPLE), "--out", str(tmp_path / "o"), "--host", "nope")
    assert result.returncode == 2 and "--host nope: no such host" in result.stderr


def test_render_invalid_inventory_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\n")
    result = run("render", str(bad), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and not (tmp_path / "o").exists()
    assert result.stderr.splitlines() == [
        f'{bad}:1:1: found no "balancer", expected a "balancer" mapping',
        f'{bad}:1:1: found no "cluster", expected a cluster name like vision-prod',
        f'{bad}:1:1: found no "groups", expected a "groups" mapping',
    ]


SMALL = """\
version: 1
cluster: c1
defaults:
  model: {{source: /srv/model}}
groups:
  g:
    hosts:
{hosts}
balancer:
  hosts:
    lb: {{address: 10.9.0.100}}
"""


def small(path: Path, **gpus: int) -> str:
    hosts = "\n".join(f"      {name}: {{address: 10.9.0.{n}, gpus: {count}}}"
                      for n, (name, count) in enumerate(gpus.items(), 1))
    path.write_text(SMALL.format(hosts=hosts))
    return str(path)


def env_files(out: Path, host: str) -> list[str]:
    return sorted(p.name for p in (out / host / "etc" / "llamactl").glob("instance-*.env"))


def test_render_again_removes_what_it_no_longer_renders(tmp_path: Path) -> None:
    out, inv = tmp_path / "out", tmp_path / "inventory.yaml"
    assert run("render", small(inv, **{"gpu-01": 2, "gpu-02": 1}), "--out", str(out)).returncode == 0
    assert env_files(out, "gpu-01") == ["instance-0.env", "instance-1.env"]
    (out / "notes.txt").write_text("mine")  # the user's own files, in DIR and inside a host's tree
    (out / "gpu-01" / "etc" / "llamactl" / "local.conf").write_text("mine too")
    (out / "gpu-02" / "etc" / "extra").mkdir()
    (out / "gpu-02" / "etc" / "extra" / "keep.txt").write_text("mine as well")
    result = run("render", small(inv, **{"gpu-01": 1}), "--out", str(out))  # a GPU and a host taken out
    assert result.returncode == 0, result.stderr
    assert env_files(out, "gpu-01") == ["instance-0.env"]
    removed = [ln for ln in result.stdout.splitlines() if ln.startswith("removed ")]
    assert f"removed {out}/gpu-01/etc/llamactl/instance-1.env (no longer rendered)" in removed
    assert f"removed {out}/gpu-02/etc/llamactl/instance-0.env (no longer rendered)" in removed
    assert len(removed) == 3  # + gpu-02's unit file
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "gpu-01" / "etc" / "llamactl" / "local.conf").read_text() == "mine too"
    # gpu-02's rendered files went, and the directories they left empty; the user's file and its dirs stay
    assert sorted(str(p.relative_to(out / "gpu-02")) for p in (out / "gpu-02").rglob("*")) == [
        "etc", "etc/extra", "etc/extra/keep.txt"]
    manifest = json.loads((out / ".llamactl-render.json").read_text())
    assert sorted(manifest["hosts"]) == ["gpu-01", "lb"]
    assert "etc/llamactl/instance-1.env" not in manifest["hosts"]["gpu-01"]
    # rendering the same inventory again removes nothing
    again = run("render", str(inv), "--out", str(out))
    assert again.returncode == 0 and "removed" not in again.stdout


def test_render_one_host_replaces_only_that_hosts_part(tmp_path: Path) -> None:
    out, inv = tmp_path / "out", tmp_path / "inventory.yaml"
    assert run("render", small(inv, **{"gpu-01": 2, "gpu-02": 2}), "--out", str(out)).returncode == 0
    small(inv, **{"gpu-01": 1, "gpu-02": 1})
    result = run("render", str(inv), "--out", str(out), "--host", "gpu-01")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [f"removed {out}/gpu-01/etc/llamactl/instance-1.env (no longer rendered)"]
    assert env_files(out, "gpu-01") == ["instance-0.env"]
    assert env_files(out, "gpu-02") == ["instance-0.env", "instance-1.env"]  # not rendered this time: kept
    hosts = json.loads((out / ".llamactl-render.json").read_text())["hosts"]
    assert sorted(hosts) == ["gpu-01", "gpu-02", "lb"] and "etc/llamactl/instance-1.env" in hosts["gpu-02"]
    assert run("render", str(inv), "--out", str(out)).returncode == 0
    assert env_files(out, "gpu-02") == ["instance-0.env"]


def test_render_never_removes_what_the_manifest_does_not_own(tmp_path: Path) -> None:
    from llamactl.cli.render import remove_stale

    out = tmp_path / "out"
    (out / "h" / "etc").mkdir(parents=True)
    (out / "h" / "etc" / "a.env").write_text("ours")
    (out / "h" / "etc" / "dir").mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("not ours")
    removed, failed = remove_stale(out, {"h": ["etc/a.env", "../../victim.txt", str(victim), "etc/dir",
                                               "etc/missing.env"]})
    assert removed == [out / "h" / "etc" / "a.env"] and failed == {}
    assert victim.read_text() == "not ours" and (out / "h" / "etc" / "dir").is_dir()


def test_render_with_an_unreadable_manifest_removes_nothing(tmp_path: Path) -> None:
    out, inv = tmp_path / "out", tmp_path / "inventory.yaml"
    assert run("render", small(inv, **{"gpu-01": 2}), "--out", str(out)).returncode == 0
    (out / ".llamactl-render.json").write_text("{not json")
    result = run("render", small(inv, **{"gpu-01": 1}), "--out", str(out))
    assert result.returncode == 0 and "cannot read the render manifest" in result.stderr
    assert env_files(out, "gpu-01") == ["instance-0.env", "instance-1.env"]
    assert json.loads((out / ".llamactl-render.json").read_text())["hosts"]["gpu-01"]
