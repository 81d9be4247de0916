"""Hold most of a GPU's memory so that a server started next sees a smaller card (an 80 GB H100's on an H200).

The continuous engine sizes its pools from the free memory it finds at start (engine.py, ``mem_get_info``), so
a process holding the difference makes an H200 look like an H100 to it: the issue's "64 clients, no OOM on an
80 GB H100" can be checked on the larger card. Only memory is reduced; bandwidth and compute stay the H200's.

    python3 bench/gpu_ballast.py --leave-gib 79   # prints one JSON line once held, holds until stdin closes

engine_bench.py runs it for its servers with ``--gpu-free-gib``.
"""

from __future__ import annotations

import argparse
import json
import sys

_GIB = 1 << 30


def hold(leave_gib: float) -> tuple[object, dict[str, float]]:
    """Allocate all free memory of the current CUDA device but ``leave_gib``; the tensor and what was measured."""
    import torch

    free, total = torch.cuda.mem_get_info()
    want = free - int(leave_gib * _GIB)
    if want <= 0:
        raise SystemExit(f"gpu_ballast: only {free / _GIB:.1f} GiB free, nothing to hold for {leave_gib} GiB")
    block = torch.empty(want, dtype=torch.uint8, device="cuda")
    after, _ = torch.cuda.mem_get_info()
    return block, {"held_gib": round(want / _GIB, 2), "free_gib": round(after / _GIB, 2),
                   "total_gib": round(total / _GIB, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--leave-gib", type=float, required=True, help="GiB left free (79: an 80 GB H100's)")
    a = ap.parse_args()
    block, figures = hold(a.leave_gib)
    print(json.dumps(figures), flush=True)
    sys.stdin.read()  # held until the parent closes our stdin (or dies)
    del block


if __name__ == "__main__":
    main()
