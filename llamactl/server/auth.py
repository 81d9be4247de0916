"""Optional API keys: ``Authorization: Bearer <key>`` on every endpoint except the probes and /metrics.

Keys are compared as sha256 digests with ``hmac.compare_digest`` against every configured key (no early exit),
so neither the key's content nor its length leaks through timing. Keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: tuple[str, ...], on_reject: object = None) -> None:
        self.app = app
        self._digests = [_digest(k) for k in keys]
        self._on_reject = on_reject

    def allowed(self, authorization: bytes | None) -> bool:
        if authorization is None:
            return False
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return False
        presented = _digest(token.strip())
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(d, presented)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._digests or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        auth = dict(scope["headers"]).get(b"authorization")
        if self.allowed(auth):
            await self.app(scope, receive, send)
            return
        if callable(self._on_reject):
            self._on_reject()
        msg = "missing API key (send Authorization: Bearer KEY)" if auth is None else "invalid API key"
        body = json.dumps({"error": {"message": msg, "type": "unauthorized"}}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="llamactl"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
