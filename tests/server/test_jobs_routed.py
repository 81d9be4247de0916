"""Without Redis, a job posted through the balancer is found through it: two real servers (the tiny checkpoint,
in-memory jobs) behind a real nginx running the rendered config, which routes GET /v1/jobs/{id} by the instance
tag in the id. Without the routing, least_conn sends about half of the GETs to the wrong instance (404)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from llamactl.server.jobs import route_tag
from tests.render.test_nginx_live import Nginx, free_port, inventory

from ._support import ThreadServer, make_settings, png_b64, start_thread_server


@pytest.fixture(scope="module")
def servers(tiny_checkpoint: Path) -> Iterator[list[ThreadServer]]:
    started = [start_thread_server(make_settings(tiny_checkpoint, instance=f"h/{i}", max_batch_size=2,
                                                 gen_max_new_tokens=8)) for i in range(2)]
    yield started
    for s in started:
        s.stop()


def test_jobs_through_the_balancer_are_found_through_it(servers: list[ThreadServer], tmp_path: Path) -> None:
    ports = [int(urlsplit(s.url).port or 0) for s in servers]
    inv = inventory(tmp_path, free_port(), ports)
    assert [i.id for i in inv.instances()] == ["h/0", "h/1"]
    nginx = Nginx(tmp_path, inv, frozenset())
    try:
        body = json.dumps({"image": png_b64("red"), "question": "What colour?", "max_tokens": 8}).encode()
        ids = []
        for _ in range(6):
            status, _, answer = nginx.request_body("POST", "/v1/jobs", body)
            assert status == 202, answer
            ids.append(json.loads(answer)["id"])
        assert {i[4:12] for i in ids} <= {route_tag("h/0"), route_tag("h/1")}
        deadline = time.monotonic() + 120
        finished: dict[str, str] = {}
        while len(finished) < len(ids) and time.monotonic() < deadline:
            for job_id in ids:
                status, headers, answer = nginx.request("GET", f"/v1/jobs/{job_id}")
                assert status == 200, (job_id, answer)  # never the other instance's 404
                expected = ports[[route_tag("h/0"), route_tag("h/1")].index(job_id[4:12])]
                assert headers["x-upstream"] == f"127.0.0.1:{expected}"
                if json.loads(answer)["status"] in ("succeeded", "failed"):
                    finished[job_id] = json.loads(answer)["status"]
            time.sleep(0.2)
        assert finished == {job_id: "succeeded" for job_id in ids}
        status, _, _ = nginx.request("GET", "/v1/jobs/job-" + "0" * 32)  # an unknown id: some instance's 404
        assert status == 404
    finally:
        nginx.stop()
