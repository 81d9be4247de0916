"""Measure: connect + `true` on N loopback sshd servers at once (paramiko, threads).

    .venv/bin/python -m tests.remote.bench_parallel_connect [N] [REPEATS]

Prints medians of: parallel connect only; parallel connect + `true`; `true` on already open
connections; and sequential connect + `true` for comparison. Needs root and /usr/sbin/sshd.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from llamactl.plan.command import Command
from llamactl.remote.parallel import Ok, run_parallel
from llamactl.remote.ssh import SSHExecutor, connect
from tests.remote.sshd import Lab, Sshd, keygen


def timed(fn: Callable[[], object]) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def main(n: int = 8, repeats: int = 5) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-ssh-"))
    keygen(workdir / "id")
    (workdir / "authorized_keys").write_text((workdir / "id.pub").read_text())
    (workdir / "known_hosts").write_text("")
    lab = Lab(workdir, workdir / "id", workdir / "authorized_keys", workdir / "known_hosts")
    servers = [lab.sshd() for _ in range(n)]
    try:
        def connect_all() -> list[SSHExecutor]:
            outcomes = run_parallel(servers, lambda s: connect(lab.target(s)), max_workers=n)
            assert all(isinstance(o, Ok) for o in outcomes), outcomes
            return [o.value for o in outcomes if isinstance(o, Ok)]

        def connect_and_true(server: Sshd) -> None:
            with connect(lab.target(server)) as host:
                host.run(Command.of("true"))

        rows: dict[str, list[float]] = {"connect": [], "connect+true": [], "true (open)": [], "sequential": []}
        for _ in range(repeats):
            opened: list[SSHExecutor] = []
            rows["connect"].append(timed(lambda: opened.extend(connect_all())))  # noqa: B023
            rows["true (open)"].append(timed(lambda: run_parallel(
                opened, lambda h: h.run(Command.of("true")), max_workers=n)))  # noqa: B023
            for executor in opened:
                executor.close()
            rows["connect+true"].append(timed(lambda: run_parallel(servers, connect_and_true, max_workers=n)))
            rows["sequential"].append(timed(lambda: [connect_and_true(s) for s in servers]))  # type: ignore[func-returns-value]
        print(f"{n} loopback sshd servers, {repeats} repeats (median / min / max seconds):")
        for name, values in rows.items():
            print(f"  {name:<14} {statistics.median(values):.3f} / {min(values):.3f} / {max(values):.3f}")
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
