"""Running the app under uvicorn with a graceful drain on SIGTERM/SIGINT.

uvicorn's own handling stops accepting connections at once and, after shutting down, re-raises the signal
(so the exit status would be "killed by SIGTERM"). For a balancer-fronted service we want instead: keep the
socket open so /ready can say 503 and new inference requests get a clean 503, let in-flight work finish
(bounded by drain_timeout_s), then shut down and exit 0. A second signal forces the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Generator
from types import FrameType

import uvicorn

from llamactl.server.state import ServerState

log = logging.getLogger("llamactl.server")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self.signals_seen = 0

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._loop = asyncio.get_running_loop()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        # Deliberately no re-raise of the captured signal: a completed drain is a clean exit (status 0).

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.signals_seen += 1
        if self.signals_seen > 1:
            log.warning("second signal: exiting without waiting for in-flight requests")
            self.should_exit = True
            self.force_exit = True
            return
        log.info(
            "received %s: draining (up to %gs)", signal.Signals(sig).name, self.state.settings.drain_timeout_s
        )
        self.state.begin_drain()  # a plain attribute write: safe inside a signal handler
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._start_drain)
        else:
            self.should_exit = True

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        await self.state.wait_drained(self.state.settings.drain_timeout_s)
        self.should_exit = True


def serve(state_app: object, host: str, port: int, *, log_level: str = "info") -> None:
    """Run ``state_app`` (a FastAPI app built by ``create_app``) until drained. Blocks."""
    from fastapi import FastAPI

    assert isinstance(state_app, FastAPI)
    config = uvicorn.Config(
        state_app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=5,
        proxy_headers=True,
        server_header=False,
    )
    server = DrainingServer(config, state_app.state.llamactl)
    server.run()
