"""Reading systemd state on a host: the pure parser of ``systemctl show`` output (--deep); the command
itself is built in ``llamactl.plan.units``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llamactl.plan.units import SHOW_PROPERTIES as PROPERTIES
from llamactl.plan.units import show_command

__all__ = ["PROPERTIES", "SystemdState", "parse_show", "show_command"]


@dataclass(frozen=True)
class SystemdState:
    unit: str
    active_state: str | None = None
    sub_state: str | None = None
    restarts: int | None = None
    error: str | None = None  # why the state could not be read

    def display(self) -> str:
        if self.error:
            return "?"
        restarts = "?" if self.restarts is None else str(self.restarts)
        return f"{self.active_state}/{self.sub_state} restarts={restarts}"


def parse_show(output: str, units: Sequence[str]) -> dict[str, SystemdState]:
    """Parse ``systemctl show`` output: ``Key=Value`` lines, one blank-line-separated block per unit.

    Blocks carry ``Id`` when asked for it; without it they are matched to ``units`` by position
    (systemctl prints them in argument order). A unit missing from the output gets an error.
    """
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in output.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition("=")
        if sep:
            current[key.strip()] = value.strip()
    if current:
        blocks.append(current)
    states: dict[str, SystemdState] = {}
    for position, block in enumerate(blocks):
        unit = block.get("Id") or (units[position] if position < len(units) else None)
        if unit is None:
            continue
        restarts = block.get("NRestarts")
        states[unit] = SystemdState(
            unit=unit,
            active_state=block.get("ActiveState"),
            sub_state=block.get("SubState"),
            restarts=int(restarts) if restarts is not None and restarts.isdigit() else None,
        )
    for unit in units:
        states.setdefault(unit, SystemdState(unit, error="not in systemctl output"))
    return {unit: states[unit] for unit in units}
