"""The deploy planner: desired state + a host's observed facts -> the steps that close the gap. Pure.

Everything is decided here from data: which files to upload, whether a release must be built, which
units to reload, enable, start or restart. The executor in ``llamactl.ops.deploy`` only carries it out.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from llamactl.plan.command import Command, join, quote
from llamactl.plan.facts import HostFacts

MIN_PYTHON = (3, 10)
MIN_FREE_BYTES = 3 * 1024**3  # a release venv with torch + transformers is ~1.2 GB (CPU) to ~6 GB (CUDA)
ENV_DIR = "/etc/llamactl"
MODEL_MANIFEST = ".llamactl-manifest.json"


@dataclass(frozen=True)
class Artifact:
    """A file the controller uploads as-is (a wheel, a model file)."""

    local_path: Path
    name: str  # path relative to its destination directory
    sha256: str
    size: int


@dataclass(frozen=True)
class Release:
    """What this controller deploys: its own wheel plus an optional wheelhouse for air-gapped hosts."""

    release_id: str
    wheel: Artifact
    wheelhouse: tuple[Artifact, ...] = ()


@dataclass(frozen=True)
class ModelUpload:
    files: tuple[Artifact, ...]
    manifest: dict[str, str]  # relative path -> sha256


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


Step = Union[Run, Upload]


@dataclass(frozen=True)
class InstanceAction:
    instance_id: str
    index: int
    unit: str
    url: str
    action: str  # "start" (not serving now) or "restart" (serving, inputs changed)
    why: str


@dataclass
class HostPlan:
    host: str
    problems: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    actions: list[InstanceAction] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> int:
        return len(self.changes)


def release_dir(install_dir: str, release_id: str) -> str:
    return posixpath.join(install_dir, "releases", release_id)


def preflight(facts: HostFacts, *, install_dir: str, gpus: list[int]) -> list[str]:
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


def pip_install_command(
    python: str,
    venv: str,
    wheel_path: str,
    *,
    index_url: str | None,
    extra_index_urls: list[str],
    find_links: list[str],
    no_index: bool,
    clone_from: str | None = None,
) -> str:
    """The shell line that builds a release venv; `.complete` marks it usable (a half-built one is redone).

    With ``clone_from`` (the active release), the new venv starts as a copy of it with its paths
    rewritten, so pip only installs what changed (usually just llamactl): an upgrade takes seconds
    instead of reinstalling torch. If that fails for any reason, a fresh venv is built instead.
    """
    pip = [posixpath.join(venv, "bin", "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if no_index:
        pip.append("--no-index")
    if index_url:
        pip += ["--index-url", index_url]
    for url in extra_index_urls:
        pip += ["--extra-index-url", url]
    for link in find_links:
        pip += ["--find-links", link]
    pip.append(f"{wheel_path}[server]")
    done = join(["touch", posixpath.join(venv, ".complete")])
    fresh = " && ".join([join(["rm", "-rf", venv]), join([python, "-m", "venv", venv]), join(pip), done])
    if clone_from is None:
        return fresh
    rewrite = (f"grep -rlI --null -F {quote(clone_from)} {quote(venv + '/bin')} | "
               f"xargs -0 -r sed -i {quote('s#' + clone_from + '#' + venv + '#g')}")
    # The copy already holds an llamactl of the same version number, which pip would keep: replace it
    # first (no deps), then let the normal install bring any dependency the new wheel needs.
    replace_self = [*pip[:-1], "--force-reinstall", "--no-deps", wheel_path]
    clone = " && ".join([join(["rm", "-rf", venv]), join(["cp", "-a", clone_from, venv]),
                         join(["rm", "-f", posixpath.join(venv, ".complete")]), rewrite, join(replace_self),
                         join(pip), done])
    return f"{{ {clone}; }} || {{ {fresh}; }}"


def plan_host(
    *,
    host: str,
    python: str,
    install_dir: str,
    gpus: list[int],
    instances: list[tuple[str, int, str, str]],  # (instance id, index, unit, url)
    files: dict[str, tuple[bytes, int]],  # rendered path -> (content, mode)
    file_digests: dict[str, str],  # rendered path -> sha256 of content
    facts: HostFacts,
    release: Release,
    pip_settings: dict[str, object],
    model_path: str | None,
    model_upload: ModelUpload | None,
    service_user: str = "root",
) -> HostPlan:
    plan = HostPlan(host=host)
    plan.problems = preflight(facts, install_dir=install_dir, gpus=gpus)
    if model_upload is None and model_path and model_path.startswith("/") and facts.model_present is False:
        plan.problems.append(f"model directory {model_path} does not exist on the host (set model.upload_from?)")
    if plan.problems:
        return plan

    wheels_dir = posixpath.join(install_dir, "wheels")
    wheelhouse_dir = posixpath.join(install_dir, "wheelhouse")
    rdir = release_dir(install_dir, release.release_id)
    need_release = release.release_id not in facts.releases
    dirs = [posixpath.join(install_dir, "releases"), ENV_DIR]

    if need_release:
        dirs += [wheels_dir, wheelhouse_dir]
        missing = [a for a in release.wheelhouse if facts.wheelhouse.get(a.name) != a.size]
        for art in missing:
            plan.steps.append(Upload(posixpath.join(wheelhouse_dir, art.name), "wheelhouse", local_path=art.local_path))
        if missing:
            plan.changes.append(f"uploaded {len(missing)} wheel(s) to the host's wheelhouse")
        wheel_remote = posixpath.join(wheels_dir, release.wheel.name)
        plan.steps.append(Upload(wheel_remote, "llamactl wheel", local_path=release.wheel.local_path))
        find_links = list(pip_settings.get("find_links", []))  # type: ignore[call-overload]
        if release.wheelhouse:
            find_links.insert(0, wheelhouse_dir)
        script = pip_install_command(
            python,
            rdir,
            wheel_remote,
            index_url=pip_settings.get("index_url"),  # type: ignore[arg-type]
            extra_index_urls=list(pip_settings.get("extra_index_urls", [])),  # type: ignore[call-overload]
            find_links=find_links,
            no_index=bool(pip_settings.get("no_index", False)),
            clone_from=release_dir(install_dir, facts.current) if facts.current in facts.releases else None,
        )
        plan.steps.append(Run(Command.sh(script, f"build release {release.release_id}"), "build release venv"))
        plan.changes.append(f"built release {release.release_id}")

    if model_upload is not None and model_path:
        current = (facts.model_manifest or {}).get("files", {})
        changed = [a for a in model_upload.files if current.get(a.name) != a.sha256]
        for art in changed:
            plan.steps.append(Upload(posixpath.join(model_path, art.name), "model file", local_path=art.local_path))
        if changed or facts.model_manifest is None:
            manifest = json.dumps({"files": model_upload.manifest}, sort_keys=True, indent=1).encode()
            plan.steps.append(Upload(posixpath.join(model_path, MODEL_MANIFEST), "model manifest", content=manifest))
            plan.changes.append(f"uploaded {len(changed)} changed model file(s) to {model_path}")

    if service_user != "root" and facts.user_exists is False:
        plan.steps.append(Run(Command.of(
            "useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/var/lib/llamactl",
            "--shell", "/usr/sbin/nologin", service_user), "create the service user"))
        plan.changes.append(f"created system user {service_user}")

    unit_changed = False
    changed_paths: set[str] = set()
    for path, (content, mode) in sorted(files.items()):
        if facts.files.get(path) == file_digests[path]:
            continue
        changed_paths.add(path)
        secret = mode & 0o077 == 0
        plan.steps.append(Upload(path, "config file", mode=mode, content=content, secret=secret))
        plan.changes.append(f"{'created' if facts.files.get(path) is None else 'updated'} {path}")
        if path.endswith(".service"):
            unit_changed = True

    wanted_env = {p for p in files if p.startswith(ENV_DIR + "/instance-")}
    stale = [p for p in facts.env_files if p not in wanted_env]
    for path in stale:
        index = path.rsplit("instance-", 1)[1].removesuffix(".env")
        unit = f"llamactl@{index}.service"
        plan.steps.append(
            Run(Command.sh(f"systemctl disable --now {quote(unit)} && rm -f {quote(path)}"), "remove stale instance")
        )
        plan.changes.append(f"stopped and removed instance {index} (no longer in the inventory)")

    if unit_changed or stale:
        plan.steps.append(Run(Command.of("systemctl", "daemon-reload"), "units changed"))
        plan.changes.append("reloaded systemd units")

    release_changed = facts.current != release.release_id
    if release_changed:
        link = posixpath.join(install_dir, "current")
        history = posixpath.join(install_dir, "releases", ".history")
        script = (
            f"ln -sfn {quote(rdir)} {quote(link + '.new')} && mv -T {quote(link + '.new')} {quote(link)}"
            f" && echo {quote(release.release_id)} >> {quote(history)}"
        )
        plan.steps.append(Run(Command.sh(script, "activate release"), "activate release"))
        plan.changes.append(f"activated release {release.release_id} (was {facts.current or 'none'})")

    to_enable = [unit for (_, _, unit, _) in instances if facts.units.get(unit, None) is None
                 or facts.units[unit].enabled != "enabled"]
    if to_enable:
        plan.steps.append(Run(Command.of("systemctl", "enable", *to_enable), "enable units"))
        plan.changes.append(f"enabled {', '.join(to_enable)}")

    for instance_id, slot, unit, url in instances:
        state = facts.units.get(unit)
        env_path = f"{ENV_DIR}/instance-{slot}.env"
        serving = state is not None and state.active in ("active", "activating", "reloading")
        if not serving:
            plan.actions.append(InstanceAction(instance_id, slot, unit, url, "start", "not running"))
            continue
        reasons = []
        if release_changed:
            reasons.append("new release")
        if unit_changed:
            reasons.append("unit changed")
        if env_path in changed_paths:
            reasons.append("settings changed")
        if reasons:
            plan.actions.append(InstanceAction(instance_id, slot, unit, url, "restart", ", ".join(reasons)))
    for act in plan.actions:
        plan.changes.append(f"{act.action} {act.unit} ({act.why})")
    if dirs and plan.steps:
        plan.steps.insert(0, Run(Command.of("mkdir", "-p", *dirs), "directories"))
    return plan
