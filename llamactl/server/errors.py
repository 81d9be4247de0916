"""The error body every route answers with: ``{"error": {"message", "type"}}``."""

from __future__ import annotations

from fastapi.responses import JSONResponse


def error_response(
    status: int, message: str, kind: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)
