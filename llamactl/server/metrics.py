"""Prometheus metrics with vLLM/TGI meanings, so existing dashboards map over.

One registry per app (not the global one), so several servers in one process (tests) do not collide.
Values the engine already keeps (counts, pool usage, its name) are read through callables at scrape time;
the constructor's defaults report 0 (or "unknown"), so every name is exposed whatever the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

from llamactl.server.gpu_health import GpuReading
from llamactl.server.gpu_metrics import GpuCollector

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Per-token times: a graph-captured decode step of the 11B model is ~6-10 ms; HF generate is 40-120 ms.
_TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)

CONTENT_TYPE = CONTENT_TYPE_LATEST


def _zero() -> float:
    return 0.0


def _unknown() -> str:
    return "unknown"


def _no_gpu() -> GpuReading | None:
    return None


def _no_fault() -> bool:
    return False


class _ReadAtScrape:
    """A counter and an info metric whose values the engine keeps: read when /metrics is scraped."""

    def __init__(self, steps: Callable[[], float], engine: Callable[[], str]) -> None:
        self._steps = steps
        self._engine = engine

    def _families(self, steps: float | None, engine: str) -> list[Metric]:
        counter = CounterMetricFamily(
            "llamactl_engine_steps", "Engine steps completed (decode steps and prefill or encode chunks).",
            value=steps,
        )
        info = InfoMetricFamily(
            "llamactl_engine", "The inference engine this server runs.", value={"name": engine}
        )
        return [counter, info]

    def describe(self) -> Iterable[Metric]:
        return self._families(None, "")  # names only: the callables may not be ready at registration

    def collect(self) -> Iterable[Metric]:
        return self._families(float(self._steps()), self._engine())


# Why an inference request failed (``llamactl_request_errors_total{reason}``), as the server reports them.
ERROR_REASONS = ("invalid_request", "invalid_image", "queue_full", "timeout", "engine_error", "draining",
                 "not_ready", "client_disconnect", "too_many_jobs", "jobs_unavailable")


def _histogram(registry: CollectorRegistry, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
    return Histogram(name, doc, buckets=buckets, registry=registry)


def _read_gauge(registry: CollectorRegistry, name: str, doc: str, read: Callable[[], float]) -> Gauge:
    """A gauge whose value is ``read()`` at scrape time."""
    gauge = Gauge(name, doc, registry=registry)
    gauge.set_function(lambda: float(read()))
    return gauge


class Metrics:
    def __init__(
        self,
        *,
        running: Callable[[], float],
        waiting: Callable[[], float],
        gpu_memory: Callable[[], tuple[int, int] | None],
        kv_pool_usage: Callable[[], float] = _zero,
        cross_pool_usage: Callable[[], float] = _zero,
        waiting_for_memory: Callable[[], float] = _zero,
        stalled: Callable[[], float] = _zero,
        engine_steps: Callable[[], float] = _zero,
        engine_name: Callable[[], str] = _unknown,
        gpu: Callable[[], GpuReading | None] = _no_gpu,
        gpu_fault: Callable[[], bool] = _no_fault,
        ready: Callable[[], bool] = _no_fault,
        queue_limit: int = 0,
        build: dict[str, str] | None = None,
    ) -> None:
        """Every callable is read at scrape time.

        ``running``/``waiting``: requests decoding / queued now. ``kv_pool_usage``, ``cross_pool_usage``:
        the used fraction (0..1) of the self-attention KV and cross-attention pools. ``waiting_for_memory``:
        queued requests held back because a pool is full. ``stalled``: true (1) while the engine has work
        and no step progress (``liveness.Liveness``). ``engine_steps``: steps completed so far (never
        decreases). ``engine_name``: the engine actually running ("continuous", or "hf" after a fallback).
        ``gpu``: the latest NVML reading (None: no NVML), ``gpu_fault``: a GPU fault latched (gpu_metrics.py).
        ``ready``: what /ready says; ``queue_limit`` and ``build`` (version, config_hash) are fixed for the
        process: the alert rules (``llamactl.plan.alerts``) compare queues and instances with them.
        """
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests_running = Gauge(
            "llamactl_num_requests_running",
            "Requests currently being generated (in a running batch).",
            registry=r,
        )
        self.requests_running.set_function(running)
        self.requests_waiting = _read_gauge(
            r, "llamactl_num_requests_waiting", "Requests waiting in the queue for a batch.", waiting
        )
        self._define_request_metrics(r)
        self._gpu_memory = gpu_memory
        self.gpu_used = _read_gauge(r, "llamactl_gpu_memory_used_bytes", "GPU memory in use on this device.",
                                    lambda: float((gpu_memory() or (0, 0))[0]))
        self.gpu_total = _read_gauge(r, "llamactl_gpu_memory_total_bytes", "GPU memory on this device.",
                                     lambda: float((gpu_memory() or (0, 0))[1]))
        # Engine internals, vLLM's meanings (time per output token: per request, after its first token).
        self.time_per_output_token = _histogram(r, "llamactl_time_per_output_token_seconds", "Per request: (end-to-end time - time to first token) / (generated tokens - 1).", _TOKEN_BUCKETS)
        self.inter_token_latency = _histogram(r, "llamactl_inter_token_latency_seconds", "Time between two consecutive tokens of one request (every gap observed).", _TOKEN_BUCKETS)
        self.kv_pool_usage = _read_gauge(
            r, "llamactl_kv_pool_usage_ratio", "Used fraction of the self-attention KV pool (0 to 1).", kv_pool_usage
        )
        self.cross_pool_usage = _read_gauge(
            r, "llamactl_cross_pool_usage_ratio", "Used fraction of the cross-attention (image) K/V pool (0 to 1).",
            cross_pool_usage,
        )
        self.requests_waiting_for_memory = _read_gauge(
            r, "llamactl_requests_waiting_for_memory",
            "Queued requests held back until KV or cross-attention pool memory frees up.", waiting_for_memory,
        )
        self.engine_stalled = _read_gauge(
            r, "llamactl_engine_stalled",
            "1 while the engine has work and has completed no step for stall_timeout_s, else 0.",
            lambda: 1.0 if stalled() else 0.0,
        )
        r.register(_ReadAtScrape(engine_steps, engine_name))
        r.register(GpuCollector(gpu, gpu_fault))
        self.ready = _read_gauge(r, "llamactl_ready", "1 while /ready answers 200 (loaded, warm, not draining, "
                                 "stalled or faulted), else 0.", lambda: 1.0 if ready() else 0.0)
        self.queue_limit = Gauge("llamactl_queue_limit", "Requests the queue holds before answering 429.",
                                 registry=r)
        self.queue_limit.set(queue_limit)
        Info("llamactl_build", "This server's llamactl version and effective config hash.",
             registry=r).info(build or {"version": "", "config_hash": ""})

    def _define_request_metrics(self, r: CollectorRegistry) -> None:
        """Latency histograms and request/token/error/cache counters (observed by the routes and admission)."""
        self.e2e_latency = _histogram(r, "llamactl_e2e_request_latency_seconds", "End-to-end latency of inference requests, from arrival to the last token.", _LATENCY_BUCKETS)
        self.ttft = _histogram(r, "llamactl_time_to_first_token_seconds", "Time from request arrival to its first generated token.", _TTFT_BUCKETS)
        # Where a request's time goes before its first token: its image decoded (before the TTFT above starts),
        # its preparation (the continuous engine's processor run), then its wait in the engine's queue.
        self.image_decode = _histogram(r, "llamactl_image_decode_seconds", "Per image request: time to decode and check its image (before the TTFT's start).", _TTFT_BUCKETS)
        self.processor = _histogram(r, "llamactl_request_processor_seconds", "Per request: its preparation before it is queued (the processor: prompt tokens, its image's tiles and pixel values; an engine that processes its batches itself only checks the length here).", _TTFT_BUCKETS)
        self.queue_time = _histogram(r, "llamactl_request_queue_seconds", "Per request: time from being queued for the engine until the engine took it (into the vision tower, a prefill or a batch).", _TTFT_BUCKETS)
        self.batch_size = _histogram(r, "llamactl_batch_size", "Number of sequences per generate call.", _BATCH_BUCKETS)
        self.batch_duration = _histogram(r, "llamactl_batch_duration_seconds", "Wall time of one batched generate call (preprocessing, prefill and every decode step).", _LATENCY_BUCKETS)
        self.prompt_tokens = Counter(
            "llamactl_prompt_tokens", "Prompt tokens processed (prefill), image token included.", registry=r
        )
        self.generation_tokens = Counter("llamactl_generation_tokens", "Tokens generated.", registry=r)
        self.request_errors = Counter(
            "llamactl_request_errors", "Failed inference requests by reason.", ["reason"], registry=r
        )
        for reason in ERROR_REASONS:  # every series exists from the start: rate() and alerts see 0, not nothing
            self.request_errors.labels(reason=reason)
        self.requests = Counter(
            "llamactl_requests",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "code"],
            registry=r,
        )
        self.cache_hits = Counter("llamactl_cache_hits", "Result cache hits.", registry=r)
        self.cache_misses = Counter("llamactl_cache_misses", "Result cache misses.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
