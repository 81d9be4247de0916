"""Deploy runs Redis on the lab's balancer host (inventory ``redis:``, which the lab enables): the unit,
its private config, AUTH + PING from the instances' network, no password in argv or output, a redeploy
that touches nothing, and jobs posted through the balancer retrievable through it."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from llamactl.inventory import load_inventory
from llamactl.plan.redis import REDIS_UNIT
from tests.e2e.test_deploy import jpeg, write_inventory
from tests.labfixtures import Lab, lab_sh, llamactl

pytestmark = [pytest.mark.lab, pytest.mark.slow]
LB = "lab-lb"


def wait_all_ready(lab: Lab, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if llamactl("status", str(lab.inventory), "--json", timeout=60).returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"not all instances ready within {timeout_s:g} s")


def password(lab: Lab) -> str:
    return (lab.dir / "redis-password").read_text().strip()


def test_first_deploy_starts_redis_on_the_balancer_host(deployed_lab: Lab) -> None:
    result = deployed_lab.deploy_json
    assert result["redis"]["host"] == LB and result["redis"]["error"] is None
    assert f"started {REDIS_UNIT}" in result["redis"]["changes"]
    assert "created /etc/redis/llamactl.conf" in result["redis"]["changes"]
    out = lab_sh(deployed_lab, LB, f"systemctl is-active {REDIS_UNIT}; systemctl is-enabled {REDIS_UNIT}; "
                 "stat -c '%a %U' /etc/redis/llamactl.conf; "
                 f"ps -o user= -p $(systemctl show -p MainPID --value {REDIS_UNIT})")
    assert out.split() == ["active", "enabled", "600", "root", "redis"]
    # the password is in no process's command line on the host
    assert password(deployed_lab) not in lab_sh(deployed_lab, LB, "ps -eo args")


def test_redis_answers_the_instances_with_the_password_only(deployed_lab: Lab) -> None:
    inv = load_inventory(deployed_lab.inventory)
    assert inv.redis is not None
    ok = redis.Redis(host=inv.redis.address, port=inv.redis.port, password=password(deployed_lab),
                     socket_timeout=5)
    try:
        assert ok.ping() is True
        assert ok.config_get("appendonly") == {"appendonly": "yes"}
        assert ok.config_get("maxmemory") == {"maxmemory": str(64 * 1024 * 1024)}
    finally:
        ok.close()
    anon = redis.Redis(host=inv.redis.address, port=inv.redis.port, socket_timeout=5)
    with pytest.raises(redis.AuthenticationError):
        anon.ping()
    anon.close()
    # every instance's 0600 env file carries the URL (it is how they find Redis)
    out = lab_sh(deployed_lab, "lab-host1", "grep -c '^LLAMACTL_REDIS_URL=redis://' /etc/llamactl/instance-0.env")
    assert out.strip() == "1"


def test_redeploy_leaves_redis_untouched(deployed_lab: Lab) -> None:
    pid = lab_sh(deployed_lab, LB, f"systemctl show -p MainPID --value {REDIS_UNIT}").strip()
    proc = llamactl("deploy", str(deployed_lab.inventory), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["redis"] == {"host": LB, "changes": [], "error": None}
    assert lab_sh(deployed_lab, LB, f"systemctl show -p MainPID --value {REDIS_UNIT}").strip() == pid
    assert password(deployed_lab) not in proc.stdout + proc.stderr


def test_dry_run_masks_the_password_and_changes_nothing(deployed_lab: Lab, tmp_path: Path) -> None:
    inv = write_inventory(deployed_lab, tmp_path, lambda d: d["redis"].__setitem__("maxmemory_mb", 96))
    before = lab_sh(deployed_lab, LB, "sha256sum /etc/redis/llamactl.conf")
    proc = llamactl("deploy", str(inv), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "-maxmemory 64mb" in proc.stdout and "+maxmemory 96mb" in proc.stdout
    assert f"systemctl restart {REDIS_UNIT}" in proc.stdout
    assert all(line.endswith("requirepass ***") for line in proc.stdout.splitlines() if "requirepass" in line)
    assert password(deployed_lab) not in proc.stdout + proc.stderr
    assert lab_sh(deployed_lab, LB, "sha256sum /etc/redis/llamactl.conf") == before


def test_jobs_posted_through_the_balancer_are_found_through_it(deployed_lab: Lab) -> None:
    """The issue's first symptom (4 of 4 jobs answered 404 through the balancer), now with Redis."""
    image = base64.b64encode(jpeg()).decode()
    ids = []
    with httpx.Client(base_url=deployed_lab.endpoint, timeout=60, trust_env=False) as client:
        for _ in range(8):
            r = client.post("/v1/jobs", json={"image": image, "question": "What is in this picture?",
                                              "max_tokens": 16})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        deadline = time.monotonic() + 300
        done: dict[str, str] = {}
        while len(done) < len(ids) and time.monotonic() < deadline:
            for job_id in ids:
                if job_id in done:
                    continue
                r = client.get(f"/v1/jobs/{job_id}")
                assert r.status_code == 200, r.text
                if r.json()["status"] in ("succeeded", "failed"):
                    done[job_id] = r.json()["status"]
            time.sleep(0.2)
    assert done == {job_id: "succeeded" for job_id in ids}


def test_lab_inventory_names_redis_by_file(deployed_lab: Lab) -> None:
    data = yaml.safe_load(deployed_lab.inventory.read_text())
    assert data["redis"]["password"] == {"file": str(deployed_lab.dir / "redis-password")}
    assert (deployed_lab.dir / "redis-password").stat().st_mode & 0o777 == 0o600


def test_a_repeated_request_through_the_balancer_is_a_cache_hit_on_any_instance(deployed_lab: Lab) -> None:
    body = {"image": base64.b64encode(jpeg((10, 200, 90))).decode(), "question": "Cache me, from any instance.",
            "max_tokens": 12}
    answers = []
    with httpx.Client(base_url=deployed_lab.endpoint, timeout=120, trust_env=False) as client:
        for _ in range(7):
            r = client.post("/infer", json=body)
            assert r.status_code == 200, r.text
            answers.append((r.headers["x-upstream"], r.json()["cached"], r.json()["full_response"]))
    assert answers[0][1] is False
    assert all(cached for _, cached, _ in answers[1:]), answers
    assert len({text for _, _, text in answers}) == 1
    # least_conn spreads them: instances that never answered it before answered from Redis
    assert len({upstream for upstream, _, _ in answers}) >= 2, answers


def test_status_shows_redis_memory_and_backlog(deployed_lab: Lab) -> None:
    proc = llamactl("status", str(deployed_lab.inventory), "--json", "--keys")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    redis_state = json.loads(proc.stdout)["redis"]
    assert redis_state["answers"] is True and redis_state["unit"] == "active"
    assert redis_state["maxmemory_bytes"] == 64 * 1024 * 1024 and redis_state["used_memory_bytes"] > 0
    assert redis_state["jobs_backlog"] == 0 and redis_state["cache_bytes"] > 0
    human = llamactl("status", str(deployed_lab.inventory))
    assert "redis on lab-lb: up (unit active), memory " in human.stdout
    assert password(deployed_lab) not in proc.stdout + human.stdout + proc.stderr + human.stderr


def test_no_job_lost_across_a_kill_9_and_a_redis_restart(deployed_lab: Lab) -> None:
    """The small CI version of bench/jobs_lab.py (which adds a rolling restart and a redeploy, >= 50 jobs)."""
    from tests.e2e.jobload import JobLoad

    wait_all_ready(deployed_lab, 120)
    load = JobLoad(deployed_lab.endpoint)
    try:
        killed = load.run("kill -9 of a server", 6, lambda: lab_sh(
            deployed_lab, "lab-host1", "systemctl kill -s KILL llamactl@0.service"), settle_timeout_s=240)
        wait_all_ready(deployed_lab, 120)
        restarted = load.run("Redis restart", 6, lambda: lab_sh(
            deployed_lab, LB, f"systemctl restart {REDIS_UNIT}"), settle_timeout_s=240)
    finally:
        load.close()
    for phase in (killed, restarted):
        summary = phase.summary()
        assert summary["lost"] == 0 and summary["not_accepted"] == 0, summary
        assert summary["succeeded"] == summary["accepted"] == 6, summary
