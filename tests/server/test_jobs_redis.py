"""Jobs shared through a real redis-server by real servers (the tiny checkpoint): a job posted to one instance is
found and run through another; a server killed mid-job loses nothing; a Redis restart mid-run loses no accepted
job; with Redis down only the jobs API answers 503."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from llamactl.server.openapi_docs import ErrorResponse, Job, JobAccepted
from tests.redis_support import PASSWORD, RedisServer

from ._support import ThreadServer, make_settings, png_b64, start_serve, start_thread_server

QUESTION = "What is in this image?"
WAIT_S = 120.0  # generous: a shared 2-core machine


def jobs_settings(model: Path, url: str, instance: str, **kw: Any) -> Any:
    base: dict[str, Any] = {"max_batch_size": 4, "gen_max_new_tokens": 256, "jobs_claim_idle_s": 2.0}
    return make_settings(model, redis_url=url, instance=instance, **{**base, **kw})


@pytest.fixture(scope="module")
def pair(tiny_checkpoint: Path, redis_server: RedisServer) -> Iterator[tuple[ThreadServer, ThreadServer]]:
    a = start_thread_server(jobs_settings(tiny_checkpoint, redis_server.url, "host-a/0"))
    b = start_thread_server(jobs_settings(tiny_checkpoint, redis_server.url, "host-b/0"))
    yield a, b
    a.stop()
    b.stop()


def post_job(server: ThreadServer | Any, colour: str = "blue", **kw: Any) -> httpx.Response:
    return httpx.post(server.url + "/v1/jobs", json={"image": png_b64(colour), "question": QUESTION,
                                                     "max_tokens": 95, **kw}, timeout=60)


def wait_job(url: str, job_id: str, until: tuple[str, ...] = ("succeeded", "failed")) -> dict[str, Any]:
    """Poll GET /v1/jobs/{id} (a 503 while Redis restarts is retried)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30)
        if r.status_code == 200 and r.json()["status"] in until:
            job: dict[str, Any] = r.json()
            return job
        assert r.status_code in (200, 503), r.text
        time.sleep(0.05)
    raise AssertionError(f"{job_id} not {until} within {WAIT_S}s")


def backlog(server: RedisServer) -> int:
    client = redis.Redis.from_url(server.url, socket_timeout=10)
    try:
        return int(client.xlen("llamactl:jobs"))
    finally:
        client.close()


def ran_on(server: RedisServer, job_id: str) -> str:
    client = redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=10)
    try:
        return str(client.hget(f"llamactl:job:{job_id}", "instance"))
    finally:
        client.close()


def test_a_job_posted_to_one_instance_is_found_through_the_other(
    pair: tuple[ThreadServer, ThreadServer], redis_server: RedisServer
) -> None:
    a, b = pair
    r = post_job(a, "blue")
    assert r.status_code == 202 and r.json()["status"] == "queued"
    job_id = r.json()["id"]
    assert r.headers["location"] == f"/v1/jobs/{job_id}"
    JobAccepted.model_validate(r.json())  # the OpenAPI document's shapes (unknown fields refused)
    job = wait_job(b.url, job_id)
    assert job["status"] == "succeeded", job
    Job.model_validate(job)
    assert job["result"]["result"]["conclusion"] == "It is a blue square."
    assert httpx.get(f"{a.url}/v1/jobs/{job_id}").json() == job  # the same record from either
    assert ran_on(redis_server, job_id).startswith(("host-a/0-", "host-b/0-"))
    missing = httpx.get(f"{b.url}/v1/jobs/job-{'0' * 32}")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    bad = httpx.post(f"{a.url}/v1/jobs", json={"image": "%%%", "max_tokens": 5})
    assert bad.status_code in (400, 415)  # refused when submitting, not discovered in the job


def test_redis_restart_mid_run_loses_no_accepted_job(
    pair: tuple[ThreadServer, ThreadServer], redis_server: RedisServer
) -> None:
    a, b = pair
    # Distinct lengths (so no answer comes from the cache), EOS ignored: long enough to be caught running.
    lengths = [200 + i for i in range(12)]
    ids = [post_job(a if i % 2 else b, max_tokens=n, ignore_eos=True).json()["id"] for i, n in enumerate(lengths)]
    assert backlog(redis_server) > 0  # mid-run: accepted jobs not yet finished
    redis_server.restart()  # SIGTERM, then the same port and data directory: the append-only file
    for job_id, n in zip(ids, lengths):
        job = wait_job(a.url, job_id)
        assert job["status"] == "succeeded", job
        assert job["result"]["usage"]["completion_tokens"] == n


def test_redis_down_503_on_jobs_200_on_inference(
    pair: tuple[ThreadServer, ThreadServer], redis_server: RedisServer
) -> None:
    a, _ = pair
    redis_server.stop()
    try:
        message = f"the job store (Redis at 127.0.0.1:{redis_server.port}) is unreachable; retry later"
        r = post_job(a)
        assert r.status_code == 503 and r.json()["error"] == {"message": message, "type": "unavailable"}
        assert r.headers["retry-after"] == "5"
        g = httpx.get(f"{a.url}/v1/jobs/job-{'1' * 32}")
        assert g.status_code == 503 and g.json()["error"]["message"] == message
        ErrorResponse.model_validate(g.json())
        infer = httpx.post(f"{a.url}/infer", json={"image": png_b64("red"), "question": QUESTION,
                                                   "max_tokens": 95}, timeout=60)
        assert infer.status_code == 200 and infer.json()["result"]["conclusion"] == "It is a red square."
        chat = httpx.post(f"{a.url}/v1/chat/completions", timeout=60, json={
            "model": "m", "max_tokens": 95, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64("blue")}},
                {"type": "text", "text": QUESTION}]}]})
        assert chat.status_code == 200, chat.text
        assert httpx.get(f"{a.url}/ready").status_code == 200
    finally:
        redis_server.start()
    job = wait_job(a.url, post_job(a, "red").json()["id"])  # back once Redis is
    assert job["status"] == "succeeded"


def test_a_server_killed_mid_job_loses_nothing(
    tiny_checkpoint: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    # Its own Redis: the module's pair must not take the job first.
    (tmp_path / "redis").mkdir()
    own = RedisServer.with_password(tmp_path / "redis", PASSWORD)
    own.start()
    victim = start_serve(tiny_checkpoint, tmp_path, {
        "LLAMACTL_REDIS_URL": own.url, "LLAMACTL_INSTANCE": "victim/0", "LLAMACTL_GEN_MAX_NEW_TOKENS": "2048",
        "LLAMACTL_JOBS_CLAIM_IDLE_S": "2",
    })
    rescuer: ThreadServer | None = None
    try:
        # Long enough (1500 tokens, EOS ignored) to be caught running.
        job_id = post_job(victim, "blue", max_tokens=1500, ignore_eos=True).json()["id"]
        assert wait_job(victim.url, job_id, until=("running",))["status"] == "running"
        assert ran_on(own, job_id).startswith("victim/0-")
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(30)
        rescuer = start_thread_server(jobs_settings(tiny_checkpoint, own.url, "rescuer/0",
                                                    gen_max_new_tokens=2048))
        job = wait_job(rescuer.url, job_id)
        assert job["status"] == "succeeded", job
        assert job["result"]["usage"]["completion_tokens"] == 1500
        assert ran_on(own, job_id).startswith("rescuer/0-")
    finally:
        if victim.proc.poll() is None:
            victim.proc.kill()
            victim.proc.wait(30)
        if rescuer is not None:
            rescuer.stop()
        own.stop()


def test_sigterm_gives_back_claimed_jobs_that_have_not_started(tiny_checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    own = RedisServer.with_password(tmp_path / "redis", PASSWORD)
    own.start()
    # Three job slots but two engine slots: of three claimed jobs two run, the third waits in the engine, unstarted.
    server = start_serve(tiny_checkpoint, tmp_path, {
        "LLAMACTL_REDIS_URL": own.url, "LLAMACTL_INSTANCE": "draining/0", "LLAMACTL_GEN_MAX_NEW_TOKENS": "2048",
        "LLAMACTL_JOBS_SLOTS": "3", "LLAMACTL_MAX_BATCH_SIZE": "2", "LLAMACTL_JOBS_CLAIM_IDLE_S": "60",
    })
    rescuer: ThreadServer | None = None
    try:
        # Long (EOS ignored, distinct lengths so none is a cache hit): the two running ones outlast the checks.
        ids = [post_job(server, "red", max_tokens=n, ignore_eos=True).json()["id"] for n in (1500, 1499, 1498)]
        for job_id in ids:
            wait_job(server.url, job_id, until=("running",))
        server.proc.send_signal(signal.SIGTERM)
        client = redis.Redis.from_url(own.url, decode_responses=True, socket_timeout=10)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:  # handed back at the start of the drain, not at its end
            records = [client.hgetall(f"llamactl:job:{job_id}") for job_id in ids]
            if any(r["status"] == "queued" for r in records):
                break
            time.sleep(0.02)
        shown = [{k: v for k, v in r.items() if k != "result"} for r in records]
        assert server.proc.poll() is None, shown  # still draining
        assert sorted(r["status"] for r in records) == ["queued", "running", "running"], shown
        given_back = ids[[r["status"] for r in records].index("queued")]
        assert client.hget(f"llamactl:job:{given_back}", "gave_back") == "1"
        assert server.proc.wait(WAIT_S) == 0  # drained: the started jobs finished
        statuses = [client.hget(f"llamactl:job:{job_id}", "status") for job_id in ids]
        client.close()
        assert sorted(statuses) == ["queued", "succeeded", "succeeded"], statuses  # type: ignore[type-var]
        # claimable at once although the claim timeout is 60 s: another instance runs it now
        rescuer = start_thread_server(jobs_settings(tiny_checkpoint, own.url, "rescuer/0",
                                                    gen_max_new_tokens=2048, jobs_claim_idle_s=60.0))
        job = wait_job(rescuer.url, given_back)
        assert job["status"] == "succeeded", job
        assert ran_on(own, given_back).startswith("rescuer/0-")
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(30)
        if rescuer is not None:
            rescuer.stop()
        own.stop()
