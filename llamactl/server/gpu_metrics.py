"""GPU readings as Prometheus series named like NVIDIA's DCGM exporter (its names, labels and units: MiB,
watts, degrees C, percent), so dashboards and alerts written for dcgm-exporter read them unchanged; plus
``llamactl_gpu_available`` and ``llamactl_gpu_fault`` (0/1), always present."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from llamactl.server.gpu_health import THROTTLE_REASONS, GpuReading

_MIB = 1 << 20
_LABELS = ["gpu", "UUID", "modelName"]


def _series(r: GpuReading) -> list[tuple[str, str, float | None]]:
    mask = sum(bit for bit, name in THROTTLE_REASONS.items() if name in r.throttle_reasons)
    free = None
    if r.memory_total_bytes is not None and r.memory_used_bytes is not None:
        free = (r.memory_total_bytes - r.memory_used_bytes) / _MIB
    ecc, rows, pages = r.ecc, r.row_remap, r.retired_pages
    return [
        ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", r.utilization_pct),
        ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).",
         None if r.memory_used_bytes is None else r.memory_used_bytes / _MIB),
        ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", free),
        ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", r.temperature_c),
        ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", r.power_w),
        ("DCGM_FI_DEV_POWER_MGMT_LIMIT", "Enforced power limit (in W).", r.power_limit_w),
        ("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "Clock throttle reasons (NVML bitmask).", float(mask)),
        ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "Corrected ECC errors since the driver loaded.",
         None if ecc is None else ecc.volatile_corrected),
        ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "Uncorrectable ECC errors since the driver loaded.",
         None if ecc is None else ecc.volatile_uncorrected),
        ("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", "Corrected ECC errors over the card's life.",
         None if ecc is None else ecc.aggregate_corrected),
        ("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", "Uncorrectable ECC errors over the card's life.",
         None if ecc is None else ecc.aggregate_uncorrected),
        ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "Rows remapped for correctable errors.",
         None if rows is None else rows.correctable),
        ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "Rows remapped for uncorrectable errors.",
         None if rows is None else rows.uncorrectable),
        ("DCGM_FI_DEV_ROW_REMAP_PENDING", "1 while a row remap waits for a GPU reset.",
         None if rows is None else float(rows.pending)),
        ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "1 when a row remap failed.", None if rows is None else float(rows.failed)),
        ("DCGM_FI_DEV_RETIRED_SBE", "Pages retired for multiple single-bit errors.",
         None if pages is None else pages.single_bit),
        ("DCGM_FI_DEV_RETIRED_DBE", "Pages retired for double-bit errors.", None if pages is None else pages.double_bit),
        ("DCGM_FI_DEV_RETIRED_PENDING", "1 while a page retirement waits for a GPU reset.",
         None if pages is None else float(pages.pending)),
        ("DCGM_FI_DEV_XID_ERRORS", "The last critical Xid seen (0: none).", float(r.xids[-1] if r.xids else 0)),
    ]


class GpuCollector:
    """Read at scrape time: the monitor's latest reading and whether a fault latched."""

    def __init__(self, reading: Callable[[], GpuReading | None], fault: Callable[[], bool]) -> None:
        self._reading = reading
        self._fault = fault

    def describe(self) -> Iterable[Metric]:
        return self._families(None, False)

    def collect(self) -> Iterable[Metric]:
        return self._families(self._reading(), self._fault())

    def _families(self, r: GpuReading | None, fault: bool) -> list[Metric]:
        out: list[Metric] = [
            GaugeMetricFamily("llamactl_gpu_available", "1 when NVML reads this instance's GPU, else 0.",
                              value=0.0 if r is None else 1.0),
            GaugeMetricFamily("llamactl_gpu_fault", "1 once a GPU fault (Xid, uncorrectable ECC, row remap) "
                              "was seen: the instance is not ready (gpu_fault).", value=1.0 if fault else 0.0),
        ]
        if r is None:
            return out
        labels = [str(r.index), r.uuid, r.name]
        for name, doc, value in _series(r):
            if value is None:
                continue
            family = GaugeMetricFamily(name, doc, labels=_LABELS)
            family.add_metric(labels, float(value))
            out.append(family)
        return out
