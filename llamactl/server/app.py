"""The FastAPI app: owns the model's lifetime (lifespan), the probes, /metrics and the error shape.

The model lives on one thread ("llamactl-model") that loads, warms up, then serves batches; the event loop
only ever waits on futures. ``/health`` reads state and never touches the model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamactl import __version__
from llamactl.server.cpus import CpuBudget
from llamactl.server.engine.protocol import Engine, ServingEngine
from llamactl.server.errors import error_response
from llamactl.server.inference import ApiError
from llamactl.server.metrics import CONTENT_TYPE
from llamactl.server.middleware import AccountingMiddleware, BodyLimitMiddleware
from llamactl.server.settings import Settings
from llamactl.server.state import ServerState, get_state

log = logging.getLogger("llamactl.server")


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


def create_app(
    settings: Settings, engine: ServingEngine | Engine | None = None, cpu: CpuBudget | None = None
) -> FastAPI:
    """Build the app. The engine is chosen by ``settings.engine``; tests and benches may inject one (a model-level
    ``Engine`` runs behind the static batch scheduler).

    ``cpu`` is the budget ``llamactl serve`` applied to this process (None in-process, e.g. under tests).
    """
    state = ServerState(settings, engine, cpu)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.thread = threading.Thread(target=state.model_main, name="llamactl-model", daemon=True)
        state.thread.start()
        if state.shared_jobs is not None:
            from llamactl.server.routes_infer import run_job

            state.shared_jobs.start(lambda request, on_start: run_job(state, request, on_start))
        try:
            yield
        finally:
            state.begin_drain()
            await state.wait_drained(0 if state.load_error else settings.drain_timeout_s)
            if state.shared_jobs is not None:
                await state.shared_jobs.stop()  # hands back what it still holds
            if state.inference.shared_cache is not None:
                await state.inference.shared_cache.close()
            if state.quotas is not None:
                await state.quotas.close()
            state.batcher.stop()
            state.gpu.stop()
            await state.jobs.cancel_all()
            state.inference.image_pool.shutdown(wait=False, cancel_futures=True)
            await asyncio.to_thread(state.thread.join, 30)
            if not state.thread.is_alive():
                state.engine.close()

    app = FastAPI(
        title="llamactl serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.llamactl = state

    _install_error_handlers(app, state)
    _install_probes(app, state)

    from llamactl.server.routes_infer import router as infer_router
    from llamactl.server.routes_openai import router as openai_router

    app.include_router(infer_router)
    app.include_router(openai_router)
    from llamactl.server.openapi_instance import install as install_openapi

    install_openapi(app, settings)

    # add_middleware puts each one outside the previous: the order below is innermost first, so requests meet
    # accounting (counts everything, even 401/413), then the body limit, then API keys, then the routes.
    from llamactl.server.auth import ApiKeyMiddleware

    if state.quotas is not None:
        from llamactl.server.quota_mw import QuotaMiddleware

        app.add_middleware(QuotaMiddleware, quotas=state.quotas)  # inside the key check, which names the key
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


def _install_error_handlers(app: FastAPI, state: ServerState) -> None:
    """Every error leaves as ``{"error": {"message", "type"}}``; a bug is a 500 with no detail, logged."""

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


def _install_probes(app: FastAPI, state: ServerState) -> None:
    """/health, /ready and /metrics read state; they never touch the model."""
    from llamactl.server.openapi_docs import HEALTH_ROUTE, METRICS_ROUTE, READY_ROUTE

    @app.get("/health", **HEALTH_ROUTE)
    async def health() -> dict[str, Any]:
        return state.health()

    @app.get("/ready", **READY_ROUTE)
    async def ready() -> JSONResponse:
        status = state.status
        if status == "ready":
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "status": status}, status_code=503)

    @app.get("/metrics", **METRICS_ROUTE)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)


__all__ = ["ServerState", "create_app", "error_response", "get_state"]
