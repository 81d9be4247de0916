"""The one "(re)start these units" step, used by deploy, restart (rolling or all at once) and watch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from llamactl.plan.units import Verb, restart_commands

if TYPE_CHECKING:
    from llamactl.remote.base import Executor


def restart_units(executor: Executor, units: Sequence[str], verb: Verb = "restart", description: str = "") -> None:
    """reset-failed (its failure ignored: a unit not loaded yet), then ``systemctl start|restart``;
    raises RemoteCommandError when the (re)start fails."""
    reset, start = restart_commands(units, verb, description)
    executor.run(reset, check=False)
    executor.run(start)
