"""Server fixtures: the tiny real checkpoint (built once per session), ``llamactl serve`` subprocesses and a
real redis-server per module.

``LLAMACTL_TINY_CACHE=/some/dir`` reuses a checkpoint across sessions (it is deterministic for a seed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# One intra-op thread: on a shared 2-core machine OpenMP's spinning worker threads make the tiny model ~10x
# slower under load. Subprocesses inherit the variable; the in-process servers get set_num_threads below.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.redis_support import RedisServer, running

from ._support import ServeProcess, start_serve


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from llamactl.server.tiny import build_tiny_checkpoint

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    cached = os.environ.get("LLAMACTL_TINY_CACHE")
    if cached:
        out = Path(cached)
        if not (out / "config.json").exists():
            build_tiny_checkpoint(out)
        return out
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def serve_factory(tiny_checkpoint: Path, tmp_path: Path) -> Iterator[Any]:
    started: list[ServeProcess] = []

    def factory(env: dict[str, str] | None = None, *args: str) -> ServeProcess:
        sp = start_serve(tiny_checkpoint, tmp_path, env, *args)
        started.append(sp)
        return sp

    yield factory
    for sp in started:
        if sp.proc.poll() is None:
            sp.proc.kill()
            sp.proc.wait()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server per module, not per test: a module's servers (module scoped, slow to start) use it.

    Overrides the per-test one of tests/conftest.py; a test that stops it starts it again."""
    with running(tmp_path_factory.mktemp("redis")) as server:
        yield server
