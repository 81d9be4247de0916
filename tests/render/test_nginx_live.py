"""The rendered balancer config in a running nginx, in front of real HTTP backends on loopback.

Checks what `nginx -t` cannot: a POST that gets a 503 is retried on another instance, X-Upstream names
the backend, drained instances get no traffic, an all-drained cluster answers 503, rate limits answer 429.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llamactl.inventory import Inventory, load_inventory
from llamactl.plan.render import render_balancer_files
from tests.render.tools import need, nginx_conf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Backend:
    """A tiny HTTP server that answers every POST with a fixed status and counts what it got."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.hits = 0
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                backend.hits += 1
                body = b'{"ok": true}' if backend.status == 200 else b'{"error": {"message": "busy"}}'
                self.send_response(backend.status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def inventory(tmp: Path, listen: int, ports: list[int], extra: str = "") -> Inventory:
    path = tmp / "inv.yaml"
    path.write_text(
        "version: 1\ncluster: live\n"
        f"defaults: {{gpus: {len(ports)}, model: {{source: /m}}}}\n"
        f"groups: {{g: {{hosts: {{h: {{address: 127.0.0.1, ports: {ports}}}}}}}}}\n"
        f"balancer:\n  hosts: {{lb: {{address: 127.0.0.9}}}}\n  listen: {listen}\n  listen_address: 127.0.0.1\n"
        f"  max_fails: 0\n  stub_status_port: {free_port()}\n{extra}"
    )
    return load_inventory(path, env={})


class Nginx:
    def __init__(self, tmp: Path, inv: Inventory, drained: frozenset[str]) -> None:
        self.tmp = tmp
        rendered = tmp / "llamactl.conf"
        rendered.write_bytes(render_balancer_files(inv, drained)[inv.balancer.config_path].content)
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = nginx_conf(tmp, rendered)
        conf.write_text(user + conf.read_text())
        self.args = [need("nginx"), "-e", str(tmp / "error.log"), "-p", str(tmp), "-c", str(conf)]
        subprocess.run(self.args, check=True, capture_output=True, timeout=30)
        self.port = inv.balancer.listen
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError((tmp / "error.log").read_text())

    def request(self, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request(method, path, body=b'{"question": "?"}' if method == "POST" else None)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body

    def request_body(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def stop(self) -> None:
        subprocess.run([*self.args, "-s", "stop"], capture_output=True, timeout=30)


@pytest.fixture
def backends() -> Iterator[tuple[Backend, Backend]]:
    need("nginx")
    busy, good = Backend(503), Backend(200)
    yield busy, good
    busy.close()
    good.close()


def running(tmp: Path, inv: Inventory, drained: frozenset[str] = frozenset()) -> Nginx:
    return Nginx(tmp, inv, drained)


def test_post_is_retried_elsewhere_and_upstream_is_named(
    tmp_path: Path, backends: tuple[Backend, Backend]
) -> None:
    busy, good = backends
    nginx = running(tmp_path, inventory(tmp_path, free_port(), [busy.port, good.port]))
    try:
        status, _, body = nginx.request("GET", "/healthz")
        assert (status, body) == (200, b"ok\n")
        upstreams = set()
        for _ in range(6):
            status, headers, body = nginx.request("POST", "/infer")
            assert (status, body) == (200, b'{"ok": true}')
            upstreams.add(headers["x-upstream"])
        # Requests that hit the busy instance first were retried on the good one: both addresses listed.
        assert f"127.0.0.1:{busy.port}, 127.0.0.1:{good.port}" in upstreams
        assert busy.hits >= 1 and good.hits == 6
    finally:
        nginx.stop()


def test_drained_instance_gets_no_traffic(tmp_path: Path, backends: tuple[Backend, Backend]) -> None:
    busy, good = backends
    inv = inventory(tmp_path, free_port(), [busy.port, good.port])
    nginx = running(tmp_path, inv, frozenset({"h/0"}))
    try:
        for _ in range(5):
            status, headers, _ = nginx.request("POST", "/v1/chat/completions")
            assert status == 200 and headers["x-upstream"] == f"127.0.0.1:{good.port}"
        assert busy.hits == 0
    finally:
        nginx.stop()


def test_all_drained_answers_503_with_retry_after(tmp_path: Path, backends: tuple[Backend, Backend]) -> None:
    busy, good = backends
    inv = inventory(tmp_path, free_port(), [busy.port, good.port])
    nginx = running(tmp_path, inv, frozenset({"h/0", "h/1"}))
    try:
        status, headers, body = nginx.request("POST", "/infer")
        assert status == 503 and headers["retry-after"] == "5" and b"drained" in body
        assert busy.hits == good.hits == 0
    finally:
        nginx.stop()


def test_rate_limit_answers_429(tmp_path: Path, backends: tuple[Backend, Backend]) -> None:
    _, good = backends
    inv = inventory(tmp_path, free_port(), [good.port], "  rate_limit: {requests_per_second: 1, burst: 0}\n")
    nginx = running(tmp_path, inv)
    try:
        statuses = [nginx.request("POST", "/infer")[0] for _ in range(3)]
        assert statuses[0] == 200 and 429 in statuses[1:]
    finally:
        nginx.stop()


def test_stub_status_on_loopback_gives_connections_and_request_rate(
    tmp_path: Path, backends: tuple[Backend, Backend]
) -> None:
    from llamactl.plan.stubstatus import parse_samples, sample_command
    from llamactl.remote.local import LocalExecutor

    _, good = backends
    inv = inventory(tmp_path, free_port(), [good.port])
    assert inv.balancer.stub_status_port is not None
    nginx = running(tmp_path, inv)
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            nginx.request("POST", "/infer")
            time.sleep(0.02)

    sender = threading.Thread(target=traffic, daemon=True)
    try:
        sender.start()
        result = LocalExecutor("lb").run(sample_command(inv.balancer.stub_status_port))
        figures = parse_samples(result.stdout)
        assert figures.requests_per_s > 5  # ~40/s sent; the sampler's own requests are left out
        assert figures.sample.requests > 10 and figures.active_connections >= 0
        # loopback only: the status page is not on the public listener
        assert b"Active connections" not in nginx.request("GET", "/nginx_status")[2]
    finally:
        stop.set()
        sender.join(5)
        nginx.stop()
