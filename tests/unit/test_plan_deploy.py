"""The deploy planner on synthetic host facts: assert on the generated steps and commands."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from llamactl.inventory import Instance, PipSettings
from llamactl.plan.command import Command
from llamactl.plan.deploy import DesiredHost, HostPlan, Run, Upload, plan_host
from llamactl.plan.facts import FactsError, HostFacts, UnitState, gather_command, parse_facts
from llamactl.plan.release import Artifact, ModelUpload, Release, pip_install_command
from llamactl.plan.render import RenderedFile

UNIT = "/etc/systemd/system/llamactl@.service"
ENV0 = "/etc/llamactl/instance-0.env"
ENV1 = "/etc/llamactl/instance-1.env"
FILES = {UNIT: (b"[Unit]\n", 0o644), ENV0: (b"LLAMACTL_PORT=8000\n", 0o600), ENV1: (b"LLAMACTL_PORT=8001\n", 0o600)}
DIGESTS = {p: hashlib.sha256(c).hexdigest() for p, (c, _) in FILES.items()}
INSTANCES = (Instance("h1", 0, None, "10.0.0.1", 8000), Instance("h1", 1, None, "10.0.0.1", 8001))
RELEASE = Release("0.1.0-abc", Artifact(Path("/w/llamactl-0.1.0-py3-none-any.whl"), "llamactl-0.1.0-py3-none-any.whl",
                                        "ab" * 32, 1000),
                  (Artifact(Path("/wh/torch.whl"), "torch.whl", "", 5), Artifact(Path("/wh/x.whl"), "x.whl", "", 7)))
PIP = PipSettings(no_index=True)

FRESH = HostFacts(python=(3, 11, 2), venv=True, free_bytes=50 * 1024**3, systemd=True,
                  files={p: None for p in FILES}, wheelhouse={}, releases=[], current=None,
                  model_manifest=None, model_present=False, units={})
CONVERGED = replace(
    FRESH, files=dict(DIGESTS), wheelhouse={"torch.whl": 5, "x.whl": 7}, releases=["0.1.0-abc"], current="0.1.0-abc",
    model_present=True,
    units={i.unit: UnitState("active", "enabled") for i in INSTANCES},
    env_files=[ENV0, ENV1],
)


def plan(facts: HostFacts, *, files: dict[str, tuple[bytes, int]] = FILES, gpus: tuple[int, ...] = (),
         release: Release = RELEASE, model_path: str | None = None, model_upload: ModelUpload | None = None,
         service_user: str = "root") -> HostPlan:
    desired = DesiredHost(name="h1", python="/usr/bin/python3", install_dir="/opt/llamactl", gpus=gpus,
                          instances=INSTANCES, files={p: RenderedFile(c, m) for p, (c, m) in files.items()},
                          release=release, pip=PIP, model_path=model_path, model_upload=model_upload,
                          service_user=service_user)
    return plan_host(desired, facts)


def commands(p: HostPlan) -> list[str]:
    return [s.command.display() for s in p.steps if isinstance(s, Run)]


def test_fresh_host_gets_everything() -> None:
    p = plan(FRESH)
    assert p.problems == []
    uploads = [s.remote_path for s in p.steps if isinstance(s, Upload)]
    assert uploads[:3] == ["/opt/llamactl/wheelhouse/torch.whl", "/opt/llamactl/wheelhouse/x.whl",
                           "/opt/llamactl/wheels/llamactl-0.1.0-py3-none-any.whl"]
    assert set(FILES) <= set(uploads)
    cmds = commands(p)
    assert cmds[0] == "mkdir -p /opt/llamactl/releases /etc/llamactl /opt/llamactl/wheels /opt/llamactl/wheelhouse"
    assert cmds[1] == (
        "rm -rf /opt/llamactl/releases/0.1.0-abc && /usr/bin/python3 -m venv /opt/llamactl/releases/0.1.0-abc && "
        "/opt/llamactl/releases/0.1.0-abc/bin/python -m pip install --quiet --disable-pip-version-check --no-index "
        "--find-links /opt/llamactl/wheelhouse "
        "'/opt/llamactl/wheels/llamactl-0.1.0-py3-none-any.whl[server]' && "
        "touch /opt/llamactl/releases/0.1.0-abc/.complete"
    )
    assert "systemctl daemon-reload" in cmds
    assert any(c.startswith("ln -sfn /opt/llamactl/releases/0.1.0-abc /opt/llamactl/current.new") for c in cmds)
    assert "systemctl enable llamactl@0.service llamactl@1.service" in cmds
    assert [(a.unit, a.action) for a in p.actions] == [("llamactl@0.service", "start"), ("llamactl@1.service", "start")]
    env_uploads = [s for s in p.steps if isinstance(s, Upload) and s.remote_path == ENV0]
    assert env_uploads[0].mode == 0o600 and env_uploads[0].secret


def test_converged_host_is_a_noop() -> None:
    p = plan(CONVERGED)
    assert p.steps == [] and p.actions == [] and p.changed == 0


def test_only_changed_instance_restarts() -> None:
    files = dict(FILES)
    files[ENV1] = (b"LLAMACTL_PORT=8001\nLLAMACTL_MAX_BATCH_SIZE=2\n", 0o600)
    p = plan(CONVERGED, files=files)
    assert [s.remote_path for s in p.steps if isinstance(s, Upload)] == [ENV1]
    assert "systemctl daemon-reload" not in commands(p)  # an env file is not a unit
    assert [(a.unit, a.action, a.why) for a in p.actions] == [("llamactl@1.service", "restart", "settings changed")]


def test_new_release_restarts_all_serving_and_reuses_wheelhouse() -> None:
    rel = replace(RELEASE, release_id="0.1.1-def")
    p = plan(CONVERGED, release=rel)
    assert not any(isinstance(s, Upload) and "wheelhouse" in s.remote_path for s in p.steps)
    assert [a.action for a in p.actions] == ["restart", "restart"]
    assert all(a.why == "new release" for a in p.actions)


def test_crashed_unit_is_started_not_restarted() -> None:
    units = dict(CONVERGED.units)
    units["llamactl@0.service"] = UnitState("failed", "enabled")
    p = plan(replace(CONVERGED, units=units))
    assert [(a.unit, a.action) for a in p.actions] == [("llamactl@0.service", "start")]


def test_stale_instance_is_removed() -> None:
    facts = replace(CONVERGED, env_files=[ENV0, ENV1, "/etc/llamactl/instance-2.env"])
    cmds = commands(plan(facts))
    assert cmds[1] == "systemctl disable --now llamactl@2.service && rm -f /etc/llamactl/instance-2.env"
    assert "systemctl daemon-reload" in cmds


@pytest.mark.parametrize(
    ("facts", "kw", "message"),
    [
        (replace(FRESH, python=(3, 8, 10)), {}, "python 3.8.10 found, llamactl needs >= 3.10"),
        (replace(FRESH, venv=False), {}, "python has no venv/ensurepip module (on Debian: apt-get install python3-venv)"),
        (replace(FRESH, systemd=False), {}, "systemd is not running as the init system (/run/systemd/system is missing)"),
        (replace(FRESH, free_bytes=1024**3), {}, "only 1.0 GiB free under /opt/llamactl, need 3 GiB"),
        (FRESH, {"gpus": (0, 1)}, "the inventory gives this host GPUs but nvidia-smi is missing or failed"),
        (replace(FRESH, gpu_count=2), {"gpus": (0, 3)}, "GPU index 3 configured but nvidia-smi lists 2 GPU(s)"),
        (FRESH, {"model_path": "/srv/models/x"},
         "model directory /srv/models/x does not exist on the host (set model.upload_from?)"),
    ],
)
def test_preflight_problems(facts: HostFacts, kw: dict[str, object], message: str) -> None:
    p = plan(facts, **kw)  # type: ignore[arg-type]
    assert p.problems == [message]
    assert p.steps == []


def test_model_upload_sends_only_changed_files() -> None:
    upload = ModelUpload((Artifact(Path("/m/a"), "a", "1" * 64, 1), Artifact(Path("/m/b"), "b", "2" * 64, 1)),
                         {"a": "1" * 64, "b": "2" * 64})
    facts = replace(CONVERGED, model_manifest={"files": {"a": "1" * 64, "b": "old"}})
    p = plan(facts, model_path="/srv/m", model_upload=upload)
    assert [s.remote_path for s in p.steps if isinstance(s, Upload)] == ["/srv/m/b", "/srv/m/.llamactl-manifest.json"]
    unchanged = replace(CONVERGED, model_manifest={"files": {"a": "1" * 64, "b": "2" * 64}})
    assert plan(unchanged, model_path="/srv/m", model_upload=upload).steps == []


def test_pip_settings_are_passed_through() -> None:
    line = pip_install_command("/usr/bin/python3", "/r", "/w.whl", index_url="https://pypi.example/simple",
                               extra_index_urls=["https://x/simple"], find_links=["/links"], no_index=False)
    assert "--index-url https://pypi.example/simple --extra-index-url https://x/simple --find-links /links" in line


def test_gather_script_runs_and_parses(tmp_path: Path) -> None:
    """The real fact-gathering script, run by a local python against a temp install dir."""
    (tmp_path / "releases" / "r1").mkdir(parents=True)
    (tmp_path / "releases" / "r1" / ".complete").touch()
    (tmp_path / "releases" / "half").mkdir()
    (tmp_path / "current").symlink_to(tmp_path / "releases" / "r1")
    (tmp_path / "wheelhouse").mkdir()
    (tmp_path / "wheelhouse" / "a.whl").write_bytes(b"12345")
    f = tmp_path / "f.conf"
    f.write_bytes(b"hello")
    cmd: Command = gather_command(sys.executable, install_dir=str(tmp_path), files=[str(f), str(tmp_path / "nope")],
                                  wheelhouse_dir=str(tmp_path / "wheelhouse"), units=[], model_path=str(tmp_path),
                                  model_manifest=None, gpus=False, env_dir=str(tmp_path))
    out = subprocess.run(list(cmd.argv), capture_output=True, text=True, check=True).stdout
    facts = parse_facts(out)
    assert facts.python[:2] == sys.version_info[:2]
    assert facts.releases == ["r1"] and facts.current == "r1"
    assert facts.wheelhouse == {"a.whl": 5}
    assert facts.files == {str(f): hashlib.sha256(b"hello").hexdigest(), str(tmp_path / "nope"): None}
    assert facts.model_present is True


@pytest.mark.parametrize("text", ["", "garbage", json.dumps({"python": [3]})])
def test_parse_facts_rejects_garbage(text: str) -> None:
    with pytest.raises(FactsError):
        parse_facts(text)


def test_service_user_is_created_once() -> None:
    p = plan(replace(CONVERGED, user_exists=False), service_user="llamactl")
    assert commands(p)[-1] == ("useradd --system --user-group --no-create-home --home-dir /var/lib/llamactl "
                               "--shell /usr/sbin/nologin llamactl")
    assert plan(replace(CONVERGED, user_exists=True), service_user="llamactl").steps == []
    assert plan(replace(CONVERGED, user_exists=None), service_user="root").steps == []


def test_upgrade_clones_the_active_release() -> None:
    p = plan(CONVERGED, release=replace(RELEASE, release_id="0.1.1-def"))
    build = next(c for c in commands(p) if "pip install" in c)
    assert build.startswith("{ rm -rf /opt/llamactl/releases/0.1.1-def && "
                            "cp -a /opt/llamactl/releases/0.1.0-abc /opt/llamactl/releases/0.1.1-def && ")
    assert "s#/opt/llamactl/releases/0.1.0-abc#/opt/llamactl/releases/0.1.1-def#g" in build
    assert "; } || { rm -rf /opt/llamactl/releases/0.1.1-def && /usr/bin/python3 -m venv" in build


def test_clone_script_really_relocates_a_venv(tmp_path: Path) -> None:
    """Run the clone branch for real on a local venv: the copy must use its own site-packages."""
    old, new = tmp_path / "r1", tmp_path / "r2"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(old)], check=True)
    (old / "bin" / "tool").write_text(f"#!{old}/bin/python\nimport sys; print(sys.prefix)\n")
    (old / "bin" / "tool").chmod(0o755)
    script = pip_install_command(sys.executable, str(new), "/nonexistent.whl", index_url=None, extra_index_urls=[],
                                 find_links=[], no_index=True, clone_from=str(old))
    clone_part = script.split(" && " + str(new) + "/bin/python -m pip")[0].removeprefix("{ ")
    subprocess.run(["sh", "-c", clone_part], check=True)
    out = subprocess.run([str(new / "bin" / "tool")], capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(new)


def test_upgrade_reinstalls_llamactl_even_with_the_same_version_number() -> None:
    p = plan(CONVERGED, release=replace(RELEASE, release_id="0.1.0-def"))
    build = next(c for c in commands(p) if "pip install" in c)
    assert ("--force-reinstall --no-deps /opt/llamactl/wheels/llamactl-0.1.0-py3-none-any.whl && "
            "/opt/llamactl/releases/0.1.0-def/bin/python -m pip install") in build


def test_hosts_install_under_the_tested_constraints() -> None:
    line = pip_install_command("/usr/bin/python3", "/r", "/w.whl", index_url=None, extra_index_urls=[],
                               find_links=[], no_index=False, constraints="/opt/llamactl/wheels/constraints-1.txt")
    assert "-m pip install --quiet --disable-pip-version-check -c /opt/llamactl/wheels/constraints-1.txt '/w.whl[server]'" in line
    from llamactl.ops.release import tested_constraints

    shipped = tested_constraints()
    assert shipped is not None and b"torch==2.13.0" in shipped  # the checkout's constraints.txt, as the wheel ships it


def test_a_release_with_constraints_uploads_them_and_builds_under_them() -> None:
    p = plan(FRESH, release=replace(RELEASE, constraints=b"torch==2.13.0\n"))
    up = [s for s in p.steps if isinstance(s, Upload) and s.remote_path.endswith(".txt")]
    assert [(s.remote_path, s.content) for s in up] == [("/opt/llamactl/wheels/constraints-0.1.0-abc.txt",
                                                         b"torch==2.13.0\n")]
    build = next(c for c in commands(p) if "pip install" in c)
    assert "-c /opt/llamactl/wheels/constraints-0.1.0-abc.txt" in build
