"""GPU fault records on the (first) balancer host: one file per faulted instance. Pure.

``watch`` writes a record when it drains an instance for ``gpu_fault`` and keeps every recorded instance
drained (also across its own restarts); ``llamactl undrain`` removes the record, which is how an operator
clears the fault. The file name is the instance id with ``/`` as ``@`` (``gpu-01@0``).
"""

from __future__ import annotations

import json

from llamactl.plan.command import Command, quote

FAULT_DIR = "/var/lib/llamactl/gpu-faults"


def record_path(instance: str) -> str:
    return f"{FAULT_DIR}/{instance.replace('/', '@')}"


def record(*, instance: str, detail: str, since: str) -> bytes:
    """What a record holds: the instance, the server's fault description and when watch drained it."""
    return (json.dumps({"instance": instance, "detail": detail, "since": since}) + "\n").encode()


def list_command() -> Command:
    """The recorded instances' file names, one a line (nothing when the directory does not exist)."""
    return Command.sh(f"if [ -d {quote(FAULT_DIR)} ]; then ls -1 {quote(FAULT_DIR)}; fi", "list GPU fault records")


def parse_list(stdout: str) -> frozenset[str]:
    """Instance ids from ``list_command``'s output (temporary upload files ignored)."""
    names = (line.strip() for line in stdout.splitlines())
    return frozenset(n.replace("@", "/", 1) for n in names if "@" in n and ".tmp-" not in n)


def clear_command(instance: str) -> Command:
    return Command.of("rm", "-f", record_path(instance), description=f"clear the GPU fault of {instance}")
