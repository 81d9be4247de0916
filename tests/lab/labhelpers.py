"""Helpers of the lab tests: SSH into lab hosts with plain paramiko and strict host keys (when the lab can\nrun at all: ``tests.labfixtures.lab_available``)."""

from __future__ import annotations

from pathlib import Path

import paramiko

from llamactl.lab.state import LabState


def ssh(state: LabState, host_name: str, known_hosts: Path | None = None) -> paramiko.SSHClient:
    """Connect as root with the lab key and strict host-key checking against the lab's known_hosts."""
    d = Path(state.dir)
    h = next(h for h in state.hosts if h.name == host_name)
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts or d / "known_hosts"))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(h.address, username="root", key_filename=str(d / "id_ed25519"), timeout=10,
                   allow_agent=False, look_for_keys=False)
    return client


def run(client: paramiko.SSHClient, command: str, timeout: float = 60) -> tuple[int, str, str]:
    _, out, err = client.exec_command(command, timeout=timeout)
    rc = out.channel.recv_exit_status()
    return rc, out.read().decode(), err.read().decode()
