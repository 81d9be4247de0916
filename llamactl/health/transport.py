"""A lean plain-HTTP/1.1 transport for httpx, for sweeping hundreds of instances at once.

Kept (issue 11) because the measurement says so. ``bench/status_sweep.py``: one ``llamactl status`` sweep of
100 simulated instances (10 hosts x 10 on loopback), 10 of them silent, 1 s probe timeout, 5 runs each way,
the same client limits, on the project's shared 2-core box (2026-11-27, load average ~2):

    this transport (asyncio streams)      median 1.03 s  (1.03-1.14)   90 ready, 10 down
    httpx's default transport (httpcore)  median 2.81 s  (1.98-4.26)   90 ready, 10 down

and on an H100 host's CPU pinned to 2 cores (bench/results/status_sweep.md): 1.11 s against 2.90 s. The
sweep's floor is the 1 s timeout of the silent instances; through httpcore the 300 concurrent probes add
1-3 s of CPU (its pool rescans every connection per request, anyio starts a task group per connect), which
misses the 1.5 s target. So status keeps ``httpx.AsyncClient`` (timeouts, URLs, Response objects) and swaps
only the transport: asyncio streams, keep-alive per origin, bodies by Content-Length, chunked or close.
``https`` goes to httpx's own transport (TLS, certificates). Re-measure with
``bench/status_sweep.py --transport asyncio|httpcore`` before changing this.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
MAX_HEAD = 64 * 1024


class _Fresh(Exception):
    """A reused keep-alive connection turned out closed before any byte came back: retry on a new one."""


class AsyncioTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, verify: bool = True, max_idle_per_origin: int = 4) -> None:
        self._idle: dict[tuple[str, int], list[Conn]] = {}
        self._max_idle = max_idle_per_origin
        self._tls = httpx.AsyncHTTPTransport(verify=verify, trust_env=False)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            return await self._tls.handle_async_request(request)
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        origin = (request.url.host, request.url.port or 80)
        body = await request.aread()
        idle = self._idle.get(origin, [])
        while idle:
            conn = idle.pop()
            if conn[0].at_eof() or conn[1].is_closing():
                conn[1].close()
                continue
            try:
                return await self._exchange(conn, origin, request, body, timeouts, reused=True)
            except _Fresh:
                continue
        conn = await self._connect(origin, timeouts.get("connect"))
        return await self._exchange(conn, origin, request, body, timeouts, reused=False)

    async def _connect(self, origin: tuple[str, int], timeout: float | None) -> Conn:
        try:
            return await asyncio.wait_for(asyncio.open_connection(*origin), timeout)
        except asyncio.TimeoutError:
            raise httpx.ConnectTimeout(f"connect to {origin[0]}:{origin[1]} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc)) from exc

    async def _exchange(
        self,
        conn: Conn,
        origin: tuple[str, int],
        request: httpx.Request,
        body: bytes,
        timeouts: dict[str, Any],
        *,
        reused: bool,
    ) -> httpx.Response:
        reader, writer = conn
        keep = False
        try:
            writer.write(_head(request, body) + body)
            await asyncio.wait_for(writer.drain(), timeouts.get("write"))
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeouts.get("read"))
            except asyncio.IncompleteReadError as exc:
                if reused and not exc.partial:
                    raise _Fresh from None
                raise
            status, version, headers = _parse_head(head)
            content = await asyncio.wait_for(
                _read_body(reader, headers, request.method, status), timeouts.get("read")
            )
            keep = version == "HTTP/1.1" and _header(headers, "connection").lower() != "close"
            return httpx.Response(
                status,
                headers=headers,
                stream=httpx.ByteStream(content),
                extensions={"http_version": b"HTTP/1.1"},
            )
        except asyncio.TimeoutError:
            raise httpx.ReadTimeout("no answer in time", request=request) from None
        except asyncio.IncompleteReadError:
            raise httpx.RemoteProtocolError("connection closed without a full answer", request=request) from None
        except (asyncio.LimitOverrunError, ValueError) as exc:
            raise httpx.RemoteProtocolError(f"not a valid HTTP answer ({exc})", request=request) from None
        except (ConnectionError, OSError) as exc:
            raise httpx.ReadError(str(exc), request=request) from exc
        finally:
            # A cancelled or failed exchange leaves the connection in an unknown state: never reuse it.
            pool = self._idle.setdefault(origin, [])
            if keep and len(pool) < self._max_idle:
                pool.append(conn)
            else:
                writer.close()

    async def aclose(self) -> None:
        for pool in self._idle.values():
            for _, writer in pool:
                writer.close()
        self._idle.clear()
        await self._tls.aclose()


def _head(request: httpx.Request, body: bytes) -> bytes:
    target = request.url.raw_path.decode("ascii")
    lines = [f"{request.method} {target} HTTP/1.1"]
    for name, value in request.headers.raw:
        if name.lower() not in (b"content-length", b"transfer-encoding"):
            lines.append(f"{name.decode('latin-1')}: {value.decode('latin-1')}")
    if body or request.method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _parse_head(head: bytes) -> tuple[int, str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    version, code, *_ = lines[0].split(" ", 2)
    if not version.startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1.x status line: {lines[0][:60]!r}")
    headers = []
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"bad header line {line[:60]!r}")
            headers.append((name.strip(), value.strip()))
    return int(code), version, headers


def _header(headers: Sequence[tuple[str, str]], name: str) -> str:
    return next((v for k, v in headers if k.lower() == name), "")


async def _read_body(
    reader: asyncio.StreamReader, headers: list[tuple[str, str]], method: str, status: int
) -> bytes:
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return b""
    if "chunked" in _header(headers, "transfer-encoding").lower():
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        headers[:] = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
        return b"".join(chunks)
    length = _header(headers, "content-length")
    if length:
        return await reader.readexactly(int(length))
    headers.append(("Connection", "close"))  # body delimited by EOF: this connection is done
    return await reader.read()
