"""What every inference route shares: admission, image decoding, parameters, cache, engine, metrics.

Routes translate HTTP to these calls; failures surface as ``ApiError`` with the contract's status and type.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import time
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.types import Receive

from llamactl.server.admission import Admission, DeadlineExceeded, EngineFailure, QueueFull, Stopped
from llamactl.server.engine.protocol import GenParams, GenRequest, GenResult, ServingEngine
from llamactl.server.quota_mw import record_usage
from llamactl.server.settings import Settings

if TYPE_CHECKING:
    from PIL.Image import Image

    from llamactl.server.cache import ResultCache
    from llamactl.server.metrics import Metrics
    from llamactl.state.cache import SharedCache

T = TypeVar("T")


def image_thread_count(setting: int, cpu_threads: int | None) -> int:
    """``settings.image_threads``, or for 0 a quarter of the server's CPU threads (all the machine's without a
    budget), at least 2 and at most 4."""
    if setting > 0:
        return setting
    return max(2, min(4, (cpu_threads or os.cpu_count() or 2) // 4))


class ApiError(Exception):
    """An error answer: ``{"error": {"message", "type"}}`` with ``status`` (and optional headers)."""

    def __init__(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its place was given back."""


@dataclass(frozen=True)
class Outcome:
    result: GenResult
    cached: bool
    started: float  # time.monotonic() at arrival


class Inference:
    def __init__(
        self,
        settings: Settings,
        engine: ServingEngine,
        batcher: Admission,
        metrics: Metrics,
        cache: ResultCache | None,
        status: Callable[[], str],
        image_threads: int = 2,
    ) -> None:
        self.settings, self.engine, self.batcher, self.metrics, self.cache = (
            settings,
            engine,
            batcher,
            metrics,
            cache,
        )
        self._status = status
        self.shared_cache: SharedCache | None = None  # the cluster-wide cache (Redis), set by ServerState
        # image decoding and preparation (CPU work outside the GIL for the most part), first come first served
        self.image_threads = image_threads
        self.image_pool = ThreadPoolExecutor(image_threads, thread_name_prefix="llamactl-image")
        # Image requests on their way to the engine (its burst_gather_ms reads the count): being decoded, or
        # decoded and not yet handed over. The decoded ones by id, weakly: an image its request drops (an error,
        # a cached answer, a check-only decode) leaves the count with its last reference.
        self._decoding = 0
        self._decoded: weakref.WeakValueDictionary[int, Image] = weakref.WeakValueDictionary()

    def images_on_the_way(self) -> int:
        """Image requests being decoded or prepared here and not yet in the engine's queue (any thread)."""
        return self._decoding + len(self._decoded)

    async def _in_image_pool(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the image threads (the caller's context variables with it, as asyncio.to_thread)."""
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self.image_pool, context.run, fn, *args)

    def error(self, reason: str) -> None:
        self.metrics.request_errors.labels(reason=reason).inc()

    def check_accepting(self) -> None:
        status = self._status()
        if status == "ready":
            return
        self.error("not_ready")
        messages = {
            "loading": "the model is still loading; retry shortly",
            "draining": "the server is shutting down; send the request to another instance",
            "failed": "the model failed to load; see /health",
        }
        headers = {"Retry-After": "5"} if status == "loading" else {}
        raise ApiError(503, messages.get(status, f"the server is {status}"), "unavailable", headers)

    def check_capacity(self) -> None:
        """Refuse early (before decoding an image) when the queue is already full."""
        if self.batcher.queued >= self.batcher.queue_limit:
            self.error("queue_full")
            retry = str(self.batcher.retry_after())
            raise ApiError(
                429, "the request queue is full; retry later", "queue_full", {"Retry-After": retry}
            )

    def params(
        self,
        *,
        max_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        do_sample: bool | None,
        min_tokens: int = 0,
        ignore_eos: bool = False,
    ) -> GenParams:
        s = self.settings
        limit = s.gen_max_new_tokens
        max_new = limit if max_tokens is None else max_tokens
        if max_new > limit:
            self.error("invalid_request")
            raise ApiError(
                400, f"max_tokens: {max_new} is above this server's limit of {limit}", "invalid_request"
            )
        if do_sample is None:  # OpenAI style: temperature alone decides
            do_sample = s.gen_do_sample if temperature is None else temperature > 0
        temp = s.gen_temperature if temperature is None else temperature
        if do_sample and temp == 0:
            do_sample = False  # temperature 0 means greedy, as in every OpenAI-compatible server
        min_new = max_new if ignore_eos else min(min_tokens, max_new)
        return GenParams(
            max_new_tokens=max_new,
            temperature=temp,
            top_p=s.gen_top_p if top_p is None else top_p,
            do_sample=do_sample,
            min_new_tokens=min_new,
        )

    async def decode_image(self, data: str) -> Image:
        """Base64 (or data: URL) -> RGB image, in an image thread (decoding can take a while)."""
        from llamactl.server.images import ImageError, ImageLimits, decode_base64_image

        limits = ImageLimits(
            max_bytes=int(self.settings.max_image_mb * 1024 * 1024), max_pixels=self.settings.max_image_pixels
        )
        t0 = time.monotonic()
        self._decoding += 1
        try:
            image = await self._in_image_pool(decode_base64_image, data, limits)
        except ImageError as exc:
            self.error("invalid_image")
            raise ApiError(exc.status, exc.message, "invalid_image") from None
        finally:
            self._decoding -= 1
        self._decoded[id(image)] = image
        self.metrics.image_decode.observe(time.monotonic() - t0)
        return image

    def render(self, messages: list[dict[str, Any]]) -> str:
        try:
            return self.engine.render_prompt(messages)
        except ValueError as exc:
            self.error("invalid_request")
            raise ApiError(400, str(exc), "invalid_request") from None

    async def enqueue(
        self,
        prompt: str,
        image: Image | None,
        params: GenParams,
        *,
        cache_key: str | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Awaitable[Outcome]:
        """Admit a request (prepared in a worker thread, then handed to the engine) and return an awaitable of
        its outcome. Refusals (400 for a request the engine cannot take, 429, 503) raise here, before a caller
        starts a response, so a streamed request gets them as its HTTP status."""
        try:
            return await self._enqueue(prompt, image, params, cache_key, on_text)
        finally:
            self._handed_over(image)  # to the engine, or answered or refused without it

    def _handed_over(self, image: Image | None) -> None:
        if image is not None:
            self._decoded.pop(id(image), None)

    async def _enqueue(self, prompt: str, image: Image | None, params: GenParams, cache_key: str | None,
                       on_text: Callable[[str], None] | None) -> Awaitable[Outcome]:
        started = time.monotonic()
        if cache_key is not None and self.cache is not None:
            hit = self.cache.get(cache_key)
            if isinstance(hit, GenResult):
                self.metrics.cache_hits.inc()
                return _ready(Outcome(hit, True, started))
            self.metrics.cache_misses.inc()
        if cache_key is not None and self.shared_cache is not None:
            shared = await self.shared_cache.get(cache_key)  # None on a miss or while Redis is down
            if shared is not None:
                if self.cache is not None:
                    self.cache.put(cache_key, shared, len(shared.text.encode()) + 256)
                return _ready(Outcome(shared, True, started))
        req = GenRequest(
            prompt=prompt,
            image=image,
            params=params,
            on_text=on_text,
            deadline=started + self.settings.request_timeout_s,
        )
        self.check_capacity()  # refuse now, before the (slow) preparation; admission says 503 once stopping
        waiter = await self._admit(req)
        return self._finish(req, waiter, started, cache_key)

    async def _admit(self, req: GenRequest) -> Awaitable[GenResult]:
        """Prepare ``req`` in an image thread (tokens, image tensors), then hand it to admission."""
        t0 = time.monotonic()
        try:
            await self._in_image_pool(self.engine.prepare, req)
        except ValueError as exc:
            self.error("invalid_request")
            raise ApiError(400, str(exc), "invalid_request") from None
        self.metrics.processor.observe(time.monotonic() - t0)
        self._handed_over(req.image)  # before it is in the engine's queue: never counted twice
        try:
            return self.batcher.enqueue(req)
        except QueueFull as exc:
            self.error("queue_full")
            raise ApiError(429, str(exc), "queue_full", {"Retry-After": str(exc.retry_after_s)}) from None
        except Stopped as exc:
            self.error("draining")
            raise ApiError(503, str(exc), "unavailable") from None

    async def _finish(self, req: GenRequest, waiter: Awaitable[GenResult], started: float,
                      cache_key: str | None) -> Outcome:
        try:
            result = await waiter
        except DeadlineExceeded:
            self.error("timeout")
            raise ApiError(
                504,
                f"no answer within the request timeout of {self.settings.request_timeout_s:g}s",
                "timeout",
            ) from None
        except EngineFailure as exc:
            self.error("engine_error")
            raise ApiError(500, str(exc), "engine_error") from None
        except Stopped as exc:
            self.error("draining")
            raise ApiError(503, str(exc), "unavailable") from None
        if (
            result.finish_reason == "cancelled"
        ):  # the engine stopped it at its deadline before our timer fired
            self.error("timeout")
            raise ApiError(
                504,
                f"no answer within the request timeout of {self.settings.request_timeout_s:g}s",
                "timeout",
            )
        m = self.metrics
        m.e2e_latency.observe(time.monotonic() - started)
        if req.queued_at is not None and req.taken_at is not None:
            m.queue_time.observe(max(0.0, req.taken_at - req.queued_at))
        if result.first_token_at is not None:
            m.ttft.observe(max(0.0, result.first_token_at - started))
            if result.finished_at is not None and result.completion_tokens > 1:
                per_token = (result.finished_at - result.first_token_at) / (result.completion_tokens - 1)
                m.time_per_output_token.observe(max(0.0, per_token))
        m.prompt_tokens.inc(result.prompt_tokens)
        m.generation_tokens.inc(result.completion_tokens)
        record_usage(result.prompt_tokens, result.completion_tokens)  # charged to the request's API key
        if cache_key is not None and self.cache is not None:
            self.cache.put(cache_key, result, len(result.text.encode()) + 256)
        if cache_key is not None and self.shared_cache is not None:
            await self.shared_cache.put(cache_key, result)
        return Outcome(result, False, started)

    def cache_key(self, image_data: str | None, prompt: str, params: GenParams) -> str | None:
        if (self.cache is None and self.shared_cache is None) or (
            params.do_sample and not self.settings.cache_include_sampled
        ):
            return None
        from llamactl.server.cache import ResultCache

        return ResultCache.key((image_data or "").encode(), prompt, params.cache_dict())


async def _ready(outcome: Outcome) -> Outcome:
    return outcome


async def until_disconnected(receive: Receive) -> None:
    """Returns when the client goes away. Only call after the request body has been read."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(receive: Receive, work: Awaitable[Any]) -> Any:
    """Await ``work``; if the client disconnects first, cancel it (freeing its queue place) and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnected(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGone()
