"""Pieces of the multi-GPU bench that stand in for systemd and the balancer host: env files, units, nginx, GPUs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads what llamactl renders (plain or "escaped" values)."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}: not KEY=VALUE: {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            inner, out, i = value[1:-1], [], 0
            while i < len(inner):
                if inner[i] == "\\" and i + 1 < len(inner):
                    i += 1
                out.append(inner[i])
                i += 1
            value = "".join(out)
        env[key.strip()] = value
    return env


def parse_unit(path: Path) -> dict[str, str]:
    """The [Service] settings of a unit file (last one wins)."""
    section, out = "", {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and "=" in line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def start_instance(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen(argv, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return time.monotonic() - t0
            if httpx.get(url + "/health", timeout=2).json().get("status") == "failed":
                raise RuntimeError(f"{url}: model load failed:\n{log.read_text()[-3000:]}")
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url}: not ready after {timeout_s}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen[Any], timeout_s: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Nginx:
    """nginx with a private prefix: the rendered balancer file included in a minimal nginx.conf.

    One worker process: the rendered upstream has no ``zone``, so with several workers each one would run
    least_conn on its own counts only (nginx docs), and the balance between GPUs would depend on how client
    connections happen to spread over workers. One worker carries this load (tens of streams) easily.
    """

    def __init__(self, prefix: Path, root: Path | None, balancer_conf: str) -> None:
        self.prefix = prefix
        (prefix / "conf.d").mkdir(parents=True, exist_ok=True)
        self.bin = str(root / "usr/sbin/nginx") if root else (shutil.which("nginx") or "/usr/sbin/nginx")
        self.env = dict(os.environ)
        if root:
            self.env["LD_LIBRARY_PATH"] = f"{root}/usr/lib/x86_64-linux-gnu:{root}/lib/x86_64-linux-gnu"
        self.proc: subprocess.Popen[bytes] | None = None
        p = prefix
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the 0700 temp prefix
        (p / "nginx.conf").write_text(
            f"daemon off;\n{user}worker_processes 1;\npid {p}/nginx.pid;\nerror_log {p}/error.log warn;\n"
            "events { worker_connections 4096; }\n"
            "http {\n    default_type application/octet-stream;\n    access_log off;\n"
            + "".join(f"    {t}_temp_path {p}/{t}_temp;\n" for t in ("client_body", "proxy", "fastcgi",
                                                                    "uwsgi", "scgi"))
            + f"    include {p}/conf.d/llamactl.conf;\n}}\n"
        )
        self._write(balancer_conf)

    def _args(self, *extra: str) -> list[str]:
        return [self.bin, "-p", f"{self.prefix}/", "-e", f"{self.prefix}/error.log",
                "-c", f"{self.prefix}/nginx.conf", *extra]

    def _write(self, conf: str) -> None:
        (self.prefix / "conf.d/llamactl.conf").write_text(conf)
        r = subprocess.run(self._args("-t"), env=self.env, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{r.stderr}")

    def version(self) -> str:
        r = subprocess.run([self.bin, "-v"], env=self.env, capture_output=True, text=True, check=False)
        return (r.stderr or r.stdout).strip()

    def start(self) -> None:
        log = (self.prefix / "stdout.log").open("wb")
        self.proc = subprocess.Popen(self._args(), env=self.env, stdout=log, stderr=subprocess.STDOUT)
        time.sleep(0.5)
        if self.proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {(self.prefix / 'error.log').read_text()[-2000:]}")

    def reload(self, conf: str) -> None:
        """Write + check the new balancer file, SIGHUP (what deploy and drain do), let old workers go."""
        self._write(conf)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(1.5)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _smi(*args: str) -> list[list[str]]:
    r = subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True,
                       text=True, timeout=30, check=False)
    return [[c.strip() for c in line.split(",")] for line in r.stdout.strip().splitlines() if line.strip()]


def gpu_pinning(procs: list[subprocess.Popen[bytes]], tiny: bool) -> dict[str, Any]:
    """Which GPU(s) each server process holds memory on (nvidia-smi) and the CUDA_VISIBLE_DEVICES it got."""
    per_proc: list[dict[str, Any]] = []
    for p in procs:
        environ = Path(f"/proc/{p.pid}/environ").read_bytes().split(b"\0")
        cvd = next((e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"CUDA_VISIBLE_DEVICES=")),
                   None)
        per_proc.append({"pid": p.pid, "CUDA_VISIBLE_DEVICES": cvd})
    if tiny:
        return {"processes": per_proc}
    gpus = _smi("--query-gpu=index,uuid,name,memory.used,memory.total")
    apps = _smi("--query-compute-apps=pid,gpu_uuid,used_memory")
    index_of = {g[1]: int(g[0]) for g in gpus}
    for entry in per_proc:
        held = [(index_of.get(a[1], a[1]), int(a[2])) for a in apps if a[0] == str(entry["pid"])]
        entry["gpus_used"] = [g for g, _ in held]
        entry["used_mib"] = [m for _, m in held]
    return {"processes": per_proc, "nvidia_smi_gpus": gpus, "nvidia_smi_compute_apps": apps,
            "one_gpu_per_process": all(len(e["gpus_used"]) == 1 for e in per_proc)
            and len({e["gpus_used"][0] for e in per_proc if e["gpus_used"]}) == len(per_proc)}


class GpuSampler:
    """nvidia-smi every 500 ms into a CSV; per GPU over a marked window: mean utilisation, peak memory, and the mean
    SM clock and power draw (a sustained run may slow down at the power cap where a short one does not)."""

    QUERY = "timestamp,index,utilization.gpu,memory.used,clocks.sm,power.draw"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc: subprocess.Popen[bytes] | None = None
        self._mark = 0

    def start(self) -> None:
        fh = self.path.open("wb")
        self.proc = subprocess.Popen(
            ["nvidia-smi", f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits", "-lms", "500"],
            stdout=fh, stderr=subprocess.DEVNULL)

    def _rows(self) -> list[list[str]]:
        if not self.path.exists():
            return []
        columns = self.QUERY.count(",")
        return [[c.strip() for c in line.split(",")] for line in self.path.read_text().splitlines()
                if line.count(",") == columns]

    def mark(self) -> None:
        self._mark = len(self._rows())

    def mean_util_since_mark(self) -> dict[str, Any]:
        by_gpu: dict[str, list[float]] = {}
        mem: dict[str, float] = {}
        clocks: dict[str, list[float]] = {}
        power: dict[str, list[float]] = {}
        for row in self._rows()[self._mark:]:
            try:
                util, used = float(row[2]), float(row[3])
            except ValueError:
                continue
            by_gpu.setdefault(row[1], []).append(util)
            mem[row[1]] = max(mem.get(row[1], 0.0), used)
            for into, cell in ((clocks, row[4]), (power, row[5])):
                try:
                    into.setdefault(row[1], []).append(float(cell))
                except ValueError:  # "[N/A]" where the GPU does not report it
                    pass

        def mean(values: list[float] | None) -> float | None:
            return round(sum(values) / len(values), 1) if values else None

        return {g: {"util_pct": mean(v), "mem_used_mib_max": mem[g], "samples": len(v),
                    "sm_clock_mhz_mean": mean(clocks.get(g)), "power_w_mean": mean(power.get(g))}
                for g, v in sorted(by_gpu.items())}

    def tail(self) -> list[str]:
        return [",".join(r) for r in self._rows()[-6:]]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(stat_path: Path) -> float:
    """utime + stime of a /proc/<pid>[/task/<tid>]/stat file, in seconds (0 when it is gone)."""
    try:
        fields = stat_path.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # fields 14 and 15 of stat(5), after "pid (comm)"


def _host_busy_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat's cpu line."""
    vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + vals[4]
    return (sum(vals) - idle) / _TICK, sum(vals) / _TICK


class CpuMeter:
    """CPU use over a window: each server process (and its busiest threads), nginx, this load process, host.

    Figures are cores (CPU seconds / wall seconds): 1.0 = one CPU busy all the time. A server's busiest thread
    near 1.0 is the Python model thread saturated (launching kernels, stepping the stopping criteria).
    """

    def __init__(self, servers: dict[str, int]) -> None:
        self.servers = servers

    @staticmethod
    def _nginx_pids() -> list[int]:
        out = []
        for d in Path("/proc").glob("[0-9]*"):
            try:
                if (d / "comm").read_text().strip() == "nginx":
                    out.append(int(d.name))
            except OSError:
                continue
        return out

    def snapshot(self) -> dict[str, Any]:
        import resource

        threads = {}
        for name, pid in self.servers.items():
            threads[name] = {t.name: _proc_cpu_s(t / "stat") for t in Path(f"/proc/{pid}/task").glob("*")}
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {"t": time.monotonic(), "threads": threads,
                "nginx": sum(_proc_cpu_s(Path(f"/proc/{p}/stat")) for p in self._nginx_pids()),
                "load": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime, "host": _host_busy_s()}

    def since(self, before: dict[str, Any]) -> dict[str, Any]:
        now = self.snapshot()
        wall = max(1e-6, now["t"] - before["t"])
        out: dict[str, Any] = {"wall_s": round(wall, 1)}
        for name, th in now["threads"].items():
            prev = before["threads"].get(name, {})
            per = sorted(((v - prev.get(tid, 0.0)) / wall for tid, v in th.items()), reverse=True)
            out[name] = {"cores": round(sum(per), 2), "top_threads": [round(x, 2) for x in per[:4]]}
        out["nginx_cores"] = round((now["nginx"] - before["nginx"]) / wall, 2)
        out["load_generator_cores"] = round((now["load"] - before["load"]) / wall, 2)
        busy = now["host"][0] - before["host"][0]
        total = now["host"][1] - before["host"][1]
        out["host_busy_cores"] = round(busy / wall, 2)
        out["host_busy_pct"] = round(100 * busy / max(1e-6, total), 1)
        return out


def scrape_batches(url: str) -> dict[str, float]:
    """Batch counters from /metrics (size and duration sums/counts) and the engine's preprocessing time."""
    text = httpx.get(url + "/metrics", timeout=10).text
    want = ("llamactl_batch_size_sum", "llamactl_batch_size_count", "llamactl_batch_duration_seconds_sum",
            "llamactl_batch_duration_seconds_count")
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in want:
            out[name] = float(value)
    engine = httpx.get(url + "/health", timeout=10).json().get("engine") or {}
    out["prepare_s_total"] = float(engine.get("prepare_s_total") or 0.0)
    return out


def batch_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    n = after.get("llamactl_batch_size_count", 0) - before.get("llamactl_batch_size_count", 0)
    if n <= 0:
        return {"batches": 0}
    size = after["llamactl_batch_size_sum"] - before["llamactl_batch_size_sum"]
    dur = after.get("llamactl_batch_duration_seconds_sum", 0) - before.get("llamactl_batch_duration_seconds_sum", 0)
    prep = after["prepare_s_total"] - before["prepare_s_total"]
    return {"batches": int(n), "mean_batch_size": round(size / n, 2), "mean_batch_s": round(dur / n, 2),
            "mean_prepare_s": round(prep / n, 3)}
