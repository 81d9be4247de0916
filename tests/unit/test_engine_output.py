"""The engine's output thread: jobs run in submission order, a failing callback does not stop the others."""

from __future__ import annotations

from llamactl.server.engine.continuous.output import OutputWorker, run_all


def test_jobs_run_in_order_and_a_failing_one_does_not_stop_the_rest() -> None:
    worker = OutputWorker()
    seen: list[int] = []

    def boom() -> None:
        raise RuntimeError("client went away")

    try:
        worker.submit(run_all([lambda: seen.append(1), boom, lambda: seen.append(2)]))
        worker.submit(boom)
        for i in range(3, 200):
            worker.submit(lambda i=i: seen.append(i))
        assert worker.drain(10)
    finally:
        worker.close()
    assert seen == list(range(1, 200))
