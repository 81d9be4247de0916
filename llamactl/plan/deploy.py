"""The deploy planner: desired state + a host's observed facts -> the steps that close the gap. Pure.

Everything is decided here from data: which files to upload, whether a release must be built, which
units to reload, enable, start or restart. ``plan_host`` runs a few named steps in order, each adding
to one ``HostPlan``; the executor in ``llamactl.ops.deploy`` only carries the plan out.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from llamactl.plan.command import Command, quote
from llamactl.plan.facts import HostFacts, gather_command
from llamactl.plan.release import ModelUpload, Release, activate_command, pip_install_command, release_dir
from llamactl.plan.render import ENV_DIR, RenderedFile, env_path, render_host_files

if TYPE_CHECKING:
    from llamactl.inventory import HostSpec, Instance, Inventory, PipSettings

MIN_PYTHON = (3, 10)
MIN_FREE_BYTES = 3 * 1024**3  # a release venv with torch + transformers is ~1.2 GB (CPU) to ~6 GB (CUDA)
MODEL_MANIFEST = ".llamactl-manifest.json"


@dataclass(frozen=True)
class Run:
    command: Command
    why: str


@dataclass(frozen=True)
class Upload:
    remote_path: str
    why: str
    mode: int = 0o644
    content: bytes | None = None
    local_path: Path | None = None
    secret: bool = False


DeployStep = Run | Upload


@dataclass(frozen=True)
class InstanceAction:
    instance_id: str
    index: int
    unit: str
    url: str
    action: Literal["start", "restart"]  # start: not serving now; restart: serving, inputs changed
    why: str


@dataclass(frozen=True)
class DesiredHost:
    """What one server host should run: everything ``plan_host`` compares with the host's facts."""

    name: str
    python: str
    install_dir: str
    gpus: tuple[int, ...]
    instances: tuple[Instance, ...]
    files: Mapping[str, RenderedFile]  # absolute path on the host -> content and mode
    release: Release
    pip: PipSettings
    model_path: str | None = None  # the model directory on the host, when model.source is a path
    model_upload: ModelUpload | None = None  # what to copy there (model.upload_from)
    service_user: str = "root"
    extra: str = "server"  # the wheel's extras installed into the release venv ("" = the controller only)
    services: tuple[str, ...] = ()  # other units of ours on the host: enabled, (re)started when anything changed

    @property
    def release_dir(self) -> str:
        return release_dir(self.install_dir, self.release.release_id)

    @property
    def wheels_dir(self) -> str:
        return posixpath.join(self.install_dir, "wheels")

    @property
    def wheelhouse_dir(self) -> str:
        return posixpath.join(self.install_dir, "wheelhouse")

    def digest(self, path: str) -> str:
        return hashlib.sha256(self.files[path].content).hexdigest()


@dataclass
class HostPlan:
    host: str
    problems: list[str] = field(default_factory=list)
    steps: list[DeployStep] = field(default_factory=list)
    actions: list[InstanceAction] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> int:
        return len(self.changes)

    def run(self, command: Command, why: str, change: str | None = None) -> None:
        self.steps.append(Run(command, why))
        if change:
            self.changes.append(change)


def desired_host(inv: Inventory, spec: HostSpec, release: Release, model_upload: ModelUpload | None) -> DesiredHost:
    """The desired state of ``spec`` from the inventory: rendered files, release, pip and model settings."""
    return DesiredHost(
        name=spec.name,
        python=spec.python,
        install_dir=spec.install_dir,
        gpus=tuple(spec.gpus),
        instances=tuple(spec.instances),
        files=render_host_files(inv, spec),
        release=release,
        pip=spec.pip,
        model_path=spec.model.source if spec.model.source.startswith("/") else None,
        model_upload=model_upload,
        service_user=spec.server.user,
        extra=",".join(("server", *spec.pip.extras)),
    )


def facts_command(desired: DesiredHost) -> Command:
    """The one round trip that reads everything ``plan_host`` needs from the host."""
    model = desired.model_path
    return gather_command(
        desired.python,
        install_dir=desired.install_dir,
        files=sorted(desired.files),
        wheelhouse_dir=desired.wheelhouse_dir,
        units=[i.unit for i in desired.instances] + list(desired.services),
        model_path=model,
        model_manifest=posixpath.join(model, MODEL_MANIFEST) if model and desired.model_upload else None,
        gpus=bool(desired.gpus),
        env_dir=ENV_DIR,
        user=desired.service_user,
    )


def preflight(facts: HostFacts, *, install_dir: str, gpus: tuple[int, ...] | list[int]) -> list[str]:
    problems: list[str] = []
    if facts.python < MIN_PYTHON:
        found = ".".join(map(str, facts.python))
        problems.append(f"python {found} found, llamactl needs >= {'.'.join(map(str, MIN_PYTHON))}")
    if not facts.venv:
        problems.append("python has no venv/ensurepip module (on Debian: apt-get install python3-venv)")
    if not facts.systemd:
        problems.append("systemd is not running as the init system (/run/systemd/system is missing)")
    if facts.free_bytes is not None and facts.free_bytes < MIN_FREE_BYTES:
        problems.append(
            f"only {facts.free_bytes / 1024**3:.1f} GiB free under {install_dir}, "
            f"need {MIN_FREE_BYTES / 1024**3:.0f} GiB"
        )
    if gpus:
        if facts.gpu_count is None:
            problems.append("the inventory gives this host GPUs but nvidia-smi is missing or failed")
        elif max(gpus) >= facts.gpu_count:
            problems.append(f"GPU index {max(gpus)} configured but nvidia-smi lists {facts.gpu_count} GPU(s)")
    return problems


def plan_host(desired: DesiredHost, facts: HostFacts) -> HostPlan:
    """The steps that bring the host from ``facts`` to ``desired``, and what to start or restart after."""
    plan = HostPlan(host=desired.name)
    plan.problems = preflight(facts, install_dir=desired.install_dir, gpus=desired.gpus)
    model = desired.model_path
    if desired.model_upload is None and model and facts.model_present is False:
        plan.problems.append(f"model directory {model} does not exist on the host (set model.upload_from?)")
    if plan.problems:
        return plan
    dirs = [posixpath.join(desired.install_dir, "releases"), ENV_DIR]
    if _build_release(plan, desired, facts):
        dirs += [desired.wheels_dir, desired.wheelhouse_dir]
    _upload_model(plan, desired, facts)
    _create_service_user(plan, desired, facts)
    changed_files = _upload_config(plan, desired, facts)
    unit_changed = any(p.endswith(".service") for p in changed_files)
    stale = _remove_stale_instances(plan, desired, facts)
    if unit_changed or stale:
        plan.run(Command.of("systemctl", "daemon-reload"), "units changed", "reloaded systemd units")
    release_changed = facts.current != desired.release.release_id
    if release_changed:
        plan.run(activate_command(desired.install_dir, desired.release.release_id), "activate release",
                 f"activated release {desired.release.release_id} (was {facts.current or 'none'})")
    to_enable = [u for u in [i.unit for i in desired.instances] + list(desired.services)
                 if facts.units.get(u) is None or facts.units[u].enabled != "enabled"]
    if to_enable:
        plan.run(Command.of("systemctl", "enable", *to_enable), "enable units", f"enabled {', '.join(to_enable)}")
    _instance_actions(plan, desired, facts, release_changed=release_changed, unit_changed=unit_changed,
                      changed_files=changed_files)
    if plan.steps:
        plan.steps.insert(0, Run(Command.of("mkdir", "-p", *dirs), "directories"))
    return plan


def _build_release(plan: HostPlan, desired: DesiredHost, facts: HostFacts) -> bool:
    """Upload the wheel (and the wheelhouse's missing wheels) and build the release venv, unless the host
    already has this release. Returns whether it builds one."""
    release = desired.release
    if release.release_id in facts.releases:
        return False
    missing = [a for a in release.wheelhouse if facts.wheelhouse.get(a.name) != a.size]
    for art in missing:
        plan.steps.append(Upload(posixpath.join(desired.wheelhouse_dir, art.name), "wheelhouse",
                                 local_path=art.local_path))
    if missing:
        plan.changes.append(f"uploaded {len(missing)} wheel(s) to the host's wheelhouse")
    wheel_remote = posixpath.join(desired.wheels_dir, release.wheel.name)
    plan.steps.append(Upload(wheel_remote, "llamactl wheel", local_path=release.wheel.local_path))
    constraints_remote = None
    if release.constraints is not None:
        constraints_remote = posixpath.join(desired.wheels_dir, f"constraints-{release.release_id}.txt")
        plan.steps.append(Upload(constraints_remote, "tested versions", content=release.constraints))
    find_links = list(desired.pip.find_links)
    if release.wheelhouse:
        find_links.insert(0, desired.wheelhouse_dir)
    script = pip_install_command(
        desired.python,
        desired.release_dir,
        wheel_remote,
        index_url=desired.pip.index_url,
        extra_index_urls=list(desired.pip.extra_index_urls),
        find_links=find_links,
        no_index=desired.pip.no_index,
        clone_from=release_dir(desired.install_dir, facts.current) if facts.current in facts.releases else None,
        extra=desired.extra,
        constraints=constraints_remote,
    )
    plan.run(Command.sh(script, f"build release {release.release_id}"), "build release venv",
             f"built release {release.release_id}")
    return True


def _upload_model(plan: HostPlan, desired: DesiredHost, facts: HostFacts) -> None:
    """Upload the model files whose hash differs from the host's manifest, then the manifest."""
    upload, model = desired.model_upload, desired.model_path
    if upload is None or not model:
        return
    current = (facts.model_manifest or {}).get("files", {})
    changed = [a for a in upload.files if current.get(a.name) != a.sha256]
    for art in changed:
        plan.steps.append(Upload(posixpath.join(model, art.name), "model file", local_path=art.local_path))
    if changed or facts.model_manifest is None:
        manifest = json.dumps({"files": upload.manifest}, sort_keys=True, indent=1).encode()
        plan.steps.append(Upload(posixpath.join(model, MODEL_MANIFEST), "model manifest", content=manifest))
        plan.changes.append(f"uploaded {len(changed)} changed model file(s) to {model}")


def _create_service_user(plan: HostPlan, desired: DesiredHost, facts: HostFacts) -> None:
    if desired.service_user != "root" and facts.user_exists is False:
        plan.run(Command.of("useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
                            "/var/lib/llamactl", "--shell", "/usr/sbin/nologin", desired.service_user),
                 "create the service user", f"created system user {desired.service_user}")


def _upload_config(plan: HostPlan, desired: DesiredHost, facts: HostFacts) -> set[str]:
    """Upload the rendered files whose content differs from the host's; returns their paths."""
    changed: set[str] = set()
    for path, rendered in sorted(desired.files.items()):
        if facts.files.get(path) == desired.digest(path):
            continue
        changed.add(path)
        secret = rendered.mode & 0o077 == 0
        plan.steps.append(Upload(path, "config file", mode=rendered.mode, content=rendered.content, secret=secret))
        plan.changes.append(f"{'created' if facts.files.get(path) is None else 'updated'} {path}")
    return changed


def _remove_stale_instances(plan: HostPlan, desired: DesiredHost, facts: HostFacts) -> list[str]:
    """Stop, disable and forget instances the host has an env file for but the inventory no longer lists."""
    wanted = {p for p in desired.files if p.startswith(ENV_DIR + "/instance-")}
    stale = [p for p in facts.env_files if p not in wanted]
    for path in stale:
        index = path.rsplit("instance-", 1)[1].removesuffix(".env")
        unit = f"llamactl@{index}.service"
        plan.run(Command.sh(f"systemctl disable --now {quote(unit)} && rm -f {quote(path)}"),
                 "remove stale instance", f"stopped and removed instance {index} (no longer in the inventory)")
    return stale


def _instance_actions(plan: HostPlan, desired: DesiredHost, facts: HostFacts, *, release_changed: bool,
                      unit_changed: bool, changed_files: set[str]) -> None:
    """Start what is not serving; restart what serves and whose release, unit or settings changed."""
    for inst in desired.instances:
        state = facts.units.get(inst.unit)
        serving = state is not None and state.active in ("active", "activating", "reloading")
        if not serving:
            plan.actions.append(InstanceAction(inst.id, inst.index, inst.unit, inst.url, "start", "not running"))
            continue
        reasons = [why for why, yes in (("new release", release_changed), ("unit changed", unit_changed),
                                        ("settings changed", env_path(inst.index) in changed_files)) if yes]
        if reasons:
            plan.actions.append(InstanceAction(inst.id, inst.index, inst.unit, inst.url, "restart",
                                               ", ".join(reasons)))
    for unit in desired.services:  # no URL: nothing to wait for
        state = facts.units.get(unit)
        if state is None or state.active not in ("active", "activating", "reloading"):
            plan.actions.append(InstanceAction(unit, -1, unit, "", "start", "not running"))
        elif release_changed or changed_files:
            plan.actions.append(InstanceAction(unit, -1, unit, "", "restart", "new release or files changed"))
    for act in plan.actions:
        plan.changes.append(f"{act.action} {act.unit} ({act.why})")
