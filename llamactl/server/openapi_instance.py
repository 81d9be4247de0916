"""The served OpenAPI document made this instance's own: its max_tokens limit and, when it has API keys, the
bearer scheme on every operation that needs one. ``create_app`` calls ``install(app, settings)`` once.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from llamactl.server.auth import OPEN_PATHS
from llamactl.server.settings import Settings

TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
BEARER = {"type": "http", "scheme": "bearer", "description": "One of the server's API keys (LLAMACTL_API_KEYS)."}


def install(app: FastAPI, settings: Settings) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = localise(build(), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def localise(doc: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """``doc`` with this server's limits: max_tokens up to gen_max_new_tokens, and required bearer auth when
    API keys are configured. Changes ``doc`` in place and returns it."""
    for schema in doc.get("components", {}).get("schemas", {}).values():
        for name in TOKEN_FIELDS:
            field = schema.get("properties", {}).get(name)
            if field is None:
                continue
            for branch in field.get("anyOf", [field]):
                if branch.get("type") == "integer":
                    branch["maximum"] = min(branch.get("maximum", settings.gen_max_new_tokens),
                                            settings.gen_max_new_tokens)
    if settings.api_keys:
        doc.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = BEARER
        for path, ops in doc.get("paths", {}).items():
            if path in OPEN_PATHS:
                continue
            for op in ops.values():
                op["security"] = [{"bearer": []}]
    return doc
