"""Canary: a real small-image inference against one instance, and a check that the staged answer parses.

A text-only readiness probe says nothing about the vision path; this one sends a real PNG through
``POST /infer`` and requires the four-stage answer shape with a non-empty conclusion.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Any

import httpx

# A plain question about a plain red square: any vision model answers it, and it is exactly the prompt the
# tiny test checkpoint (llamactl.server.tiny) was trained on, so the lab's canaries exercise the real path.
QUESTION = "What is in this image?"
COLOUR = (220, 30, 30)
# The canary leaves max_tokens to the instance's own configured default (what users get); an answer cut
# before CONCLUSION by a too-small default fails the canary, which is the point.
SIZE = 64


@dataclass(frozen=True)
class CanaryResult:
    ok: bool
    elapsed_s: float
    error: str | None = None
    conclusion: str | None = None
    reasoning_steps: int = 0
    cached: bool = False  # the server answered from its result cache


def canary_png(size: int = SIZE, nonce: str | None = None) -> bytes:
    """A small PNG of one colour: Pillow when installed, else built by hand with zlib.

    ``nonce`` goes into a text chunk: same pixels (same answer), different bytes, so the server's result
    cache (keyed by the image bytes) cannot answer it and the canary is a real pass through the model."""
    try:
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo
    except ImportError:
        return _png_by_hand(size, nonce)
    out = io.BytesIO()
    info = PngInfo()
    if nonce is not None:
        info.add_text("llamactl-canary", nonce)
    Image.new("RGB", (size, size), COLOUR).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def _png_by_hand(size: int, nonce: str | None = None) -> bytes:
    """RGB, 8 bits per channel, filter byte 0 on every row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = (b"\x00" + bytes(COLOUR) * size) * size
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + (chunk(b"tEXt", b"llamactl-canary\x00" + nonce.encode()) if nonce is not None else b"")
        + chunk(b"IEND", b"")
    )


def check_answer(body: Any) -> tuple[str | None, str | None, int]:
    """Validate an /infer answer: ``(error, conclusion, reasoning steps)``; error None when it parses."""
    if not isinstance(body, dict) or not isinstance(body.get("result"), dict):
        return "answer has no `result` object", None, 0
    result = body["result"]
    for key in ("summary", "caption", "conclusion"):
        if not isinstance(result.get(key), str):
            return f"result.{key} is not a string", None, 0
    steps = result.get("reasoning")
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        return "result.reasoning is not a list of strings", None, 0
    conclusion = result["conclusion"].strip()
    if not conclusion:
        return "the answer has no conclusion stage", None, len(steps)
    return None, conclusion, len(steps)


def infer_payload(image: bytes, question: str = QUESTION, max_tokens: int | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "image": base64.b64encode(image).decode("ascii"),
        "question": question,
        "do_sample": False,
    }
    if max_tokens is not None:
        payload["max_tokens"] = max_tokens
    return payload


def _fresh_png() -> bytes:
    return canary_png(nonce=f"{random.getrandbits(64):016x}")


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _interpret(response: httpx.Response, start: float) -> CanaryResult:
    elapsed = time.monotonic() - start
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        return CanaryResult(False, elapsed, f"HTTP {response.status_code}: {message}")
    try:
        body = response.json()
    except ValueError:
        return CanaryResult(False, elapsed, "answer is not JSON")
    error, conclusion, steps = check_answer(body)
    cached = isinstance(body, dict) and body.get("cached") is True
    return CanaryResult(error is None, elapsed, error, conclusion, steps, cached)


async def run_canary(
    client: httpx.AsyncClient,
    base_url: str,
    *,
    timeout_s: float,
    api_key: str | None = None,
    image: bytes | None = None,
) -> CanaryResult:
    """POST one small image to ``base_url/infer`` and check the staged answer; never raises for HTTP trouble."""
    from llamactl.health.probe import describe_error

    payload = infer_payload(image if image is not None else _fresh_png())
    start = time.monotonic()
    url = base_url.rstrip("/") + "/infer"
    try:
        response = await asyncio.wait_for(
            client.post(url, json=payload, headers=_headers(api_key), timeout=timeout_s), timeout_s
        )
    except (httpx.HTTPError, asyncio.TimeoutError, OSError) as exc:
        return CanaryResult(False, time.monotonic() - start, describe_error(exc, timeout_s))
    return _interpret(response, start)


def run_canary_sync(
    base_url: str, *, timeout_s: float, api_key: str | None = None, image: bytes | None = None
) -> CanaryResult:
    """Blocking variant for thread-based callers (rolling restart)."""
    from llamactl.health.probe import describe_error

    payload = infer_payload(image if image is not None else _fresh_png())
    start = time.monotonic()
    try:
        with httpx.Client(trust_env=False, timeout=timeout_s) as client:
            response = client.post(base_url.rstrip("/") + "/infer", json=payload, headers=_headers(api_key))
    except (httpx.HTTPError, OSError) as exc:
        return CanaryResult(False, time.monotonic() - start, describe_error(exc, timeout_s))
    return _interpret(response, start)
