"""status + canary + infer against a real ``llamactl serve`` (tiny checkpoint) behind real nginx, on loopback.

The server runs with exactly the environment the inventory renders for its env file (``expected_env``), so
the config hash it reports must match the one status expects: no drift. nginx runs from a temp prefix with
the balancer config llamactl renders, so /healthz and X-Upstream are the real ones.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llamactl.health.canary import canary_png
from llamactl.health.wait import wait_ready
from llamactl.inventory import expected_env, load_inventory
from llamactl.plan.render import render_balancer_files
from tests.health.helpers import free_base_port

pytestmark = pytest.mark.slow

HOST = "127.0.0.61"
LB = "127.0.0.62"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@dataclass
class RealCluster:
    inventory: Path
    endpoint: str
    instance_url: str


def _tiny(tmp: Path) -> Path:
    cached = os.environ.get("LLAMACTL_TINY_CACHE")
    out = Path(cached) if cached else tmp / "tiny"
    if not (out / "config.json").exists():
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "llamactl", "model", "tiny", str(out)], check=True, env=env,
                       capture_output=True, timeout=600)  # fmt: skip
    return out


def _inventory(path: Path, model: Path, port: int, lb_port: int) -> Path:
    path.write_text(
        f"""version: 1
cluster: real
defaults:
  gpus: 0
  base_port: {port}
  bind: {HOST}
  model: {{source: {model}, dtype: float32}}
  ssh: {{host_key_policy: accept-new}}
groups:
  local:
    hosts:
      box: {{address: {HOST}}}
balancer:
  hosts:
    lb: {{address: {LB}}}
  listen: {lb_port}
  listen_address: {LB}
health: {{timeout_s: 2}}
"""
    )
    return path


def _nginx_conf(d: Path, inv_path: Path) -> Path:
    inv = load_inventory(inv_path)
    (site,) = [f for p, f in render_balancer_files(inv).items() if p == inv.balancer.config_path]
    d.mkdir(parents=True, exist_ok=True)
    (d / "llamactl.conf").write_bytes(site.content)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(
        f"pid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 256; }}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n"
        f"  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n"
        f"  include {d}/llamactl.conf;\n}}\n"
    )
    return conf


@pytest.fixture(scope="module")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    if not os.path.exists(NGINX):
        pytest.skip("needs nginx")
    tmp = tmp_path_factory.mktemp("real")
    port = free_base_port([HOST], 1)
    lb_port = free_base_port([LB], 1)
    inv_path = _inventory(tmp / "inventory.yaml", _tiny(tmp), port, lb_port)
    inv = load_inventory(inv_path)
    (instance,) = inv.instances()
    env = {**os.environ, **expected_env(inv, instance), "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp / "hf"), "XDG_CACHE_HOME": str(tmp / "cache")}  # fmt: skip
    conf = _nginx_conf(tmp / "nginx", inv_path)
    nginx_cmd = [NGINX, "-e", str(tmp / "nginx" / "error.log"), "-c", str(conf)]
    subprocess.run([*nginx_cmd, "-t"], check=True, capture_output=True)
    procs: list[subprocess.Popen[bytes]] = []
    with (tmp / "serve.log").open("wb") as log:
        try:
            procs.append(
                subprocess.Popen([sys.executable, "-m", "llamactl", "serve"], env=env, stdout=log, stderr=log)
            )
            procs.append(subprocess.Popen([*nginx_cmd, "-g", "daemon off;"], stderr=subprocess.DEVNULL))
            ready = wait_ready(instance.url, 300, interval_s=0.5)
            assert ready.ok, (
                ready.describe("ready", instance.url) + "\n" + (tmp / "serve.log").read_text()[-3000:]
            )
            yield RealCluster(inv_path, inv.endpoint, instance.url)
        finally:
            for proc in procs:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _llamactl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llamactl", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "NO_COLOR": "1"}, check=False)  # fmt: skip


def test_status_with_canary_is_all_ready_without_drift(real_cluster: RealCluster) -> None:
    proc = _llamactl("status", str(real_cluster.inventory), "--canary", "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0, doc["summary"] + proc.stderr
    (inst,) = doc["instances"]
    assert inst["state"] == "ready" and not inst["drift"], inst
    assert inst["version"] == __import__("llamactl").__version__
    assert inst["config_hash"] == inst["expected_config_hash"]
    assert inst["canary"]["ok"] and inst["canary"]["conclusion"], inst["canary"]
    assert doc["balancers"][0]["state"] == "ready"
    # the canary's request shows up in the server's own metrics
    again = json.loads(_llamactl("status", str(real_cluster.inventory), "--json").stdout)
    assert again["instances"][0]["p50_s"] is not None and again["instances"][0]["requests_per_s"] > 0


def test_infer_through_the_balancer(real_cluster: RealCluster, tmp_path: Path) -> None:
    image = tmp_path / "red.png"
    image.write_bytes(canary_png())
    proc = _llamactl("infer", str(image), "--endpoint", real_cluster.endpoint, "-q", "What is in this image?")
    assert proc.returncode == 0, proc.stderr
    assert "Conclusion" in proc.stdout
    assert (
        proc.stdout.strip()
        .splitlines()[-1]
        .endswith(f"by {real_cluster.instance_url.removeprefix('http://')}")
    )
    as_json = _llamactl("infer", str(image), "--endpoint", real_cluster.endpoint, "--json")
    body = json.loads(as_json.stdout)
    assert set(body["result"]) >= {"summary", "caption", "reasoning", "conclusion"}
    streamed = _llamactl("infer", str(image), "--endpoint", real_cluster.endpoint, "--stream", "-q",
                         "What is in this image?")  # fmt: skip
    assert streamed.returncode == 0, streamed.stderr
    assert "<CONCLUSION>" in streamed.stdout and "Conclusion" in streamed.stdout


def test_status_watch_draws_sparklines_of_a_real_server_under_load(real_cluster: RealCluster) -> None:
    """`status --watch` for a bounded number of sweeps while requests flow: the JSON lines keep every reading
    (req/s above zero, p95 of the windows where requests finished), the live view draws both sparklines."""
    import base64
    import threading

    import httpx

    from llamactl.health.sparkline import BLOCKS

    stop = threading.Event()
    body = {"image": base64.b64encode(canary_png()).decode(), "question": "What is in this image?", "max_tokens": 8,
            "do_sample": True}  # sampled: never a cached answer, every request runs the model

    def traffic() -> None:
        with httpx.Client(timeout=120, trust_env=False) as client:
            while not stop.is_set():
                codes.append(client.post(f"{real_cluster.endpoint}/infer", json=body).status_code)

    codes: list[int] = []
    workers = [threading.Thread(target=traffic, daemon=True) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        streamed = _llamactl("status", str(real_cluster.inventory), "--watch", "--json", "--count", "6",
                             "--interval", "1", timeout=120)
        drawn = _llamactl("status", str(real_cluster.inventory), "--watch", "--count", "4", "--interval", "1",
                          "--history", "1", timeout=120)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=130)
    lines = [json.loads(line) for line in streamed.stdout.splitlines() if line.strip()]
    assert len(lines) == 6, streamed.stdout + streamed.stderr
    history = lines[-1]["history"]["box/0"]
    rates = [v for _, v in history["requests_per_s"]]
    assert len(rates) == 6 and rates[0] is None  # the first sweep has no window
    assert codes and set(codes) == {200}, codes
    assert any(r is not None and r > 0 for r in rates), (rates, len(codes))
    assert any(v is not None and v > 0 for _, v in history["p95_s"]), history["p95_s"]
    assert lines[-1]["instances"][0]["p95_s"] is not None  # every figure of the table is kept too
    assert drawn.returncode in (0, 1), drawn.stderr
    assert "last 1 min" in drawn.stdout and "box/0" in drawn.stdout, drawn.stdout
    spark_rows = [row for row in drawn.stdout.splitlines() if row.strip().startswith("│ box/0") and
                  any(b in row for b in BLOCKS)]
    assert spark_rows, drawn.stdout
