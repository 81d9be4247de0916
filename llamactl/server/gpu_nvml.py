"""The NVML side of ``gpu_health``: one device's readings through ``pynvml`` (nvidia-ml-py).

Every query the card does not support reads as ``None``; ``GpuIsLost`` reads as a lost GPU (a fault), and
any other NVML error propagates to ``GpuHealth.refresh`` (reported, never raised into a request).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pynvml

from llamactl.server.gpu_health import THROTTLE_REASONS, EccCounts, GpuReading, RetiredPages, RowRemap

T = TypeVar("T")


def _maybe(fn: Callable[[], T]) -> T | None:
    try:
        return fn()
    except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound, pynvml.NVMLError_NoPermission):
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlReader:
    def __init__(self, handle: Any, index: int) -> None:
        self._h = handle
        self.index = index
        self.name = _text(pynvml.nvmlDeviceGetName(handle))
        self.uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
        self._xids: list[int] = []
        self._events: Any = None
        try:
            events = pynvml.nvmlEventSetCreate()
            pynvml.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, events)
            self._events = events
        except pynvml.NVMLError:
            self._events = None  # no Xid events here (some containers, vGPU): the rest still reads

    @classmethod
    def open(cls, device: str) -> NvmlReader:
        """``device``: an NVML index or a ``GPU-...`` UUID, as in CUDA_VISIBLE_DEVICES."""
        pynvml.nvmlInit()
        if device.startswith(("GPU-", "MIG-")):
            handle = pynvml.nvmlDeviceGetHandleByUUID(device)
            return cls(handle, int(pynvml.nvmlDeviceGetIndex(handle)))
        return cls(pynvml.nvmlDeviceGetHandleByIndex(int(device)), int(device))

    def _drain_xids(self) -> None:
        while self._events is not None:
            try:
                event = pynvml.nvmlEventSetWait_v2(self._events, 0)
            except pynvml.NVMLError_Timeout:
                return
            if event.eventType == pynvml.nvmlEventTypeXidCriticalError:
                self._xids.append(int(event.eventData))

    def read(self) -> GpuReading:
        h = self._h
        base = GpuReading(index=self.index, name=self.name, uuid=self.uuid, xids=tuple(self._xids))
        try:
            self._drain_xids()
            util = _maybe(lambda: pynvml.nvmlDeviceGetUtilizationRates(h))
            mem = _maybe(lambda: pynvml.nvmlDeviceGetMemoryInfo(h))
            temp = _maybe(lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
            power = _maybe(lambda: pynvml.nvmlDeviceGetPowerUsage(h))
            limit = _maybe(lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(h))
            reasons = _maybe(lambda: pynvml.nvmlDeviceGetCurrentClocksEventReasons(h)) or 0
            return GpuReading(
                index=self.index, name=self.name, uuid=self.uuid,
                utilization_pct=None if util is None else float(util.gpu),
                memory_used_bytes=None if mem is None else int(mem.used),
                memory_total_bytes=None if mem is None else int(mem.total),
                temperature_c=None if temp is None else float(temp),
                power_w=None if power is None else power / 1000.0,
                power_limit_w=None if limit is None else limit / 1000.0,
                throttle_reasons=tuple(name for bit, name in THROTTLE_REASONS.items() if reasons & bit),
                ecc=_maybe(self._ecc), row_remap=_maybe(self._row_remap),
                retired_pages=_maybe(self._retired_pages), xids=tuple(self._xids),
            )
        except pynvml.NVMLError_GpuIsLost:
            return GpuReading(index=base.index, name=base.name, uuid=base.uuid, xids=tuple(self._xids), lost=True)

    def _ecc(self) -> EccCounts:
        def count(kind: int, counter: int) -> int:
            return int(pynvml.nvmlDeviceGetTotalEccErrors(self._h, kind, counter))

        c, u = pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        v, a = pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC
        return EccCounts(count(c, v), count(u, v), count(c, a), count(u, a))

    def _row_remap(self) -> RowRemap:
        corr, unc, pending, failed = pynvml.nvmlDeviceGetRemappedRows(self._h)
        return RowRemap(int(corr), int(unc), bool(pending), bool(failed))

    def _retired_pages(self) -> RetiredPages:
        sbe = pynvml.nvmlDeviceGetRetiredPages(self._h, pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS)
        dbe = pynvml.nvmlDeviceGetRetiredPages(self._h, pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)
        pending = pynvml.nvmlDeviceGetRetiredPagesPendingStatus(self._h)
        return RetiredPages(len(sbe), len(dbe), bool(pending))
