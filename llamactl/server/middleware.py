"""Pure ASGI middleware: request body limit and request accounting (counts, in-flight for draining).

Pure ASGI (not BaseHTTPMiddleware) so that streaming responses and disconnect detection keep working.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

INFERENCE_PATHS = frozenset({"/infer", "/batch_infer", "/v1/chat/completions", "/v1/jobs"})
_KNOWN = frozenset({"/health", "/ready", "/metrics", "/v1/models"}) | INFERENCE_PATHS


def endpoint_label(path: str) -> str:
    """A bounded label for metrics: the route, never the raw path (no cardinality blow-up)."""
    if path in _KNOWN:
        return path
    if path.startswith("/v1/jobs/"):
        return "/v1/jobs/{id}"
    return "other"


# A declared body up to this size is read and dropped by the server after an early 413, and the connection is
# kept; a larger one gets "Connection: close". Closing a socket with unread bytes makes the kernel send a reset,
# which can destroy the 413 before the client reads it (RFC 9112 section 9.6).
DRAIN_MAX_BYTES = 64 * 1024 * 1024


async def _send_error(send: Send, status: int, message: str, kind: str, close: bool = True) -> None:
    body = json.dumps({"error": {"message": message, "type": kind}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """413 as soon as Content-Length (or the bytes received so far) exceed the limit; never buffers past it."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: Callable[[], None] | None = None) -> None:
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body exceeds the limit of {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_error(send, 400, "invalid Content-Length header", "invalid_request")
                return
            if declared > self.max_bytes:
                if self.on_reject:
                    self.on_reject()
                await _send_error(send, 413, message, "body_too_large", close=declared > DRAIN_MAX_BYTES)
                return
        seen = 0
        rejected = False

        async def limited_receive() -> Message:
            nonlocal seen, rejected
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes and not rejected:
                    rejected = True
                    if self.on_reject:
                        self.on_reject()
                    await _send_error(send, 413, message, "body_too_large")
                    return {"type": "http.disconnect"}  # the app stops reading; its response is dropped
            return msg

        async def guarded_send(msg: Message) -> None:
            if not rejected:
                await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not rejected:
                raise


class AccountingMiddleware:
    """Counts requests by endpoint and status; tracks inference requests in flight (for /health and draining)."""

    def __init__(self, app: ASGIApp, count: Callable[[str, int], None], in_flight: list[int]) -> None:
        self.app, self.count, self.in_flight = app, count, in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        label = endpoint_label(scope["path"])
        inference = scope["path"] in INFERENCE_PATHS and scope["method"] == "POST"
        status = 500

        async def recording_send(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = int(msg["status"])
            await send(msg)

        if inference:
            self.in_flight[0] += 1
        try:
            await self.app(scope, receive, recording_send)
        finally:
            if inference:
                self.in_flight[0] -= 1
            self.count(label, status)
