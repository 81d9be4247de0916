"""The continuous engine's loop on a GPU, before a long benchmark: greedy answers equal transformers' generate.

The CI tests run the engine on the CPU; CUDA-only parts (graph replay fed from device buffers, the pipelined
loop's pinned copies and events, the vision tower on its SM partition) run here on the tiny checkpoint in
float32, in both loop orders (the pipelined one with the tower on an SM partition and the Triton kernels forced
on: gemv.py's projections for batch-1 steps, decode_attention.py's self- and cross-attention for every step): 12
staggered requests (images of several sizes, text-only rows, different lengths) through the engine,
each answer compared with ``generate`` for that request alone. Exits 1 on any difference. Other settings come
from the environment (``LLAMACTL_VISION_PRIORITY=first LLAMACTL_VISION_GRAPHS=1``: the tower's graphs with the
decode steps waiting for them).

    python3 bench/engine_gpu_check.py        # on the GPU machine, ~30 s
"""

from __future__ import annotations

import functools
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
from PIL import Image

import llamactl.server.engine.continuous.engine as engine_module
from llamactl.server.engine.continuous import ContinuousEngine, gemv
from llamactl.server.engine.protocol import GenParams, GenRequest, GenResult
from llamactl.server.settings import Settings
from llamactl.server.tiny import build_tiny_checkpoint, trained_image


def image_prompt(eng: ContinuousEngine) -> str:
    from llamactl.server.tiny import trained_messages

    return eng.render_prompt(trained_messages())


def reference_ids(eng: ContinuousEngine, req: GenRequest) -> list[int]:
    """generate's greedy answer for this request alone, without its stop token."""
    import torch

    hf = eng.hf
    inputs = hf.processor(images=[[req.image]] if req.image is not None else None, text=[req.prompt],
                          add_special_tokens=False, return_tensors="pt").to(eng.hf.device)
    with torch.inference_mode():
        out = hf.model.generate(**inputs, max_new_tokens=req.params.max_new_tokens, do_sample=False,
                                pad_token_id=hf._pad_id, temperature=1.0, top_p=1.0, top_k=50)
    return [t for t in out[0, inputs["input_ids"].shape[1]:].tolist() if t not in hf._eos_ids]


def run_all(eng: ContinuousEngine, reqs: list[GenRequest], gaps_s: list[float]) -> list[GenResult]:
    results: dict[int, object] = {}
    done = threading.Event()
    for i, r in enumerate(reqs):
        def finish(value: object, i: int = i) -> None:
            results[i] = value
            if len(results) == len(reqs):
                done.set()
        r.on_finish = finish
    for i, r in enumerate(reqs):
        eng.prepare(r)
        eng.add(r)
        time.sleep(gaps_s[i % len(gaps_s)])
    if not done.wait(120):
        raise SystemExit(f"only {len(results)} of {len(reqs)} finished")
    out = [results[i] for i in range(len(reqs))]
    bad = [r for r in out if not isinstance(r, GenResult)]
    if bad:
        raise SystemExit(f"failed: {bad}")
    return out  # type: ignore[return-value]


def main() -> int:
    path = Path("/tmp/engine-gpu-check-tiny")
    if not (path / "config.json").exists():
        build_tiny_checkpoint(path)
    failures = 0
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    measured = engine_module.choose_gemv, engine_module.choose_cross, engine_module.choose_fastest
    forced = (functools.partial(gemv.choose, margin=-10.0), lambda *a, **k: ({1: "triton"}, {}),
              lambda *a, **k: ({1: "triton"}, {}))
    for pipelined in (True, False):
        # the pipelined loop with the tower on an SM partition and every Triton kernel forced on: the one-row
        # projections on every weight shape (a negative margin: chosen even where slower) and the self- and
        # cross-attention kernels at every batch size, to check their answers; the step-by-step loop with an
        # ordinary stream and the measured choices
        engine_module.choose_gemv, engine_module.choose_cross, engine_module.choose_fastest = (
            forced if pipelined else measured)
        eng = ContinuousEngine(Settings.from_env(model=str(path), device=device, dtype="float32", max_batch_size=8,
                                                 vision_sms=-1 if pipelined else 0, gen_max_new_tokens=256))
        eng.pipelined = pipelined
        eng.start()
        thread = threading.Thread(target=eng.run_forever, daemon=True)
        thread.start()
        print("engine", eng.describe(), flush=True)
        reqs = []
        for i in range(12):
            if i % 4 == 3:
                prompt = eng.render_prompt([{"role": "user", "content": [{"type": "text", "text": f"Count to {i}"}]}])
                reqs.append(GenRequest(prompt=prompt, image=None, params=GenParams(max_new_tokens=6 + i)))
                continue
            img = trained_image(("red", "blue")[i % 2]) if i % 3 else Image.new("RGB", (90 + 20 * i, 60), (30, 200, 60))
            reqs.append(GenRequest(prompt=image_prompt(eng), image=img, params=GenParams(max_new_tokens=8 + 5 * i)))
        syncs: Counter[str] = Counter()
        with warnings.catch_warnings(record=True) as caught:
            # the pipelined pass under CUDA's sync debug mode: every call that makes the host wait for the device
            # (blocking copies, .tolist(), stream syncs) is reported with the Python line that made it, so a
            # sync that empties the step loop's pipeline shows up here (event waits are not counted)
            warnings.simplefilter("always")
            if pipelined and device == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                results = run_all(eng, reqs, gaps_s=[0.0, 0.02, 0.0, 0.05])
            finally:
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        for w in caught:
            if "synchroniz" in str(w.message):
                syncs[f"{Path(w.filename).name}:{w.lineno}"] += 1
        if syncs:
            print(f"pipelined={pipelined}: host syncs by line: {dict(syncs.most_common())}", flush=True)
        tok = eng.hf.processor.tokenizer
        for req, result in zip(reqs, results):
            ref = tok.decode(reference_ids(eng, GenRequest(prompt=req.prompt, image=req.image, params=req.params)),
                             skip_special_tokens=True)
            if result.text != ref:
                failures += 1
                print(f"DIFFERS (pipelined={pipelined}): {result.text!r} vs generate {ref!r}", flush=True)
        end = eng.describe()
        print(f"pipelined={pipelined}: {len(reqs) - failures} of {len(reqs)} equal generate; "
              f"batch sizes {sorted({r.batch_size for r in results})}; steps {end['steps']}, tower holds "
              f"{end['tower_holds']} (vision_priority {end['vision_priority']}, vision_graphs {end['vision_graphs']})",
              flush=True)
        eng.stop()
        thread.join(10)
        eng.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
