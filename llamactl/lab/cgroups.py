"""Per-host child cgroups.

Each host's ``unshare`` is moved into its own child cgroup before it unshares the cgroup namespace,
so the host's systemd sees that child as its root and creates init.scope/system.slice there rather
than at the machine's real roots. Works on cgroup v1/hybrid (one dir per hierarchy) and pure v2.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from llamactl.errors import LlamactlError

# v1 hierarchies systemd writes to; cpuset is left alone (a child needs cpus/mems set before use).
_V1_WANTED = {"name=systemd", "pids", "devices", "memory"}


def _own_cgroups() -> dict[str, str]:
    """Map hierarchy key (controllers of a v1 line, "" for v2) -> this process's cgroup path."""
    result: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        result[controllers] = path
    return result


def hierarchy_dirs() -> list[Path]:
    """The directories under which host cgroups are created: this process's own cgroup in every
    relevant hierarchy (children of it stay inside whatever limits apply to us)."""
    own = _own_cgroups()
    dirs: list[Path] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        fstype, options = rfields[0], rfields[2].split(",") if len(rfields) > 2 else []
        root, mountpoint = fields[3], fields[4]
        if fstype == "cgroup2":
            key = ""
        elif fstype == "cgroup":
            key = next((k for k in own if k and set(k.split(",")) <= set(options)), "")
            if not key or not set(key.split(",")) & _V1_WANTED:
                continue
        else:
            continue
        if key not in own:
            continue
        rel = own[key]
        if root != "/" and rel.startswith(root):
            rel = rel[len(root) :]
        dirs.append(Path(mountpoint) / rel.lstrip("/"))
    return dirs


def create(child: str) -> list[str]:
    made = []
    for parent in hierarchy_dirs():
        path = parent / child
        path.mkdir(exist_ok=True)
        made.append(str(path))
    return made


def remove(paths: list[str], timeout_s: float = 30.0) -> None:
    """Remove each cgroup and the cgroups systemd made inside it, deepest first. Emptied cgroups
    can stay busy for a moment after their last task died, so retry until ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    for top in paths:
        if not os.path.isdir(top):
            continue
        while True:
            try:
                for dirpath, _, _ in sorted(os.walk(top), key=lambda t: -t[0].count("/")):
                    os.rmdir(dirpath)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise LlamactlError(f"cannot remove cgroup {top}: {exc}") from exc
                time.sleep(0.05)


def find_leftovers(prefix: str) -> list[str]:
    """Cgroups named ``prefix*`` directly under our hierarchy dirs (crash repair without a state file)."""
    found = []
    for parent in hierarchy_dirs():
        if parent.is_dir():
            found += [str(p) for p in parent.iterdir() if p.is_dir() and p.name.startswith(prefix)]
    return found
