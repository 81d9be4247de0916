"""The deploy lock and the audit log, both on the (first) balancer host: the one place that takes the
lock and writes the audit line (the commands come from ``llamactl.plan.lock``).

``deploy``, ``restart`` (rolling or all at once) and ``rollback`` run inside ``guarded``: the lock held
for their whole run, one audit line at the end however it ends. ``watch`` only reads it (``holder``)
and does not heal while someone holds it.
"""

from __future__ import annotations

import getpass
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from llamactl import __version__
from llamactl.errors import LlamactlError
from llamactl.plan import lock as plan
from llamactl.plan.lock import AUDIT_PATH, LOCK_PATH, describe
from llamactl.remote.base import Executor

__all__ = ["AUDIT_PATH", "LOCK_PATH", "LockHeld", "acquire", "audit", "describe", "guarded", "holder", "release"]

Summary = Callable[[], Mapping[str, object]]  # the result to audit: {"release", "ok", "changed", "hosts"}


class LockHeld(LlamactlError):
    exit_code = 1


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def holder(ex: Executor) -> str | None:
    """``None`` when the lock is free, else who holds it (see ``describe``). Reads only; takes nothing."""
    held = ex.read_bytes(LOCK_PATH)
    return None if held is None else describe(held)


def acquire(ex: Executor, command_line: str, *, force: bool = False) -> None:
    if force:
        ex.run(plan.release_command(LOCK_PATH))
    record = plan.lock_record(owner=_who(), since=_now(), command_line=command_line, version=__version__)
    res = ex.run(plan.take_command(record, LOCK_PATH), check=False)
    if res.exit_code != 0:
        held = ex.read_bytes(LOCK_PATH)
        if held is None:
            raise LlamactlError(f"{ex.host}: cannot create the deploy lock {LOCK_PATH}: {res.stderr.strip()}")
        raise LockHeld(
            f"another deploy or restart is running: the lock {LOCK_PATH} on {ex.host} is {describe(held)}. "
            "If it is gone, re-run with --force-unlock."
        )


def release(ex: Executor) -> None:
    ex.run(plan.release_command(LOCK_PATH), check=False)


def audit(ex: Executor, command_line: str, result: Mapping[str, object]) -> None:
    """Append one JSON line: who, when, what version, what changed. Never fails the operation."""
    line = plan.audit_line(time=_now(), who=_who(), command_line=command_line, version=__version__, result=result)
    ex.run(plan.audit_command(AUDIT_PATH), check=False, stdin=line.encode())


@contextmanager
def guarded(ex: Executor, command_line: str, summary: Summary, *, force: bool = False) -> Iterator[None]:
    """Hold the lock for the body, then write ``summary()`` to the audit log and release the lock,
    however the body ends (not when the process is killed: ``--force-unlock`` is for that)."""
    acquire(ex, command_line, force=force)
    try:
        yield
    finally:
        try:
            audit(ex, command_line, summary())
        finally:
            release(ex)
