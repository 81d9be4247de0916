"""What the routes share (``ServerState``) and how the serving engine is chosen.

Route modules import ``get_state`` from here, never from the app factory. ``status`` is the one truth for
/health, /ready and admission; it includes ``stalled`` (the engine has work and made no step for
``stall_timeout_s``), which status and watch treat as not ready, and ``gpu_fault`` (NVML reported a hardware
fault of this instance's GPU, ``gpu_health.py``), which watch drains and never restarts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request

from llamactl import __version__
from llamactl.server.admission import Admission
from llamactl.server.cpus import CpuBudget
from llamactl.server.engine.protocol import Engine, ServingEngine
from llamactl.server.gpu_health import GpuHealth, device_selector, open_gpu_health
from llamactl.server.inference import Inference, image_thread_count
from llamactl.server.jobs import JobStore
from llamactl.server.liveness import Liveness, exit_for_restart, is_fatal_cuda_error
from llamactl.server.metrics import Metrics
from llamactl.server.settings import Settings

if TYPE_CHECKING:
    from llamactl.state.service import SharedJobs

log = logging.getLogger("llamactl.server")


def choose_engine(settings: Settings, threads: int | None) -> tuple[ServingEngine, str | None]:
    """The serving engine the settings ask for, and why another one runs instead (None when it is the one asked).

    ``auto`` and ``continuous`` run the continuous engine; bitsandbytes quantization (nf4/int8) runs on ``hf``,
    whose transformers layers handle the quantized weights; fp8 runs on the continuous engine (its own kernel).
    """
    from llamactl.server.hf_engine import HFEngine

    wanted = settings.engine
    reason: str | None = None
    if wanted == "hf" and settings.quantization == "fp8":
        reason = "quantization fp8 runs on the continuous engine (its FP8 kernel; the hf engine has none)"
        wanted = "continuous"
    if wanted in ("auto", "continuous") and settings.quantization in ("nf4", "int8"):
        reason = (
            f"quantization {settings.quantization} runs on the hf engine (the continuous engine takes "
            "bf16/fp16/fp32 weights)"
        )
        wanted = "hf"
    if wanted == "hf":
        return static_engine(HFEngine(settings, threads=threads), settings), reason
    from llamactl.server.engine.continuous import ContinuousEngine

    return ContinuousEngine(settings, threads=threads), reason


def static_engine(engine: Engine, settings: Settings) -> ServingEngine:
    """A model-level engine behind the ``hf`` windowed static batches, sized by the settings."""
    from llamactl.server.engine.static import StaticBatches

    return StaticBatches(engine, max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms)


class ServerState:
    def __init__(
        self,
        settings: Settings,
        engine: ServingEngine | Engine | None = None,
        cpu: CpuBudget | None = None,
        gpu: GpuHealth | None = None,
    ) -> None:
        self.settings = settings
        self.cpu = cpu
        if gpu is None:
            cpu_only = settings.device == "cpu"
            gpu = (GpuHealth(None, unavailable_reason="CPU instance (device cpu)") if cpu_only
                   else open_gpu_health(device_selector()))
        self.gpu = gpu
        self.engine_note: str | None = None
        if engine is None:
            engine, self.engine_note = choose_engine(settings, None if cpu is None else cpu.threads)
        elif hasattr(engine, "generate_batch"):  # a model-level engine (tests, benches): the static scheduler
            engine = static_engine(engine, settings)  # type: ignore[arg-type]
        self.engine: ServingEngine = engine
        self.liveness = Liveness(settings.stall_timeout_s)
        # Optional hooks an engine may expose (set by attribute: the protocol stays minimal).
        hooks: Any = self.engine
        if hasattr(hooks, "liveness"):
            hooks.liveness = self.liveness
        if hasattr(hooks, "in_server"):
            hooks.in_server = lambda: self.busy
        if hasattr(hooks, "on_batch"):
            hooks.on_batch = lambda n: self.metrics.batch_size.observe(n)
            hooks.on_batch_done = lambda s: self.metrics.batch_duration.observe(s)
        self.started = time.monotonic()
        self.created = int(time.time())
        self.draining = False
        self.drain_finished = False
        self.load_error: str | None = None
        self.in_flight = [0]  # inference HTTP requests being handled (mutated by the accounting middleware)
        self.batcher = Admission(self.engine, queue_limit=settings.queue_limit)
        self.metrics: Metrics = Metrics(
            running=lambda: float(self.engine.running),
            waiting=lambda: float(self.engine.waiting),
            gpu_memory=self._gpu_memory,
            kv_pool_usage=lambda: float(self._engine_figure("kv_pool_usage")),
            cross_pool_usage=lambda: float(self._engine_figure("cross_pool_usage")),
            waiting_for_memory=lambda: float(self._engine_figure("waiting_for_memory")),
            stalled=lambda: 1.0 if self.stalled else 0.0,
            engine_steps=lambda: float(self.liveness.steps),
            engine_name=lambda: self.engine.name,
            gpu=lambda: self.gpu.reading(),
            gpu_fault=lambda: self.gpu.fault is not None,
            ready=lambda: self.status == "ready",
            queue_limit=settings.queue_limit,
            build={"version": __version__, "config_hash": settings.config_hash()},
        )
        if hasattr(hooks, "metrics"):
            hooks.metrics = self.metrics
        self.cache = _make_cache(settings)
        self.jobs = JobStore(settings.jobs_max_entries, settings.jobs_ttl_s, instance=settings.instance)
        self.shared_jobs = _shared_jobs(  # None: in-memory jobs only
            settings, lambda: self.status == "ready", lambda: self.batcher.queued < self.batcher.queue_limit
        )
        self.inference = Inference(
            settings, self.engine, self.batcher, self.metrics, self.cache, lambda: self.status,
            image_threads=image_thread_count(settings.image_threads, cpu.threads if cpu is not None else None),
        )
        self.inference.shared_cache = _shared_cache(settings, self.metrics)
        if hasattr(hooks, "images_on_the_way"):
            hooks.images_on_the_way = self.inference.images_on_the_way
        self.quotas = _quotas(settings, self.metrics)  # None without API keys
        self.thread: threading.Thread | None = None

    def _engine_figure(self, name: str) -> float:
        value = getattr(self.engine, name, 0.0)
        return float(value() if callable(value) else value)

    @property
    def busy_engine(self) -> bool:
        return self.engine.running + self.engine.waiting > 0

    @property
    def stalled(self) -> bool:
        return self.engine.state == "ready" and self.liveness.stalled(self.busy_engine)

    @property
    def status(self) -> str:
        if self.gpu.fault is not None:
            return "gpu_fault"  # before failed and stalled: a broken GPU explains those, and is not restarted
        if self.load_error is not None:
            return "failed"
        if self.draining:
            return "draining"
        if self.stalled:
            return "stalled"
        return self.engine.state

    @property
    def busy(self) -> int:
        shared = 0 if self.shared_jobs is None else self.shared_jobs.active
        return self.in_flight[0] + self.jobs.active + shared

    def _gpu_memory(self) -> tuple[int, int] | None:
        try:
            return self.engine.gpu_memory()
        except Exception:  # noqa: BLE001 - a failed load is reported by /health, not raised
            return None

    def model_main(self) -> None:
        self.gpu.start()
        try:
            self.engine.start()
        except Exception as exc:
            log.exception("model load failed")
            self.load_error = f"{type(exc).__name__}: {exc}"[:2000]
            if is_fatal_cuda_error(exc):
                exit_for_restart(f"CUDA error while loading: {exc}")
            return
        log.info("model ready: %s (engine %s)", self.settings.model, self.engine.name)
        try:
            self.batcher.run_forever()
        except Exception as exc:
            # The step loop only ends on stop(); an exception that escapes it poisoned the engine (a CUDA
            # error leaves the context unusable): exit non-zero so systemd restarts this instance.
            log.exception("engine step loop failed")
            exit_for_restart(f"engine step loop failed: {type(exc).__name__}: {exc}")

    def begin_drain(self) -> None:
        if not self.draining:
            log.info("draining: refusing new inference, %d request(s) in flight", self.busy)
        self.draining = True

    async def wait_drained(self, timeout_s: float) -> bool:
        if self.drain_finished or self.stalled or self.engine.state != "ready":
            # already waited; nothing will ever finish; or still loading (its warm-up is not a client's request)
            timeout_s = 0
        deadline = time.monotonic() + timeout_s
        while self.busy > 0 or self.engine.waiting > 0 or self.engine.running > 0:
            if time.monotonic() >= deadline:
                if timeout_s > 0:
                    log.warning("drain timeout: %d request(s) still in flight", self.busy)
                self.drain_finished = True
                return False
            await asyncio.sleep(0.05)
        self.drain_finished = True
        return True

    def health(self) -> dict[str, Any]:
        mem = self._gpu_memory()
        described = self.engine.describe() if hasattr(self.engine, "describe") else {}
        engine = {"name": self.engine.name, **described, "requested": self.settings.engine}
        if self.engine_note:
            engine["fallback_reason"] = self.engine_note
        live = self.liveness.state(self.busy_engine)
        engine["running"] = self.engine.running
        engine["waiting"] = self.engine.waiting
        engine["steps"] = live.steps
        engine["since_progress_s"] = None if live.since_progress_s is None else round(live.since_progress_s, 3)
        error = self.load_error or (live.describe() if self.stalled else None)
        if self.gpu.fault is not None:
            error = f"GPU fault: {self.gpu.fault}"
        return {
            "status": self.status,
            "model": self.settings.model,
            "version": __version__,
            "config_hash": self.settings.config_hash(),
            "instance": self.settings.instance,
            "in_flight": self.busy,
            "queued": self.engine.waiting,
            "gpu_memory": None if mem is None else {"used_bytes": mem[0], "total_bytes": mem[1]},
            "uptime_s": round(time.monotonic() - self.started, 3),
            "cpu": None if self.cpu is None else self.cpu.describe(),
            "image_threads": self.inference.image_threads,
            "engine": engine,
            "gpu": self.gpu.describe(),
            "error": error,
            **self._shared_state(),
        }

    def _shared_state(self) -> dict[str, Any]:
        """Redis-backed parts (only when configured): the cluster-wide cache's state."""
        shared = self.inference.shared_cache
        out = {} if shared is None else {"shared_cache": shared.describe()}
        if self.quotas is not None:
            out["quotas"] = self.quotas.describe()
        return out


def _make_cache(settings: Settings) -> Any:
    if settings.cache_max_entries <= 0 or settings.cache_max_mb <= 0:
        return None
    from llamactl.server.cache import ResultCache

    return ResultCache(
        max_entries=settings.cache_max_entries, max_bytes=int(settings.cache_max_mb * 1024 * 1024)
    )


def _shared_jobs(
    settings: Settings, accepting: Callable[[], bool], room: Callable[[], bool]
) -> SharedJobs | None:
    if settings.redis_url is None:
        return None
    from llamactl.state.service import SharedJobs

    return SharedJobs(
        settings.redis_url, instance=settings.instance, ttl_s=settings.jobs_ttl_s,
        slots=settings.jobs_slots or settings.max_batch_size, claim_idle_s=settings.jobs_claim_idle_s,
        max_deliveries=settings.jobs_max_deliveries, accepting=accepting, room=room,
    )


def _shared_cache(settings: Settings, metrics: Metrics) -> Any:
    if settings.redis_url is None or settings.cache_shared_mb <= 0:
        return None
    from llamactl.state.cache import SharedCache

    return SharedCache(settings.redis_url, model=settings.model, revision=settings.revision,
                       max_bytes=int(settings.cache_shared_mb * 1024 * 1024), ttl_s=settings.cache_shared_ttl_s,
                       registry=metrics.registry)


def _quotas(settings: Settings, metrics: Metrics) -> Any:
    if not settings.api_keys:
        return None
    from llamactl.state.keys import parse_entries
    from llamactl.state.quotas import Quotas

    return Quotas(parse_entries(settings.api_keys), settings.redis_url, metrics.registry)


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.llamactl
    return state
