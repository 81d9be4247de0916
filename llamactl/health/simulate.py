"""Simulated server instances on loopback: the fake that ships with the health probes.

A small asyncio HTTP/1.1 server (no framework, so hundreds of listeners stay cheap) answering the
CONTRACTS shapes of ``/health``, ``/ready``, ``/metrics``, ``/healthz``, ``/infer`` and streamed
``/v1/chat/completions``, with scripted misbehaviour: loading, draining, failed, stalled (an engine with
work and no step progress), slow, silent (accepts and never answers), and error statuses for inference.
Tests run it on a thread; the status benchmark runs it as a separate process
(``python -m llamactl.health.simulate SPEC.json``).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import llamactl

ANSWER = {
    "summary": "I will describe the image.",
    "caption": "A plain red square.",
    "reasoning": ["The image has one colour.", "The colour is red."],
    "conclusion": "It is a red square.",
}
STREAM = ["<SUMMARY>I will describe the image.</SUMMARY>", "<CAPTION>A plain red square.</CAPTION>",
          "<REASONING>1. The image has one colour.\n2. The colour is red.</REASONING>",
          "<CONCLUSION>It is a red square.</CONCLUSION>"]  # fmt: skip


@dataclass
class Behaviour:
    status: str = "ready"  # ready | loading | draining | failed | stalled | silent | balancer
    delay_s: float = 0.0  # before every answer
    version: str = llamactl.__version__
    config_hash: str = "0123456789abcdef"
    model: str = "/srv/models/Llama-3.2V-11B-cot"
    requests: int = 0  # completed inferences reported in /metrics
    infer_status: int = 200
    infer_message: str = ""
    retry_after: int | None = None
    api_key: str | None = None  # when set, /infer and chat need ``Authorization: Bearer <key>``
    upstream: str | None = None  # X-Upstream header on inference answers
    answer: dict[str, Any] = field(default_factory=lambda: dict(ANSWER))


@dataclass
class Endpoint:
    host: str
    port: int
    behaviour: Behaviour = field(default_factory=Behaviour)


def metrics_text(b: Behaviour) -> str:
    """Exposition text like the server's: gauges and an e2e latency histogram of ``b.requests``."""
    n = b.requests
    bounds = [(0.5, n // 10), (1.0, n // 2), (2.5, n * 9 // 10), (5.0, n), ("+Inf", n)]
    lines = ["# TYPE llamactl_num_requests_running gauge", "llamactl_num_requests_running 1.0",
             "# TYPE llamactl_num_requests_waiting gauge", "llamactl_num_requests_waiting 0.0",
             "# TYPE llamactl_e2e_request_latency_seconds histogram"]  # fmt: skip
    lines += [f'llamactl_e2e_request_latency_seconds_bucket{{le="{le}"}} {c}.0' for le, c in bounds]
    lines += [
        f"llamactl_e2e_request_latency_seconds_count {n}.0",
        f"llamactl_e2e_request_latency_seconds_sum {n}.0",
    ]
    return "\n".join(lines) + "\n"


_ERRORS = {
    "failed": "weights missing",
    "stalled": "engine stalled: no step completed for 75.0 s with work waiting (stall_timeout_s 60)",
}


def _health(b: Behaviour, ep: Endpoint) -> dict[str, Any]:
    return {
        "status": b.status, "model": b.model, "version": b.version, "config_hash": b.config_hash,
        "instance": f"{ep.host}:{ep.port}", "in_flight": 1, "queued": 0,
        "gpu_memory": {"used_bytes": 21 * 2**30, "total_bytes": 80 * 2**30}, "uptime_s": 100.0,
        "error": _ERRORS.get(b.status),
    }  # fmt: skip


def _error(status: int, message: str) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"error": {"message": message, "type": "simulated"}}).encode()
    return status, {"Content-Type": "application/json"}, body


def route(ep: Endpoint, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    b = ep.behaviour
    as_json = {"Content-Type": "application/json"}
    if path == "/healthz":
        return 200, {"Content-Type": "text/plain"}, b"ok\n"
    if path == "/health":
        return 200, as_json, json.dumps(_health(b, ep)).encode()
    if path == "/ready":
        ready = b.status == "ready"
        return (200 if ready else 503), as_json, json.dumps({"ready": ready, "status": b.status}).encode()
    if path == "/metrics":
        return 200, {"Content-Type": "text/plain; version=0.0.4"}, metrics_text(b).encode()
    if path not in ("/infer", "/v1/chat/completions") or method != "POST":
        return _error(404, f"no route {method} {path}")
    if b.api_key is not None and headers.get("authorization") != f"Bearer {b.api_key}":
        return _error(401, "missing or invalid API key")
    if b.infer_status != 200:
        status, extra, body = _error(b.infer_status, b.infer_message or f"simulated {b.infer_status}")
        if b.retry_after is not None:
            extra["Retry-After"] = str(b.retry_after)
        return status, extra, body
    extra = {"X-Upstream": b.upstream} if b.upstream else {}
    if path == "/v1/chat/completions":
        events = [{"choices": [{"index": 0, "delta": {"content": piece}}]} for piece in STREAM]
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return 200, {"Content-Type": "text/event-stream", **extra}, text.encode()
    answer = {"result": b.answer, "full_response": "".join(STREAM), "inference_time": 0.25,
              "model": b.model, "cached": False}  # fmt: skip
    return 200, {**as_json, **extra}, json.dumps(answer).encode()


# Connection handlers waiting forever are referenced only weakly by asyncio: hold them, or the garbage
# collector destroys them mid-wait (and says so on stderr).
_HANDLERS: set[asyncio.Task[Any]] = set()


async def _serve_connection(ep: Endpoint, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    me = asyncio.current_task()
    if me is not None:
        _HANDLERS.add(me)
        me.add_done_callback(_HANDLERS.discard)
    try:
        if ep.behaviour.status == "silent":
            await asyncio.Event().wait()  # hold the connection open, never read, never answer
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
            }
            length = int(headers.get("content-length", "0"))
            if length:
                await reader.readexactly(length)
            if ep.behaviour.delay_s:
                await asyncio.sleep(ep.behaviour.delay_s)
            status, extra, body = route(ep, method, target.split("?", 1)[0], headers)
            head_out = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n"
            head_out += "".join(f"{k}: {v}\r\n" for k, v in extra.items()) + "\r\n"
            writer.write(head_out.encode("latin-1") + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError, ValueError):
        pass
    finally:
        writer.close()


async def start(endpoints: list[Endpoint]) -> list[asyncio.Server]:
    """Listen on every endpoint (``asyncio.start_server`` per address and port)."""
    servers = []
    for ep in endpoints:

        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, ep: Endpoint = ep) -> None:
            await _serve_connection(ep, r, w)

        servers.append(await asyncio.start_server(handler, ep.host, ep.port, backlog=512, reuse_address=True))
    return servers


@contextmanager
def running(endpoints: list[Endpoint]) -> Iterator[list[Endpoint]]:
    """Serve ``endpoints`` from a background thread for the duration of the block (tests)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="simulated-instances")
    thread.start()
    servers = asyncio.run_coroutine_threadsafe(start(endpoints), loop).result(timeout=30)
    try:
        yield endpoints
    finally:

        async def stop() -> None:
            for server in servers:
                server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def spec_json(endpoints: list[Endpoint]) -> str:
    return json.dumps([asdict(ep) for ep in endpoints])


def _main(path: str) -> None:
    """Run the endpoints listed in a JSON spec until killed; prints ``listening N`` once they all are."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    endpoints = [Endpoint(e["host"], e["port"], Behaviour(**e["behaviour"])) for e in raw]

    async def forever() -> None:
        servers = await start(endpoints)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print(f"listening {len(endpoints)}", flush=True)
        await stop.wait()
        for server in servers:
            server.close()

    asyncio.run(forever())


if __name__ == "__main__":
    _main(sys.argv[1])
