"""GPU health of this instance's device, read from NVML (``nvidia-ml-py``, imported as ``pynvml``).

``GpuReader`` is the boundary: ``read()`` returns one ``GpuReading``. ``NvmlReader`` is the real one,
``FakeReader`` the one tests drive. ``GpuHealth`` polls a reader on its own thread (NVML calls block, and
``ServerState.status`` is asked on every request), latches what it saw and says whether the GPU is faulted.

Fault kinds (the instance turns ``gpu_fault``: not ready, drained by ``watch``, never restarted by it):
a critical Xid other than the ones a CUDA program causes itself (13, 31, 43, 45), an uncorrectable ECC error
since the driver loaded, a pending or failed row remap (retired pages pending on cards before Ampere), and a
GPU that fell off the bus. A host without NVML (no driver, no library: the CPU lab) is ``unavailable``, never
an error.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, Protocol

log = logging.getLogger("llamactl.server.gpu")

# Xids that a CUDA program raises by itself (illegal address, MMU fault, exception, killed context): recorded,
# not hardware faults. Every other critical Xid (48 DBE, 63/64 row remap, 79 off the bus, 92, 94/95 ...) is.
APPLICATION_XIDS = frozenset({13, 31, 43, 45})

# NVML clock event reason bits (nvmlClocksEventReason*), as DCGM's exporter names them.
THROTTLE_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


@dataclass(frozen=True)
class EccCounts:
    volatile_corrected: int
    volatile_uncorrected: int
    aggregate_corrected: int
    aggregate_uncorrected: int


@dataclass(frozen=True)
class RowRemap:
    correctable: int
    uncorrectable: int
    pending: bool
    failed: bool


@dataclass(frozen=True)
class RetiredPages:
    single_bit: int
    double_bit: int
    pending: bool


@dataclass(frozen=True)
class GpuReading:
    """One reading; ``None`` where the card does not support the query (ECC off, no row remapper, ...)."""

    index: int
    name: str
    uuid: str
    utilization_pct: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    throttle_reasons: tuple[str, ...] = ()
    ecc: EccCounts | None = None
    row_remap: RowRemap | None = None
    retired_pages: RetiredPages | None = None
    xids: tuple[int, ...] = ()  # critical Xid events seen since this reader opened, in order
    lost: bool = False  # NVML says the GPU is lost (fallen off the bus)


def faults(r: GpuReading) -> list[str]:
    """The fault kinds in a reading, as sentences; empty when the GPU is fit to serve."""
    out: list[str] = []
    if r.lost:
        out.append("GPU is lost (fallen off the bus)")
    for xid in dict.fromkeys(r.xids):
        if xid not in APPLICATION_XIDS:
            out.append(f"Xid {xid} critical error")
    if r.ecc is not None and r.ecc.volatile_uncorrected > 0:
        out.append(f"{r.ecc.volatile_uncorrected} uncorrectable ECC error(s) since the driver loaded")
    if r.row_remap is not None and r.row_remap.pending:
        out.append("row remap pending: the GPU needs a reset")
    if r.row_remap is not None and r.row_remap.failed:
        out.append("row remap failed")
    if r.retired_pages is not None and r.retired_pages.pending:
        out.append("page retirement pending: the GPU needs a reset")
    return out


class GpuReader(Protocol):
    def read(self) -> GpuReading: ...


@dataclass
class FakeReader:
    """A scripted reader: tests set ``reading`` (or ``error``) between polls."""

    reading: GpuReading
    error: Exception | None = None
    reads: int = 0

    def read(self) -> GpuReading:
        self.reads += 1
        if self.error is not None:
            raise self.error
        return self.reading


def healthy_reading(index: int = 0) -> GpuReading:
    """A plausible fault-free H100 reading (tests and the fake)."""
    return GpuReading(
        index=index, name="NVIDIA H100 80GB HBM3", uuid=f"GPU-fake-{index}", utilization_pct=40.0,
        memory_used_bytes=60 << 30, memory_total_bytes=80 << 30, temperature_c=55.0, power_w=300.0,
        power_limit_w=700.0, ecc=EccCounts(0, 0, 0, 0), row_remap=RowRemap(0, 0, False, False),
    )


GpuStatus = Literal["unavailable", "ok", "fault"]


class GpuHealth:
    """The latest reading of one GPU, refreshed every ``interval_s`` on a daemon thread once ``start``ed.

    Faults latch: a fault seen once keeps the instance ``gpu_fault`` for the life of this process, even if a
    later reading no longer shows it (an Xid is an event; a reset GPU needs a new process anyway).
    """

    def __init__(self, reader: GpuReader | None, *, unavailable_reason: str = "", interval_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._reader = reader
        self._why = unavailable_reason
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._reading: GpuReading | None = None
        self._read_at: float | None = None
        self._error: str | None = None
        self._faults: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self._reader is not None

    def refresh(self) -> None:
        """Read once now (the polling thread's body; tests call it directly)."""
        if self._reader is None:
            return
        try:
            reading: GpuReading | None = self._reader.read()
            error = None
        except Exception as exc:  # noqa: BLE001 - a failed read is reported, never raised into /health
            reading, error = None, f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._read_at = self._clock()
            self._error = error
            if reading is not None:
                self._reading = reading
                for f in faults(reading):
                    if f not in self._faults:
                        log.error("GPU fault on device %d: %s", reading.index, f)
                        self._faults.append(f)

    @property
    def fault(self) -> str | None:
        """The faults seen so far, joined; None when none."""
        with self._lock:
            return "; ".join(self._faults) if self._faults else None

    def reading(self) -> GpuReading | None:
        with self._lock:
            return self._reading

    def describe(self) -> dict[str, Any]:
        """The ``gpu`` field of /health."""
        with self._lock:
            if self._reader is None:
                return {"status": "unavailable", "reason": self._why}
            status: GpuStatus = "fault" if self._faults else "ok"
            out: dict[str, Any] = {"status": status, "faults": list(self._faults), "error": self._error,
                                   "age_s": None if self._read_at is None else round(self._clock() - self._read_at, 3)}
            if self._reading is not None:
                reading = asdict(self._reading)
                reading["throttle_reasons"] = list(self._reading.throttle_reasons)
                reading["xids"] = list(self._reading.xids)
                out.update(reading)
            return out

    def start(self) -> None:
        if self._reader is None or self._thread is not None:
            return
        self.refresh()
        self._thread = threading.Thread(target=self._poll, name="llamactl-gpu-health", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 1)
            self._thread = None


def device_selector(env: dict[str, str] | None = None) -> str | None:
    """Which NVML device this process uses: the first entry of CUDA_VISIBLE_DEVICES (an index or a UUID);
    None for a CPU instance (set and empty). Unset means device 0."""
    env = dict(os.environ) if env is None else env
    if "CUDA_VISIBLE_DEVICES" not in env:
        return "0"
    first = env["CUDA_VISIBLE_DEVICES"].split(",")[0].strip()
    return first or None


def open_gpu_health(device: str | None, *, interval_s: float = 5.0) -> GpuHealth:
    """The monitor for ``device`` (see ``device_selector``); ``unavailable`` when there is no device or NVML."""
    if device is None:
        return GpuHealth(None, unavailable_reason="CPU instance (CUDA_VISIBLE_DEVICES is empty)")
    try:
        from llamactl.server.gpu_nvml import NvmlReader

        return GpuHealth(NvmlReader.open(device), interval_s=interval_s)
    except Exception as exc:  # noqa: BLE001 - no library, no driver, no such device: not an error
        return GpuHealth(None, unavailable_reason=f"NVML: {type(exc).__name__}: {exc}")


def with_xid(r: GpuReading, xid: int) -> GpuReading:
    """``r`` with one more critical Xid event (tests)."""
    return replace(r, xids=(*r.xids, xid))


__all__ = [
    "APPLICATION_XIDS",
    "THROTTLE_REASONS",
    "EccCounts",
    "FakeReader",
    "GpuHealth",
    "GpuReader",
    "GpuReading",
    "RetiredPages",
    "RowRemap",
    "device_selector",
    "faults",
    "healthy_reading",
    "open_gpu_health",
    "with_xid",
]
