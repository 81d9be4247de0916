"""Image newcomers through the vision tower + projector before they take a slot, beside the decoding batch.

On GPUs the tower runs on a stream of its own (``VisionLane``): its kernels are queued and the step loop goes on;
the newcomers join (cross-attention K/V, prefill) once their states are ready, handed to the main stream. The
stream is an ordinary one, or one confined to part of the SMs (``green.py``, ``vision_sms``); which of the
tower and the decode steps the GPU serves first is ``vision_priority`` (``stream_priorities``). On the CPU the
tower runs at once, on the loop's thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from llamactl.server.engine.continuous.green import GreenContextError, SmStream, auto_sms, sm_stream
from llamactl.server.engine.continuous.model import Newcomer
from llamactl.server.engine.protocol import GenRequest

log = logging.getLogger("llamactl.server.engine")


@dataclass
class Encoding:
    """Image newcomers whose vision states are being computed; no slot yet."""

    reqs: list[GenRequest]
    states: torch.Tensor
    done: Any  # torch.cuda.Event, or None when computed synchronously (CPU)
    started: float

    def ready(self) -> bool:
        return self.done is None or bool(self.done.query())


@dataclass(frozen=True)
class StreamPriorities:
    """CUDA stream priorities (lower = served first: -1 high, 0 low) of the engine's GPU work, from
    settings.vision_priority. A CUDA graph's kernels keep the priority of the stream they were CAPTURED on, not of
    the one they are replayed on (PyTorch instantiates graphs with cudaGraphInstantiateFlagUseNodePriority, and
    stream capture copies the stream's priority into each kernel node), so each graph family's capture stream
    carries its own. None: torch.cuda.graph's default capture stream (priority 0), as before these settings."""

    main: int  # eager work of the main stream: joins (cross K/V, prefill), steps outside the decode graphs
    lane: int  # the vision tower's stream (the eager tower, the graphs' input copies)
    decode_graphs: int | None  # the decode steps' graphs, which run most of the time
    tower_graphs: int  # the tower's graphs


def stream_priorities(setting: str) -> StreamPriorities:
    """The priorities for a vision_priority: "equal", the decode steps' graphs and the tower at one priority, the
    joins first (what every run before Session 15 measured as "low": its decode graphs were captured at priority
    0, the tower's); "low", the tower below everything, the decode graphs included; "high", the tower first;
    "first", equal's priorities, the order given by waits instead (``decode_waits_for_tower``)."""
    if setting == "high":
        return StreamPriorities(main=0, lane=-1, decode_graphs=None, tower_graphs=-1)
    if setting == "low":
        return StreamPriorities(main=-1, lane=0, decode_graphs=-1, tower_graphs=0)
    if setting in ("equal", "first"):
        return StreamPriorities(main=-1, lane=0, decode_graphs=None, tower_graphs=0)
    raise ValueError(f"vision_priority {setting!r}: expected equal, low, high or first")


def decode_waits_for_tower(setting: str) -> bool:
    """Whether a decode step waits on the device for the image chunk in the tower (vision_priority "first").
    A stream's priority only orders thread blocks waiting for an SM: the tower's large kernels, once resident,
    are not preempted, and "high" changed nothing measurable (an H200, bench/results/engine_bench_run47_h200.md).
    A wait does order them: the chunk gets the whole GPU, its first tokens come sooner, the running rows wait
    up to one chunk's tower (~45 ms for one image, ~280 ms for eight on an H200) between two tokens."""
    return setting == "first"


class VisionLane:
    """Where the tower runs: ``stream`` None = synchronously (CPU)."""

    def __init__(self, stream: Any = None, description: str = "-", partition: SmStream | None = None) -> None:
        self.stream = stream
        self.description = description  # what the tower may use, for /health
        self._partition = partition  # keeps the green context alive as long as its stream

    @property
    def partitioned(self) -> bool:
        """Whether the tower's stream is confined to part of the SMs (a green context)."""
        return self._partition is not None

    @classmethod
    def on_gpu(cls, sms: int, priority: int = 0) -> VisionLane:
        """On ``sms`` SMs (a green context; -1 = the automatic share) beside the decode steps, or on an ordinary
        stream (``sms`` 0, or when the driver cannot partition: the description says why). ``priority``: CUDA's
        stream priority (lower = served first; the decode stream's is set beside it)."""
        device = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(device).multi_processor_count
        if sms == 0:
            return cls(torch.cuda.Stream(priority=priority), f"all {total} (partition off)")  # type: ignore[no-untyped-call]
        try:
            part = sm_stream(sms if sms > 0 else auto_sms(total), device=device, priority=priority)
        except GreenContextError as exc:
            log.warning("vision tower on every SM: %s", exc)
            return cls(torch.cuda.Stream(priority=priority),  # type: ignore[no-untyped-call]
                       f"all {total} (no partition: {exc})")
        return cls(part.stream, f"{part.sms} of {part.total_sms}", part)

    def start(self, encode: Callable[[list[Newcomer]], torch.Tensor], reqs: list[GenRequest],
              rows: list[Newcomer]) -> Encoding:
        """Queue the tower for ``rows`` (returns at once on GPUs)."""
        started = time.monotonic()
        if self.stream is None:
            return Encoding(reqs, encode(rows), None, started)
        with torch.cuda.stream(self.stream):
            states = encode(rows)
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record()
        return Encoding(reqs, states, done, started)

    def hold(self, encoding: Encoding, stream: Any = None) -> bool:
        """Make ``stream``'s (default: the current CUDA stream's) next work wait on the device until
        ``encoding``'s tower is done; the host does not wait. False when there is nothing to wait for: the tower
        runs synchronously (CPU), or is done."""
        if self.stream is None or encoding.ready():
            return False
        (stream or torch.cuda.current_stream()).wait_event(encoding.done)
        return True

    @staticmethod
    def hand_over(encoding: Encoding) -> torch.Tensor:
        """The states, usable on the current (main) stream from here on."""
        if encoding.done is not None:
            main = torch.cuda.current_stream()
            main.wait_event(encoding.done)
            encoding.states.record_stream(main)  # freed on the vision stream only after the main stream used it
        return encoding.states
