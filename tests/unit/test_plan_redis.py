"""Deploy's Redis planner (``llamactl.plan.redis``): pure plans from captured facts, plus its facts and
PING commands run for real (this machine's shell, a real redis-server) and the unit checked by systemd-analyze."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from llamactl.errors import RemoteCommandError
from llamactl.inventory import Inventory, load_inventory
from llamactl.plan import redis as plan
from llamactl.plan.deploy import Run, Upload
from llamactl.plan.render import render_redis_files
from llamactl.remote.local import LocalExecutor
from tests.redis_support import running

PASSWORD = "s3cret-Redis-pass-0123"
INV = """\
version: 1
cluster: lab
defaults:
  gpus: 0
  model: {{source: /srv/model}}
groups:
  cpu:
    hosts:
      node-1: {{address: 127.0.0.1}}
balancer:
  hosts:
    lb-01: {{address: 127.0.0.1}}
  listen: 8080
redis:
  port: {port}
  password: {{env: REDIS_PW}}
  config_path: {config}
"""

CAPTURED_FRESH = """\
systemd=yes
server=/usr/bin/redis-server
cli=yes
apt=yes
candidate=5:7.0.15-1~deb12u10
user=yes
unit.ActiveState=inactive
unit.UnitFileState=
"""


def inventory(tmp_path: Path, port: int = 6379, password: str = PASSWORD) -> Inventory:
    path = tmp_path / "inv.yaml"
    path.write_text(INV.format(port=port, config=tmp_path / "llamactl.conf"))
    return load_inventory(path, env={"REDIS_PW": password})


def converged(inv: Inventory) -> plan.RedisFacts:
    facts = plan.parse_facts(CAPTURED_FRESH)
    sums = {p: hashlib.sha256(f.content).hexdigest() for p, f in plan.desired_files(inv, facts).items()}
    return replace(facts, files=sums, active="active", enabled="enabled")


def test_parse_captured_facts() -> None:
    facts = plan.parse_facts(CAPTURED_FRESH + f"file=abc123  {plan.REDIS_UNIT_PATH}\n")
    assert facts.server == "/usr/bin/redis-server" and facts.cli and facts.apt and facts.user and facts.systemd
    assert facts.candidate == "5:7.0.15-1~deb12u10"
    assert facts.files == {plan.REDIS_UNIT_PATH: "abc123"}
    assert (facts.active, facts.enabled) == ("inactive", "")
    none = plan.parse_facts("server=\ncandidate=(none)\napt=yes\n")
    assert none.server is None and none.candidate is None and not none.systemd


def test_fresh_host_gets_config_unit_enable_start(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    p = plan.plan_redis(inv, plan.parse_facts(CAPTURED_FRESH))
    assert p.problems == []
    uploads = [s for s in p.steps if isinstance(s, Upload)]
    assert [(u.remote_path, u.mode, u.secret) for u in uploads] == [
        (plan.REDIS_UNIT_PATH, 0o644, False), (str(tmp_path / "llamactl.conf"), 0o600, True)]
    runs = [s.command.display() for s in p.steps if isinstance(s, Run)]
    assert runs == ["systemctl daemon-reload", f"systemctl enable {plan.REDIS_UNIT}",
                    f"systemctl start {plan.REDIS_UNIT}"]
    assert all(PASSWORD not in r for r in runs)


def test_converged_host_plans_nothing(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    p = plan.plan_redis(inv, converged(inv))
    assert (p.steps, p.changes, p.problems) == ([], [], [])


def test_changed_password_uploads_the_config_and_restarts(tmp_path: Path) -> None:
    facts = converged(inventory(tmp_path))
    p = plan.plan_redis(inventory(tmp_path, password="another-password-0123456"), facts)
    assert [s.remote_path for s in p.steps if isinstance(s, Upload)] == [str(tmp_path / "llamactl.conf")]
    assert [s.command.display() for s in p.steps if isinstance(s, Run)] == [f"systemctl restart {plan.REDIS_UNIT}"]


def test_missing_server_is_installed_with_apt(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    facts = replace(plan.parse_facts(CAPTURED_FRESH), server=None, cli=False, user=False)
    p = plan.plan_redis(inv, facts)
    first = p.steps[0]
    assert isinstance(first, Run)
    assert first.command.display() == ("DEBIAN_FRONTEND=noninteractive apt-get update && apt-get install -y "
                                       "--no-install-recommends redis-server")
    unit = next(s for s in p.steps if isinstance(s, Upload) and s.remote_path == plan.REDIS_UNIT_PATH)
    assert b"ExecStart=/usr/bin/redis-server -\n" in (unit.content or b"")


@pytest.mark.parametrize(("apt", "candidate", "why"), [
    (False, None, "no apt-get"),
    (True, None, "apt knows no redis-server package"),
])
def test_host_that_cannot_install_fails_preflight_with_the_command(
        tmp_path: Path, apt: bool, candidate: str | None, why: str) -> None:
    facts = replace(plan.parse_facts(CAPTURED_FRESH), server=None, apt=apt, candidate=candidate)
    p = plan.plan_redis(inventory(tmp_path), facts)
    assert p.steps == []
    expected = ("redis-server (with redis-cli and the redis user) is not installed and this host cannot install it "
                f"({why}); install it yourself, as root on lb-01: "
                "`apt-get update && apt-get install -y --no-install-recommends redis-server`")
    assert p.problems == [expected]


def test_no_systemd_is_a_problem(tmp_path: Path) -> None:
    facts = replace(plan.parse_facts(CAPTURED_FRESH), systemd=False)
    assert "systemd is not running" in plan.plan_redis(inventory(tmp_path), facts).problems[0]


def test_facts_command_on_this_machine(tmp_path: Path) -> None:
    """The real script on this machine's shell: it finds Debian's redis-server and reads file digests."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run scripts/bootstrap.sh")
    inv = inventory(tmp_path)
    conf = tmp_path / "llamactl.conf"
    conf.write_bytes(b"port 1\n")
    facts = plan.parse_facts(LocalExecutor().run(plan.facts_command(inv)).stdout)
    assert facts.server == shutil.which("redis-server")
    assert facts.cli and facts.apt and facts.user
    assert facts.files == {str(conf): hashlib.sha256(b"port 1\n").hexdigest()}


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    unit = tmp_path / plan.REDIS_UNIT
    unit.write_bytes(plan.render_unit(inv, shutil.which("redis-server") or plan.DEFAULT_SERVER).content)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_ping_command_against_a_real_redis(tmp_path: Path) -> None:
    """AUTH + PING with the password read from the rendered config: PONG; with a wrong one: a clear error.
    The password is never in the command line."""
    (tmp_path / "srv").mkdir()
    with running(tmp_path / "srv", PASSWORD) as server:
        inv = rendered(tmp_path, port=server.port)
        cmd = plan.ping_command(inv, timeout_s=2)
        assert PASSWORD not in cmd.shell()
        assert LocalExecutor().run(cmd).stdout.strip() == "PONG"
        wrong = rendered(tmp_path, port=server.port, password="wrong-password-0123456")
        with pytest.raises(RemoteCommandError) as caught:
            LocalExecutor().run(plan.ping_command(wrong, timeout_s=0.5))
        assert "Redis did not answer PONG" in str(caught.value) and "WRONGPASS" in str(caught.value)


def rendered(tmp_path: Path, **kw: Any) -> Inventory:
    """``inventory(tmp_path, **kw)`` with its Redis files written where they point (the password file)."""
    inv = inventory(tmp_path, **kw)
    for path, f in render_redis_files(inv).items():
        Path(path).write_bytes(f.content)
    return inv


def test_sync_redis_applies_the_plan_then_pings(tmp_path: Path) -> None:
    """The edge (``ops.redis``) through the recording executor: uploads, commands, the PING, in order;
    nothing printed or recorded carries the password. A dry run only reads."""
    from llamactl.ops.redis import sync_redis
    from llamactl.remote.recording import RecordingExecutor, Reply

    inv = inventory(tmp_path)
    facts = plan.facts_command(inv)

    def fresh() -> RecordingExecutor:
        return RecordingExecutor("lb-01", responses={facts.shell(): Reply(stdout=CAPTURED_FRESH)})

    dry = fresh()
    out = sync_redis(inv, dry, dry_run=True, say=lambda msg: None)
    assert [c.kind for c in dry.calls] == ["run", "read", "read"]  # facts, then the two files for the diff
    assert out.commands == ["systemctl daemon-reload", f"systemctl enable {plan.REDIS_UNIT}",
                            f"systemctl start {plan.REDIS_UNIT}"]
    assert [d.secret for d in out.diffs] == [False, True]
    real = fresh()
    out = sync_redis(inv, real, dry_run=False, say=lambda msg: None)
    assert [(u.path, u.mode) for u in real.uploads] == [(plan.REDIS_UNIT_PATH, 0o644),
                                                          (str(tmp_path / "llamactl.conf"), 0o600)]
    assert real.commands[1:4] == ["systemctl daemon-reload", f"systemctl enable {plan.REDIS_UNIT}",
                                  f"systemctl start {plan.REDIS_UNIT}"]
    assert out.changes[-1] == f"started {plan.REDIS_UNIT}"
    assert "redis-cli --no-auth-warning" in real.commands[-1]  # the PING comes last
    assert all(PASSWORD not in str(c) for c in real.calls + dry.calls)
