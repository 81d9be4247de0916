"""Engine liveness: stalls on an injected clock and on a real blocked thread, fatal CUDA errors, exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from llamactl.server.liveness import (
    FATAL_EXIT_STATUS,
    Liveness,
    LivenessState,
    exit_for_restart,
    exit_if_fatal,
    is_fatal_cuda_error,
)

from ._support import REPO


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_idle_is_never_stalled() -> None:
    clock = Clock(100.0)
    live = Liveness(60, clock=clock)
    for clock.now in (100.0, 161.0, 10_000.0):
        assert not live.stalled(busy=False)
    assert live.state(busy=False) == LivenessState(False, False, None, 60, 0)
    assert live.state(busy=False).describe() is None


def test_busy_without_steps_stalls_after_the_timeout_and_a_step_clears_it() -> None:
    clock = Clock(0.0)
    live = Liveness(60, clock=clock)
    live.work_arrived(was_idle=True, at=10.0)
    live.step_completed(at=20.0)
    assert not live.stalled(busy=True, now=79.9)
    state = live.state(busy=True, now=80.0)
    assert state == LivenessState(True, True, 60.0, 60, 1)
    assert state.describe() == (
        "engine stalled: no step completed for 60.0 s with work waiting (stall_timeout_s 60)"
    )
    live.step_completed(at=95.0)  # a long prefill finished: not stalled any more
    assert live.state(busy=True, now=100.0) == LivenessState(False, True, 5.0, 60, 2)


def test_a_long_idle_period_does_not_make_the_first_new_request_look_stalled() -> None:
    clock = Clock(0.0)
    live = Liveness(60, clock=clock)
    live.step_completed(at=10.0)  # the last request finished; then nothing for almost 17 minutes
    live.work_arrived(was_idle=True, at=1000.0)
    # its first step (vision encoding + prefill) is timed from its arrival, not from the step at 10 s
    assert not live.stalled(busy=True, now=1000.5)
    assert live.state(busy=True, now=1030.0).since_progress_s == 30.0
    assert not live.stalled(busy=True, now=1059.0)
    assert live.stalled(busy=True, now=1060.0)


def test_arrivals_at_a_busy_engine_do_not_hide_a_hung_step_loop() -> None:
    live = Liveness(60, clock=Clock(0.0))
    live.work_arrived(was_idle=True, at=400.0)
    live.step_completed(at=500.0)  # the loop hangs after this step
    for t in (510.0, 530.0, 555.0):  # new requests keep coming
        live.work_arrived(was_idle=False, at=t)
    assert not live.stalled(busy=True, now=559.0)
    assert live.stalled(busy=True, now=560.0)


def test_the_injected_clock_is_read_when_no_time_is_given() -> None:
    clock = Clock(5.0)
    live = Liveness(2.5, clock=clock)
    clock.now = 7.0
    assert not live.stalled(busy=True)
    clock.now = 7.5
    assert live.stalled(busy=True)
    live.step_completed()
    assert live.steps == 1 and not live.stalled(busy=True)
    clock.now = 100.0
    live.work_arrived(was_idle=True)
    clock.now = 102.0
    assert live.state(busy=True).since_progress_s == 2.0


def test_an_out_of_order_reading_never_moves_progress_back() -> None:
    live = Liveness(60, clock=Clock(0.0))
    live.step_completed(at=100.0)
    live.step_completed(at=90.0)  # read before the other thread's, reported after it
    live.work_arrived(was_idle=True, at=50.0)
    assert live.state(busy=True, now=130.0).since_progress_s == 30.0


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan")])
def test_the_timeout_must_be_positive(timeout: float) -> None:
    with pytest.raises(ValueError, match=r"^stall_timeout_s must be greater than 0, found "):
        Liveness(timeout)


def test_a_real_step_loop_blocked_by_a_hook_is_reported_stalled_then_recovers() -> None:
    live = Liveness(0.3)
    running = threading.Event()
    running.set()
    stop = threading.Event()

    def step_loop() -> None:
        while not stop.is_set():
            running.wait()  # the hook: a cleared event blocks the loop mid-step
            time.sleep(0.005)
            live.step_completed()

    thread = threading.Thread(target=step_loop, daemon=True)
    live.work_arrived(was_idle=True)
    thread.start()
    try:
        time.sleep(0.5)
        assert not live.stalled(busy=True)
        running.clear()
        deadline = time.monotonic() + 5
        while not live.stalled(busy=True):
            assert time.monotonic() < deadline, "a blocked loop was never reported stalled"
            time.sleep(0.02)
        assert not live.stalled(busy=False)  # the same moment, without work: not stalled
        running.set()
        deadline = time.monotonic() + 5
        while live.stalled(busy=True):
            assert time.monotonic() < deadline, "the loop ran again but stayed stalled"
            time.sleep(0.02)
    finally:
        stop.set()
        running.set()
        thread.join(timeout=5)


def _wrapped(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as got:
        return got


@pytest.mark.parametrize(
    ("exc", "fatal"),
    [
        (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
        (RuntimeError("CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA"), True),
        (RuntimeError("CUDA error: unspecified launch failure"), True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx(handle, ...)`"), True),
        (RuntimeError("CUDA error: misaligned address"), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (RuntimeError("CUDA error: out of memory"), False),
        (RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), False),
        (RuntimeError("Expected all tensors to be on the same device"), False),
        (ValueError("image rejected: 'CUDA error' in its text chunk"), False),
        (_wrapped(RuntimeError("engine step failed"), RuntimeError("CUDA error: misaligned address")), True),
        (_wrapped(ValueError("bad request"), RuntimeError("CUDA error: out of memory")), False),
    ],
)
def test_fatal_cuda_errors(exc: BaseException, fatal: bool) -> None:
    assert is_fatal_cuda_error(exc) is fatal


def test_torch_errors_are_classified_by_what_they_are() -> None:
    torch = pytest.importorskip("torch")
    oom = torch.cuda.OutOfMemoryError("CUDA error: out of memory (CUBLAS_STATUS in a later frame)")
    assert not is_fatal_cuda_error(oom)
    accelerator = getattr(torch, "AcceleratorError", None)
    if accelerator is not None:
        assert is_fatal_cuda_error(accelerator("CUDA error: an illegal memory access was encountered"))


def test_a_cycle_in_the_exception_chain_terminates() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert not is_fatal_cuda_error(a)


def test_exit_if_fatal_exits_only_for_fatal_errors() -> None:
    codes: list[int] = []
    exit_if_fatal(RuntimeError("CUDA out of memory. Tried to allocate 1 GiB"), _exit=codes.append)
    assert codes == []
    with pytest.raises(SystemExit):
        exit_if_fatal(RuntimeError("CUDA error: device-side assert triggered"), _exit=codes.append)
    assert codes == [FATAL_EXIT_STATUS] and FATAL_EXIT_STATUS != 0


def test_exit_needs_a_failure_status() -> None:
    with pytest.raises(ValueError, match="needs a non-zero status"):
        exit_for_restart("x", status=0, _exit=lambda code: None)


def test_exit_for_restart_ends_a_real_process_at_once_with_its_logs_flushed() -> None:
    # A non-daemon thread blocked forever and an atexit handler: a normal exit would hang or run it.
    code = textwrap.dedent(
        """
        import atexit, logging, sys, threading
        from llamactl.server.liveness import exit_for_restart
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
        atexit.register(lambda: print("atexit ran", file=sys.stderr))
        threading.Thread(target=threading.Event().wait).start()
        logging.getLogger("llamactl.server.engine").error("step failed")
        print("buffered stdout", end="")
        exit_for_restart("RuntimeError: CUDA error: an illegal memory access was encountered")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO, check=False
    )
    assert proc.returncode == FATAL_EXIT_STATUS, proc.stderr
    assert proc.stdout == "buffered stdout"
    assert proc.stderr.splitlines() == [
        "ERROR step failed",
        "CRITICAL fatal: RuntimeError: CUDA error: an illegal memory access was encountered; "
        f"exiting with status {FATAL_EXIT_STATUS} so systemd restarts the server",
    ]
