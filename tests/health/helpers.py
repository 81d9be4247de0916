"""Helpers for health tests: free loopback ports, inventories pointing at simulated instances, running the CLI."""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest


def free_base_port(addresses: Sequence[str], span: int) -> int:
    """A port P such that P .. P+span-1 are free on every address (checked by binding)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + span >= 65000:
            continue
        held: list[socket.socket] = []
        try:
            for address in addresses:
                for port in range(base, base + span):
                    s = socket.socket()
                    held.append(s)
                    s.bind((address, port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no free port range on loopback")


def write_inventory(
    path: Path, hosts: dict[str, str], gpus: int, base_port: int, lb_port: int, *, timeout_s: float = 1.0
) -> Path:
    """An inventory of ``hosts`` (name -> 127.x address) with ``gpus`` instances each and a balancer on 127.0.0.2."""
    host_lines = "\n".join(f"      {name}: {{address: {addr}}}" for name, addr in hosts.items())
    path.write_text(
        f"""version: 1
cluster: sim
defaults:
  gpus: {gpus}
  base_port: {base_port}
  model:
    source: /srv/models/Llama-3.2V-11B-cot
  ssh:
    host_key_policy: accept-new
groups:
  sim:
    hosts:
{host_lines}
balancer:
  hosts:
    lb: {{address: 127.0.0.2}}
  listen: {lb_port}
health:
  timeout_s: {timeout_s}
  interval_s: 1
"""
    )
    return path


def run_cli(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, str]:
    """Run the real ``llamactl`` entry point in-process; returns (exit code, stdout, stderr)."""
    from llamactl.cli.main import main

    monkeypatch.setattr(sys, "argv", ["llamactl", *argv])
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit) as exited:
        main()
    out, err = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 0), out, err
