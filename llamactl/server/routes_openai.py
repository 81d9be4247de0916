"""OpenAI-compatible routes: POST /v1/chat/completions (plain and SSE streaming) and GET /v1/models."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import StreamingResponse

from llamactl.server.errors import error_response
from llamactl.server.inference import ApiError, ClientGone, Outcome, unless_disconnected
from llamactl.server.openapi_docs import (
    EXAMPLE_IMAGE,
    SSE_EVENT_SCHEMA,
    ChatCompletion,
    ModelList,
    errors,
    example,
    ok,
)
from llamactl.server.protocol import ChatMessage, ChatRequest
from llamactl.server.state import ServerState, get_state

router = APIRouter()

_CHAT_EXAMPLE = example(
    "A question about a small PNG",
    {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + EXAMPLE_IMAGE}},
                    {"type": "text", "text": "What colour is it?"},
                ],
            }
        ],
        "max_tokens": 8,
    },
)


@router.get(
    "/v1/models",
    operation_id="list_models",
    summary="The one model this server serves (OpenAI's model list)",
    responses={**ok(ModelList, "The model"), **errors(401)},
)
async def models(request: Request) -> dict[str, Any]:
    state = get_state(request)
    card = {"id": state.settings.model, "object": "model", "created": state.created, "owned_by": "llamactl"}
    return {"object": "list", "data": [card]}


def convert_messages(messages: list[ChatMessage]) -> tuple[list[dict[str, Any]], str | None]:
    """OpenAI messages -> HF chat messages with image placeholders, and the one image's URL (if any).

    The request model already guarantees content in every message and data: URLs only; images only in user
    messages and one image per request are checked here (400).
    """
    out: list[dict[str, Any]] = []
    image: str | None = None
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if isinstance(m.content, str):
            out.append({"role": role, "content": m.content})
            continue
        parts: list[dict[str, Any]] = []
        for part in m.content:
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            if role != "user":
                raise ApiError(
                    400, f"messages.{i}: images are only accepted in user messages", "invalid_request"
                )
            if image is not None:
                raise ApiError(400, "only one image per request is supported", "invalid_request")
            image = part.image_url.url
            parts.append({"type": "image"})
        out.append({"role": role, "content": parts})
    return out, image


def _usage(outcome: Outcome) -> dict[str, int]:
    r = outcome.result
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.prompt_tokens + r.completion_tokens,
    }


def _finish_reason(outcome: Outcome) -> str:
    return "length" if outcome.result.finish_reason == "length" else "stop"


@router.post(
    "/v1/chat/completions",
    operation_id="create_chat_completion",
    summary="OpenAI-compatible chat completion, plain or streamed (stream: true)",
    responses={
        **ok(
            ChatCompletion,
            "The completion: JSON, or server-sent events with stream: true",
            content={"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
        ),
        **errors(
            400, 401, 413, 415, 422, 429, 500, 503, 504,
            e400="The body is not JSON, or valid JSON the server cannot use: more than one image, an image "
            "outside a user message, an image that does not decode, max_tokens above this server's limit, or messages the model's chat template "
            "refuses (Llama 3.2 Vision: a system message together with an image).",
        ),
    },
)
async def chat_completions(
    body: Annotated[ChatRequest, Body(openapi_examples=_CHAT_EXAMPLE)], request: Request
) -> Any:
    state = get_state(request)
    svc = state.inference
    svc.check_accepting()
    try:
        messages, image_url = convert_messages(body.messages)
    except ApiError:
        svc.error("invalid_request")
        raise
    params = svc.params(
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        do_sample=None,
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
    )
    prompt = svc.render(messages)
    svc.check_capacity()
    image = None if image_url is None else await svc.decode_image(image_url)
    rid = "chatcmpl-" + uuid.uuid4().hex
    created = int(time.time())
    model = state.settings.model
    cache_key = svc.cache_key(image_url, prompt, params)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _stream(state, rid, created, prompt, image, params, include_usage, cache_key)
    waiter = await svc.enqueue(prompt, image, params, cache_key=cache_key)
    try:
        outcome: Outcome = await unless_disconnected(request.receive, waiter)
    except ClientGone:
        svc.error("client_disconnect")
        return error_response(499, "client closed the request", "client_disconnect")
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": outcome.result.text},
                "finish_reason": _finish_reason(outcome),
                "logprobs": None,
            }
        ],
        "usage": _usage(outcome),
        "cached": outcome.cached,
    }


async def _stream(
    state: ServerState,
    rid: str,
    created: int,
    prompt: str,
    image: Any,
    params: Any,
    include_usage: bool,
    cache_key: str | None,
) -> StreamingResponse:
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()  # None: the request ended (after its last piece)

    def on_text(text: str) -> None:  # model thread
        loop.call_soon_threadsafe(pieces.put_nowait, text)

    # Admission happens here, before the response starts, so 429/503 are real HTTP statuses.
    # A cached answer arrives whole (on_text is never called); a generated one is stored when it completes.
    waiter = await state.inference.enqueue(prompt, image, params, on_text=on_text, cache_key=cache_key)
    task: asyncio.Future[Outcome] = asyncio.ensure_future(waiter)
    # One await a piece, and no task or wait per token: the pieces were queued (call_soon_threadsafe, in order)
    # before the request's end resolved the waiter, so the end comes after them. At 32 streams that per-token
    # task and wait were a share of the event loop's hold on the GIL, which the model thread waits for
    # (bench/results/engine.md, Session 17).
    task.add_done_callback(lambda _: pieces.put_nowait(None))

    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None,
              cached: bool | None = None) -> str:
        body: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": state.settings.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
            if delta or finish
            else [],
        }
        if usage is not None:
            body["usage"] = usage
        if cached is not None:  # as the non-streaming answer's "cached"; clients ignore fields they do not know
            body["cached"] = cached
        return f"data: {json.dumps(body)}\n\n"

    async def events() -> AsyncIterator[str]:
        try:
            yield chunk({"role": "assistant", "content": ""})
            while (piece := await pieces.get()) is not None:
                yield chunk({"content": piece})
            try:
                outcome = task.result()
            except ApiError as exc:  # the status line is gone: report in-band, as OpenAI does
                yield f"data: {json.dumps({'error': {'message': exc.message, 'type': exc.kind}})}\n\n"
                yield "data: [DONE]\n\n"
                return
            if outcome.cached:
                yield chunk({"content": outcome.result.text})
            yield chunk({}, finish=_finish_reason(outcome), cached=outcome.cached)
            if include_usage:
                yield chunk({}, usage=_usage(outcome))
            yield "data: [DONE]\n\n"
        finally:
            if not task.done():  # client went away mid-stream: stop generating for it
                task.cancel()
                state.inference.error("client_disconnect")

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
