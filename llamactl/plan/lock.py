"""The deploy lock and the audit log on the (first) balancer host: their commands and records. Pure.

The lock is a file created with the shell's noclobber (O_EXCL): of two concurrent writers exactly one
wins. Its content says who holds it, so a refusal can name the holder. ``llamactl.ops.lock`` runs these.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping

from llamactl.plan.command import Command, quote

LOCK_PATH = "/var/lib/llamactl/deploy.lock"
AUDIT_PATH = "/var/log/llamactl/audit.log"
TAKE = "take the deploy lock"
APPEND = "append to the audit log"


def lock_record(*, owner: str, since: str, command_line: str, version: str) -> str:
    """What the lock file holds: one JSON object naming its holder."""
    return json.dumps({"owner": owner, "since": since, "command": command_line, "version": version})


def take_command(record: str, path: str = LOCK_PATH) -> Command:
    """Create the lock file only if it does not exist (``set -C``); a non-zero exit means it is held."""
    script = f"mkdir -p {quote(posixpath.dirname(path))} && (set -C; printf '%s\\n' {quote(record)} > {quote(path)})"
    return Command.sh(script, TAKE)


def release_command(path: str = LOCK_PATH) -> Command:
    """Remove the lock file (also ``--force-unlock``'s first step)."""
    return Command.of("rm", "-f", path)


def audit_command(path: str = AUDIT_PATH) -> Command:
    """Append stdin to the audit log."""
    return Command.sh(f"mkdir -p {quote(posixpath.dirname(path))} && cat >> {quote(path)}", APPEND)


def describe(held: bytes) -> str:
    """What a lock file's content says about its holder, for messages: ``held by ... since ... (...)``."""
    try:
        owner = json.loads(held)
    except ValueError:
        return "held (unreadable lock file)"
    if not isinstance(owner, dict):
        return "held (unreadable lock file)"
    return f"held by {owner.get('owner')} since {owner.get('since')} ({owner.get('command')})"


def audit_line(*, time: str, who: str, command_line: str, version: str, result: Mapping[str, object]) -> str:
    """One audit log line (JSON, newline-terminated): who, when, what version, what changed where."""
    hosts = result.get("hosts", {})
    entry = {
        "time": time,
        "who": who,
        "command": command_line,
        "version": version,
        "release": result.get("release"),
        "ok": result.get("ok"),
        "changed": result.get("changed"),
        "changes": {h: v.get("changes") for h, v in hosts.items()} if isinstance(hosts, dict) else {},
    }
    return json.dumps(entry, sort_keys=True) + "\n"
