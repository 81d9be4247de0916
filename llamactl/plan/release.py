"""Releases on a host: what a release is made of, how its venv is built and how it is activated. Pure.

A release lives in ``<install_dir>/releases/<id>/`` (a venv, usable once ``.complete`` exists);
``<install_dir>/current`` points at the active one and ``releases/.history`` lists activations in order.
Deploy builds and activates; rollback activates an earlier one.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

from llamactl.plan.command import Command, join, quote


@dataclass(frozen=True)
class Artifact:
    """A file the controller uploads as-is (a wheel, a model file)."""

    local_path: Path
    name: str  # path relative to its destination directory
    sha256: str
    size: int


@dataclass(frozen=True)
class Release:
    """What this controller deploys: its own wheel plus an optional wheelhouse for air-gapped hosts, and the
    constraints (the versions CI tested) that every host's pip installs under."""

    release_id: str
    wheel: Artifact
    wheelhouse: tuple[Artifact, ...] = ()
    constraints: bytes | None = None


@dataclass(frozen=True)
class ModelUpload:
    files: tuple[Artifact, ...]
    manifest: dict[str, str]  # relative path -> sha256


def release_dir(install_dir: str, release_id: str) -> str:
    return posixpath.join(install_dir, "releases", release_id)


def activate_command(install_dir: str, release_id: str, description: str = "activate release") -> Command:
    """Point ``current`` at the release atomically (a new link renamed over the old) and record it."""
    link = posixpath.join(install_dir, "current")
    history = posixpath.join(install_dir, "releases", ".history")
    script = (
        f"ln -sfn {quote(release_dir(install_dir, release_id))} {quote(link + '.new')} && "
        f"mv -T {quote(link + '.new')} {quote(link)} && echo {quote(release_id)} >> {quote(history)}"
    )
    return Command.sh(script, description)


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
    extra: str = "server",
    constraints: str | None = None,
) -> str:
    """The shell line that builds a release venv; `.complete` marks it usable (a half-built one is redone).

    With ``clone_from`` (the active release), the new venv starts as a copy of it with its paths
    rewritten, so pip only installs what changed (usually just llamactl): an upgrade takes seconds
    instead of reinstalling torch. If that fails for any reason, a fresh venv is built instead.
    ``extra``: the wheel's extra to install with it (``server`` on server hosts, none for the controller).
    ``constraints``: a constraints file on the host (pip ``-c``): dependencies resolve to the tested versions.
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
    if constraints:
        pip += ["-c", constraints]
    pip.append(f"{wheel_path}[{extra}]" if extra else wheel_path)
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
