"""GPU smoke run of ``llamactl serve``: an 11B-shape random-weight Llama 3.2 Vision behind the real server.

Proves the CUDA path (dtype, placement, memory) end to end and records first figures: the script saves a
same-shape checkpoint (``MllamaConfig()`` with vision image_size 560, bf16, random weights; see
shared/notes/gpu-baseline.md), starts ``llamactl serve --device cuda`` on it as a subprocess (the very code path
production uses: AutoProcessor + AutoModelForImageTextToText from a directory, offline), and drives it over HTTP
at concurrency 1 and 8 with fixed-length answers (``ignore_eos``), streaming, one 4-tile image per request.

Prints one JSON object (and writes it with --out): per level tok/s, req/s, TTFT (client-side, first streamed
token), end-to-end latency, the server's batch sizes, and GPU memory from /health.

    python bench/gpu_smoke.py --out bench/results/gpu_smoke.json      # on a GPU machine
    python bench/gpu_smoke.py --tiny                                   # on CPU, with the tiny test checkpoint

The random model's tokenizer is a word-level vocabulary with all 128,256 ids (Llama 3 special tokens at their
real ids), so every generated token decodes to text and streaming/TTFT are measured as for the real model.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a plain checkout (the device machine) without installing llamactl
    sys.path.insert(0, str(REPO))
LLAMA3_SPECIAL = {  # id -> token, the real Llama 3 / 3.2 Vision layout
    128000: "<|begin_of_text|>",
    128001: "<|end_of_text|>",
    128004: "<|finetune_right_pad_id|>",
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128008: "<|eom_id|>",
    128009: "<|eot_id|>",
    128010: "<|python_tag|>",
}
TEXT_VOCAB = 128256
IMAGE_TOKEN_ID = 128256


def hub_layout(out: Path, image_processor: Any) -> None:
    """The published checkpoint's processor files: ``preprocessor_config.json`` naming ``MllamaImageProcessor``.

    That name lets transformers pick its backend (torchvision where installed, as on the GPU machines, else
    PIL), exactly as it does for the real Llama-3.2V-11B-cot; a saved "...Pil" name would pin the PIL one.
    """
    from llamactl.server.tiny import _mirror_real_layout, _write_json

    _mirror_real_layout(out, image_processor)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    pre["image_processor_type"] = "MllamaImageProcessor"
    _write_json(out / "preprocessor_config.json", pre)


def make_processor() -> tuple[Any, Any]:
    """A full-vocabulary Llama 3 style processor (word-level tokenizer) for the random 11B-shape model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MllamaImageProcessorPil, MllamaProcessor, PreTrainedTokenizerFast

    from llamactl.server.tiny import CHAT_TEMPLATE

    vocab = {f"w{i}": i for i in range(128000)}
    for i in range(128000, TEXT_VOCAB):
        vocab[LLAMA3_SPECIAL.get(i, f"<|reserved_special_token_{i - 128000}|>")] = i
    vocab["<|image|>"] = IMAGE_TOKEN_ID
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        unk_token="w0",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [*LLAMA3_SPECIAL.values(), "<|image|>"]}  # never split
    )
    image_processor = MllamaImageProcessorPil(size={"height": 560, "width": 560}, max_image_tiles=4)
    processor = MllamaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )

    return processor, image_processor


def build_random_11b(out: Path, device: str = "cuda", cfg: Any = None) -> dict[str, Any]:
    """Save a random-weight 11B-shape Mllama (bf16) + a full-vocabulary processor into ``out``.

    ``cfg`` (a smaller MllamaConfig) and ``device`` exist only to check this function on a CPU machine.
    """
    import torch
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    processor, image_processor = make_processor()

    if cfg is None:
        cfg = MllamaConfig()
    cfg.vision_config.image_size = 560  # the transformers default is 448; the 11B checkpoint uses 560
    cfg.image_token_index = IMAGE_TOKEN_ID
    t0 = time.monotonic()
    with torch.device(device):
        model = MllamaForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    build_s = time.monotonic() - t0
    params = sum(p.numel() for p in model.parameters())
    t0 = time.monotonic()
    model.save_pretrained(out, max_shard_size="5GB")
    processor.save_pretrained(out)
    hub_layout(out, image_processor)
    save_s = time.monotonic() - t0
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"params": params, "build_s": round(build_s, 2), "save_s": round(save_s, 2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: Path, device: str, port: int, log: Path, max_batch: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "LLAMACTL_MAX_BATCH_SIZE": str(max_batch),
        "LLAMACTL_MAX_WAIT_MS": "20",
        "LLAMACTL_CACHE_MAX_ENTRIES": "0",  # every request must really generate
        "LLAMACTL_GEN_MAX_NEW_TOKENS": "4096",
        "LLAMACTL_INSTANCE": "gpu-smoke/0",
    }
    cmd = [
        sys.executable,
        "-m",
        "llamactl",
        "serve",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        device,
        "--log-level",
        "warning",
    ]
    with log.open("wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def wait_ready(httpx: Any, url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"server not ready after {timeout_s}s:\n{log.read_text()[-4000:]}")


def image_url(seed: int, side: int) -> str:
    """A noise JPEG (side x side): 1120 px gives the 11B processor 4 tiles of 560, like the baseline."""
    import random

    from PIL import Image

    rnd = random.Random(seed)
    small = Image.frombytes("RGB", (16, 16), bytes(rnd.randrange(256) for _ in range(16 * 16 * 3)))
    buf = io.BytesIO()
    small.resize((side, side)).save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def one_request(httpx: Any, url: str, img: str, max_tokens: int) -> dict[str, float]:
    body = {
        "model": "bench",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": img}},
                    {"type": "text", "text": "Describe this image step by step, then answer briefly."},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.monotonic()
    ttft = None
    usage: dict[str, int] = {}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(str(chunk["error"]))
            if chunk.get("usage"):
                usage = chunk["usage"]
            for ch in chunk.get("choices", []):
                if ch["delta"].get("content") and ttft is None:
                    ttft = time.monotonic() - t0
    return {
        "e2e_s": time.monotonic() - t0,
        "ttft_s": ttft if ttft is not None else float("nan"),
        "completion_tokens": usage.get("completion_tokens", 0),
        "prompt_tokens": usage.get("prompt_tokens", 0),
    }


def batch_sizes(httpx: Any, url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics").text
    vals = {}
    for line in text.splitlines():
        for name in ("llamactl_batch_size_sum", "llamactl_batch_size_count"):
            if line.startswith(name + " "):
                vals[name] = float(line.split()[1])
    return vals.get("llamactl_batch_size_sum", 0.0), vals.get("llamactl_batch_size_count", 0.0)


def run_level(httpx: Any, url: str, conc: int, n: int, max_tokens: int, side: int) -> dict[str, Any]:
    peak = [0]
    stop = threading.Event()

    def sample_memory() -> None:
        while not stop.is_set():
            mem = httpx.get(url + "/health").json().get("gpu_memory")
            if mem:
                peak[0] = max(peak[0], int(mem["used_bytes"]))
            stop.wait(0.2)

    images = [image_url(1000 * conc + i, side) for i in range(n)]
    s0, c0 = batch_sizes(httpx, url)
    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(conc) as pool:
        results = list(pool.map(lambda im: one_request(httpx, url, im, max_tokens), images))
    wall = time.monotonic() - t0
    stop.set()
    sampler.join()
    s1, c1 = batch_sizes(httpx, url)
    tokens = sum(r["completion_tokens"] for r in results)
    ttfts = [r["ttft_s"] for r in results if r["ttft_s"] == r["ttft_s"]]
    return {
        "concurrency": conc,
        "requests": n,
        "max_tokens": max_tokens,
        "wall_s": round(wall, 3),
        "completion_tokens": tokens,
        "prompt_tokens_per_request": results[0]["prompt_tokens"],
        "tok_per_s": round(tokens / wall, 2),
        "req_per_s": round(n / wall, 3),
        "ttft_s_median": round(statistics.median(ttfts), 4) if ttfts else None,
        "ttft_s_max": round(max(ttfts), 4) if ttfts else None,
        "e2e_s_median": round(statistics.median(r["e2e_s"] for r in results), 3),
        "mean_batch_size": round((s1 - s0) / (c1 - c0), 2) if c1 > c0 else None,
        "gpu_memory_used_bytes_peak": peak[0] or None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU dry run with the tiny test checkpoint")
    ap.add_argument("--model-dir", type=Path, help="reuse (or write) the checkpoint here")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--levels", default="1,8", help="concurrency levels, comma-separated")
    ap.add_argument(
        "--requests", type=int, default=0, help="requests per level (default: 2 x concurrency, min 4)"
    )
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    import httpx

    work = Path(tempfile.mkdtemp(prefix="llamactl-gpu-smoke-"))
    model_dir = args.model_dir or work / "model"
    info: dict[str, Any] = {"kind": "tiny-cpu" if args.tiny else "11b-shape-random-bf16"}
    if not (model_dir / "config.json").exists():
        if args.tiny:
            from llamactl.server.tiny import build_tiny_checkpoint

            build_tiny_checkpoint(model_dir)
        else:
            info["build"] = build_random_11b(model_dir)
    device = "cpu" if args.tiny else "cuda"
    levels = [int(x) for x in args.levels.split(",")]
    info["device"] = _device_name(device)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "serve.log"
    proc = start_server(model_dir, device, port, log, max_batch=max(levels))
    try:
        info["load_to_ready_s"] = round(wait_ready(httpx, url, proc, log, 900), 2)
        health = httpx.get(url + "/health").json()
        info["gpu_memory_after_load"] = health["gpu_memory"]
        side = 112 if args.tiny else 1120
        one_request(httpx, url, image_url(7, side), args.max_tokens)  # warm the allocator and kernels
        info["levels"] = []
        for conc in levels:
            n = args.requests or max(4, 2 * conc)
            run_level(
                httpx, url, conc, conc, args.max_tokens, side
            )  # warm run at this batch size, not quoted
            info["levels"].append(run_level(httpx, url, conc, n, args.max_tokens, side))
        info["gpu_memory_end"] = httpx.get(url + "/health").json()["gpu_memory"]
    finally:
        proc.terminate()
        try:
            info["server_exit_code"] = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            info["server_exit_code"] = "killed"
    text = json.dumps(info, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


def _device_name(device: str) -> str:
    import platform

    if device == "cuda":
        import torch

        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
