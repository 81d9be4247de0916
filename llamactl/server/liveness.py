"""Engine liveness: is a busy engine still making step progress, and which errors must end the process.

A server whose ``/health`` says 200 while its engine is hung or its CUDA context is poisoned is the failure
operators of other servers complain about most. Two rules cover it:

- ``Liveness`` answers "stalled?": the engine has work (running or waiting requests) and no step has
  completed for ``stall_timeout_s``. It is told about progress from the engine (``step_completed`` after
  every step, ``work_arrived`` when a request is added) and asked from ``/health`` and ``/ready`` with the
  engine's current ``busy``. An idle engine is never stalled, and idleness never counts against the next
  request: when work arrives at an idle engine, its first step is timed from that arrival, not from the last
  step before the idle period. Work arriving at a busy engine does not move the reference, so a steady
  stream of new requests cannot hide a hung step loop.
- ``is_fatal_cuda_error`` tells a CUDA error that poisons the context (every later kernel fails too) from
  an ordinary out-of-memory error (which the engine can survive by failing one request); for the former
  ``exit_for_restart`` ends the process with a non-zero status so systemd (``Restart=on-failure``)
  starts a fresh one.

Pure apart from the clock (injected) and ``exit_for_restart``; imports only the stdlib.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

Clock = Callable[[], float]

# EX_SOFTWARE from sysexits.h: any non-zero status makes systemd's Restart=on-failure start the unit again.
FATAL_EXIT_STATUS = 70

_LOG = logging.getLogger("llamactl.server.liveness")


@dataclass(frozen=True)
class LivenessState:
    """One answer for ``/health``: ``since_progress_s`` is None while idle."""

    stalled: bool
    busy: bool
    since_progress_s: float | None
    stall_timeout_s: float
    steps: int

    def describe(self) -> str | None:
        """A reason for ``/health``'s ``error`` while stalled, else None."""
        if not self.stalled or self.since_progress_s is None:
            return None
        return (
            f"engine stalled: no step completed for {self.since_progress_s:.1f} s with work waiting "
            f"(stall_timeout_s {self.stall_timeout_s:g})"
        )


class Liveness:
    """Step-progress tracking for one engine. Thread-safe: the step loop, ``add`` and the HTTP probes call it.

    ``at``/``now`` default to the injected clock (``time.monotonic``); pass them to use the caller's reading.
    """

    def __init__(self, stall_timeout_s: float, *, clock: Clock = time.monotonic) -> None:
        if not stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be greater than 0, found {stall_timeout_s!r}")
        self.stall_timeout_s = stall_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        # The latest moment progress was made or owed: a completed step, or work arriving at an idle engine.
        self._reference = clock()
        self._steps = 0

    @property
    def steps(self) -> int:
        """Steps completed so far."""
        return self._steps

    def step_completed(self, at: float | None = None) -> None:
        """Called by the step loop after every step (a decode step, a prefill chunk, an encode chunk)."""
        at = self._clock() if at is None else at
        with self._lock:
            self._steps += 1
            self._reference = max(self._reference, at)

    def work_arrived(self, *, was_idle: bool, at: float | None = None) -> None:
        """Called by the engine when a request is added; ``was_idle``: it had no running or waiting request.

        Only work reaching an idle engine restarts the clock; the engine decides ``was_idle`` under its own
        lock, so a request racing the last one's completion is judged as the engine saw it.
        """
        if not was_idle:
            return
        at = self._clock() if at is None else at
        with self._lock:
            self._reference = max(self._reference, at)

    def state(self, busy: bool, now: float | None = None) -> LivenessState:
        """Where the engine stands, given whether it has work now (running or waiting requests)."""
        now = self._clock() if now is None else now
        with self._lock:
            reference, steps = self._reference, self._steps
        if not busy:
            return LivenessState(False, False, None, self.stall_timeout_s, steps)
        since = max(0.0, now - reference)
        return LivenessState(since >= self.stall_timeout_s, True, since, self.stall_timeout_s, steps)

    def stalled(self, busy: bool, now: float | None = None) -> bool:
        """True when the engine has work and no progress for ``stall_timeout_s``; never while idle."""
        return self.state(busy, now).stalled


# Messages of CUDA failures after which the context is unusable: every later call fails the same way.
_FATAL_MARKERS = (
    "CUDA error",
    "device-side assert",
    "illegal memory access",
    "CUBLAS_STATUS",
    "CUDNN_STATUS_EXECUTION_FAILED",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "uncorrectable ECC error",
)
# Allocation failures: the request that hit one fails, the engine and its context carry on.
_OOM_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and those it was raised from or during, without looping on cycles."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def is_fatal_cuda_error(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it wraps) is a CUDA error that poisons the process's context.

    torch raises these as ``RuntimeError`` (``torch.AcceleratorError`` in newer releases, a subclass), so
    only RuntimeErrors are read: text from elsewhere (a user's prompt in a ValueError) never matches.
    Out-of-memory errors, ``torch.cuda.OutOfMemoryError`` included, are not fatal.
    """
    for item in _chain(exc):
        if not isinstance(item, RuntimeError) or type(item).__name__ == "OutOfMemoryError":
            continue
        message = str(item)
        if any(marker in message for marker in _OOM_MARKERS):
            continue
        if any(marker in message for marker in _FATAL_MARKERS):
            return True
    return False


def flush_logs() -> None:
    """Flush every logging handler and the standard streams (without closing them)."""
    loggers = [logging.getLogger(), *(
        obj for obj in list(logging.Logger.manager.loggerDict.values()) if isinstance(obj, logging.Logger)
    )]
    for logger in loggers:
        for handler in list(logger.handlers):
            try:
                handler.flush()
            except Exception:  # noqa: BLE001 - a broken handler must not stop the exit
                pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def exit_for_restart(
    reason: str, *, status: int = FATAL_EXIT_STATUS, _exit: Callable[[int], object] = os._exit
) -> NoReturn:
    """Log ``reason``, flush the logs and end the process at once with ``status`` (non-zero).

    ``os._exit``: no atexit handlers or thread joins, which a poisoned CUDA context or a hung step loop
    could block forever. systemd's ``Restart=on-failure`` then starts a fresh server.
    """
    if status == 0:
        raise ValueError("exit_for_restart needs a non-zero status, or systemd would not restart the server")
    _LOG.critical("fatal: %s; exiting with status %d so systemd restarts the server", reason, status)
    flush_logs()
    _exit(status)
    raise SystemExit(status)  # only reached when a test injects an _exit that returns


def exit_if_fatal(exc: BaseException, *, _exit: Callable[[int], object] = os._exit) -> None:
    """For the engine's error path: end the process when ``exc`` is a fatal CUDA error, else return."""
    if is_fatal_cuda_error(exc):
        exit_for_restart(f"{type(exc).__name__}: {exc}", _exit=_exit)
