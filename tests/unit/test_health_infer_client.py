"""Pieces of the infer client that need no socket: event-stream parsing, error wording, mime types."""

from __future__ import annotations

import httpx
import pytest

from llamactl.errors import LlamactlError
from llamactl.health.infer_client import InferRequest, chat_payload, http_error, mime_type, sse_tokens

REQ = InferRequest("http://lb", b"\x89PNG....", "Q?", 64, 10.0, None, "LLAMACTL_API_KEY")


def test_sse_tokens_follow_deltas_and_stop_at_done() -> None:
    lines = [
        ": keep-alive comment",
        'data: {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}',
        'data: {"choices": [{"index": 0, "delta": {"content": "<SUMMARY>"}}]}',
        "",
        'data:{"choices": [{"index": 0, "delta": {"content": "hi"}}]}',
        "data: [DONE]",
        'data: {"choices": [{"index": 0, "delta": {"content": "after done"}}]}',
    ]
    assert list(sse_tokens(lines)) == ["<SUMMARY>", "hi"]


def test_sse_error_event_is_a_clear_error() -> None:
    with pytest.raises(LlamactlError, match="^stream failed: engine failed$"):
        list(sse_tokens(['data: {"error": {"message": "engine failed", "type": "x"}}']))


def test_nginx_error_pages_are_reduced_to_their_title() -> None:
    page = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>...</body></html>"
    err = http_error("http://lb/infer", 502, page, httpx.Headers(), REQ)
    assert str(err) == "http://lb/infer: server error (HTTP 502): 502 Bad Gateway"


def test_unauthorised_names_the_env_var_without_the_key() -> None:
    keyed = InferRequest("http://lb", b"x", "q", None, 1.0, "s3cret", "TEAM_KEY")
    err = http_error("http://lb/infer", 401, '{"error": {"message": "bad key"}}', httpx.Headers(), keyed)
    assert str(err) == "http://lb/infer: API key rejected (HTTP 401): set --api-key-env ($TEAM_KEY is set)"
    assert "s3cret" not in str(err)


def test_mime_types_and_chat_payload() -> None:
    assert mime_type(b"\xff\xd8\xff\xe0") == "image/jpeg"
    assert mime_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert mime_type(b"??") == "application/octet-stream"
    payload = chat_payload(REQ)
    assert payload["stream"] is True and payload["max_tokens"] == 64
    image, text = payload["messages"][0]["content"]
    assert image["image_url"]["url"] == "data:image/png;base64,iVBORy4uLi4="
    assert text == {"type": "text", "text": "Q?"}
