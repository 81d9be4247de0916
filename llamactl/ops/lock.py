"""The deploy lock and audit log, both on the (first) balancer host.

The lock is a file created with the shell's noclobber (O_EXCL): of two concurrent deploys exactly one
wins. It records who holds it, so a refusal can say so; ``--force-unlock`` removes a stale one.
``deploy`` and ``restart`` (rolling or all at once) hold it for their whole run; ``watch`` only reads it
(``holder``) and does not heal while someone holds it.
"""

from __future__ import annotations

import getpass
import json
import posixpath
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from llamactl import __version__
from llamactl.errors import LlamactlError
from llamactl.plan.command import Command, quote
from llamactl.remote.base import Executor

LOCK_PATH = "/var/lib/llamactl/deploy.lock"
AUDIT_PATH = "/var/log/llamactl/audit.log"


class LockHeld(LlamactlError):
    exit_code = 1


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def describe(held: bytes) -> str:
    """What a lock file's content says about its holder, for messages: ``held by ... since ... (...)``."""
    try:
        owner = json.loads(held)
    except ValueError:
        return "held (unreadable lock file)"
    if not isinstance(owner, dict):
        return "held (unreadable lock file)"
    return f"held by {owner.get('owner')} since {owner.get('since')} ({owner.get('command')})"


def holder(ex: Executor) -> str | None:
    """``None`` when the lock is free, else who holds it (see ``describe``). Reads only; takes nothing."""
    held = ex.read_bytes(LOCK_PATH)
    return None if held is None else describe(held)


def acquire(ex: Executor, command_line: str, *, force: bool = False) -> None:
    if force:
        ex.run(Command.of("rm", "-f", LOCK_PATH))
    info = json.dumps({"owner": _who(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command_line,
                       "version": __version__})
    script = (f"mkdir -p {quote(posixpath.dirname(LOCK_PATH))} && "
              f"(set -C; printf '%s\\n' {quote(info)} > {quote(LOCK_PATH)})")
    res = ex.run(Command.sh(script, "take the deploy lock"), check=False)
    if res.exit_code != 0:
        held = ex.read_bytes(LOCK_PATH)
        if held is None:
            raise LlamactlError(f"{ex.host}: cannot create the deploy lock {LOCK_PATH}: {res.stderr.strip()}")
        raise LockHeld(
            f"another deploy or restart is running: the lock {LOCK_PATH} on {ex.host} is {describe(held)}. "
            "If it is gone, re-run with --force-unlock."
        )


@contextmanager
def held(ex: Executor, command_line: str, *, force: bool = False) -> Iterator[None]:
    """Hold the lock for the body; released however the body ends (not when the process is killed)."""
    acquire(ex, command_line, force=force)
    try:
        yield
    finally:
        release(ex)


def release(ex: Executor) -> None:
    ex.run(Command.of("rm", "-f", LOCK_PATH), check=False)


def audit(ex: Executor, command_line: str, result: dict[str, object]) -> None:
    """Append one JSON line: who, when, what version, what changed. Never fails the deploy."""
    hosts = result.get("hosts", {})
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "who": _who(),
        "command": command_line,
        "version": __version__,
        "release": result.get("release"),
        "ok": result.get("ok"),
        "changed": result.get("changed"),
        "changes": {h: v.get("changes") for h, v in hosts.items()} if isinstance(hosts, dict) else {},
    }
    line = json.dumps(entry, sort_keys=True) + "\n"
    script = f"mkdir -p {quote(posixpath.dirname(AUDIT_PATH))} && cat >> {quote(AUDIT_PATH)}"
    ex.run(Command.sh(script, "append to the audit log"), check=False, stdin=line.encode())
