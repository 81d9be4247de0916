"""Jobs posted through a lab's balancer while something disrupts the cluster, then followed to their end.

Used by the lab test (tests/e2e/test_redis_lab.py, a few jobs) and the benchmark (bench/jobs_lab.py, >= 50).
A job counts as accepted once ``POST /v1/jobs`` answered 202 (a 503/502/429 or a refused connection is retried:
not accepted yet). An accepted job is *lost* when ``GET /v1/jobs/{id}`` through the balancer answers 404, or when
it has not ended (succeeded or failed) by the deadline; 503s while Redis restarts are retried.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

RETRY_STATUSES = (429, 502, 503, 504)


def jpeg_b64(seed: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (seed * 37 % 256, 90, 200)).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


@dataclass
class PhaseResult:
    name: str
    accepted: list[str] = field(default_factory=list)
    not_accepted: list[str] = field(default_factory=list)  # gave up posting (never 202)
    outcome: dict[str, str] = field(default_factory=dict)  # id -> succeeded | failed: REASON | lost: WHY
    post_retries: int = 0
    get_retries: int = 0
    open_at_disruption: int = 0  # accepted jobs not ended yet when the disruption began
    disruption_s: float = 0.0
    settle_s: float = 0.0

    @property
    def lost(self) -> list[str]:
        return [i for i in self.accepted if not self.outcome.get(i, "lost").startswith(("succeeded", "failed"))]

    def summary(self) -> dict[str, object]:
        ends = list(self.outcome.values())
        return {"phase": self.name, "accepted": len(self.accepted), "not_accepted": len(self.not_accepted),
                "succeeded": sum(1 for e in ends if e == "succeeded"),
                "failed": sum(1 for e in ends if e.startswith("failed")), "lost": len(self.lost),
                "lost_detail": {i: self.outcome.get(i, "lost: no end") for i in self.lost},
                "open_at_disruption": self.open_at_disruption,
                "post_retries": self.post_retries, "get_retries": self.get_retries,
                "disruption_s": round(self.disruption_s, 1), "settle_s": round(self.settle_s, 1)}


class JobLoad:
    def __init__(self, endpoint: str, *, max_tokens: int = 12, ignore_eos: bool = False,
                 post_give_up_s: float = 120.0) -> None:
        self.client = httpx.Client(base_url=endpoint, timeout=60, trust_env=False)
        self.max_tokens, self.ignore_eos, self.post_give_up_s = max_tokens, ignore_eos, post_give_up_s
        self.serial = 0

    def close(self) -> None:
        self.client.close()

    def _post(self, phase: PhaseResult) -> None:
        self.serial += 1
        n = self.serial
        body = {"image": jpeg_b64(n), "question": f"Job {n} of the lab run: what is in this picture?",
                "max_tokens": self.max_tokens, "ignore_eos": self.ignore_eos}
        deadline = time.monotonic() + self.post_give_up_s
        last = ""
        while time.monotonic() < deadline:
            try:
                r = self.client.post("/v1/jobs", json=body)
            except httpx.TransportError as exc:
                last = type(exc).__name__
            else:
                if r.status_code == 202:
                    phase.accepted.append(r.json()["id"])
                    return
                last = f"{r.status_code} {r.text[:120]}"
                if r.status_code not in RETRY_STATUSES:
                    break
            phase.post_retries += 1
            time.sleep(0.5)
        phase.not_accepted.append(f"job {n}: {last}")

    def run(self, name: str, jobs: int, disrupt: Callable[[], None], interval_s: float = 0.4,
            settle_timeout_s: float = 300.0, hit_after: int = 3) -> PhaseResult:
        """Post ``jobs`` jobs ``interval_s`` apart in a thread while ``disrupt()`` runs here (started once
        ``hit_after`` are accepted: all of them for an instant disruption such as a kill), then follow every
        accepted job to its end."""
        phase = PhaseResult(name)

        def poster() -> None:
            for _ in range(jobs):
                self._post(phase)
                time.sleep(interval_s)

        thread = threading.Thread(target=poster, name=f"post-{name}")
        thread.start()
        while len(phase.accepted) < min(hit_after, jobs) and thread.is_alive():
            time.sleep(0.05)
        phase.open_at_disruption = self._open(list(phase.accepted))
        t0 = time.monotonic()
        disrupt()
        phase.disruption_s = time.monotonic() - t0
        thread.join()
        t1 = time.monotonic()
        self.settle(phase, settle_timeout_s)
        phase.settle_s = time.monotonic() - t1
        return phase

    def _open(self, ids: list[str]) -> int:
        """How many of ``ids`` have not ended (queued or running) right now."""
        count = 0
        for job_id in ids:
            try:
                r = self.client.get(f"/v1/jobs/{job_id}")
                count += r.status_code == 200 and r.json()["status"] in ("queued", "running")
            except httpx.TransportError:
                pass
        return count

    def settle(self, phase: PhaseResult, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(phase.accepted)
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                try:
                    r = self.client.get(f"/v1/jobs/{job_id}")
                except httpx.TransportError:
                    phase.get_retries += 1
                    continue
                if r.status_code == 404:
                    phase.outcome[job_id] = "lost: 404 through the balancer"
                    pending.remove(job_id)
                elif r.status_code in RETRY_STATUSES:
                    phase.get_retries += 1
                elif r.status_code == 200:
                    job = r.json()
                    if job["status"] == "succeeded":
                        phase.outcome[job_id] = "succeeded"
                        pending.remove(job_id)
                    elif job["status"] == "failed":
                        phase.outcome[job_id] = f"failed: {job.get('error')}"
                        pending.remove(job_id)
                else:
                    phase.outcome[job_id] = f"lost: GET answered {r.status_code} {r.text[:120]}"
                    pending.remove(job_id)
            time.sleep(0.3)
        for job_id in pending:
            phase.outcome[job_id] = f"lost: not ended within {timeout_s:g} s"
