"""Support for tests/ops: tiny real HTTP backends and an nginx in a temp prefix."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import yaml


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


class Backend:
    """A stand-in inference server on 127.0.0.1 answering /health, /ready and /infer for real."""

    def __init__(self, name: str, address: str = "127.0.0.1") -> None:
        self.name, self.address = name, address
        self.hits = 0
        self.in_flight = 0
        self.ready = True
        self.infer_delay_s = 0.0
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _send(self, code: int, body: dict[str, object]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._send(200, {"status": "ready" if backend.ready else "loading", "in_flight":
                                     backend.in_flight, "queued": 0, "uptime_s": 100.0, "instance": backend.name})
                elif self.path == "/ready":
                    self._send(200 if backend.ready else 503, {"ready": backend.ready})
                else:
                    self._send(404, {"error": {"message": "not found", "type": "not_found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                self.rfile.read(length)
                backend.hits += 1
                backend.in_flight += 1
                try:
                    time.sleep(backend.infer_delay_s)
                    self._send(200, {"result": {"summary": "s", "caption": "c", "reasoning": ["r"],
                                                "conclusion": "ok"}, "backend": backend.name})
                finally:
                    backend.in_flight -= 1

        self.handler = Handler
        self.restarts = 0
        self.port = free_port(address)
        self._serve()

    def _serve(self) -> None:
        self.server = ThreadingHTTPServer((self.address, self.port), self.handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def restart(self, down_s: float = 0.3, ready: bool = True) -> None:
        """Stop listening (connections are refused), then serve again, as a unit restart does."""
        self.close()
        self.restarts += 1
        time.sleep(down_s)
        self.ready = ready
        self._serve()


class TempNginx:
    """``nginx -p DIR -c DIR/nginx.conf`` with every path under DIR; includes DIR/conf.d/*.conf."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "nginx.conf"
        self.conf_d = root / "conf.d"
        self.conf_d.mkdir(parents=True)
        user = "user root;\n" if os.geteuid() == 0 else ""
        temps = "".join(f"    {k}_temp_path {root}/{k}_temp;\n"
                        for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        self.conf.write_text(
            f"{user}pid {root}/nginx.pid;\nerror_log {root}/error.log;\nworker_processes 1;\n"
            "events { worker_connections 256; }\n"
            f"http {{\n    access_log off;\n{temps}    include {self.conf_d}/*.conf;\n}}\n"
        )

    def flags(self) -> list[str]:
        return ["-p", str(self.root), "-c", str(self.conf)]

    def start(self) -> None:
        subprocess.run(["nginx", *self.flags()], check=True, capture_output=True, timeout=10)

    def master_pid(self) -> int:
        return int((self.root / "nginx.pid").read_text().strip())

    def workers(self) -> set[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.master_pid())], capture_output=True,
                             text=True, check=False).stdout
        return {int(p) for p in out.split()}

    def stop(self) -> None:
        if (self.root / "nginx.pid").exists():
            subprocess.run(["nginx", *self.flags(), "-s", "quit"], capture_output=True, timeout=10, check=False)
            deadline = time.monotonic() + 5
            while (self.root / "nginx.pid").exists() and time.monotonic() < deadline:
                time.sleep(0.05)


class Load:
    """A bounded client: POST /infer through the balancer until stopped, counting outcomes."""

    def __init__(self, url: str) -> None:
        self.url, self.ok, self.failed, self.upstreams = url, 0, [], []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(trust_env=False, timeout=10) as client:
            for _ in range(100_000):  # bounded even if never stopped
                if self._stop.is_set():
                    return
                try:
                    r = client.post(self.url + "/infer", json={"image": "x", "question": "q"})
                    if r.status_code == 200:
                        self.ok += 1
                        self.upstreams.append(r.headers.get("x-upstream", ""))
                    else:
                        self.failed.append(f"HTTP {r.status_code}")
                except httpx.HTTPError as exc:
                    self.failed.append(repr(exc))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def wait_for(self, n: int) -> None:
        target = self.ok + n
        deadline = 200
        while self.ok < target and deadline:
            self._stop.wait(0.05)
            deadline -= 1


def write_inventory(path: Path, backends: list[Backend], *, listen: int, config_path: Path,
                    rollout: dict[str, object] | None = None) -> Path:
    """An inventory whose hosts are the backends (one CPU instance each) behind a temp-prefix nginx."""
    doc = {
        "version": 1,
        "cluster": "t",
        "defaults": {"gpus": 0, "model": {"source": "/srv/model"}},
        "groups": {"g": {"hosts": {b.name: {"address": b.address, "base_port": b.port} for b in backends}}},
        "balancer": {
            "hosts": {"lb": {"address": "127.0.0.99"}},
            "listen": listen,
            "listen_address": "127.0.0.1",
            "config_path": str(config_path),
            "prometheus_targets_path": str(path.parent / "prometheus" / "llamactl.json"),
        },
        "rollout": rollout or {},
        "health": {"interval_s": 0.5, "timeout_s": 0.5, "fall": 2, "rise": 2, "startup_grace_s": 5},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


class LabLoad:
    """Continuous /infer traffic to one balancer address: ``concurrency`` clients, bounded by
    ``max_requests`` and ``max_seconds`` whatever happens; every non-200 or transport error is kept."""

    def __init__(self, endpoint: str, *, max_requests: int = 5000, max_seconds: float = 600,
                 concurrency: int = 4, max_tokens: int = 4) -> None:
        import base64
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (32, 24), (30, 120, 200)).save(buf, format="JPEG")
        self.image = base64.b64encode(buf.getvalue()).decode()
        self.url = endpoint.rstrip("/") + "/infer"
        self.max_requests, self.max_seconds, self.max_tokens = max_requests, max_seconds, max_tokens
        self.ok = 0
        self.failed: list[str] = []
        self.upstreams: set[str] = set()
        self._sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(concurrency)]

    def _next(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or self._sent >= self.max_requests:
                return None
            self._sent += 1
            return self._sent

    def _run(self, worker: int) -> None:
        deadline = time.monotonic() + self.max_seconds
        with httpx.Client(trust_env=False, timeout=120) as client:
            while time.monotonic() < deadline and (n := self._next()) is not None:
                # A distinct question per request: the server's answer cache must not hide a failure.
                body = {"image": self.image, "question": f"What is this? ({worker}-{n})",
                        "max_tokens": self.max_tokens}
                try:
                    r = client.post(self.url, json=body)
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.failed.append(f"#{n}: {type(exc).__name__}: {exc}")
                    continue
                with self._lock:
                    if r.status_code == 200:
                        self.ok += 1
                        self.upstreams.add(r.headers.get("x-upstream", "?"))
                    else:
                        self.failed.append(f"#{n}: HTTP {r.status_code}: {r.text[:200]}")

    def __enter__(self) -> LabLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=150)

    def wait_ok(self, n: int, timeout_s: float = 300) -> None:
        """Block until ``n`` more requests succeeded (or the timeout)."""
        target, deadline = self.ok + n, time.monotonic() + timeout_s
        while self.ok < target and time.monotonic() < deadline and any(t.is_alive() for t in self._threads):
            time.sleep(0.1)


def reload_storm(ngx: TempNginx, url: str, *, reloads: int, clients: int = 4,
                 pause_s: float = 0.1) -> tuple[int, list[str]]:
    """Reload ``ngx`` ``reloads`` times while ``clients`` Loads POST /infer back to back, each on one
    ``httpx.Client`` (keep-alive, as sessions in real clients are). Returns (ok, failures)."""
    loads = [Load(url) for _ in range(clients)]
    with contextlib.ExitStack() as running:
        for load in loads:
            running.enter_context(load)
        time.sleep(0.5)
        for _ in range(reloads):
            subprocess.run(["nginx", *ngx.flags(), "-s", "reload"], check=True, capture_output=True, timeout=10)
            time.sleep(pause_s)
    return sum(load.ok for load in loads), [f for load in loads for f in load.failed]
