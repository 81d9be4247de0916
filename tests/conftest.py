"""Fixtures shared by every test directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.labfixtures import deployed_lab, lab  # noqa: F401 - re-exported fixtures
from tests.redis_support import RedisServer, running


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of this test's own (tests/server/conftest.py overrides it with one per module)."""
    with running(tmp_path) as server:
        yield server
