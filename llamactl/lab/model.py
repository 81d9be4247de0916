"""DIR/model: the tiny checkpoint, built once per software version and copied on each ``lab up``.

Building it trains a few steps (about a minute on 2 cores); it is deterministic for a seed on the
same software, so a cache keyed by the builder's source and the torch/transformers versions is exact.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable
from importlib import metadata, util
from pathlib import Path

from llamactl.errors import LlamactlError
from llamactl.lab.wheelhouse import cache_lock

CACHE = Path("/var/cache/llamactl-lab/model")


def _cache_key(seed: int) -> str:
    spec = util.find_spec("llamactl.server.tiny")
    if spec is None or spec.origin is None:
        raise LlamactlError("cannot build the lab's tiny model: llamactl.server.tiny is not installed")
    h = hashlib.sha256(Path(spec.origin).read_bytes())
    for dist in ("torch", "transformers"):
        h.update(f"{dist}=={metadata.version(dist)}".encode())
    return f"seed{seed}-{h.hexdigest()[:16]}"


def provide(dest: Path, say: Callable[[str], None], seed: int = 0, cache: Path = CACHE) -> None:
    """Copy the cached checkpoint into ``dest``, building it into the cache first if needed."""
    built = cache / _cache_key(seed)
    with cache_lock(cache):
        if not built.is_dir():
            _build(built, cache, seed, say)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(built, dest)  # a copy, not links: nothing done to DIR/model reaches the cache
    say(f"model: tiny checkpoint (seed {seed}) in {dest}")


def _build(built: Path, cache: Path, seed: int, say: Callable[[str], None]) -> None:
    from llamactl.server.tiny import build_tiny_checkpoint

    say("model: building the tiny checkpoint (first time for this software version, about a minute)")
    t0 = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    try:
        build_tiny_checkpoint(tmp, seed=seed)
        tmp.rename(built)  # atomic: a half-built checkpoint is never used
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"model: built in {time.monotonic() - t0:.1f} s")
