"""Per-key quotas on inference requests (pure ASGI, inside the API key check, which names the key).

Over a limit: 429 with Retry-After and the limit's name in the error (``type`` rate_limited, ``limit``
requests_per_minute or tokens_per_minute). The tokens of the answers a request produced are gathered in a
context variable (``record_usage``, called by ``Inference``) and charged to the key when the request ends.
"""

from __future__ import annotations

import json
from contextvars import ContextVar
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Receive, Scope, Send

from llamactl.server.auth import KEY_NAME
from llamactl.server.middleware import INFERENCE_PATHS

if TYPE_CHECKING:
    from llamactl.state.quotas import Quotas

_usage: ContextVar[list[int] | None] = ContextVar("llamactl_request_usage", default=None)


def record_usage(prompt_tokens: int, completion_tokens: int) -> None:
    """Add an answer's tokens to the current request's usage (no-op outside a keyed request)."""
    usage = _usage.get()
    if usage is not None:
        usage[0] += prompt_tokens
        usage[1] += completion_tokens


class QuotaMiddleware:
    def __init__(self, app: ASGIApp, quotas: Quotas) -> None:
        self.app, self.quotas = app, quotas

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = scope.get(KEY_NAME) if scope["type"] == "http" else None
        if name is None or scope["method"] != "POST" or scope["path"] not in INFERENCE_PATHS:
            await self.app(scope, receive, send)
            return
        refusal = await self.quotas.admit(str(name))
        if refusal is not None:
            body = json.dumps({"error": {"message": refusal.message, "type": "rate_limited",
                                         "limit": refusal.limit}}).encode()
            await send({"type": "http.response.start", "status": 429, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(refusal.retry_after_s).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        usage = [0, 0]
        token = _usage.set(usage)
        try:
            await self.app(scope, receive, send)
        finally:
            _usage.reset(token)
            await self.quotas.charge(str(name), usage[0], usage[1])
