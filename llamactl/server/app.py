"""The FastAPI app: owns the model's lifetime (lifespan), the probes, /metrics and the error shape.

The model lives on one thread ("llamactl-model") that loads, warms up, then serves batches; the event loop
only ever waits on futures. ``/health`` reads state and never touches the model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamactl import __version__
from llamactl.server.batching import Batcher
from llamactl.server.cpus import CpuBudget
from llamactl.server.engine import Engine
from llamactl.server.inference import ApiError, Inference
from llamactl.server.jobs import JobStore
from llamactl.server.metrics import CONTENT_TYPE, Metrics
from llamactl.server.middleware import AccountingMiddleware, BodyLimitMiddleware
from llamactl.server.settings import Settings

log = logging.getLogger("llamactl.server")


class ServerState:
    """Everything the routes share. ``status`` is the one truth for /health, /ready and admission."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.started = time.monotonic()
        self.created = int(time.time())
        self.draining = False
        self.drain_finished = False
        self.load_error: str | None = None
        self.in_flight = [0]  # inference HTTP requests being handled (mutated by the accounting middleware)
        self.batcher = Batcher(
            engine,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            queue_limit=settings.queue_limit,
            on_batch=lambda n: self.metrics.batch_size.observe(n),
            on_batch_done=lambda s: self.metrics.batch_duration.observe(s),
            in_server=lambda: self.busy,
        )
        self.metrics = Metrics(
            running=lambda: float(self.batcher.running),
            waiting=lambda: float(self.batcher.queued),
            gpu_memory=self._gpu_memory,
        )
        self.cache = _make_cache(settings)
        self.jobs = JobStore(settings.jobs_max_entries, settings.jobs_ttl_s)
        self.inference = Inference(
            settings, engine, self.batcher, self.metrics, self.cache, lambda: self.status
        )
        self.thread: threading.Thread | None = None
        self.cpu: CpuBudget | None = None

    @property
    def status(self) -> str:
        if self.load_error is not None:
            return "failed"
        if self.draining:
            return "draining"
        return self.engine.state

    @property
    def busy(self) -> int:
        return self.in_flight[0] + self.jobs.active

    def _gpu_memory(self) -> tuple[int, int] | None:
        try:
            return self.engine.gpu_memory()
        except Exception:  # noqa: BLE001 - a failed load is reported by /health, not raised
            return None

    def model_main(self) -> None:
        try:
            self.engine.load()
            self.engine.warmup()
        except Exception as exc:
            log.exception("model load failed")
            self.load_error = f"{type(exc).__name__}: {exc}"[:2000]
            return
        log.info("model ready: %s", self.settings.model)
        self.batcher.run_forever()

    def begin_drain(self) -> None:
        if not self.draining:
            log.info("draining: refusing new inference, %d request(s) in flight", self.busy)
        self.draining = True

    async def wait_drained(self, timeout_s: float) -> bool:
        if self.drain_finished:  # the signal handler already waited (or gave up): do not wait twice
            timeout_s = 0
        deadline = time.monotonic() + timeout_s
        while self.busy > 0 or self.batcher.queued > 0 or self.batcher.running > 0:
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
        return {
            "status": self.status,
            "model": self.settings.model,
            "version": __version__,
            "config_hash": self.settings.config_hash(),
            "instance": self.settings.instance,
            "in_flight": self.busy,
            "queued": self.batcher.queued,
            "gpu_memory": None if mem is None else {"used_bytes": mem[0], "total_bytes": mem[1]},
            "uptime_s": round(time.monotonic() - self.started, 3),
            "cpu": None if self.cpu is None else self.cpu.describe(),
            "engine": self.engine.describe() if hasattr(self.engine, "describe") else None,
            "error": self.load_error,
        }


def _make_cache(settings: Settings) -> Any:
    if settings.cache_max_entries <= 0 or settings.cache_max_mb <= 0:
        return None
    from llamactl.server.cache import ResultCache

    return ResultCache(
        max_entries=settings.cache_max_entries, max_bytes=int(settings.cache_max_mb * 1024 * 1024)
    )


def error_response(
    status: int, message: str, kind: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "the request body is not valid JSON"
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid value')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "; ".join(parts) + more


def create_app(settings: Settings, engine: Engine | None = None, cpu: CpuBudget | None = None) -> FastAPI:
    """Build the app. ``engine`` defaults to the transformers engine; tests and benches may inject another.

    ``cpu`` is the budget ``llamactl serve`` applied to this process (None in-process, e.g. under tests).
    """
    if engine is None:
        from llamactl.server.hf_engine import HFEngine

        engine = HFEngine(settings, threads=None if cpu is None else cpu.threads)
    state = ServerState(settings, engine)
    state.cpu = cpu

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.thread = threading.Thread(target=state.model_main, name="llamactl-model", daemon=True)
        state.thread.start()
        try:
            yield
        finally:
            state.begin_drain()
            await state.wait_drained(0 if state.load_error else settings.drain_timeout_s)
            state.batcher.stop()
            await state.jobs.cancel_all()
            await asyncio.to_thread(state.thread.join, 30)
            if not state.thread.is_alive():
                engine.close()

    app = FastAPI(
        title="llamactl serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.llamactl = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.kind, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(exc)
        state.metrics.request_errors.labels(reason="invalid_request").inc()
        return error_response(status, message, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, str(exc.detail), kind, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        state.metrics.request_errors.labels(reason="internal").inc()
        return error_response(500, "internal server error", "internal")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return state.health()

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.status == "ready":
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "status": state.status}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    from llamactl.server.routes_infer import router as infer_router
    from llamactl.server.routes_openai import router as openai_router

    app.include_router(infer_router)
    app.include_router(openai_router)

    # add_middleware puts each one outside the previous: the order below is innermost first, so requests meet
    # accounting (counts everything, even 401/413), then the body limit, then API keys, then the routes.
    from llamactl.server.auth import ApiKeyMiddleware

    app.add_middleware(
        ApiKeyMiddleware,
        keys=settings.api_keys,
        on_reject=lambda: state.metrics.request_errors.labels(reason="unauthorized").inc(),
    )
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=int(settings.max_body_mb * 1024 * 1024),
        on_reject=lambda: state.metrics.request_errors.labels(reason="body_too_large").inc(),
    )
    app.add_middleware(
        AccountingMiddleware,
        count=lambda ep, code: state.metrics.requests.labels(endpoint=ep, code=str(code)).inc(),
        in_flight=state.in_flight,
    )
    return app


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.llamactl
    return state
