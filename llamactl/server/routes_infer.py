"""Seed-compatible routes: POST /infer, POST /batch_infer, and the jobs API (POST /v1/jobs, GET /v1/jobs/{id})."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Request
from fastapi.responses import JSONResponse

from llamactl.server.errors import error_response
from llamactl.server.inference import ApiError, ClientGone, Outcome, unless_disconnected
from llamactl.server.jobs import JOB_ID_PATTERN, JobsFull
from llamactl.server.openapi_docs import (
    EXAMPLE_IMAGE,
    BatchInferResponse,
    InferResponse,
    Job,
    JobAccepted,
    errors,
    example,
    ok,
)
from llamactl.server.protocol import BatchInferRequest, GenOptions, InferRequest, JobRequest
from llamactl.server.state import ServerState, get_state
from llamactl.state.client import StateUnavailable
from llamactl.state.jobs import JobFailed

router = APIRouter()

_INFER_EXAMPLE = example("A small PNG", {"image": EXAMPLE_IMAGE, "question": "What colour is it?", "max_tokens": 8})
_BATCH_EXAMPLE = example(
    "Two images, one question each",
    {"images": [EXAMPLE_IMAGE, EXAMPLE_IMAGE], "questions": ["What colour is it?", "Describe it."], "max_tokens": 8},
)


def _messages(question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def _params(state: ServerState, opts: GenOptions) -> Any:
    return state.inference.params(
        max_tokens=opts.max_tokens,
        temperature=opts.temperature,
        top_p=opts.top_p,
        do_sample=opts.do_sample,
        min_tokens=opts.min_tokens,
        ignore_eos=opts.ignore_eos,
    )


async def _admit(state: ServerState, image_b64: str, question: str, opts: GenOptions) -> Awaitable[Outcome]:
    """Validate and queue one item; returns the awaitable of its outcome (errors raise ApiError)."""
    svc = state.inference
    params = _params(state, opts)
    prompt = svc.render(_messages(question))
    svc.check_capacity()
    image = await svc.decode_image(image_b64)
    return await svc.enqueue(prompt, image, params, cache_key=svc.cache_key(image_b64, prompt, params))


def _answer(state: ServerState, outcome: Outcome) -> dict[str, Any]:
    from llamactl.server.cot import parse_staged

    res = outcome.result
    return {
        "result": parse_staged(res.text).to_dict(),
        "full_response": res.text,
        "inference_time": round(time.monotonic() - outcome.started, 4),
        "model": state.settings.model,
        "cached": outcome.cached,
        "finish_reason": res.finish_reason,
        "usage": {
            "prompt_tokens": res.prompt_tokens,
            "completion_tokens": res.completion_tokens,
            "total_tokens": res.prompt_tokens + res.completion_tokens,
        },
    }


def _error_dict(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ApiError):
        return {"message": exc.message, "type": exc.kind, "status": exc.status}
    return {"message": "internal server error", "type": "internal", "status": 500}


@router.post(
    "/infer",
    operation_id="infer",
    summary="Ask about one image; the answer split into its stages",
    responses={
        **ok(InferResponse, "The answer"),
        **errors(400, 401, 413, 415, 422, 429, 500, 503, 504),
    },
)
async def infer(
    body: Annotated[InferRequest, Body(openapi_examples=_INFER_EXAMPLE)], request: Request
) -> Any:
    state = get_state(request)
    state.inference.check_accepting()
    waiter = await _admit(state, body.image, body.question, body)
    try:
        outcome = await unless_disconnected(request.receive, waiter)
    except ClientGone:
        state.inference.error("client_disconnect")
        return error_response(499, "client closed the request", "client_disconnect")
    return _answer(state, outcome)


@router.post(
    "/batch_infer",
    operation_id="batch_infer",
    summary="Ask about several images at once; each item succeeds or fails on its own",
    responses={
        **ok(BatchInferResponse, "One result per image (an image's own failure is reported in its item)"),
        **errors(
            400, 401, 413, 422, 503,
            e400="The body is not JSON, questions is a list of another length than images, or max_tokens is "
            "above this server's limit.",
        ),
    },
)
async def batch_infer(
    body: Annotated[BatchInferRequest, Body(openapi_examples=_BATCH_EXAMPLE)], request: Request
) -> Any:
    state = get_state(request)
    state.inference.check_accepting()
    questions = [body.questions] * len(body.images) if isinstance(body.questions, str) else body.questions
    if len(questions) != len(body.images):
        raise ApiError(
            400,
            f"questions: {len(questions)} given for {len(body.images)} images (give one each, or a single string)",
            "invalid_request",
        )
    _params(state, body)  # options are the whole request's: refused once (400), not once per item

    async def one(image: str, question: str) -> dict[str, Any]:
        try:
            outcome = await (await _admit(state, image, question, body))
        except ApiError as exc:
            return {"success": False, "error": _error_dict(exc)}
        return {"success": True, **_answer(state, outcome)}

    # Every item is queued before any is awaited, so the batcher sees them together.
    work = asyncio.gather(*(one(img, q) for img, q in zip(body.images, questions)))
    try:
        items = await unless_disconnected(request.receive, work)
    except ClientGone:
        state.inference.error("client_disconnect")
        return error_response(499, "client closed the request", "client_disconnect")
    ok = sum(1 for it in items if it["success"])
    return {"results": items, "succeeded": ok, "failed": len(items) - ok, "model": state.settings.model}


@router.post(
    "/v1/jobs",
    status_code=202,
    operation_id="create_job",
    summary="Queue one /infer request as a job; fetch its result from GET /v1/jobs/{job_id}",
    responses={
        **ok(
            JobAccepted,
            "Queued",
            status=202,
            headers={
                "Location": {
                    "description": "The job's URL (/v1/jobs/{id})",
                    "required": True,
                    "schema": {"type": "string"},
                }
            },
            links={
                "GetJob": {
                    "operationId": "get_job",
                    "parameters": {"job_id": "$response.body#/id"},
                    "description": "The job's state and, once finished, its result",
                }
            },
        ),
        **errors(
            400, 401, 413, 415, 422, 429, 503,
            e429="The request queue is full, or the server holds as many unfinished jobs as it keeps "
            "(LLAMACTL_JOBS_MAX_ENTRIES); retry after Retry-After seconds.",
            e503="The server is loading or shutting down, or its job store (Redis, when configured) is "
            "unreachable or full.",
        ),
    },
)
async def create_job(
    body: Annotated[JobRequest, Body(openapi_examples=_INFER_EXAMPLE)], request: Request
) -> Any:
    state = get_state(request)
    state.inference.check_accepting()
    if state.shared_jobs is not None:
        return await _create_shared_job(state, body)
    try:
        state.jobs.check_room()
    except JobsFull as exc:
        state.inference.error("too_many_jobs")
        raise ApiError(429, str(exc), "too_many_jobs", {"Retry-After": "5"}) from None
    waiter = await _admit(state, body.image, body.question, body)  # bad input fails now, not in the job

    async def work() -> dict[str, Any]:
        return _answer(state, await waiter)

    job = state.jobs.submit(work, _error_dict)
    return JSONResponse(
        {"id": job.id, "object": "job", "status": job.status},
        status_code=202,
        headers={"Location": f"/v1/jobs/{job.id}"},
    )


@router.get(
    "/v1/jobs/{job_id}",
    operation_id="get_job",
    summary="A job's state, and its result or error once it has finished",
    responses={
        **ok(Job, "The job"),
        **errors(
            401, 404, 422, 503,
            e404="No such job: never created, or expired after its retention time (LLAMACTL_JOBS_TTL_S).",
            e422="job_id is not of the form job-<32 hex digits>.",
            e503="The job store (Redis, when configured) is unreachable.",
        ),
    },
)
async def get_job(job_id: Annotated[str, Path(pattern=JOB_ID_PATTERN)], request: Request) -> Any:
    state = get_state(request)
    if state.shared_jobs is not None:
        try:
            shared = await state.shared_jobs.get(job_id)
        except StateUnavailable as exc:
            raise _unavailable(state, exc) from None
        found = shared
    else:
        job = state.jobs.get(job_id)
        found = None if job is None else job.to_dict()
    if found is None:
        raise ApiError(
            404, f"no job {job_id[:80]!r} (unknown, or expired after its retention time)", "not_found"
        )
    return found


# -- jobs on Redis (LLAMACTL_REDIS_URL): any instance takes the POST, any instance runs it, any answers GET --


def _unavailable(state: ServerState, exc: StateUnavailable) -> ApiError:
    state.inference.error("jobs_unavailable")
    return ApiError(503, str(exc), "unavailable", {"Retry-After": "5"})


async def _create_shared_job(state: ServerState, body: JobRequest) -> Any:
    assert state.shared_jobs is not None
    svc = state.inference
    _params(state, body)  # bad input fails now, not in the job
    svc.render(_messages(body.question))
    await svc.decode_image(body.image)
    try:
        job_id = await state.shared_jobs.submit(body.model_dump(mode="json"))
    except StateUnavailable as exc:
        raise _unavailable(state, exc) from None
    return JSONResponse(
        {"id": job_id, "object": "job", "status": "queued"},
        status_code=202,
        headers={"Location": f"/v1/jobs/{job_id}"},
    )


# Failures another delivery may not repeat: the server was busy, shutting down, or its engine failed.
_RETRYABLE = frozenset({429, 500, 503, 504})


async def run_job(state: ServerState, request: dict[str, Any], on_start: Callable[[], None]) -> dict[str, Any]:
    """Run one job taken from the stream, as POST /infer would; failures raise ``JobFailed``."""
    try:
        body = JobRequest.model_validate(request)
        svc = state.inference
        svc.check_accepting()
        params = _params(state, body)
        prompt = svc.render(_messages(body.question))
        image = await svc.decode_image(body.image)
        waiter = await svc.enqueue(prompt, image, params, cache_key=svc.cache_key(body.image, prompt, params),
                                   on_text=lambda _piece: on_start())
        return _answer(state, await waiter)
    except ApiError as exc:
        raise JobFailed(_error_dict(exc), retry=exc.status in _RETRYABLE) from None
    except ValueError as exc:  # the stored request no longer validates (another version wrote it)
        raise JobFailed({"message": str(exc)[:500], "type": "invalid_request", "status": 400},
                        retry=False) from None
