"""Fixtures shared by every test directory."""

from tests.labfixtures import deployed_lab, lab  # noqa: F401 - re-exported fixtures
