"""Every endpoint over real HTTP against one server (tiny real Mllama checkpoint, uvicorn on a real socket)."""

from __future__ import annotations

import concurrent.futures
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ._support import ThreadServer, make_settings, png_b64, start_thread_server

QUESTION = "What is in this image?"


@pytest.fixture(scope="module")
def srv(tiny_checkpoint: Path) -> Iterator[ThreadServer]:
    settings = make_settings(
        tiny_checkpoint,
        max_batch_size=16,
        max_wait_ms=300,
        queue_limit=64,
        max_body_mb=1,
        gen_max_new_tokens=256,
        instance="testhost/0",
    )
    server = start_thread_server(settings)
    yield server
    server.stop()


def post(srv: ThreadServer, path: str, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=120, **kw)


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_health_reports_engine_state(srv: ThreadServer) -> None:
    h = httpx.get(srv.url + "/health").json()
    assert h["status"] == "ready"
    assert h["model"] == srv.state.settings.model
    assert h["config_hash"] == srv.state.settings.config_hash() and len(h["config_hash"]) == 16
    assert h["instance"] == "testhost/0"
    assert h["gpu_memory"] is None  # CPU
    assert h["error"] is None and h["uptime_s"] > 0
    assert {"in_flight", "queued", "version"} <= h.keys()
    r = httpx.get(srv.url + "/ready")
    assert r.status_code == 200 and r.json() == {"ready": True}


def test_infer_returns_staged_answer_and_caches(srv: ThreadServer) -> None:
    for colour in ("red", "blue"):
        body = {"image": png_b64(colour), "question": QUESTION, "max_tokens": 100}
        r = post(srv, "/infer", body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["cached"] is False
        assert out["result"]["conclusion"] == f"It is a {colour} square."
        assert out["result"]["caption"] == f"The image is a plain {colour} square."
        assert out["full_response"].startswith("<SUMMARY>")
        assert out["finish_reason"] == "stop"
        assert out["usage"]["completion_tokens"] > 10 and out["usage"]["prompt_tokens"] > 5
        again = post(srv, "/infer", body).json()
        assert again["cached"] is True and again["full_response"] == out["full_response"]
    # a data: URL prefix is accepted too
    r = post(srv, "/infer", {"image": "data:image/png;base64," + png_b64("red"), "max_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    assert r.json()["finish_reason"] == "length"


def test_batch_infer_reports_each_item(srv: ThreadServer) -> None:
    body = {
        "images": [png_b64("red"), "bm90IGFuIGltYWdl", png_b64("blue")],
        "questions": QUESTION,
        "max_tokens": 90,
    }
    before = srv.state.engine.batches
    r = post(srv, "/batch_infer", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [it["success"] for it in out["results"]] == [True, False, True]
    assert out["succeeded"] == 2 and out["failed"] == 1
    assert out["results"][1]["error"]["status"] == 415  # decodes as base64, but is no image
    assert out["results"][0]["result"]["conclusion"] == "It is a red square."
    assert out["results"][2]["result"]["conclusion"] == "It is a blue square."
    # the continuous engine admits each good item as soon as it is prepared: one or two prefill chunks
    assert 1 <= srv.state.engine.batches - before <= 2
    bad = post(srv, "/batch_infer", {"images": [png_b64()], "questions": ["a", "b"]})
    assert bad.status_code == 400 and "questions" in bad.json()["error"]["message"]  # schema-valid, unusable


def test_jobs_keep_their_result(srv: ThreadServer) -> None:
    r = post(srv, "/v1/jobs", {"image": png_b64("blue"), "question": QUESTION, "max_tokens": 95})
    assert r.status_code == 202
    job_id = r.json()["id"]
    assert r.headers["location"] == f"/v1/jobs/{job_id}"
    deadline = time.monotonic() + 60
    while True:
        job = httpx.get(f"{srv.url}/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert job["status"] == "succeeded", job
    assert job["result"]["result"]["conclusion"] == "It is a blue square."
    assert httpx.get(f"{srv.url}/v1/jobs/{job_id}").json()["status"] == "succeeded"  # still there
    missing = httpx.get(f"{srv.url}/v1/jobs/job-{'0' * 32}")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    # bad input is refused when submitting, not discovered later
    assert post(srv, "/v1/jobs", {"image": "%%%", "max_tokens": 5}).status_code == 400  # not base64


def _chat_messages(colour: str) -> list[dict[str, Any]]:
    url = "data:image/png;base64," + png_b64(colour)
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}],
        }
    ]


def test_openai_client_streaming_plain_and_cached(srv: ThreadServer) -> None:
    import openai

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [srv.state.settings.model]

    def stream() -> tuple[list[str], str | None, Any, bool | None]:
        pieces, finish, usage, cached = [], None, None, None
        for chunk in client.chat.completions.create(
            model="llama",
            messages=_chat_messages("red"),
            max_completion_tokens=120,
            temperature=0,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        ):
            usage = chunk.usage or usage
            cached = (chunk.model_extra or {}).get("cached", cached)
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                finish = choice.finish_reason or finish
        return pieces, finish, usage, cached

    pieces, finish, usage, cached = stream()
    assert len(pieces) > 5 and cached is False  # really streamed, piece by piece
    text = "".join(pieces)
    assert "<CONCLUSION>It is a red square.</CONCLUSION>" in text
    assert finish == "stop" and usage is not None and usage.completion_tokens > 10
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    # the streamed answer was stored: the same question, plain (max_tokens) or streamed again, comes from the cache
    plain = client.chat.completions.create(
        model="llama",
        messages=_chat_messages("red"),
        max_tokens=120,
        temperature=0,  # type: ignore[arg-type]
    )
    assert plain.choices[0].message.content == text and (plain.model_extra or {})["cached"] is True
    assert plain.choices[0].finish_reason == "stop" and plain.usage == usage
    again, finish, again_usage, cached = stream()
    assert again == [text] and cached is True and finish == "stop" and again_usage == usage


def test_text_only_chat_and_template_errors(srv: ThreadServer) -> None:
    r = post(
        srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6}
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
    assert r.json()["usage"]["completion_tokens"] <= 6
    # the Llama 3.2 Vision template refuses a system message together with an image: a 400, not a 500
    messages = [{"role": "system", "content": "Be brief."}, *_chat_messages("red")]
    r = post(srv, "/v1/chat/completions", {"messages": messages, "max_tokens": 6})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request", r.text


def test_raw_sse_ends_with_done(srv: ThreadServer) -> None:
    body = {"messages": _chat_messages("blue"), "max_tokens": 8, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length"


def test_concurrent_requests_are_batched_and_match_unbatched(srv: ThreadServer) -> None:
    """16 concurrent greedy requests share generate calls, and each answer equals its answer alone."""
    colours = ["red", "blue"] * 8
    questions = [QUESTION if i % 3 else f"Describe picture number {i}." for i in range(16)]
    bodies = [
        {"image": png_b64(c, (40 + i, 40)), "question": q, "max_tokens": 24, "do_sample": False}
        for i, (c, q) in enumerate(zip(colours, questions))
    ]
    cache, srv.state.inference.cache = srv.state.inference.cache, None  # measure generation, not the cache
    try:
        before_text = httpx.get(srv.url + "/metrics").text
        batches_before = srv.state.engine.batches
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda b: post(srv, "/infer", b), bodies))
        batches = srv.state.engine.batches - batches_before
        after_text = httpx.get(srv.url + "/metrics").text
        alone = [post(srv, "/infer", b) for b in bodies]  # one at a time: batch size 1 each
    finally:
        srv.state.inference.cache = cache
    assert all(r.status_code == 200 for r in together + alone)
    assert batches < 16, f"{batches} generate calls for 16 concurrent requests: nothing was batched"
    count = metric(after_text, "llamactl_batch_size_count") - metric(before_text, "llamactl_batch_size_count")
    total = metric(after_text, "llamactl_batch_size_sum") - metric(before_text, "llamactl_batch_size_sum")
    assert total == 16 and count == batches and total / count > 1
    for t, a in zip(together, alone):
        assert t.json()["full_response"] == a.json()["full_response"]
    assert len({r.json()["full_response"] for r in together}) > 1  # different images give different answers


BAD_BODIES: list[tuple[str, Any, int]] = [
    ("/infer", b"{not json", 400),
    ("/infer", b"", 422),
    ("/infer", b"[1, 2]", 422),
    ("/infer", b'"a string"', 422),
    ("/infer", {"question": "no image"}, 422),
    ("/infer", {"image": 12345}, 422),
    ("/infer", {"image": "AAAA", "max_tokens": 0}, 422),
    ("/infer", {"image": "AAAA", "max_tokens": "many"}, 422),
    ("/infer", {"image": "AAAA", "max_tokens": 10**9}, 422),
    ("/infer", {"image": png_b64(), "max_tokens": 5000}, 400),  # above this server's limit of 256
    ("/infer", {"image": "AAAA", "temperature": -1}, 422),
    ("/infer", {"image": "AAAA", "top_p": 0}, 422),
    ("/infer", {"image": "not base64 at all!!"}, 400),
    ("/infer", {"image": "data:image/png;base64,"}, 400),
    ("/batch_infer", {"images": []}, 422),
    ("/v1/chat/completions", {"messages": []}, 422),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 422),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 422),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}],
                }
            ]
        },
        422,  # the document's pattern ^data: (this server does not fetch remote URLs)
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64()}},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64()}},
                    ],
                }
            ]
        },
        400,
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 3}, 422),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 422),
    ("/v1/jobs", {"image": "AAAA", "top_p": 2}, 422),
]


@pytest.mark.parametrize(("path", "body", "code"), BAD_BODIES, ids=[f"{i}" for i in range(len(BAD_BODIES))])
def test_bad_input_gets_a_plain_4xx(srv: ThreadServer, path: str, body: Any, code: int) -> None:
    if isinstance(body, bytes):
        r = httpx.post(srv.url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        r = post(srv, path, body)
    assert r.status_code == code, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert "Traceback" not in err["message"] and "pydantic" not in err["message"].lower()
    assert httpx.get(srv.url + "/ready").status_code == 200


def test_routing_errors_use_the_error_shape(srv: ThreadServer) -> None:
    r = httpx.get(srv.url + "/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    r = httpx.get(srv.url + "/infer")
    assert r.status_code == 405 and "error" in r.json()


def test_body_limit_413_without_reading_everything(srv: ThreadServer) -> None:
    big = b"x" * (2 * 1024 * 1024)  # the module server allows 1 MB
    r = httpx.post(srv.url + "/infer", content=big, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["type"] == "body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming in
        for _ in range(40):
            yield b"y" * 65536

    r = httpx.post(
        srv.url + "/infer", content=chunks(), headers={"content-type": "application/json"}, timeout=30
    )
    assert r.status_code == 413
    assert httpx.get(srv.url + "/ready").status_code == 200


def test_metrics_say_where_a_request_waited_before_its_first_token(srv: ThreadServer) -> None:
    """Image decode, the processor and the wait in the engine's queue: one observation each per image request,
    what comes before its first token."""
    _check_before_first_token(srv)


def test_the_hf_engine_reports_its_queue_wait_too(tiny_checkpoint: Path) -> None:
    """The static-batching hf engine: the queue wait ends when the request joins a batch."""
    hf = start_thread_server(make_settings(tiny_checkpoint, engine="hf", max_batch_size=2))
    try:
        assert httpx.get(hf.url + "/health").json()["engine"]["name"] == "hf"
        _check_before_first_token(hf)
    finally:
        hf.stop()


def _check_before_first_token(srv: ThreadServer) -> None:
    names = ("llamactl_image_decode_seconds", "llamactl_request_processor_seconds",
             "llamactl_request_queue_seconds", "llamactl_time_to_first_token_seconds")

    def scrape() -> dict[str, tuple[float, float]]:
        text = httpx.get(srv.url + "/metrics").text
        return {n: (metric(text, n + "_count"), metric(text, n + "_sum")) for n in names}

    before = scrape()
    r = post(srv, "/infer", {"image": png_b64("blue", (48, 40)), "question": "What colour?", "max_tokens": 4})
    assert r.status_code == 200, r.text
    after = scrape()
    counts = {n: after[n][0] - before[n][0] for n in names}
    seconds = {n: after[n][1] - before[n][1] for n in names}
    assert all(c == 1 for c in counts.values()), counts
    assert all(0 <= s < 60 for s in seconds.values()), seconds
    assert seconds["llamactl_request_queue_seconds"] <= seconds["llamactl_time_to_first_token_seconds"]


def test_metrics_names_and_promtool(srv: ThreadServer, tmp_path: Path) -> None:
    r = httpx.get(srv.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "llamactl_num_requests_running",
        "llamactl_num_requests_waiting",
        "llamactl_e2e_request_latency_seconds_bucket",
        "llamactl_time_to_first_token_seconds_count",
        "llamactl_batch_size_bucket",
        "llamactl_prompt_tokens_total",
        "llamactl_generation_tokens_total",
        "llamactl_request_errors_total",
        "llamactl_requests_total",
        "llamactl_cache_hits_total",
        "llamactl_cache_misses_total",
        "llamactl_gpu_memory_used_bytes",
        "llamactl_gpu_memory_total_bytes",
    ):
        assert re.search(rf"^{name}[ {{]", text, re.MULTILINE), name
    assert metric(text, "llamactl_generation_tokens_total") > 0
    assert re.search(r'^llamactl_requests_total\{code="200",endpoint="/infer"\} [1-9]', text, re.MULTILINE)
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    check = subprocess.run(
        [promtool, "check", "metrics"], check=False, input=r.content, capture_output=True, timeout=30
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_failed_load_is_reported_not_fatal(tmp_path: Path) -> None:
    server = start_thread_server(make_settings(tmp_path / "no-such-model"), wait=False)
    try:
        deadline = time.monotonic() + 60
        while (h := httpx.get(server.url + "/health").json())["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert h["status"] == "failed" and h["error"]
        assert httpx.get(server.url + "/ready").status_code == 503
        r = httpx.post(server.url + "/infer", json={"image": png_b64(), "max_tokens": 3})
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]
    finally:
        server.stop()


def test_draining_refuses_new_work(srv: ThreadServer) -> None:
    srv.state.draining = True
    try:
        r = httpx.get(srv.url + "/ready")
        assert r.status_code == 503 and r.json() == {"ready": False, "status": "draining"}
        r = post(srv, "/infer", {"image": png_b64(), "max_tokens": 3})
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable"
        assert httpx.get(srv.url + "/health").json()["status"] == "draining"
    finally:
        srv.state.draining = False
    assert httpx.get(srv.url + "/ready").status_code == 200


def test_image_corpus_over_http(srv: ThreadServer) -> None:
    """Odd-but-valid images all get 200; bad ones their 4xx; never a 5xx; the server stays ready."""
    import base64

    from tests.fixtures.images import corpus

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    valid, bad = corpus.valid_samples(), corpus.bad_samples()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        good = list(pool.map(lambda s: post(srv, "/infer", {"image": b64(s.data), "max_tokens": 2}), valid))
        refused = list(pool.map(lambda s: post(srv, "/infer", {"image": b64(s.data), "max_tokens": 2}), bad))
    for sample, r in zip(valid, good):
        assert r.status_code == 200, (sample.name, r.text)
    for sample, r in zip(bad, refused):
        # no bytes at all is image "", which the document's minLength already refuses
        status, kind = (422, "invalid_request") if not sample.data else (sample.status, "invalid_image")
        assert r.status_code == status, (sample.name, r.status_code, r.text)
        assert r.json()["error"]["type"] == kind
    assert httpx.get(srv.url + "/ready").status_code == 200
