"""A CUDA stream confined to some of the GPU's SMs (a CUDA green context), for the vision tower.

Why: the tower is compute-bound and a decode step bandwidth-bound, yet on an ordinary stream the tower's kernels
take every SM and the steps run between them, not beside them (bench/results/engine.md: a tower chunk and 30
decode steps on two streams took the sum of their times). A kernel launched on a green context's stream runs only
on that context's SMs, so the decode steps (on the ordinary stream, free to use every SM) always find SMs of
their own while the tower runs.

PyTorch has no public call that makes such a stream, so this binds the CUDA driver API (12.4+) with ctypes:
cuDeviceGetDevResource -> cuDevSmResourceSplitByCount -> cuDevResourceGenerateDesc -> cuGreenCtxCreate ->
cuGreenCtxStreamCreate, and wraps the stream with ``torch.cuda.ExternalStream``. The green context need not be
current: the partition rides the stream.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

_SM_RESOURCE = 1  # CU_DEV_RESOURCE_TYPE_SM
_GREEN_CTX_DEFAULT_STREAM = 0x1  # required by cuGreenCtxCreate
_STREAM_NON_BLOCKING = 0x1
# sizeof(CUdevResource) is 144 bytes in the CUDA 12.4-13.x headers: type (4), padding (92), then a union whose
# first member is the SM count. Buffers get room to spare; only the SM count is read back.
_RESOURCE_BYTES = 1024
_SM_COUNT_OFFSET = 96


class GreenContextError(RuntimeError):
    pass


@dataclass
class SmStream:
    stream: Any  # torch.cuda.ExternalStream
    sms: int  # SMs in the partition (the driver rounds up to its granularity)
    total_sms: int
    _keep: Any = None  # the green context handle: alive as long as the stream


def auto_sms(total: int) -> int:
    """The tower's share when none is set: two thirds of the SMs, a multiple of 8 (Hopper splits in 8s).

    Measured on an H100 (132 SMs), tower chunk + 30 batch-32 decode steps: 72 SMs 696 ms, 88 SMs 676 ms,
    104 SMs 706 ms, no partition 771 ms (bench/results/engine_green_probe_run1_h100.json)."""
    return max(8, (total * 2 // 3) // 8 * 8)


def _check(lib: Any, name: str, *args: Any) -> None:
    fn = getattr(lib, name, None)
    if fn is None:
        raise GreenContextError(f"the CUDA driver has no {name} (green contexts need driver API 12.4+)")
    fn.restype = ctypes.c_int
    status = fn(*args)
    if status != 0:
        text = ctypes.c_char_p()
        getter = getattr(lib, "cuGetErrorString", None)
        if getter is not None:
            getter(status, ctypes.byref(text))
        reason = text.value.decode() if text.value else f"CUresult {status}"
        raise GreenContextError(f"{name} failed: {reason}")


def _driver() -> Any:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise GreenContextError(f"cannot load the CUDA driver: {exc}") from exc


def priority_stream(priority: int) -> Any:
    """An ordinary stream (flags as cudaStreamCreate's) of CUDA ``priority`` on the current device, not one of
    PyTorch's pooled streams: PyTorch's cudart binding creates streams without a priority."""
    import torch

    torch.cuda.current_stream().synchronize()  # the primary context is current on this thread (the call needs it)
    handle = ctypes.c_void_p()
    _check(_driver(), "cuStreamCreateWithPriority", ctypes.byref(handle), ctypes.c_uint(0), ctypes.c_int(priority))
    return torch.cuda.ExternalStream(handle.value)  # type: ignore[no-untyped-call]


def sm_count(resource: ctypes.Array[ctypes.c_char]) -> int:
    return int(ctypes.c_uint.from_buffer(resource, _SM_COUNT_OFFSET).value)


def sm_stream(sms: int, device: int = 0, priority: int = 0) -> SmStream:
    """A non-blocking stream whose kernels run on ``sms`` SMs of ``device`` (rounded up by the driver).

    Raises GreenContextError when the driver or GPU cannot make one (old driver, MIG, too many SMs asked).
    """
    import torch

    torch.cuda.init()  # type: ignore[no-untyped-call]  # the primary context exists before the driver calls below
    lib = _driver()
    dev = ctypes.c_int()
    _check(lib, "cuDeviceGet", ctypes.byref(dev), ctypes.c_int(device))
    whole = ctypes.create_string_buffer(_RESOURCE_BYTES)
    _check(lib, "cuDeviceGetDevResource", dev, whole, ctypes.c_int(_SM_RESOURCE))
    total = sm_count(whole)
    if sms >= total:
        raise GreenContextError(f"asked for {sms} SMs of {total}: leave some for the rest")
    part = ctypes.create_string_buffer(_RESOURCE_BYTES)
    rest = ctypes.create_string_buffer(_RESOURCE_BYTES)
    groups = ctypes.c_uint(1)
    _check(lib, "cuDevSmResourceSplitByCount", part, ctypes.byref(groups), whole, rest, ctypes.c_uint(0),
           ctypes.c_uint(sms))
    if groups.value != 1:
        raise GreenContextError(f"the driver made {groups.value} groups of {sms} SMs, not one")
    desc = ctypes.c_void_p()
    _check(lib, "cuDevResourceGenerateDesc", ctypes.byref(desc), part, ctypes.c_uint(1))
    green = ctypes.c_void_p()
    _check(lib, "cuGreenCtxCreate", ctypes.byref(green), desc, dev, ctypes.c_uint(_GREEN_CTX_DEFAULT_STREAM))
    handle = ctypes.c_void_p()
    _check(lib, "cuGreenCtxStreamCreate", ctypes.byref(handle), green, ctypes.c_uint(_STREAM_NON_BLOCKING),
           ctypes.c_int(priority))
    stream = torch.cuda.ExternalStream(handle.value, device=torch.device("cuda", device))  # type: ignore[no-untyped-call]
    return SmStream(stream, sm_count(part), total, _keep=green)
