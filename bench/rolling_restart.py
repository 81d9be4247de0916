"""Measure a rolling restart of a deployed lab, step by step, optionally under load through the balancer.

    sudo llamactl lab up 3 --dir /tmp/lab && llamactl deploy /tmp/lab/inventory.yaml
    python bench/rolling_restart.py /tmp/lab/inventory.yaml --load --out bench/results/rolling_restart_lab3.json

Records: total wall time, per-instance time of each step (drain apply -> idle -> restart -> ready ->
canary -> undrain), the balancer apply times, and (with --load) requests served / failed meanwhile.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "ops"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inventory", type=Path)
    parser.add_argument("--load", action="store_true", help="send /infer through the balancer meanwhile")
    parser.add_argument("--batch", default=None, help="override rollout.batch")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = parser.parse_args()

    from llamactl.inventory import load_inventory
    from llamactl.ops.rolling import Progress, RollingRestartFailed, rolling_restart

    inv = load_inventory(args.inventory)
    events: list[tuple[float, Progress]] = []
    start = time.monotonic()

    def on_event(p: Progress) -> None:
        events.append((time.monotonic() - start, p))
        print(f"{events[-1][0]:7.2f}s  {p.instance or 'batch ' + str(p.batch)}  {p.step}: {p.message}", flush=True)

    load_ctx: Any = None
    if args.load:
        from ops_support import LabLoad

        load_ctx = LabLoad(inv.endpoint, max_requests=100_000, max_seconds=900)
        load_ctx.__enter__()
        load_ctx.wait_ok(5)
    start = time.monotonic()
    try:
        result = rolling_restart(inv, inv.instances(), on_event=on_event, batch=args.batch)
    except RollingRestartFailed as exc:
        result = exc.result
        print(exc, file=sys.stderr)
    finally:
        if load_ctx is not None:
            load_ctx.__exit__(None, None, None)
    total = time.monotonic() - start

    steps: dict[str, dict[str, float]] = {}
    last: dict[str, float] = {}
    batch_start: dict[int, float] = {}
    for t, p in events:
        if p.step == "batch":
            batch_start[p.batch] = t
            continue
        if not p.instance:
            continue
        prev = last.get(p.instance, batch_start.get(p.batch, 0.0))
        steps.setdefault(p.instance, {})[p.step] = round(t - prev, 3)
        last[p.instance] = t
    per_instance = [sum(v.values()) for v in steps.values()]
    record = {
        "what": "rolling restart of every instance of a deployed lab (llamactl.ops.rolling)",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.node()} {platform.machine()}, shared CPU",
        "inventory": str(args.inventory),
        "instances": len(inv.instances()),
        "batches": result.batches,
        "rollout": inv.rollout.model_dump(),
        "total_s": round(total, 2),
        "per_instance_s": {"median": round(statistics.median(per_instance), 2), "max": round(max(per_instance), 2)},
        "steps_s": steps,
        "load": None if load_ctx is None else {"ok": load_ctx.ok, "failed": len(load_ctx.failed),
                                               "failures": load_ctx.failed[:10]},
    }
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if result.ok and (load_ctx is None or not load_ctx.failed) else 1


if __name__ == "__main__":
    sys.exit(main())
