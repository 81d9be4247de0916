"""The deploy lock and audit log, both on the (first) balancer host.

The lock is a file created with the shell's noclobber (O_EXCL): of two concurrent deploys exactly one
wins. It records who holds it, so a refusal can say so; ``--force-unlock`` removes a stale one.
"""

from __future__ import annotations

import getpass
import json
import socket
import time

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


def acquire(ex: Executor, command_line: str, *, force: bool = False) -> None:
    if force:
        ex.run(Command.of("rm", "-f", LOCK_PATH))
    info = json.dumps({"owner": _who(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command_line,
                       "version": __version__})
    script = f"mkdir -p /var/lib/llamactl && (set -C; printf '%s\\n' {quote(info)} > {quote(LOCK_PATH)})"
    res = ex.run(Command.sh(script, "take the deploy lock"), check=False)
    if res.exit_code != 0:
        held = ex.read_bytes(LOCK_PATH)
        if held is None:
            raise LlamactlError(f"{ex.host}: cannot create the deploy lock {LOCK_PATH}: {res.stderr.strip()}")
        try:
            owner = json.loads(held)
            desc = f"held by {owner.get('owner')} since {owner.get('since')} ({owner.get('command')})"
        except ValueError:
            desc = "held (unreadable lock file)"
        raise LockHeld(
            f"another deploy is running: the lock {LOCK_PATH} on {ex.host} is {desc}. "
            "If that deploy is gone, re-run with --force-unlock."
        )


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
    script = f"mkdir -p /var/log/llamactl && cat >> {quote(AUDIT_PATH)}"
    ex.run(Command.sh(script, "append to the audit log"), check=False, stdin=line.encode())
