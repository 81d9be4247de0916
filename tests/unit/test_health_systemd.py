"""The ``systemctl show`` command and its pure parser, on captured output (--deep)."""

from __future__ import annotations

from llamactl.health.systemd import SystemdState, parse_show, show_command

UNITS = ["llamactl@0.service", "llamactl@1.service", "llamactl@2.service"]

# systemd 252 output for three template instances: running, crash-looping, never started.
CAPTURED = """\
Id=llamactl@0.service
NRestarts=0
ActiveState=active
SubState=running

Id=llamactl@1.service
NRestarts=7
ActiveState=activating
SubState=auto-restart

Id=llamactl@2.service
NRestarts=0
ActiveState=inactive
SubState=dead
"""


def test_command_asks_for_every_unit_at_once() -> None:
    assert show_command(UNITS[:2]).shell() == (
        "systemctl show llamactl@0.service llamactl@1.service -p Id,ActiveState,SubState,NRestarts"
    )


def test_parses_one_block_per_unit() -> None:
    states = parse_show(CAPTURED, UNITS)
    assert states == {
        "llamactl@0.service": SystemdState("llamactl@0.service", "active", "running", 0),
        "llamactl@1.service": SystemdState("llamactl@1.service", "activating", "auto-restart", 7),
        "llamactl@2.service": SystemdState("llamactl@2.service", "inactive", "dead", 0),
    }
    assert states["llamactl@1.service"].display() == "activating/auto-restart restarts=7"


def test_blocks_without_id_match_units_by_position() -> None:
    text = "ActiveState=failed\nSubState=failed\nNRestarts=3\n\nActiveState=active\nSubState=running\nNRestarts=\n"
    states = parse_show(text, UNITS[:2])
    assert states["llamactl@0.service"] == SystemdState("llamactl@0.service", "failed", "failed", 3)
    assert states["llamactl@1.service"].restarts is None  # old systemd: empty NRestarts


def test_unit_missing_from_output_gets_an_error() -> None:
    states = parse_show(CAPTURED.split("\n\n")[0], UNITS[:2])
    assert states["llamactl@1.service"].error == "not in systemctl output"
    assert states["llamactl@1.service"].display() == "?"
