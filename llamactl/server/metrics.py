"""Prometheus metrics with vLLM/TGI meanings, so existing dashboards map over.

One registry per app (not the global one), so several servers in one process (tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(
        self,
        *,
        running: Callable[[], float],
        waiting: Callable[[], float],
        gpu_memory: Callable[[], tuple[int, int] | None],
    ) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests_running = Gauge(
            "llamactl_num_requests_running",
            "Requests currently being generated (in a running batch).",
            registry=r,
        )
        self.requests_running.set_function(running)
        self.requests_waiting = Gauge(
            "llamactl_num_requests_waiting", "Requests waiting in the queue for a batch.", registry=r
        )
        self.requests_waiting.set_function(waiting)
        self.e2e_latency = Histogram(
            "llamactl_e2e_request_latency_seconds",
            "End-to-end latency of inference requests, from arrival to the last token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "llamactl_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "llamactl_batch_size",
            "Number of sequences per generate call.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_duration = Histogram(
            "llamactl_batch_duration_seconds",
            "Wall time of one batched generate call (preprocessing, prefill and every decode step).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "llamactl_prompt_tokens", "Prompt tokens processed (prefill), image token included.", registry=r
        )
        self.generation_tokens = Counter("llamactl_generation_tokens", "Tokens generated.", registry=r)
        self.request_errors = Counter(
            "llamactl_request_errors", "Failed inference requests by reason.", ["reason"], registry=r
        )
        self.requests = Counter(
            "llamactl_requests",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "code"],
            registry=r,
        )
        self.cache_hits = Counter("llamactl_cache_hits", "Result cache hits.", registry=r)
        self.cache_misses = Counter("llamactl_cache_misses", "Result cache misses.", registry=r)
        self._gpu_memory = gpu_memory
        self.gpu_used = Gauge(
            "llamactl_gpu_memory_used_bytes", "GPU memory in use on this device.", registry=r
        )
        self.gpu_used.set_function(lambda: float((gpu_memory() or (0, 0))[0]))
        self.gpu_total = Gauge("llamactl_gpu_memory_total_bytes", "GPU memory on this device.", registry=r)
        self.gpu_total.set_function(lambda: float((gpu_memory() or (0, 0))[1]))

    def render(self) -> bytes:
        return generate_latest(self.registry)
