"""Fixtures for the lab's own tests: a lab of 3 real hosts under a name and subnet of its own,
so a developer's lab (10.203.0.0/24) and the e2e lab (10.214.0.0/24) can run at the same time."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llamactl.lab import core
from llamactl.lab.state import LabState
from tests.lab.labhelpers import skip_reason

NAME = "lt"
SUBNET = "10.213.0.0/24"


@pytest.fixture(scope="module")
def lab3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("lab3")
    core.down(d, NAME, say=lambda _m: None)  # leftovers of an interrupted run
    state = core.up(3, d, NAME, SUBNET, say=print)
    try:
        yield state
    finally:
        core.down(d, None, say=print)
