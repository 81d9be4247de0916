"""The controller's inference client (``llamactl infer``): one request, and one clear error per failure.

Every HTTP failure becomes a ``LlamactlError`` naming the URL: unreachable or timed out -> ``ConnectError``
(exit 3); 401, 413, 429, other 4xx and 5xx -> exit 1 with the server's own message where it sent one.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from llamactl.errors import ConnectError, LlamactlError
from llamactl.health.probe import describe_error

TokenSink = Callable[[str], None]

_MAGIC = (
    (b"\x89PNG", "image/png"),
    (b"\xff\xd8", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"BM", "image/bmp"),
)


@dataclass(frozen=True)
class InferRequest:
    endpoint: str
    image: bytes
    question: str
    max_tokens: int | None
    timeout_s: float
    api_key: str | None
    api_key_env: str


def mime_type(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for magic, mime in _MAGIC if data.startswith(magic)), "application/octet-stream")


def _headers(req: InferRequest) -> dict[str, str]:
    return {"Authorization": f"Bearer {req.api_key}"} if req.api_key else {}


def _server_message(status: int, text: str) -> str:
    """The server's ``{"error": {"message"}}``, an nginx error page's title, or the start of the body."""
    try:
        body = json.loads(text)
        if isinstance(body, dict) and isinstance(body.get("error"), dict) and body["error"].get("message"):
            return str(body["error"]["message"])
        if isinstance(body, dict) and isinstance(body.get("detail"), str):
            return str(body["detail"])
    except ValueError:
        pass
    title = re.search(r"<title>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
    if title:
        return title.group(1).strip()
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first[:200] or f"HTTP {status}"


def http_error(url: str, status: int, text: str, headers: httpx.Headers, req: InferRequest) -> LlamactlError:
    message = _server_message(status, text)
    if status in (401, 403):
        where = f"${req.api_key_env} is {'set' if req.api_key else 'not set'}"
        return LlamactlError(f"{url}: API key rejected (HTTP {status}): set --api-key-env ({where})")
    if status == 413:
        return LlamactlError(f"{url}: image too large (HTTP 413): {message}")
    if status == 429:
        after = headers.get("retry-after")
        wait = f"retry after {after} s" if after else "retry later"
        return LlamactlError(f"{url}: cluster busy, {wait} (HTTP 429)")
    if status >= 500:
        return LlamactlError(f"{url}: server error (HTTP {status}): {message}")
    return LlamactlError(f"{url}: request rejected (HTTP {status}): {message}")


def transport_error(url: str, exc: httpx.HTTPError, timeout_s: float) -> ConnectError:
    if isinstance(exc, httpx.ConnectTimeout):
        return ConnectError(url, f"cannot connect within {timeout_s:g} s")
    if isinstance(exc, httpx.TimeoutException):
        return ConnectError(url, f"no answer within {timeout_s:g} s (raise --timeout for long answers)")
    if isinstance(exc, httpx.ConnectError):
        reason = describe_error(exc, timeout_s)
        return ConnectError(url, f"{reason}: is the cluster up and the endpoint right?")
    return ConnectError(url, f"connection failed: {type(exc).__name__}: {exc}")


def _client(req: InferRequest) -> httpx.Client:
    return httpx.Client(timeout=httpx.Timeout(req.timeout_s, connect=min(req.timeout_s, 10.0)))


def post_infer(req: InferRequest) -> tuple[dict[str, Any], str | None]:
    """``POST /infer``; returns the JSON answer and the X-Upstream header (which backend answered)."""
    url = f"{req.endpoint}/infer"
    payload: dict[str, Any] = {"image": base64.b64encode(req.image).decode("ascii"), "question": req.question}
    if req.max_tokens is not None:
        payload["max_tokens"] = req.max_tokens
    try:
        with _client(req) as client:
            response = client.post(url, json=payload, headers=_headers(req))
    except httpx.HTTPError as exc:
        raise transport_error(url, exc, req.timeout_s) from None
    if response.status_code != 200:
        raise http_error(url, response.status_code, response.text, response.headers, req)
    try:
        body = response.json()
    except ValueError:
        raise LlamactlError(f"{url}: the answer is not JSON: {response.text[:120]!r}") from None
    if not isinstance(body, dict):
        raise LlamactlError(f"{url}: the answer is not a JSON object")
    return body, response.headers.get("x-upstream")


def chat_payload(req: InferRequest) -> dict[str, Any]:
    data_url = f"data:{mime_type(req.image)};base64,{base64.b64encode(req.image).decode('ascii')}"
    content = [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": req.question}]
    payload: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "stream": True}
    if req.max_tokens is not None:
        payload["max_tokens"] = req.max_tokens
    return payload


def sse_tokens(lines: Iterable[str]) -> Iterator[str]:
    """Yield the text deltas of an OpenAI chat-completions event stream, stopping at ``[DONE]``."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if isinstance(event.get("error"), dict):
            raise LlamactlError(f"stream failed: {event['error'].get('message', 'unknown error')}")
        for choice in event.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                yield piece


def stream_chat(req: InferRequest, on_token: TokenSink | None) -> tuple[str, str | None]:
    """``POST /v1/chat/completions`` with ``stream: true``; tokens go to ``on_token`` as they arrive."""
    url = f"{req.endpoint}/v1/chat/completions"
    pieces: list[str] = []
    try:
        with (
            _client(req) as client,
            client.stream("POST", url, json=chat_payload(req), headers=_headers(req)) as r,
        ):
            if r.status_code != 200:
                r.read()
                raise http_error(url, r.status_code, r.text, r.headers, req)
            upstream = r.headers.get("x-upstream")
            for piece in sse_tokens(r.iter_lines()):
                pieces.append(piece)
                if on_token is not None:
                    on_token(piece)
    except httpx.HTTPError as exc:
        raise transport_error(url, exc, req.timeout_s) from None
    except ValueError as exc:
        raise LlamactlError(f"{url}: malformed event stream: {exc}") from None
    return "".join(pieces), upstream
