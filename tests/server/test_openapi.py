"""The OpenAPI document and the behaviour agree: what each operation declares, real answers against the documented
models, and one case for each mismatch schemathesis once found (each answers exactly one status)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from llamactl.server.app import create_app
from llamactl.server.openapi_docs import (
    EXAMPLE_IMAGE,
    BatchInferResponse,
    ChatCompletion,
    ChatCompletionChunk,
    ErrorResponse,
    Health,
    InferResponse,
    Job,
    JobAccepted,
    ModelList,
    Ready,
)
from llamactl.server.openapi_instance import install

from ._support import ThreadServer, make_settings, start_thread_server

DATA_URL = "data:image/png;base64," + EXAMPLE_IMAGE
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
LIMIT = 16  # the module server's gen_max_new_tokens

EXPECTED_STATUSES = {
    ("get", "/health"): {"200"},
    ("get", "/ready"): {"200", "503"},
    ("get", "/metrics"): {"200"},
    ("post", "/infer"): {"200", "400", "401", "413", "415", "422", "429", "500", "503", "504"},
    ("post", "/batch_infer"): {"200", "400", "401", "413", "422", "503"},
    ("post", "/v1/jobs"): {"202", "400", "401", "413", "415", "422", "429", "503"},
    ("get", "/v1/jobs/{job_id}"): {"200", "401", "404", "422", "503"},
    ("get", "/v1/models"): {"200", "401"},
    ("post", "/v1/chat/completions"): {"200", "400", "401", "413", "415", "422", "429", "500", "503", "504"},
}


@pytest.fixture(scope="module")
def srv(tiny_checkpoint: Path) -> Iterator[ThreadServer]:
    server = start_thread_server(make_settings(tiny_checkpoint, gen_max_new_tokens=LIMIT, max_body_mb=1))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def doc(srv: ThreadServer) -> dict[str, Any]:
    r = httpx.get(srv.url + "/openapi.json")
    assert r.status_code == 200
    document: dict[str, Any] = r.json()
    return document


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            yield method, path, op


def test_every_operation_states_each_status_it_answers(doc: dict[str, Any]) -> None:
    found = {(method, path): set(op["responses"]) for method, path, op in _operations(doc)}
    assert found == EXPECTED_STATUSES


def test_every_error_has_the_one_named_error_body(doc: dict[str, Any]) -> None:
    for method, path, op in _operations(doc):
        for code, response in op["responses"].items():
            if int(code) < 400 or (path, code) == ("/ready", "503"):
                continue
            assert response["content"] == {"application/json": {"schema": ERROR_REF}}, (method, path, code)
            assert response["description"], (method, path, code)
        if "429" in op["responses"]:
            assert op["responses"]["429"]["headers"]["Retry-After"]["required"] is True
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas  # FastAPI's default 422 body, which this server never sends
    assert schemas["ErrorResponse"]["required"] == ["error"]
    assert set(schemas["ErrorDetail"]["required"]) == {"message", "type"}


def test_probes_and_streams_have_their_real_shapes_and_content_types(doc: dict[str, Any]) -> None:
    paths = doc["paths"]
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    ready = paths["/ready"]["get"]["responses"]
    assert ready["503"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/NotReady"}
    health = paths["/health"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert health["$ref"] == "#/components/schemas/Health"
    chat = paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(chat) == {"application/json", "text/event-stream"}
    created = paths["/v1/jobs"]["post"]["responses"]["202"]
    assert created["headers"]["Location"]["required"] is True
    assert created["links"]["GetJob"]["operationId"] == "get_job"


def test_the_constraints_the_server_enforces_are_in_the_document(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    infer = schemas["InferRequest"]["properties"]
    assert infer["image"]["minLength"] == 1
    assert infer["ignore_eos"]["type"] == "boolean"
    assert infer["max_tokens"]["anyOf"][0]["type"] == "integer" and infer["max_tokens"]["anyOf"][0]["minimum"] == 1
    assert infer["top_p"]["anyOf"][0] == {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
    assert schemas["BatchInferRequest"]["properties"]["images"]["maxItems"] == 256
    chat = schemas["ChatRequest"]["properties"]
    assert chat["messages"]["minItems"] == 1 and chat["messages"]["maxItems"] == 256
    assert schemas["ChatMessage"]["required"] == ["role", "content"]
    assert schemas["ImageURL"]["properties"]["url"]["pattern"] == "^data:"
    job_id = doc["paths"]["/v1/jobs/{job_id}"]["get"]["parameters"][0]
    assert job_id["schema"]["pattern"] == "^job-[0-9a-f]{32}$"


@pytest.mark.parametrize("keys", [(), ("k1",)], ids=["open", "api-keys"])
def test_the_served_document_states_this_instances_limit_and_keys(tiny_checkpoint: Path, keys: tuple[str, ...]) -> None:
    settings = make_settings(tiny_checkpoint, gen_max_new_tokens=LIMIT, api_keys=keys)
    app = create_app(settings)
    install(app, settings)
    doc = app.openapi()
    schemas = doc["components"]["schemas"]
    for model, name in [("InferRequest", "max_tokens"), ("ChatRequest", "max_completion_tokens")]:
        assert schemas[model]["properties"][name]["anyOf"][0]["maximum"] == LIMIT
    secured = {(m, p) for m, p, op in _operations(doc) if op.get("security") == [{"bearer": []}]}
    if keys:
        assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        assert secured == {op for op in EXPECTED_STATUSES if op[1] not in ("/health", "/ready", "/metrics")}
    else:
        assert "securitySchemes" not in doc["components"] and not secured


def _chat(content: Any, role: str = "user", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": content}], "max_tokens": 4, **extra}


_IMAGE_PART = {"type": "image_url", "image_url": {"url": DATA_URL}}
# (what, method, path, body, the one status). Each was a mismatch between document and behaviour, or pins a rule.
CASES: list[tuple[str, str, str, Any, int]] = [
    ("empty image", "POST", "/infer", {"image": ""}, 422),
    ("blank image: schema-valid, not an image", "POST", "/infer", {"image": "   "}, 400),
    ("ignore_eos 0", "POST", "/infer", {"image": EXAMPLE_IMAGE, "ignore_eos": 0}, 422),
    ("do_sample as a string", "POST", "/infer", {"image": EXAMPLE_IMAGE, "do_sample": "true"}, 422),
    ("max_tokens as a string", "POST", "/infer", {"image": EXAMPLE_IMAGE, "max_tokens": "5"}, 422),
    ("max_tokens true", "POST", "/infer", {"image": EXAMPLE_IMAGE, "max_tokens": True}, 422),
    ("max_tokens 5.0 is the integer 5", "POST", "/infer", {"image": EXAMPLE_IMAGE, "max_tokens": 5.0}, 200),
    ("max_tokens above the server's limit", "POST", "/infer", {"image": EXAMPLE_IMAGE, "max_tokens": LIMIT + 1}, 400),
    ("empty question", "POST", "/infer", {"image": EXAMPLE_IMAGE, "question": ""}, 422),
    ("message without content", "POST", "/v1/chat/completions", {"messages": [{"role": "user"}]}, 422),
    ("message with null content", "POST", "/v1/chat/completions", _chat(None), 422),
    ("message with empty content", "POST", "/v1/chat/completions", _chat(""), 422),
    ("message with no parts", "POST", "/v1/chat/completions", _chat([]), 422),
    ("empty text part", "POST", "/v1/chat/completions", _chat([{"type": "text", "text": ""}]), 422),
    ("stream 1", "POST", "/v1/chat/completions", _chat("hi", stream=1), 422),
    ("image in a system message", "POST", "/v1/chat/completions", _chat([_IMAGE_PART], role="system"), 400),
    ("image in an assistant message", "POST", "/v1/chat/completions", _chat([_IMAGE_PART], role="assistant"), 400),
    ("unknown role", "POST", "/v1/chat/completions", _chat("hi", role="tool"), 422),
    (
        "remote image URL",
        "POST",
        "/v1/chat/completions",
        _chat([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]),
        422,
    ),
    ("two images: schema-valid, refused", "POST", "/v1/chat/completions", _chat([_IMAGE_PART, _IMAGE_PART]), 400),
    ("a text-only chat is answered", "POST", "/v1/chat/completions", _chat("Hello"), 200),
    ("an empty image in a batch", "POST", "/batch_infer", {"images": [EXAMPLE_IMAGE, ""]}, 422),
    ("an empty question in a batch", "POST", "/batch_infer", {"images": [EXAMPLE_IMAGE], "questions": [""]}, 422),
    (
        "three questions for two images",
        "POST",
        "/batch_infer",
        {"images": [EXAMPLE_IMAGE, EXAMPLE_IMAGE], "questions": ["a?", "b?", "c?"]},
        400,
    ),
    (
        "max_tokens above the limit in a batch: the request's error, not each item's",
        "POST",
        "/batch_infer",
        {"images": [EXAMPLE_IMAGE], "max_tokens": LIMIT + 1},
        400,
    ),
    ("job id of the wrong form", "GET", "/v1/jobs/job-nope", None, 422),
    ("unknown job", "GET", "/v1/jobs/job-" + "0" * 32, None, 404),
]


@pytest.mark.parametrize(("what", "method", "path", "body", "status"), CASES, ids=[c[0] for c in CASES])
def test_behaviour_matches_the_document(
    srv: ThreadServer, what: str, method: str, path: str, body: Any, status: int
) -> None:
    r = httpx.request(method, srv.url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    if status >= 400:
        ErrorResponse.model_validate(r.json())


def _check(model: type[BaseModel], r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, r.text
    return model.model_validate(r.json())  # the documented models forbid fields they do not name


def test_real_answers_match_the_documented_models(srv: ThreadServer) -> None:
    url = srv.url
    _check(Health, httpx.get(url + "/health"))
    _check(Ready, httpx.get(url + "/ready"))
    _check(ModelList, httpx.get(url + "/v1/models"))
    body = {"image": EXAMPLE_IMAGE, "question": "What colour is it?", "max_tokens": 6}
    _check(InferResponse, httpx.post(url + "/infer", json=body, timeout=60))
    batch = {"images": [EXAMPLE_IMAGE, "%%%"], "max_tokens": 6}
    answer = _check(BatchInferResponse, httpx.post(url + "/batch_infer", json=batch, timeout=60))
    assert [item.success for item in answer.results] == [True, False]
    _check(ChatCompletion, httpx.post(url + "/v1/chat/completions", json=_chat("Hello"), timeout=60))
    accepted = _check(JobAccepted, httpx.post(url + "/v1/jobs", json=body, timeout=60), status=202)
    deadline = time.monotonic() + 60
    while True:
        job = _check(Job, httpx.get(f"{url}/v1/jobs/{accepted.id}"))
        if job.status in ("succeeded", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert job.status == "succeeded" and job.result is not None


def test_streamed_events_match_the_documented_chunk(srv: ThreadServer) -> None:
    body = _chat([_IMAGE_PART, {"type": "text", "text": "What colour?"}], stream=True)
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        data = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert data[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(d)) for d in data[:-1]]
    assert chunks[-1].usage is not None and chunks[-2].choices[0].finish_reason == "length"


def test_an_over_limit_body_leaves_the_connection_usable(srv: ThreadServer) -> None:
    """The 413 comes before the body is read; the server then reads and drops the rest and keeps the connection,
    so a keep-alive client reads its 413 (closing with unread bytes made the kernel reset it) and goes on."""
    host, port = srv.url.removeprefix("http://").split(":")
    body = b"x" * (1024 * 1024 + 1)  # the module server allows 1 MiB
    head = (
        f"POST /infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        first = _read_response(sock)
        sock.sendall(f"GET /ready HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        second = _read_response(sock)
    assert first.startswith(b"HTTP/1.1 413 ") and b"connection: close" not in first.lower()
    assert second.startswith(b"HTTP/1.1 200 ")


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    assert data, "the server closed the connection"
    return data


def _read_response(sock: socket.socket) -> bytes:
    """One HTTP/1.1 response with a Content-Length (all this server's JSON answers have one)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += _recv(sock)
    head, _, rest = data.partition(b"\r\n\r\n")
    fields = (line.partition(b":") for line in head.split(b"\r\n")[1:])
    length = next(int(value) for name, _, value in fields if name.strip().lower() == b"content-length")
    while len(rest) < length:
        rest += _recv(sock)
    return head + b"\r\n\r\n" + rest
