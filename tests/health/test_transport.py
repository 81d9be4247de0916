"""The sweep's asyncio transport over real loopback sockets: framing, keep-alive, errors, timeouts."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from llamactl.health.probe import describe_error, fetch, make_client
from tests.health.helpers import free_base_port

ADDR = "127.0.0.51"


@contextmanager
def scripted_server(answers: list[bytes]) -> Iterator[tuple[int, list[bytes], list[int]]]:
    """Answers the n-th request with ``answers[n]`` (raw bytes); b"" means close without answering,
    b"silent" means never answer. Yields (port, requests seen, connection number per request)."""
    port = free_base_port([ADDR], 1)
    seen: list[bytes] = []
    conn_of: list[int] = []
    loop = asyncio.new_event_loop()
    conns = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns[0] += 1
        me = conns[0]
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(ln.split(b":")[1])
                        for ln in head.split(b"\r\n")
                        if ln.lower().startswith(b"content-length")
                    ),
                    0,
                )
                seen.append(head + (await reader.readexactly(length) if length else b""))
                conn_of.append(me)
                answer = answers[len(seen) - 1]
                if answer == b"silent":
                    await asyncio.Event().wait()
                if not answer:
                    break
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer or not (
                    b"Content-Length" in answer or b"chunked" in answer
                ):
                    break  # a close-delimited body ends where the server closes
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(asyncio.start_server(handle, ADDR, port), loop).result()
    try:
        yield port, seen, conn_of
    finally:

        async def stop() -> None:
            server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()


def gets(port: int, paths: list[str], timeout_s: float = 2.0) -> list[httpx.Response | str]:
    async def go() -> list[httpx.Response | str]:
        out: list[httpx.Response | str] = []
        async with make_client(1, timeout_s) as client:
            for path in paths:
                try:
                    response = await client.get(f"http://{ADDR}:{port}{path}")
                    await response.aread()
                    out.append(response)
                except httpx.HTTPError as exc:
                    out.append(describe_error(exc, timeout_s))
        return out

    return asyncio.run(go())


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Upstream: 10.0.0.1:8000\r\n\r\nhello"


def test_keep_alive_reuses_one_connection_and_sends_a_proper_request() -> None:
    with scripted_server([OK, OK]) as (port, seen, conn_of):
        first, second = gets(port, ["/health", "/metrics?x=1"])
    assert isinstance(first, httpx.Response) and first.status_code == 200 and first.text == "hello"
    assert first.headers["x-upstream"] == "10.0.0.1:8000"
    assert isinstance(second, httpx.Response) and second.text == "hello"
    assert conn_of == [1, 1]
    assert seen[0].startswith(b"GET /health HTTP/1.1\r\n") and f"Host: {ADDR}:{port}".encode() in seen[0]
    assert seen[1].startswith(b"GET /metrics?x=1 HTTP/1.1\r\n")


def test_chunked_and_close_delimited_bodies() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n3;x=y\r\nefg\r\n0\r\nT: 1\r\n\r\n"
    )
    until_close = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\nbusy for now"
    with scripted_server([chunked, until_close, OK]) as (port, _, conn_of):
        a, b, c = gets(port, ["/a", "/b", "/c"])
    assert isinstance(a, httpx.Response) and a.text == "abcdefg"
    assert isinstance(b, httpx.Response) and (b.status_code, b.text) == (503, "busy for now")
    assert isinstance(c, httpx.Response) and c.text == "hello"
    assert conn_of == [1, 1, 2]  # a close-delimited body ends its connection


def test_server_closing_an_idle_keep_alive_connection_is_retried_on_a_new_one() -> None:
    close_after = OK.replace(b"\r\n\r\n", b"\r\nConnection: keep-alive\r\n\r\n", 1)
    with scripted_server([close_after, b"", OK]) as (port, _, conn_of):
        first, second = gets(port, ["/a", "/b"])
    assert isinstance(first, httpx.Response) and isinstance(second, httpx.Response)
    assert second.text == "hello" and conn_of == [1, 1, 2]


def test_refused_silent_and_garbage_answers_become_short_reasons() -> None:
    port = free_base_port([ADDR], 1)
    assert gets(port, ["/"]) == ["connection refused"]
    with scripted_server([b"silent"]) as (port, _, _):
        assert gets(port, ["/"], timeout_s=0.3) == ["no answer within 0.3 s"]
    with scripted_server([b"SSH-2.0-OpenSSH_9.2\r\n\r\n"]) as (port, _, _):
        (answer,) = gets(port, ["/"])
    assert isinstance(answer, str) and answer.startswith("not a valid HTTP answer (")


def test_post_body_and_fetch_deadline() -> None:
    with scripted_server([OK, b"silent"]) as (port, seen, _):

        async def go() -> tuple[httpx.Response, str | None, float]:
            async with make_client(1, 5.0) as client:
                posted = await client.post(f"http://{ADDR}:{port}/infer", json={"image": "x"})
                outcome = await fetch(client, f"http://{ADDR}:{port}/health", 0.2)
                return posted, outcome.error, outcome.elapsed_s

        posted, error, elapsed = asyncio.run(go())
    assert posted.status_code == 200
    assert seen[0].startswith(b"POST /infer HTTP/1.1\r\n") and seen[0].endswith(b'{"image":"x"}')
    assert b"Content-Length: 13\r\n" in seen[0]
    assert error == "no answer within 0.2 s" and elapsed == pytest.approx(0.2, abs=0.15)
