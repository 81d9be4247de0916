"""Measure `lab up` (hosts with systemd running and sshd answering) and `lab down` for 1, 3 and 8
server hosts (+ the balancer), without the model and wheelhouse (those are cached copies).

Run as root:  .venv/bin/python bench/lab_up.py [--reps 3] [--sizes 1,3,8]
Prints one JSON line per size with the median and every run, in seconds.

Recorded 2026-11-25 17:06 UTC on the 2-core dev machine shared with ~6 engineers (load average 6-10),
3 runs each, hosts only (the notes' anchor without load: 3 hosts ~1.3 s, 8 hosts ~3.2 s, teardown ~1 s):
    1 server  (2 hosts): up 0.88 s  (1.09, 0.88, 0.75)   down 0.33 s (0.33, 0.34, 0.29)
    3 servers (4 hosts): up 1.75 s  (1.39, 1.84, 1.75)   down 0.43 s (0.47, 0.43, 0.43)
    8 servers (9 hosts): up 5.07 s  (4.01, 5.40, 5.07)   down 2.33 s (2.33, 2.47, 2.30)
A full `llamactl lab up 3` with the cached wheelhouse (55 wheels, hard links) and cached tiny model
took 2.6 s wall; the first ever run adds ~12 s (pip download, local mirror) and ~70 s (model build).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from llamactl.lab import core

NAME, SUBNET = "bench", "10.217.0.0/24"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sizes", default="1,3,8")
    args = parser.parse_args()

    def quiet(_m: str) -> None:
        pass

    for n in (int(s) for s in args.sizes.split(",")):
        ups, downs = [], []
        for _ in range(args.reps):
            d = Path(tempfile.mkdtemp(prefix="lab-bench-"))
            t0 = time.monotonic()
            core.up(n, d, NAME, SUBNET, say=quiet, model=False, wheels=False)
            t1 = time.monotonic()
            core.down(d, None, say=quiet)
            t2 = time.monotonic()
            ups.append(round(t1 - t0, 2))
            downs.append(round(t2 - t1, 2))
        print(json.dumps({"servers": n, "hosts": n + 1, "up_median_s": statistics.median(ups),
                          "down_median_s": statistics.median(downs), "up_s": ups, "down_s": downs}))


if __name__ == "__main__":
    main()
