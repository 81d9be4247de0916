"""Deploy to a real lab: 3 hosts with systemd + sshd, a balancer running Debian's nginx under systemd."""

from __future__ import annotations

import io
import json
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.labfixtures import Lab, lab_sh, llamactl

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def jpeg(color: tuple[int, int, int] = (200, 60, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, format="JPEG")
    return buf.getvalue()


def write_inventory(lab: Lab, tmp_path: Path, mutate) -> Path:  # type: ignore[no-untyped-def]
    data = yaml.safe_load(lab.inventory.read_text())
    mutate(data)
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_first_deploy_reports_every_host(deployed_lab: Lab) -> None:
    result = deployed_lab.deploy_json
    assert result["ok"] is True
    assert sorted(result["hosts"]) == ["lab-host1", "lab-host2", "lab-host3"]
    for host in result["hosts"].values():
        assert host["ok"] and host["changed"] > 0
        assert any("built release" in c for c in host["changes"])
    assert result["balancer"]["changed"] is True


def test_inference_through_the_balancer(deployed_lab: Lab) -> None:
    seen = set()
    for _ in range(6):
        resp = httpx.post(f"{deployed_lab.endpoint}/infer", json={
            "image": __import__("base64").b64encode(jpeg()).decode(), "question": "What is in this picture?"},
            timeout=120, trust_env=False)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert set(body["result"]) == {"summary", "caption", "reasoning", "conclusion"}
        assert isinstance(body["result"]["reasoning"], list)
        assert body["full_response"]
        seen.add(resp.headers["x-upstream"])
    assert all(u.startswith("10.214.0.") and u.endswith(":8000") for u in seen), seen


def test_units_run_the_release_and_env_files_are_private(deployed_lab: Lab) -> None:
    out = lab_sh(deployed_lab, "lab-host1",
              "systemctl is-active llamactl@0.service; stat -c '%a' /etc/llamactl/instance-0.env; "
              "readlink /opt/llamactl/current")
    active, mode, current = out.split()
    assert active == "active" and mode == "600"
    assert current.startswith("/opt/llamactl/releases/" + deployed_lab.deploy_json["release"])


def test_redeploy_changes_nothing_and_restarts_nothing(deployed_lab: Lab) -> None:
    pid_before = lab_sh(deployed_lab, "lab-host2", "systemctl show -p MainPID --value llamactl@0.service").strip()
    started = time.monotonic()
    proc = llamactl("deploy", str(deployed_lab.inventory), "--json")
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["changed"] == 0, result
    assert all(h["changed"] == 0 for h in result["hosts"].values())
    assert lab_sh(deployed_lab, "lab-host2", "systemctl show -p MainPID --value llamactl@0.service").strip() == pid_before
    assert elapsed < 30  # generous for a loaded 2-core CI box; the benchmark records the real figure


def test_dry_run_shows_the_diff_and_changes_nothing(deployed_lab: Lab, tmp_path: Path) -> None:
    inv = write_inventory(deployed_lab, tmp_path,
                          lambda d: d["defaults"]["server"].__setitem__("max_batch_size", 2))
    before = lab_sh(deployed_lab, "lab-host1", "sha256sum /etc/llamactl/instance-0.env")
    proc = llamactl("deploy", str(inv), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "-LLAMACTL_MAX_BATCH_SIZE=4" in proc.stdout and "+LLAMACTL_MAX_BATCH_SIZE=2" in proc.stdout
    assert "restart llamactl@0.service (settings changed)" in proc.stdout
    assert lab_sh(deployed_lab, "lab-host1", "sha256sum /etc/llamactl/instance-0.env") == before
    assert "Traceback" not in proc.stderr


def test_deploy_lock_refuses_a_second_deploy(deployed_lab: Lab) -> None:
    lab_sh(deployed_lab, "lab-lb", "mkdir -p /var/lib/llamactl && "
        "echo '{\"owner\": \"alice@laptop\", \"since\": \"2026-11-25T10:00\", \"command\": \"llamactl deploy x\"}' "
        "> /var/lib/llamactl/deploy.lock")
    proc = llamactl("deploy", str(deployed_lab.inventory))
    assert proc.returncode == 1
    assert "held by alice@laptop since 2026-11-25T10:00" in proc.stderr
    assert "--force-unlock" in proc.stderr
    proc = llamactl("deploy", str(deployed_lab.inventory), "--force-unlock", "--json")
    assert proc.returncode == 0, proc.stderr
    assert lab_sh(deployed_lab, "lab-lb", "test -e /var/lib/llamactl/deploy.lock && echo held || echo free",
               check=False).strip() == "free"
    audit = lab_sh(deployed_lab, "lab-lb", "tail -n 1 /var/log/llamactl/audit.log")
    entry = json.loads(audit)
    assert entry["ok"] is True and entry["version"] and "who" in entry


def test_changed_host_key_is_refused(deployed_lab: Lab, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = (deployed_lab.dir / "known_hosts").read_text().splitlines()
    addr = yaml.safe_load(deployed_lab.inventory.read_text())["groups"]["lab"]["hosts"]["lab-host2"]["address"]
    fake_pub = (tmp_path / "other_key.pub").read_text().split()[:2]
    forged = [f"{line.split()[0]} {' '.join(fake_pub)}" if addr in line.split()[0].split(",") else line
              for line in known]
    assert forged != known
    kh = tmp_path / "known_hosts"
    kh.write_text("\n".join(forged) + "\n")
    inv = write_inventory(deployed_lab, tmp_path, lambda d: d["defaults"]["ssh"].__setitem__("known_hosts", str(kh)))
    proc = llamactl("deploy", str(inv), "--json")
    assert proc.returncode == 3, proc.stdout  # every failure was a refused connection
    result = json.loads(proc.stdout)
    assert result["hosts"]["lab-host1"]["ok"] and result["hosts"]["lab-host3"]["ok"]
    err = result["hosts"]["lab-host2"]["error"]
    assert "lab-host2" in err and "SHA256:" in err and "changed" in err.lower()


def _set_link(lab: Lab, host: str, up: bool) -> None:
    state = json.loads((lab.dir / "lab-state.json").read_text()) if (lab.dir / "lab-state.json").exists() else None
    veth = None
    if state:
        veth = next(h["veth"] for h in state["hosts"] if h["name"] == host)
    assert veth, "cannot find the host's veth in the lab state"
    subprocess.run(["ip", "link", "set", veth, "up" if up else "down"], check=True)


def test_unreachable_host_leaves_others_deployed_and_rerun_converges(deployed_lab: Lab, tmp_path: Path) -> None:
    inv = write_inventory(deployed_lab, tmp_path,
                          lambda d: d["defaults"]["server"].__setitem__("queue_limit", 17))
    _set_link(deployed_lab, "lab-host3", up=False)
    try:
        proc = llamactl("deploy", str(inv), "--json")
    finally:
        _set_link(deployed_lab, "lab-host3", up=True)
    assert proc.returncode in (1, 3), proc.stderr
    result = json.loads(proc.stdout)
    assert result["hosts"]["lab-host1"]["ok"] and result["hosts"]["lab-host2"]["ok"]
    assert not result["hosts"]["lab-host3"]["ok"]
    assert "lab-host3" in result["hosts"]["lab-host3"]["error"]
    assert "LLAMACTL_QUEUE_LIMIT=17" in lab_sh(deployed_lab, "lab-host1", "cat /etc/llamactl/instance-0.env")
    again = llamactl("deploy", str(inv), "--json")
    assert again.returncode == 0, again.stderr
    res2 = json.loads(again.stdout)
    assert res2["hosts"]["lab-host3"]["changed"] > 0 and res2["hosts"]["lab-host1"]["changed"] == 0
    # put the lab back to its own inventory for the tests that follow
    back = llamactl("deploy", str(deployed_lab.inventory), "--json")
    assert back.returncode == 0, back.stderr


@pytest.fixture
def quick_dead_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    """SSH connections made in this process give up on a silent peer after ~4 s (product: 15 s keepalive, 60 s
    TCP_USER_TIMEOUT); the mechanism is the same."""
    from llamactl.remote import transport

    monkeypatch.setattr(transport, "KEEPALIVE_S", 1)
    monkeypatch.setattr(transport, "DEAD_PEER_S", 3)


@pytest.mark.usefixtures("quick_dead_peer")
def test_a_host_that_vanishes_ends_a_ready_wait_at_once(deployed_lab: Lab) -> None:
    """A cut network sends no RST: the instance's port just goes silent. The host's real SSH connection (its
    keepalives unacknowledged) is what ends the wait, instead of ready_timeout_s (900 s by default)."""
    from llamactl.health.wait import CONNECTION_LOST, wait_ready
    from llamactl.inventory import load_inventory
    from llamactl.ops.connect import connect_host

    inv = load_inventory(deployed_lab.inventory)
    spec = inv.host("lab-host3")
    url = spec.instances[0].url
    executor = connect_host(spec.name, spec.address, spec.ssh)
    try:
        assert wait_ready(url, 60, interval_s=0.5, alive=executor.connected).ok and executor.connected()
        _set_link(deployed_lab, "lab-host3", up=False)
        try:
            started = time.monotonic()
            result = wait_ready(url, 900, interval_s=0.5, alive=executor.connected)
            elapsed = time.monotonic() - started
        finally:
            _set_link(deployed_lab, "lab-host3", up=True)
    finally:
        executor.close()
    assert not result.ok and result.last == CONNECTION_LOST
    assert elapsed < 30, elapsed  # keepalive 1 s + 3 s unacknowledged, plus at most one 5 s HTTP attempt
    assert wait_ready(url, 60, interval_s=0.5).ok  # the link is back: the instance never stopped


@pytest.mark.usefixtures("quick_dead_peer")
def test_a_host_lost_mid_deploy_is_reported_at_once_and_the_others_finish(deployed_lab: Lab) -> None:
    """host3's link is cut right after deploy started its (stopped) instance, while deploy waits for it."""
    from llamactl.health.wait import wait_ready
    from llamactl.inventory import load_inventory
    from llamactl.ops.connect import connect_host
    from llamactl.ops.deploy import deploy
    from llamactl.plan.command import Command

    lab_sh(deployed_lab, "lab-host3", "systemctl stop llamactl@0.service")  # so deploy starts it and waits

    def connector(name: str, address: str, settings: object):  # type: ignore[no-untyped-def]
        executor = connect_host(name, address, settings)
        if name == "lab-host3":
            real_run = executor.run

            def run(command: Command, **kw: object):  # type: ignore[no-untyped-def]
                result = real_run(command, **kw)
                if command.description == "start instances":
                    _set_link(deployed_lab, "lab-host3", up=False)
                return result

            executor.run = run  # type: ignore[method-assign]
        return executor

    started = time.monotonic()
    try:
        result = deploy(load_inventory(deployed_lab.inventory), connector=connector, command_line="test")
    finally:
        _set_link(deployed_lab, "lab-host3", up=True)
    elapsed = time.monotonic() - started
    outcomes = {h.host: h for h in result.hosts}
    assert outcomes["lab-host1"].ok and outcomes["lab-host2"].ok
    lost = outcomes["lab-host3"]
    assert not lost.ok and lost.unreachable, lost.error
    assert "the SSH connection was lost while waiting for the instances to be ready" in (lost.error or "")
    assert elapsed < 120, elapsed  # not rollout.ready_timeout_s
    again = llamactl("deploy", str(deployed_lab.inventory), "--json")  # the host is back: converges
    assert again.returncode == 0, again.stderr
    url = load_inventory(deployed_lab.inventory).host("lab-host3").instances[0].url
    assert wait_ready(url, 180, interval_s=0.5).ok  # leave it serving for the tests that follow


def test_broken_balancer_config_is_rolled_back_while_traffic_flows(deployed_lab: Lab, tmp_path: Path) -> None:
    # A certificate that does not exist on the balancer host: validation cannot know, `nginx -t` there refuses.
    def broken(d: dict) -> None:  # type: ignore[type-arg]
        d["balancer"]["tls"] = {"listen": 443, "certificate": "/etc/ssl/missing.pem",
                                "certificate_key": "/etc/ssl/missing.key"}

    inv = write_inventory(deployed_lab, tmp_path, broken)
    before = lab_sh(deployed_lab, "lab-lb", "sha256sum /etc/nginx/conf.d/llamactl.conf")
    stop = threading.Event()
    codes: list[int] = []

    def load() -> None:
        with httpx.Client(timeout=60, trust_env=False) as client:
            while not stop.is_set() and len(codes) < 400:
                codes.append(client.get(f"{deployed_lab.endpoint}/healthz").status_code)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        proc = llamactl("deploy", str(inv), "--json")
    finally:
        stop.set()
        worker.join()
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert "nginx" in (result["balancer"]["error"] or "")
    assert lab_sh(deployed_lab, "lab-lb", "sha256sum /etc/nginx/conf.d/llamactl.conf") == before
    assert codes and all(c == 200 for c in codes), codes
    resp = httpx.get(f"{deployed_lab.endpoint}/healthz", timeout=10, trust_env=False)
    assert resp.status_code == 200


def test_health_watch_runs_watch_as_a_service_on_the_balancer(deployed_lab: Lab, tmp_path: Path) -> None:
    """deploy installs `llamactl watch` on the balancer host (inventory and SSH files 0600), status shows it
    running, it heals a stopped server over SSH from there, and a deploy without health.watch removes it."""
    inv = write_inventory(deployed_lab, tmp_path, lambda d: d.setdefault("health", {}).__setitem__("watch", True))
    unit = "llamactl-watch.service"
    try:
        first = llamactl("deploy", str(inv), "--json", timeout=900)
        assert first.returncode == 0, first.stdout + first.stderr
        changes = json.loads(first.stdout)["watch"]["changes"]
        assert any(c.startswith("built release") for c in changes) and f"start {unit} (not running)" in changes
        assert lab_sh(deployed_lab, "lab-lb", f"systemctl is-active {unit}").strip() == "active"
        modes = lab_sh(deployed_lab, "lab-lb", "stat -c '%a %n' /etc/llamactl/watch/*").splitlines()
        assert modes and all(m.startswith("600 ") for m in modes), modes
        assert any(m.endswith("/inventory.yaml") for m in modes) and any("id_ed25519" in m for m in modes)
        status = llamactl("status", str(inv), "--json", timeout=120)
        assert json.loads(status.stdout)["watch_service"] == "active", status.stdout + status.stderr
        again = llamactl("deploy", str(inv), "--json", timeout=900)
        assert again.returncode == 0 and json.loads(again.stdout)["watch"]["changes"] == [], again.stdout

        lab_sh(deployed_lab, "lab-host2", "systemctl stop llamactl@0.service")  # watch, on lab-lb, heals it
        deadline = time.monotonic() + 180
        while lab_sh(deployed_lab, "lab-host2", "systemctl is-active llamactl@0.service", check=False).strip() != (
                "active"):
            assert time.monotonic() < deadline, lab_sh(deployed_lab, "lab-lb", "tail -n 20 /var/log/llamactl/watch.log")
            time.sleep(1)
        log = lab_sh(deployed_lab, "lab-lb", "cat /var/log/llamactl/watch.log")
        assert '"event": "restarted"' in log and '"instance": "lab-host2/0"' in log, log
        url = load_inventory_url(deployed_lab, "lab-host2")
        from llamactl.health.wait import wait_ready

        assert wait_ready(url, 180, interval_s=0.5).ok
    finally:
        off = llamactl("deploy", str(deployed_lab.inventory), "--json", timeout=900)
    assert off.returncode == 0, off.stdout + off.stderr
    assert json.loads(off.stdout)["watch"]["changes"] == ["removed the watch service"]
    assert lab_sh(deployed_lab, "lab-lb", f"test -e /etc/systemd/system/{unit} || echo gone").strip() == "gone"
    assert "watch_service" not in json.loads(llamactl("status", str(deployed_lab.inventory), "--json").stdout)


def load_inventory_url(lab: Lab, host: str) -> str:
    from llamactl.inventory import load_inventory

    return load_inventory(lab.inventory).host(host).instances[0].url
