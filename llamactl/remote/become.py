"""Privilege escalation for a non-root SSH user (``ssh.become``): the wire form of commands and the
small root-side scripts that install and read files, all through passwordless ``sudo -n``.

Everything sent to the host is an argv joined by ``shlex`` in ``wire`` and nowhere else; the scripts
below take their paths as positional parameters, never spliced into the script text.
"""

from __future__ import annotations

from llamactl.errors import ConnectError
from llamactl.plan.command import Command

# timeout(1) sends TERM, then KILL after this long; it runs inside sudo, as root, so it may signal
# everything the command started (a user's timeout could not kill root's processes).
KILL_AFTER_S = 2.0

# Exit code of the read script when the file does not exist (cat itself exits 0 or 1 only).
MISSING_EXIT_CODE = 3

# `sudo -n` with a user name or uid 0 needs no sudo at all; echo "root" says so.
PROBE = Command.sh('if [ "$(id -u)" = 0 ]; then echo root; else sudo -n -- true; fi',
                   description="check passwordless sudo")

# Run as root: $1 the staged upload (in the SSH user's private directory), $2 the target, $3 the
# octal mode, $4 a temp name next to the target. umask 077 while moving: if the move crosses file
# systems (a copy), the new file is never readable by others before it gets its owner and mode.
# mv -T: never move *into* a directory that happens to have the target's name.
INSTALL_SCRIPT = """set -e
umask 022
mkdir -p -- "$(dirname -- "$2")"
umask 077
trap 'rm -f -- "$4"' EXIT
mv -f -- "$1" "$4"
chown root:root -- "$4"
chmod "$3" -- "$4"
mv -f -T -- "$4" "$2"
"""

READ_SCRIPT = f'[ -e "$1" ] || exit {MISSING_EXIT_CODE}; exec cat -- "$1"'


def wire(command: Command, *, sudo: bool, timeout_s: float | None) -> str:
    """The one string sent to the host's shell for ``command``, wrapped in timeout(1) and sudo."""
    if not sudo and timeout_s is None:
        return command.shell()  # as given: no extra shell (callers may rely on $PPID being sshd)
    # exec: no shell stays between timeout(1) and the command. Otherwise TERM kills that shell,
    # timeout(1) sees its child gone and exits before its KILL, orphaning a command that ignores TERM.
    argv: tuple[str, ...] = ("sh", "-c", "exec " + command.shell())
    if timeout_s is not None:
        argv = ("timeout", "-k", f"{KILL_AFTER_S:g}", f"{timeout_s:.3f}", *argv)
    if sudo:
        argv = ("sudo", "-n", "--", *argv)
    return Command(argv).shell()


def install_command(staged: str, path: str, mode: int, tmp: str) -> Command:
    return Command(("sh", "-c", INSTALL_SCRIPT, "sh", staged, path, f"{mode:04o}", tmp),
                   description=f"install {path}")


def read_command(path: str) -> Command:
    return Command(("sh", "-c", READ_SCRIPT, "sh", path), description=f"read {path}")


def probe_error(host: str, where: str, user: str, exit_code: int, stderr: str) -> ConnectError:
    """The user-facing error for a failed PROBE: what sudo said, and what to do about it."""
    said = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {exit_code}"
    if "password is required" in stderr or "password" in said.lower():
        reason = "passwordless sudo is required"
        hint = (f"allow it with a sudoers rule like `{user} ALL=(root) NOPASSWD: ALL`, "
                "or log in as root")
    elif exit_code == 127:
        reason = "sudo is not installed on the host"
        hint = "install sudo with a NOPASSWD rule, or log in as root"
    else:
        reason = "passwordless sudo is required and `sudo -n true` failed"
        hint = f"allow {user} NOPASSWD in sudoers, or log in as root"
    return ConnectError(host, f"ssh.become: {where}: user {user!r} cannot run commands as root: {reason} "
                              f"(sudo said: {said}); {hint}")
