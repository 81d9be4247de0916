"""systemd on a host: the commands that start, restart and inspect llamactl's units, and read their
journal. Pure; ``llamactl.ops.units`` runs the restart step, ``logs``, ``deploy`` and ``status --deep``
the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from llamactl.plan.command import Command

Verb = Literal["start", "restart"]
SHOW_PROPERTIES = ("Id", "ActiveState", "SubState", "NRestarts")


def reset_failed_command(units: Sequence[str]) -> Command:
    """Clear the units' failed state and start-rate counter: a unit that hit StartLimitBurst refuses
    ``start``/``restart``, and our deliberate restarts must not use up the budget that lets systemd bring
    a crashed server back (Restart=on-failure). Fails harmlessly for a unit that is not loaded yet."""
    return Command.of("systemctl", "reset-failed", *units)


def start_command(units: Sequence[str], verb: Verb = "restart", description: str = "") -> Command:
    """``systemctl start|restart UNIT...``: start what is not running, or restart what is."""
    return Command.of("systemctl", verb, *units, description=description or f"{verb} {' '.join(units)}")


def restart_commands(units: Sequence[str], verb: Verb = "restart",
                     description: str = "") -> tuple[Command, Command]:
    """The "(re)start these units" step: reset-failed (its failure ignored), then start or restart."""
    return reset_failed_command(units), start_command(units, verb, description)


def show_command(units: Sequence[str]) -> Command:
    """One ``systemctl show`` for every unit of a host; ``Id`` ties each block to its unit
    (parsed by ``llamactl.health.systemd.parse_show``)."""
    return Command.of("systemctl", "show", *units, "-p", ",".join(SHOW_PROPERTIES),
                      description="read llamactl unit states")


def journal_command(units: Sequence[str], lines: int, follow: bool = False, *, color: bool = False,
                    output: str = "short-iso") -> Command:
    """``journalctl -u U ... -n LINES --no-pager [-f]``: one command for every unit, merged by time.
    Colors only when asked (our terminal is a TTY): ``-f`` runs on a PTY, where journalctl colors."""
    argv = ["env", f"SYSTEMD_COLORS={int(color)}", "journalctl", "--no-pager", "-o", output, "-n", str(lines)]
    for unit in units:
        argv += ["-u", unit]
    if follow:
        argv.append("-f")
    return Command(tuple(argv), description="logs")
