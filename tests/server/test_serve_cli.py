"""``llamactl serve`` as a real subprocess: settings errors, config file, SIGTERM drain with exit code 0."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from llamactl.server.settings import Settings

from ._support import REPO, png_b64


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llamactl", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


def test_invalid_settings_exit_2_without_traceback(tmp_path: Path) -> None:
    cases = [
        (["serve", "--model", "m", "--max-batch-size", "0"], {}, "--max-batch-size"),
        (["serve", "--model", "m", "--device", "tpu"], {}, "--device"),
        (["serve", "--model", "m"], {"LLAMACTL_QUEUE_LIMIT": "lots"}, "LLAMACTL_QUEUE_LIMIT"),
        (["serve"], {"LLAMACTL_MODEL": ""}, "LLAMACTL_MODEL"),
        (["serve", "--model", "m"], {"LLAMACTL_CONFIG": str(tmp_path / "missing.yaml")}, "missing.yaml"),
        (["serve", "--model", "m"], {"LLAMACTL_HOST_SLOT": "2/2"}, "host_slot"),
        (["serve", "--model", "m"], {"LLAMACTL_CPU_THREADS": "-1"}, "LLAMACTL_CPU_THREADS"),
        (["serve", "--model", "m", "--engine", "vllm"], {}, "--engine: Input should be 'auto', 'contin"),
        (["serve", "--model", "m", "--stall-timeout-s", "0"], {}, "--stall-timeout-s: Input should be"),
        (["serve", "--model", "m"], {"LLAMACTL_ENGINE": "static"}, "LLAMACTL_ENGINE: Input should be"),
    ]
    for args, env, needle in cases:
        proc = run_cli(*args, env=env)
        assert proc.returncode == 2, (args, proc.stderr)
        assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_sigterm_drains_in_flight_requests_and_exits_0(serve_factory: Any, tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("instance: lab-host1/0\nmax_batch_size: 4\ndrain_timeout_s: 60\n")
    env = {"LLAMACTL_CONFIG": str(config), "LLAMACTL_GEN_MAX_NEW_TOKENS": "2048"}
    sp = serve_factory(env)
    health = httpx.get(sp.url + "/health").json()
    assert health["instance"] == "lab-host1/0"
    expected = Settings.from_env(
        {**env, "LLAMACTL_MODEL": health["model"], "LLAMACTL_DEVICE": "cpu", "LLAMACTL_MAX_WAIT_MS": "50"}
    )
    assert health["config_hash"] == expected.config_hash()

    # long enough to still be decoding after the signal (the continuous engine makes ~2,000 tiny-model tokens/s)
    body = {"image": png_b64("blue"), "max_tokens": 2000, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(httpx.post, sp.url + "/infer", json=body, timeout=300) for _ in range(4)]
        deadline = time.monotonic() + 60
        while httpx.get(sp.url + "/health").json()["in_flight"] < 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        sp.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(sp.url + "/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        refused = httpx.post(sp.url + "/infer", json=body, timeout=30)
        assert refused.status_code == 503
        results = [f.result() for f in futures]
    assert [r.status_code for r in results] == [200] * 4
    assert all(r.json()["usage"]["completion_tokens"] == 2000 for r in results)
    assert sp.proc.wait(timeout=60) == 0
    assert "Traceback" not in sp.log.read_text()


def test_sigterm_while_loading_exits_0(tiny_checkpoint: Path, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llamactl",
                "serve",
                "--model",
                str(tiny_checkpoint),
                "--port",
                "0",
                "--device",
                "cpu",
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        deadline = time.monotonic() + 60
        while (
            b"Uvicorn running" not in log.read_bytes()
            and b"Application startup complete" not in log.read_bytes()
        ):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_served_process_takes_its_host_slot_cpu_share(serve_factory: Any) -> None:
    """Slot 1 of 2 with pinning, as the second GPU's rendered env file says: the real process is pinned to
    the plan's CPUs (read back from /proc), its thread budget is the operator's OMP_NUM_THREADS, and /health
    reports both plus where the image processor runs."""
    from llamactl.server.cpus import format_cpus, plan_budget, read_topology

    sp = serve_factory({"LLAMACTL_HOST_SLOT": "1/2", "LLAMACTL_CPU_PINNING": "true", "OMP_NUM_THREADS": "1"})
    health = httpx.get(sp.url + "/health").json()
    plan = plan_budget(os.sched_getaffinity(0), read_topology(), slot=(1, 2), pin=True, env_threads="1")
    assert health["cpu"] == {"threads": 1, "cpus": format_cpus(plan.cpus), "pinned": plan.pinned,
                             "threads_from": "OMP_NUM_THREADS"}
    status = Path(f"/proc/{sp.proc.pid}/status").read_text()
    allowed = next(line.split(":", 1)[1].strip() for line in status.splitlines()
                   if line.startswith("Cpus_allowed_list"))
    assert allowed == format_cpus(plan.cpus)
    assert health["engine"]["image_preprocessing_on"] == "cpu" and health["engine"]["threads"] == 1
