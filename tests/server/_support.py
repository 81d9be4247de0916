"""Helpers for the server tests: tiny-image payloads, real HTTP servers on real sockets (thread or subprocess)."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]


def run_in_triton_interpreter(code: str, *args: str) -> None:
    """Run ``code`` (a script printing "ok" last) in a fresh interpreter with TRITON_INTERPRET=1 (the flag is
    read at import) and this checkout on its path; fail with its stderr otherwise."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def png_b64(colour: str = "red", size: tuple[int, int] | None = None) -> str:
    from llamactl.server.tiny import trained_image

    img = trained_image(colour)
    if size is not None:
        img = img.resize(size)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def wait_ready(url: str, timeout_s: float = 120.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited early with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready within {timeout_s}s")


@dataclass
class ThreadServer:
    """uvicorn on a real socket in a background thread, serving an app built by ``create_app``."""

    url: str
    app: Any
    server: Any
    thread: threading.Thread

    @property
    def state(self) -> Any:
        return self.app.state.llamactl

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def start_thread_server(settings: Any, engine: Any = None, *, wait: bool = True) -> ThreadServer:
    import uvicorn

    from llamactl.server.app import create_app

    app = create_app(settings, engine)
    sock = free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    if wait:
        wait_ready(url)
    else:
        while not server.started:
            time.sleep(0.02)
    return ThreadServer(url, app, server, thread)


def make_settings(model: Path, **kw: Any) -> Any:
    from llamactl.server.settings import Settings

    base: dict[str, Any] = {"device": "cpu", "max_wait_ms": 50}
    base.update(kw)
    return Settings.from_env({}, model=str(model), **base)


@dataclass
class ServeProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


def start_serve(model: Path, tmp: Path, env_extra: dict[str, str] | None = None, *args: str) -> ServeProcess:
    """``llamactl serve`` as a real subprocess (its own signals, its own exit code)."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "LLAMACTL_MAX_WAIT_MS": "50", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    log = tmp / f"serve-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "llamactl",
        "serve",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        *args,
    ]
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc=proc)
    except AssertionError:
        proc.kill()
        proc.wait()
        raise AssertionError(log.read_text()[-3000:]) from None
    return ServeProcess(url, proc, log)
