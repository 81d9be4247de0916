"""Optional API keys: ``Authorization: Bearer <key>`` on every endpoint except the probes and /metrics.

Keys are compared as sha256 digests with ``hmac.compare_digest`` against every configured key (no early exit),
so neither the key's content nor its length leaks through timing. Keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

KEY_NAME = "llamactl.api_key_name"  # the scope entry naming the accepted key (see server.quota_mw)
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


class ApiKeyMiddleware:
    """``keys``: entries as ``llamactl.state.keys`` parses them (a bare key, or name=... key=... rpm=... tpm=...);
    an accepted request carries its key's name in ``scope[KEY_NAME]`` for the quota middleware."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], on_reject: object = None) -> None:
        from llamactl.state.keys import parse_entries

        self.app = app
        policies = parse_entries(keys)  # validated with the settings already
        self._digests = [_digest(p.key) for p in policies]
        self._names = [p.name for p in policies]
        self._on_reject = on_reject

    def allowed(self, authorization: bytes | None) -> bool:
        return self.identify(authorization) is not None

    def identify(self, authorization: bytes | None) -> str | None:
        """The name of the key presented, or None; compares with every key (no early exit)."""
        if authorization is None:
            return None
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return None
        presented = _digest(token.strip())
        found: str | None = None
        for d, name in zip(self._digests, self._names):
            if hmac.compare_digest(d, presented):
                found = name
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._digests or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        auth = dict(scope["headers"]).get(b"authorization")
        name = self.identify(auth)
        if name is not None:
            await self.app({**scope, KEY_NAME: name}, receive, send)
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
