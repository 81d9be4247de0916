"""What the decode step saves when rows are marked off for the cross-attention (no image K/V read): the 11B-shape
engine's graph-replayed step at 32 rows with every row an image row, with the last 5 rows marked off (27 running
rows in the 32-row bucket: slots left empty), half the rows off (16 text-only rows) and none on.

    python3 bench/engine_rows_off_probe.py --out $OUT/engine_rows_off_probe.json      # GPU only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch
from engine_probe import timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=32)
    args = ap.parse_args()
    from engine_direct import build

    engine, _model = build(False, 64, 2048)
    engine.start()
    b, g, flags = args.rows, engine.graphs, engine.pools.has_image
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": b,
              "cross_attention": engine.describe().get("cross_attention")}
    cases = {"all rows with an image": b, "last 5 rows off (27 running)": b - 5, "half the rows off": b // 2,
             "every row off": 0}
    with torch.inference_mode():
        for name, on in cases.items():
            flags.zero_()
            flags[:on] = 1
            report[name] = {"rows_on": on, "step_ms": round(timed(lambda: g.run(b, 256), reps=21) * 1000, 3)}
            print(name, report[name], flush=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
