"""GPU health: fault kinds from readings, the NVML reader through a fake pynvml, and what /health, /ready and
/metrics say when the fake reports a fault (no GPU needed)."""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
from fastapi.testclient import TestClient

from llamactl.server.app import create_app
from llamactl.server.gpu_health import (
    EccCounts,
    FakeReader,
    GpuHealth,
    RetiredPages,
    RowRemap,
    faults,
    healthy_reading,
    open_gpu_health,
    with_xid,
)
from llamactl.server.openapi_docs import Health

from ._support import make_settings

OK = healthy_reading()
FAULTS = {
    "xid": (with_xid(OK, 79), ["Xid 79 critical error"]),
    "ecc": (replace(OK, ecc=EccCounts(5, 2, 9, 3)), ["2 uncorrectable ECC error(s) since the driver loaded"]),
    "row_remap_pending": (replace(OK, row_remap=RowRemap(0, 1, True, False)),
                          ["row remap pending: the GPU needs a reset"]),
    "row_remap_failed": (replace(OK, row_remap=RowRemap(0, 1, False, True)), ["row remap failed"]),
    "retired_pending": (replace(OK, row_remap=None, retired_pages=RetiredPages(1, 1, True)),
                        ["page retirement pending: the GPU needs a reset"]),
    "lost": (replace(OK, lost=True), ["GPU is lost (fallen off the bus)"]),
}


def test_a_healthy_reading_has_no_fault_and_application_xids_are_not_faults() -> None:
    assert faults(OK) == []
    for xid in (13, 31, 43, 45):
        assert faults(with_xid(OK, xid)) == []
    # corrected and lifetime errors are readings, not faults
    assert faults(replace(OK, ecc=EccCounts(100, 0, 100, 4))) == []
    assert faults(with_xid(with_xid(OK, 48), 48)) == ["Xid 48 critical error"]


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_every_fault_kind_is_named(kind: str) -> None:
    reading, expected = FAULTS[kind]
    assert faults(reading) == expected


def test_no_nvml_is_unavailable_never_an_error() -> None:
    gpu = open_gpu_health(None)
    assert gpu.describe() == {"status": "unavailable", "reason": "CPU instance (CUDA_VISIBLE_DEVICES is empty)"}
    assert gpu.fault is None and gpu.reading() is None
    gpu.start()  # nothing to poll
    gpu.refresh()


def test_nvml_that_cannot_initialise_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_library() -> None:
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    gpu = open_gpu_health("0")
    assert gpu.describe() == {
        "status": "unavailable", "reason": "NVML: NVMLError_LibraryNotFound: NVML Shared Library Not Found",
    }


def test_faults_latch_and_a_failed_read_is_reported() -> None:
    reader = FakeReader(OK)
    gpu = GpuHealth(reader, clock=lambda: 10.0)
    gpu.refresh()
    assert gpu.fault is None and gpu.describe()["status"] == "ok"
    reader.reading = FAULTS["ecc"][0]
    gpu.refresh()
    reader.reading = OK  # the next reading looks fine: the fault stays
    gpu.refresh()
    assert gpu.fault == "2 uncorrectable ECC error(s) since the driver loaded"
    reader.error = RuntimeError("driver busy")
    gpu.refresh()
    described = gpu.describe()
    assert described["status"] == "fault" and described["error"] == "RuntimeError: driver busy"
    assert described["temperature_c"] == 55.0  # the last good reading stays visible


class FakeNvml:
    """The slice of pynvml NvmlReader calls, answering like an H100 (retired pages unsupported)."""

    def __init__(self) -> None:
        self.events: deque[int] = deque()
        self.pending_remap = 0

    def install(self, mp: pytest.MonkeyPatch) -> None:
        def unsupported(*_: Any) -> Any:
            raise pynvml.NVMLError_NotSupported()

        def wait(_set: Any, _timeout: int) -> Any:
            if not self.events:
                raise pynvml.NVMLError_Timeout()
            return SimpleNamespace(eventType=pynvml.nvmlEventTypeXidCriticalError, eventData=self.events.popleft())

        ecc = {(0, 0): 3, (1, 0): 0, (0, 1): 7, (1, 1): 1}
        calls: dict[str, Any] = {
            "nvmlInit": lambda: None,
            "nvmlDeviceGetHandleByIndex": lambda i: f"handle{i}",
            "nvmlDeviceGetName": lambda h: "NVIDIA H100 80GB HBM3",
            "nvmlDeviceGetUUID": lambda h: "GPU-1234",
            "nvmlEventSetCreate": lambda: "events",
            "nvmlDeviceRegisterEvents": lambda h, kinds, s: None,
            "nvmlEventSetWait_v2": wait,
            "nvmlDeviceGetUtilizationRates": lambda h: SimpleNamespace(gpu=87, memory=40),
            "nvmlDeviceGetMemoryInfo": lambda h: SimpleNamespace(used=70 << 30, total=80 << 30, free=10 << 30),
            "nvmlDeviceGetTemperature": lambda h, sensor: 71,
            "nvmlDeviceGetPowerUsage": lambda h: 612_500,
            "nvmlDeviceGetEnforcedPowerLimit": lambda h: 700_000,
            "nvmlDeviceGetCurrentClocksEventReasons": lambda h: 0x4 | 0x20,
            "nvmlDeviceGetTotalEccErrors": lambda h, kind, counter: ecc[(kind, counter)],
            "nvmlDeviceGetRemappedRows": lambda h: (2, 0, self.pending_remap, 0),
            "nvmlDeviceGetRetiredPages": unsupported,
            "nvmlDeviceGetRetiredPagesPendingStatus": unsupported,
        }
        for name, fn in calls.items():
            mp.setattr(pynvml, name, fn)


def test_the_nvml_reader_converts_units_reasons_and_xid_events(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml()
    nvml.install(monkeypatch)
    gpu = open_gpu_health("0")
    gpu.refresh()
    r = gpu.reading()
    assert r is not None
    assert (r.index, r.uuid, r.utilization_pct, r.temperature_c, r.power_w, r.power_limit_w) == (
        0, "GPU-1234", 87.0, 71.0, 612.5, 700.0)
    assert (r.memory_used_bytes, r.memory_total_bytes) == (70 << 30, 80 << 30)
    assert r.throttle_reasons == ("sw_power_cap", "sw_thermal_slowdown")
    assert r.ecc == EccCounts(volatile_corrected=3, volatile_uncorrected=0, aggregate_corrected=7,
                              aggregate_uncorrected=1)
    assert r.row_remap == RowRemap(2, 0, False, False) and r.retired_pages is None
    assert gpu.fault is None
    nvml.events.extend([13, 94])
    gpu.refresh()
    assert gpu.reading().xids == (13, 94)  # type: ignore[union-attr]
    assert gpu.fault == "Xid 94 critical error"
    nvml.pending_remap = 1
    gpu.refresh()
    assert gpu.fault == "Xid 94 critical error; row remap pending: the GPU needs a reset"


class IdleEngine:
    """A ServingEngine that is loaded and idle: enough for the probe routes (no lifespan is run)."""

    name = "fake"
    state = "ready"
    running = 0
    waiting = 0

    def describe(self) -> dict[str, Any]:
        return {}

    def gpu_memory(self) -> tuple[int, int] | None:
        return None


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_a_fault_turns_the_instance_gpu_fault_on_ready_health_and_metrics(kind: str, tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path), IdleEngine())  # type: ignore[arg-type]
    state = app.state.llamactl
    reader = FakeReader(OK)
    state.gpu = GpuHealth(reader)
    state.gpu.refresh()
    client = TestClient(app)
    assert client.get("/ready").json() == {"ready": True}
    health = client.get("/health").json()
    Health.model_validate(health)
    assert health["status"] == "ready" and health["gpu"]["status"] == "ok" and health["gpu"]["faults"] == []
    metrics = client.get("/metrics").text
    assert 'DCGM_FI_DEV_GPU_TEMP{UUID="GPU-fake-0",gpu="0",modelName="NVIDIA H100 80GB HBM3"} 55.0' in metrics
    assert "llamactl_gpu_fault 0.0" in metrics and "llamactl_gpu_available 1.0" in metrics
    assert "llamactl_ready 1.0" in metrics and "llamactl_queue_limit 64.0" in metrics
    assert f'llamactl_build_info{{config_hash="{state.settings.config_hash()}",version="0.1.0"}} 1.0' in metrics

    reader.reading, expected = FAULTS[kind]
    state.gpu.refresh()
    ready = client.get("/ready")
    assert (ready.status_code, ready.json()) == (503, {"ready": False, "status": "gpu_fault"})
    health = client.get("/health").json()
    Health.model_validate(health)
    assert health["status"] == "gpu_fault" and health["gpu"]["faults"] == expected
    assert health["error"] == "GPU fault: " + "; ".join(expected)
    metrics = client.get("/metrics").text
    assert "llamactl_gpu_fault 1.0" in metrics and "llamactl_ready 0.0" in metrics


def test_a_cpu_instance_reports_gpu_unavailable(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path), IdleEngine())  # type: ignore[arg-type]
    client = TestClient(app)
    health = client.get("/health").json()
    Health.model_validate(health)
    assert health["gpu"] == {"status": "unavailable", "reason": "CPU instance (device cpu)"}
    assert health["status"] == "ready"
    metrics = client.get("/metrics").text
    assert "llamactl_gpu_available 0.0" in metrics and "DCGM_FI_DEV" not in metrics
