"""The lab's own tests run on the session's one lab (tests/labfixtures.py)."""

from __future__ import annotations

import pytest

from llamactl.lab.state import LabState
from tests.labfixtures import Lab


@pytest.fixture
def lab3(lab: Lab) -> LabState:
    """The hosts of the session's lab of 3 (``lab``), as the lab recorded them."""
    return lab.state
