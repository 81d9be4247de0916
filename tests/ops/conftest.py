"""Fixtures for tests/ops."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from ops_support import Backend, TempNginx


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    made = [Backend("a", "127.0.0.1"), Backend("b", "127.0.0.2")]
    yield made
    for b in made:
        b.close()


@pytest.fixture
def temp_nginx(tmp_path: Path) -> Iterator[TempNginx]:
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    ngx = TempNginx(tmp_path / "nginx")
    yield ngx
    ngx.stop()
