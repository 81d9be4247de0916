"""The lab wheelhouse: every wheel `llamactl[server]` needs, for air-gapped lab hosts.

Downloaded once with the controller's pip into a shared cache (slow the first time) and hard-linked
into ``DIR/wheelhouse`` on each ``lab up`` (instant). The versions are the ones CI tested: the source
tree's ``constraints.txt`` constrains the download, so hosts install exactly them.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from llamactl.errors import LlamactlError

CACHE = Path("/var/cache/llamactl-lab/wheelhouse")
CONSTRAINTS = Path(__file__).resolve().parents[2] / "constraints.txt"  # in a source checkout
# The CPU build; an unpinned torch would pull a multi-GB CUDA build and its nvidia-* wheels.
TORCH_PIN = "torch==2.13.0+cpu"
# The hosts run /usr/bin/python3 (CPython 3.11, glibc x86_64); say so when the controller differs.
TARGET = ["--implementation", "cp", "--python-version", "3.11", "--abi", "cp311",
          "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
          "--platform", "manylinux_2_17_x86_64", "--platform", "linux_x86_64"]


def server_requirements() -> list[str]:
    """Base and ``server`` requirements of the installed llamactl, markers evaluated for the hosts."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # not a declared dependency; pip always vendors it
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[assignment,no-redef,unused-ignore]

    reqs = []
    for line in metadata.requires("llamactl") or []:
        req = Requirement(line)
        env = {"extra": "server", "platform_system": "Linux", "sys_platform": "linux",
               "python_version": "3.11", "platform_machine": "x86_64"}
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            reqs.append(str(req))
    return sorted(reqs)


# Requirements that apply on the hosts but that pip skips while downloading here: it evaluates
# `python_full_version` markers against this interpreter, even with --python-version. Debian 12's python3 (the lab
# hosts') is 3.11.2, and redis needs async-timeout below 3.11.3.
HOST_ONLY = ("async-timeout>=4.0.3",)


def _same_target() -> bool:
    return sys.version_info[:2] == (3, 11) and sys.platform == "linux" and os.uname().machine == "x86_64"


def pinned_constraints(tested: Path | None = CONSTRAINTS) -> str:
    """The download's constraints: the tested versions (when this is a source checkout) and the CPU torch."""
    text = tested.read_text() if tested is not None and tested.is_file() else ""
    return text + ("" if not text or text.endswith("\n") else "\n") + TORCH_PIN + "\n"


def ensure_cache(reqs: list[str], say: Callable[[str], None], cache: Path = CACHE,
                 tested: Path | None = CONSTRAINTS) -> Path:
    """Fill the cache with wheels for ``reqs`` unless a stamp says it already holds exactly them."""
    pins = pinned_constraints(tested)
    stamp_text = "\n".join(reqs) + "\n" + pins
    stamp = cache / ".requirements"
    if stamp.exists() and stamp.read_text() == stamp_text and any(cache.glob("*.whl")):
        say(f"wheelhouse: cached in {cache}")
        return cache
    if pins == TORCH_PIN + "\n":
        say("wheelhouse: no constraints.txt (not a source checkout): newest versions within llamactl's ranges")
    cache.mkdir(parents=True, exist_ok=True)
    constraints = cache / ".constraints.txt"
    constraints.write_text(pins)
    argv = [sys.executable, "-m", "pip", "download", "--dest", str(cache), "--only-binary=:all:",
            "--progress-bar", "off", "-c", str(constraints), *([] if _same_target() else TARGET), *reqs]
    say(f"wheelhouse: downloading {len(reqs)} requirements and their dependencies into {cache} (first time only)")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    saved = 0
    assert proc.stdout is not None
    for line in proc.stdout:  # pip's own lines are kept for an error report, not shown
        line = line.rstrip()
        tail = [*tail[-20:], line]
        saved += line.lstrip().startswith(("Saved", "File was already downloaded"))
    if proc.wait() != 0:
        raise LlamactlError("wheelhouse: `pip download` failed:\n  " + "\n  ".join(tail))
    stamp.write_text(stamp_text)
    say(f"wheelhouse: {saved} wheels downloaded")
    return cache


@contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """Serialise cache fills between concurrent `lab up`s (parallel test runs)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / f".{cache.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def populate(dest: Path, say: Callable[[str], None], cache: Path = CACHE) -> int:
    """Make ``dest`` hold every cached wheel (hard links, copies across filesystems). Returns the count."""
    with cache_lock(cache):
        ensure_cache(server_requirements() + list(HOST_ONLY), say, cache)
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    for wheel in sorted(cache.glob("*.whl")):
        target = dest / wheel.name
        if not target.exists() or target.stat().st_size != wheel.stat().st_size:
            target.unlink(missing_ok=True)
            try:
                os.link(wheel, target)
            except OSError:
                shutil.copy2(wheel, target)
        count += 1
    say(f"wheelhouse: {count} wheels in {dest}")
    return count

