"""The artifacts a deploy ships: the controller's own wheel, the wheelhouse, the model files.

The wheel is built once per source state and cached, so a no-op redeploy does not rebuild it.
The release id is ``<version>-<first 10 hex of the wheel's sha256>``: a code change without a version
bump still gets its own release directory on the hosts.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from llamactl import __version__
from llamactl.errors import UsageError
from llamactl.plan.release import Artifact, ModelUpload, Release

CACHE_DIR = Path(os.environ.get("LLAMACTL_CACHE_DIR", Path.home() / ".cache" / "llamactl"))
SKIP_PARTS = {"__pycache__", ".git", ".mypy_cache", ".pytest_cache", ".ruff_cache"}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _source_root() -> Path | None:
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "llamactl").is_dir() else None


def _source_digest(root: Path) -> str:
    h = hashlib.sha256()
    paths = [root / "pyproject.toml", root / "README.md"]
    for top in ("llamactl", "templates"):
        paths += sorted(p for p in (root / top).rglob("*") if p.is_file() and not SKIP_PARTS & set(p.parts))
    for p in paths:
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_wheel(explicit: Path | None = None) -> Path:
    """Return the wheel of this exact llamactl: the given one, or built from the source tree (cached)."""
    if explicit is not None:
        if not explicit.is_file() or explicit.suffix != ".whl":
            raise UsageError(f"--wheel {explicit}: not a wheel file")
        return explicit
    root = _source_root()
    if root is None:
        raise UsageError(
            "cannot build llamactl's wheel: this installation has no source tree; pass --wheel PATH to the wheel"
        )
    out = CACHE_DIR / "wheels" / _source_digest(root)
    existing = sorted(out.glob("llamactl-*.whl"))
    if existing:
        return existing[0]
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), str(root)],
        capture_output=True,
        text=True,
    )
    built = sorted(out.glob("llamactl-*.whl"))
    if proc.returncode != 0 or not built:
        raise UsageError(f"building llamactl's wheel failed:\n{proc.stderr.strip()[-2000:]}")
    return built[0]


def make_release(wheel: Path, wheelhouse: Path | None, extras: tuple[str, ...] = ()) -> Release:
    """The release of ``wheel`` (with a wheelhouse's wheels); ``extras`` (pip.extras) name a release venv of
    their own: its id ends in them, so adding or dropping one builds a new venv rather than reusing the last."""
    digest = sha256_file(wheel)
    art = Artifact(wheel, wheel.name, digest, wheel.stat().st_size)
    house: tuple[Artifact, ...] = ()
    if wheelhouse is not None:
        if not wheelhouse.is_dir():
            raise UsageError(f"pip.wheelhouse {wheelhouse}: not a directory")
        wheels = [p for p in sorted(wheelhouse.iterdir())
                  if p.is_file() and p.suffix in (".whl", ".gz", ".zip") and not p.name.startswith("llamactl-")]
        digests = cached_sha256(wheels)  # hosts fetch wheels from peers and check them by digest
        house = tuple(Artifact(p, p.name, digests[p], p.stat().st_size) for p in wheels)
    tag = "".join(f"+{name}" for name in extras)
    return Release(f"{__version__}-{digest[:10]}{tag}", art, house, tested_constraints())


def tested_constraints() -> bytes | None:
    """The constraints file shipped in this llamactl (a checkout's constraints.txt; package data in a wheel):
    hosts install the versions CI tested. None when it is missing (a build that did not include it)."""
    path = Path(__file__).resolve().parents[1] / "constraints.txt"
    try:
        return path.read_bytes()
    except OSError:
        return None


def model_upload(local_dir: Path) -> ModelUpload:
    """Hash a local model directory (sizes+mtimes cached, so an unchanged 20 GB model is not re-read)."""
    if not local_dir.is_dir():
        raise UsageError(f"model.upload_from {local_dir}: not a directory")
    paths = [p for p in sorted(local_dir.rglob("*"))
             if p.is_file() and not SKIP_PARTS & set(p.parts) and p.name != ".llamactl-manifest.json"]
    digests = cached_sha256(paths)
    files: list[Artifact] = []
    manifest: dict[str, str] = {}
    for p in paths:
        rel = p.relative_to(local_dir).as_posix()
        files.append(Artifact(p, rel, digests[p], p.stat().st_size))
        manifest[rel] = digests[p]
    if not files:
        raise UsageError(f"model.upload_from {local_dir}: the directory is empty")
    return ModelUpload(tuple(files), manifest)


def cached_sha256(paths: list[Path]) -> dict[Path, str]:
    """sha256 of each file, cached by (size, mtime) so an unchanged 20 GB model or wheelhouse is not re-read."""
    cache_path = CACHE_DIR / "model-hashes.json"
    try:
        cache: dict[str, list[object]] = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    out: dict[Path, str] = {}
    dirty = False
    for p in paths:
        st = p.stat()
        key = str(p.resolve())
        hit = cache.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            out[p] = str(hit[2])
        else:
            out[p] = sha256_file(p)
            cache[key] = [st.st_size, st.st_mtime_ns, out[p]]
            dirty = True
    if dirty:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_text(json.dumps(cache))
        except OSError:
            pass
    return out
