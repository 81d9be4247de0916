"""Server settings: environment variables, an optional config file, and command-line overrides.

Imports only pydantic and the stdlib: the controller uses ``Settings.from_env(...).config_hash()`` to predict
the hash a rendered env file produces (drift detection), and it must not need torch or fastapi for that.
Precedence, lowest first: defaults < ``LLAMACTL_CONFIG`` file < environment < explicit overrides (CLI flags).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENV_PREFIX = "LLAMACTL_"

# Settings that do not change what the server computes (address, label, place on its host): not hashed.
_UNHASHED = frozenset({"host", "port", "instance", "host_slot"})


class SettingsError(ValueError):
    """Invalid server settings; the message names each bad setting and where it came from."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    revision: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["cuda", "cpu", "auto"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # nf4/int8: bitsandbytes (the hf engine). fp8: e4m3 copies of the text layers, read by the continuous
    # engine's own kernel (CUDA: compute capability 8.9+, Triton; the CPU runs the same arithmetic slowly).
    quantization: Literal["none", "nf4", "int8", "fp8"] = "none"
    # fp8 only: keep the bf16 text weights beside the FP8 copies (+8.6 GiB for the 11B shape instead of -8.5) and
    # use, per weight shape and batch size, whichever was faster at start: cuBLAS on bf16 or the FP8 kernel. An
    # H200, same call (bench/results/engine_bench_run29_h200.md), tok/s at 1 / 8 / 32 / 64 clients: 176.6, 813.3,
    # 1,454.7, 1,521.4; fp8 alone 185.1, 805.5, 1,451.3, 1,546.3; bf16 144.6, 734.5, 1,357.3, 1,527.9.
    fp8_keep_bf16: bool = False
    # fp8 only: each image's cross-attention K/V stored as e4m3 (a scale per image and K/V head): half the bytes a
    # decode step reads per image row (~210 -> ~105 MB for the 11B shape) and half the image pool (-10.6 GB at 64
    # slots). GPUs: read by the Triton cross-attention kernel (needs triton_kernels). Off by default: on an H200 it
    # gained nothing at 8-32 clients and cost 6-7 % at 64 (bench/results/engine_bench_run30/run31_h200.md).
    fp8_image_kv: bool = False
    # "auto" is the continuous-batching engine (or hf where it cannot run, e.g. nf4/int8; /health says which).
    engine: Literal["auto", "continuous", "hf"] = "auto"
    # torch.compile on CUDA (continuous engine): "vision" compiles the vision encoder layers, "all" also the
    # small-batch decode step. Off by default: with "all" a batch-1 step went from 12.3 to 9.8 ms on an H100, but
    # the server took over 220 s to become ready (bench/results/engine_direct_run4.json, engine_bench_run2.md).
    engine_compile: Literal["off", "vision", "all"] = "off"
    # SMs the vision tower may use while the batch decodes (continuous engine on CUDA, a green context): -1 = two
    # thirds of the GPU's, 0 = no partition (the tower then takes every SM and the decode steps wait between its
    # kernels). On an H100, 88 of 132 SMs ran a tower chunk beside 30 batch-32 steps in 676 ms instead of 771 ms
    # (bench/results/engine_green_probe_run1_h100.json).
    vision_sms: int = Field(0, ge=-1, le=4096)
    # Which work the GPU serves first when both have kernels ready (continuous engine on CUDA;
    # encoding.stream_priorities): "equal" = the decode steps and the vision tower alike, the joins (cross K/V,
    # prefill) before both; "low" = the tower after everything else, in the decode steps' gaps; "high" = the
    # tower first. Until Session 15 the setting said "low" but did "equal": a CUDA graph's kernels keep the
    # priority of the stream they were captured on, and the decode graphs were captured at the tower's; every
    # figure recorded as "low" before is "equal". An H100 at 32 clients, high vs equal: 1,091 vs 1,149 tok/s,
    # TTFT p50 1.12 vs 0.82 s, p95 2.09 vs 2.39 s (bench/results/engine_bench_run12.md); an H200 with the tower's
    # graphs, high / low / equal: 1,581 / 1,613 / 1,621 tok/s, TTFT p95 1.60 / 1.74 / 1.56 s (run 47). Priorities
    # cannot preempt the tower's resident kernels. "first" orders by a wait instead: each decode step waits on the
    # device for the image chunk in the tower (encoding.decode_waits_for_tower; /health engine.tower_holds counts
    # them), so a chunk gets the whole GPU and the running rows wait up to one chunk between two tokens. It is what
    # the eager tower does by accident (its launches hold the decode steps back) made deliberate, for the tower's
    # graphs. An H200, 12 rounds, "first" with graphs vs the default (bench/results/engine_bench_run51_h200.md):
    # 32 clients 1,605 vs 1,603 tok/s, TTFT p50 0.91 vs 0.60 s, ITL p95 22 vs 65 ms; 64 clients 1,971 vs 1,880.
    vision_priority: Literal["equal", "low", "high", "first"] = "equal"
    # Images that go through the tower together and join the batch together (continuous engine); 0 = the
    # engine's default (8 on CUDA, 4 on the CPU). Smaller: first tokens come sooner, throughput drops (an H100 at
    # 32 clients with 2: TTFT p50 0.37 vs 0.83 s, 1,021 vs 1,164 tok/s; bench/results/engine_bench_run13.md).
    prefill_chunk_images: int = Field(0, ge=0, le=64)
    # Image chunks that may be in the vision tower at once (continuous engine on CUDA): behind the chunk there, a
    # FULL chunk (a burst) may queue and starts as soon as the tower is free, not after the previous chunk joined
    # the batch. 1 = one chunk at a time (towers and joins alternate); 0 = the engine's choice: 2 when the tower
    # runs as CUDA graphs (vision_graphs), else 1. With graphs a replay is one launch, so the tower runs on while
    # the model thread launches the previous chunk's join; eagerly the one thread launches both and 2 gained
    # nothing clear (an H200, bench/results/engine_bench_run20_h200.md: 32 clients 1,362 vs 1,390 tok/s, TTFT p95
    # 2.10 vs 2.20 s). The price of 2 with graphs: a chunk joins while the next one's tower holds the GPU (an
    # H200, closed loops at 32 clients, graphs and 2 against the eager tower and 1: the join 0.125 instead of
    # 0.061 s; bench/results/engine.md, Session 16).
    vision_queue: int = Field(0, ge=0, le=16)
    # Decode steps the continuous engine keeps queued on the GPU ahead of the host (CUDA; the CPU steps one at a
    # time): it reads a step's tokens back while the next ``pipeline_depth`` run, so the GPU idles only when the
    # step loop falls that many steps (~8 ms each at 32 rows on an H200) behind, e.g. waiting for the GIL under
    # HTTP load. A row that ends rides along that many steps (its tokens dropped), and a request's context is
    # that many tokens minus one shorter. 1 = the loop as measured; 2 gained nothing once the loop stopped waiting
    # on the GPU at each finished request (an H200, 32 clients: 1,674 vs 1,701 tok/s, TTFT p50 0.60 vs 0.47 s;
    # bench/results/engine_bench_run54_h200.md).
    pipeline_depth: int = Field(1, ge=1, le=4)
    # How long an idle vision tower may hold the images waiting for it while enough of a burst's other images are
    # still on their way (decoded or prepared in the image threads) to fill its chunk (scheduler.gather_left); 0 =
    # never hold: the first ready image starts at once (the behaviour measured up to Session 18). A lone request
    # never waits.
    burst_gather_ms: int = Field(0, ge=0, le=1000)
    # The vision tower's encoder layers (continuous engine): "fused" = q/k/v as one GEMM, GELU inside the fc1 GEMM
    # on GPUs (its tanh form, < 5e-4 from the erf form), residual + layer norm in one pass (engine/continuous/
    # tower.py); "transformers" = its modules as written; "auto" = on GPUs the faster of the two at start (the
    # fused one only if within 2e-2 of the other), elsewhere fused (float32: the same arithmetic).
    vision_layers: Literal["auto", "fused", "transformers"] = "auto"
    # The vision tower + projector as CUDA graphs (continuous engine on CUDA; engine/continuous/tower_graphs.py):
    # one per chunk size and padding width, captured at start (~10 s on an H200) and kept only if a replay equals
    # the eager tower; otherwise the eager tower, and /health engine.vision_graphs says why. A replay is one
    # launch, so the tower runs at the GPU's pace while request threads hold the GIL (a burst's first chunk of one
    # image: 196-534 ms eagerly, 45-74 ms replayed on an H200) and the decode steps run beside it. Off by default
    # since Session 16: the same GPU work in another order. An H200 at 32 clients, 12 closed-loop rounds, same
    # call, cuDNN's attention in the tower (bench/results/engine_bench_run50_h200.md), graphs (2 chunks) vs the
    # eager tower: 1,406 vs 1,413 tok/s, end-to-end p50 2.85 s both, but TTFT p50 1.05 vs 0.60 s and p95 1.57 vs
    # 1.33 s, against ITL p95 54 vs 98 ms and the opening burst's TTFT p95 1.97 vs 2.09 s: the eager tower's
    # launches hold the decode steps back, so the tower finishes sooner. Short runs (4 rounds, FlashAttention 4,
    # Session 15) favoured the graphs (TTFT p95 1.38-1.73 vs 1.79-1.84 s, 64 clients +5-13 % tok/s): there the
    # opening burst is a quarter of the requests. True suits a service that values smooth streams, bursts or many
    # clients over the first token; vision_priority "first" is meant to give the graphs the eager tower's order.
    # Off on a vision_sms partition (a green context is a context of its own).
    vision_graphs: bool = False
    # The continuous engine's own Triton kernels on CUDA (one-row projections, decode self- and cross-attention,
    # the vision tower's residual + layer norm),
    # each still timed at start and used only where it is correct and faster. False: PyTorch's kernels only
    # (a switch for ruling them out when a GPU misbehaves, and the benchmark's comparison).
    triton_kernels: bool = True
    max_batch_size: int = Field(8, ge=1, le=1024)
    max_wait_ms: float = Field(10.0, ge=0, le=60_000)
    queue_limit: int = Field(64, ge=1, le=100_000)
    request_timeout_s: float = Field(300.0, gt=0, le=86_400)
    drain_timeout_s: float = Field(60.0, ge=0, le=86_400)
    # The engine has work and no step finished for this long: /health and /ready say "stalled" (liveness.py).
    stall_timeout_s: float = Field(60.0, gt=0, allow_inf_nan=False)
    max_body_mb: float = Field(25.0, gt=0, le=4096)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_image_mb: float = Field(20.0, gt=0, le=4096)
    api_keys: tuple[str, ...] = ()
    api_keys_file: str | None = None
    cache_max_entries: int = Field(1024, ge=0)
    cache_max_mb: float = Field(64.0, ge=0)
    cache_include_sampled: bool = False
    gen_max_new_tokens: int = Field(2048, ge=1, le=32_768)
    gen_temperature: float = Field(0.6, ge=0, le=10)
    gen_top_p: float = Field(0.9, gt=0, le=1)
    gen_do_sample: bool = False
    instance: str = ""
    # CPU budget (llamactl.server.cpus): 0 threads = this instance's share of the host's physical cores.
    cpu_threads: int = Field(0, ge=0, le=4096)
    # Threads that decode request images and compute their pixel values, apart from the event loop, the model
    # thread and asyncio's default pool; 0 = a quarter of the server's CPU threads, 2 to 4. Fewer threads finish a
    # burst's first images sooner and contend less with the model thread for the GIL (an H200 machine, 32
    # requests: the first 8 ready after 0.09 s with 4 threads, 0.12 s with 8, 0.19 s with 16, engine_burst_prep_
    # probe_run2_h200.json; burst TTFT p95 with 4 vs 8 threads 1.72 vs 1.84 s and 1.79 vs 1.86 s in two calls,
    # engine_burst_probe_run2/run3_h200.json).
    image_threads: int = Field(0, ge=0, le=256)
    cpu_pinning: bool = False
    host_slot: str = Field("0/1", pattern=r"^\d+/\d+$")
    # Jobs API retention (not in the env contract's list, but read the same way).
    jobs_max_entries: int = Field(1000, ge=1)
    jobs_ttl_s: float = Field(3600.0, gt=0)
    # Shared jobs on Redis (llamactl.state): redis://:PASSWORD@HOST:PORT/DB. None: in-memory jobs.
    redis_url: str | None = Field(None, pattern=r"^rediss?://", repr=False)
    jobs_slots: int = Field(0, ge=0, le=4096)  # jobs this instance runs at once; 0 = max_batch_size
    jobs_claim_idle_s: float = Field(30.0, gt=0, le=86_400)  # a claimed job silent this long is reclaimed
    jobs_max_deliveries: int = Field(3, ge=1, le=100)  # deliveries without an end before a job fails
    # Cluster-wide result cache in Redis (llamactl.state.cache), behind the local one; 0 MiB = off.
    cache_shared_mb: float = Field(0.0, ge=0, le=1_048_576)
    cache_shared_ttl_s: float = Field(86_400.0, gt=0, le=30 * 86_400)

    @model_validator(mode="after")
    def _keys_not_blank(self) -> Settings:
        if any(not k for k in self.api_keys):
            raise ValueError("api_keys: empty key in the list")
        from llamactl.state.keys import KeySpecError, parse_entries

        try:
            parse_entries(self.api_keys)
        except KeySpecError as exc:
            raise ValueError(f"api_keys: {exc}") from None
        index, count = (int(x) for x in self.host_slot.split("/"))
        if not 0 <= index < count:
            raise ValueError(f"host_slot: expected INDEX/COUNT with 0 <= INDEX < COUNT, found {self.host_slot}")
        return self

    # -- construction ------------------------------------------------------------------------------------

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``LLAMACTL_*`` variables (and ``LLAMACTL_CONFIG``), then apply overrides.

        Raises ``SettingsError`` naming every bad setting and its source.
        """
        env = os.environ if env is None else env
        raw: dict[str, tuple[Any, str]] = {}
        config_path = env.get(ENV_PREFIX + "CONFIG")
        if config_path:
            for key, value in load_config_file(Path(config_path)).items():
                raw[key] = (value, f"{config_path}: {key}")
        for name in cls.model_fields:
            env_name = ENV_PREFIX + name.upper()
            if env_name in env:
                raw[name] = (env[env_name], env_name)
        for name, value in overrides.items():
            if value is not None:
                raw[name] = (value, "--" + name.replace("_", "-"))
        unknown = [src for key, (_, src) in raw.items() if key not in cls.model_fields]
        if unknown:
            raise SettingsError("; ".join(f"{src}: unknown setting" for src in unknown))
        values = {k: _coerce(k, v) for k, (v, _) in raw.items()}
        if "model" not in values:
            raise SettingsError("no model given: set LLAMACTL_MODEL or pass --model PATH_OR_HUB_ID")
        if values.get("api_keys_file"):
            values["api_keys"] = tuple(values.get("api_keys", ())) + _read_keys(values["api_keys_file"])
        try:
            return cls(**values)
        except ValidationError as exc:
            raise SettingsError(_describe(exc, {k: src for k, (_, src) in raw.items()})) from None

    def config_hash(self) -> str:
        """sha256 (first 16 hex chars) of the canonical JSON of every effective setting except host/port/label.

        API keys and the Redis URL contribute only their sha256, so the hash can be shown without leaking them.
        """
        data = self.model_dump(mode="json", exclude=set(_UNHASHED))
        data["api_keys"] = sorted(hashlib.sha256(k.encode()).hexdigest() for k in self.api_keys)
        data.pop("api_keys_file", None)  # its contents are already in api_keys
        if self.redis_url is not None:  # holds the password
            data["redis_url"] = hashlib.sha256(self.redis_url.encode()).hexdigest()
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML mapping or a KEY=VALUE file; keys may be ``LLAMACTL_X`` or ``x``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"LLAMACTL_CONFIG: cannot read {path}: {exc.strerror or exc}") from None
    data: dict[str, Any] = {}
    if path.suffix in (".yaml", ".yml", ".json"):
        try:
            import yaml
        except ImportError:  # pragma: no cover - pyyaml is a base dependency
            raise SettingsError(f"{path}: reading YAML needs pyyaml") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SettingsError(f"{path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise SettingsError(f"{path}: expected a mapping of setting names to values")
        items = [(str(k), v) for k, v in loaded.items()]
    else:
        items = []
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "=" not in line:
                raise SettingsError(f"{path}:{lineno}: expected KEY=VALUE, found {line[:40]!r}")
            key, _, value = line.partition("=")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            items.append((key.strip(), value))
    for key, value in items:
        name = key[len(ENV_PREFIX) :] if key.upper().startswith(ENV_PREFIX) else key
        data[name.lower()] = value
    data.pop("config", None)
    return data


def _coerce(name: str, value: Any) -> Any:
    if name == "api_keys" and isinstance(value, str):
        return tuple(k.strip() for k in value.split(",") if k.strip())
    if name in ("revision", "redis_url") and value == "":
        return None
    return value


def _read_keys(path: str) -> tuple[str, ...]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"LLAMACTL_API_KEYS_FILE: cannot read {path}: {exc.strerror or exc}") from None
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def _describe(exc: ValidationError, sources: dict[str, str]) -> str:
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        field = str(err["loc"][0]) if err["loc"] else ""
        where = sources.get(field, field or "settings")
        lines.append(f"{where}: {err['msg']}")
    return "invalid server settings: " + "; ".join(lines)
