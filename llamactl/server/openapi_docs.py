"""What the OpenAPI document says each route answers: response shapes and every status code, with headers.

The routes build plain dicts; the models here only describe them (they are named components of the document,
and the schemathesis test checks real answers against them). ``errors(...)`` declares error statuses with the one
error body, ``ErrorResponse``. ``HEALTH_ROUTE``, ``READY_ROUTE`` and ``METRICS_ROUTE`` are the decorator arguments
of the probes.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from llamactl.server.jobs import JOB_ID_PATTERN, JobStatus


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")  # the test then catches a field the document does not name


class ErrorDetail(_Shape):
    message: str = Field(description="What went wrong, for people; never a traceback.")
    type: str = Field(
        description="Stable, for programs: invalid_request, invalid_image, unauthorized, body_too_large, "
        "queue_full, too_many_jobs, unavailable, timeout, engine_error, internal, not_found."
    )


class ErrorResponse(_Shape):
    """Every error answer (any status from 400 up) has this body."""

    error: ErrorDetail


class Usage(_Shape):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class StagedResult(_Shape):
    """The model's answer split into its stages (empty string / list when a stage is missing)."""

    summary: str
    caption: str
    reasoning: list[str]
    conclusion: str


class InferResponse(_Shape):
    result: StagedResult
    full_response: str = Field(description="The model's raw text, stage tags included.")
    inference_time: float = Field(description="Seconds from arrival to answer.")
    model: str
    cached: bool = Field(description="True when the answer came from the server's result cache.")
    finish_reason: Literal["stop", "length"]
    usage: Usage


class ItemError(_Shape):
    message: str
    type: str
    status: int | None = Field(None, description="The HTTP status this failure would have had on its own.")


class BatchItemOk(InferResponse):
    success: Literal[True]


class BatchItemFailed(_Shape):
    success: Literal[False]
    error: ItemError


class BatchInferResponse(_Shape):
    results: list[BatchItemOk | BatchItemFailed] = Field(description="One per image, in order.")
    succeeded: int
    failed: int
    model: str


class JobAccepted(_Shape):
    id: str = Field(pattern=JOB_ID_PATTERN)
    object: Literal["job"]
    status: JobStatus


class Job(JobAccepted):
    created: float = Field(description="Unix time of submission.")
    finished: float | None = Field(None, description="Unix time it ended; absent while queued or running.")
    result: InferResponse | None = Field(None, description="As POST /infer answers; present once succeeded.")
    error: ItemError | None = Field(None, description="Present once failed.")


class ChatMessageOut(_Shape):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Shape):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]
    logprobs: None


class ChatCompletion(_Shape):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    cached: bool


class ModelCard(_Shape):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Shape):
    object: Literal["list"]
    data: list[ModelCard]


class GpuMemory(_Shape):
    used_bytes: int
    total_bytes: int


class Health(_Shape):
    status: Literal["loading", "ready", "draining", "stalled", "gpu_fault", "failed"]
    model: str
    version: str
    config_hash: str = Field(description="First 16 hex digits of the effective settings' sha256.")
    instance: str | None
    in_flight: int
    queued: int
    gpu_memory: GpuMemory | None
    uptime_s: float
    cpu: dict[str, Any] | None = Field(description="Threads and CPUs this process uses; null in-process.")
    image_threads: int | None = Field(None, description="Threads that decode request images and compute their "
                                      "pixel values.")
    engine: dict[str, Any] | None = Field(description="What the engine reports about itself.")
    gpu: dict[str, Any] = Field(
        description="This instance's GPU from NVML: status unavailable (no NVML, CPU instance; with a reason), "
        "ok or fault (faults listed), and the latest reading: utilization_pct, memory, temperature_c, power_w, "
        "throttle_reasons, ecc, row_remap, retired_pages, xids."
    )
    error: str | None = Field(description="Why the model failed to load (failed), stalled or faulted (gpu_fault).")
    shared_cache: dict[str, Any] | None = Field(
        default=None, description="With Redis configured: the cluster-wide result cache's state (up, hits, ...)."
    )
    quotas: dict[str, Any] | None = Field(
        default=None, description="With API keys: where per-key limits are counted (redis, or local while Redis "
        "is down), the key names and which of them have limits. Never a key."
    )


class Ready(_Shape):
    ready: Literal[True]


class NotReady(_Shape):
    ready: Literal[False]
    status: Literal["loading", "draining", "stalled", "gpu_fault", "failed"]


_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}
_DESCRIPTIONS: dict[int, str] = {
    400: "The body is not JSON, or valid JSON the server cannot use: an image that does not decode, "
    "max_tokens above this server's limit, or messages the model's chat template refuses.",
    401: "API keys are configured (LLAMACTL_API_KEYS) and the request has no valid "
    "'Authorization: Bearer KEY'.",
    404: "Not found.",
    413: "The body is over the server's limit (LLAMACTL_MAX_BODY_MB), or an image is over its byte or pixel "
    "limit.",
    415: "The image is in a format the server does not decode (JPEG, PNG, GIF, WebP, BMP and TIFF are).",
    422: "The body does not match this document's schema (the message names the field).",
    429: "The request queue is full; retry after Retry-After seconds.",
    500: "The engine failed while generating.",
    503: "The model is loading (Retry-After is sent), failed to load, or the server is draining.",
    504: "No answer within the server's request timeout (LLAMACTL_REQUEST_TIMEOUT_S).",
}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "Bearer", "required": True, "schema": {"type": "string"}}},
    429: {"Retry-After": {**_RETRY_AFTER["Retry-After"], "required": True}},
    503: _RETRY_AFTER,
}


def errors(*codes: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for error statuses; ``descriptions`` overrides one by name, e.g. ``e404=...``."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {
            "model": ErrorResponse,
            "description": descriptions.get(f"e{code}", _DESCRIPTIONS[code]),
        }
        if code in _HEADERS:
            entry["headers"] = _HEADERS[code]
        out[code] = entry
    return out


def ok(model: type[BaseModel], description: str, status: int = 200, **extra: Any) -> dict[int | str, Any]:
    return {status: {"model": model, "description": description, **extra}}


# An 8x8 red PNG: request examples that a real server answers (clients and schemathesis try them).
EXAMPLE_IMAGE = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAEUlEQVR42mP8z4AdMDEMKQkAzUEBD7t4NqoAAAAASUVORK5CYII="
)


def example(summary: str, value: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``openapi_examples=`` for a request body: one named example."""
    return {"default": {"summary": summary, "value": value}}


class ChunkDelta(_Shape):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Shape):
    index: int
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None
    logprobs: None


class ChatCompletionChunk(_Shape):
    """One streamed event: a piece of the answer; the last choice chunk has finish_reason and cached."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice] = Field(description="Empty in the usage chunk (stream_options.include_usage).")
    usage: Usage | None = None
    cached: bool | None = None


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """A pydantic JSON schema with its local $defs references replaced by the definitions themselves."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline(v, defs) for v in schema]
    return schema


def _standalone(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    inlined: dict[str, Any] = _inline(schema, schema.get("$defs", {}))
    return inlined


# With stream: true, each server-sent event (pre-3.2 OpenAPI: the schema describes one event) carries in its
# data a chunk, or an error if generation fails after the stream started, and the last one "[DONE]".
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "anyOf": [
                {"type": "string", "const": "[DONE]"},
                {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"anyOf": [_standalone(ChatCompletionChunk), _standalone(ErrorResponse)]},
                },
            ]
        }
    },
    "description": "One server-sent event: data is a chat.completion.chunk JSON object, an error object "
    "(generation failed after the stream started), or [DONE] (the last event).",
}
# Arguments for the probes' route decorators, e.g. ``@app.get("/health", **HEALTH_ROUTE)``.
HEALTH_ROUTE: dict[str, Any] = {
    "operation_id": "health",
    "summary": "The process's state; 200 whenever it runs, never touches the model",
    "responses": ok(Health, "Current state"),
}
READY_ROUTE: dict[str, Any] = {
    "operation_id": "ready",
    "summary": "Whether this instance takes inference requests (for balancers and rollouts)",
    "responses": {
        **ok(Ready, "Ready"),
        503: {"model": NotReady, "description": "Loading, draining, stalled (the engine makes no progress) or failed"},
    },
}
METRICS_ROUTE: dict[str, Any] = {
    "operation_id": "metrics",
    "summary": "Prometheus metrics",
    "response_class": PlainTextResponse,
    "responses": {200: {"description": "Prometheus text exposition format"}},
}
