"""The deploy's fan-out on the real lab (3 hosts, strict host keys): the first deploy sends each file once
from the controller, hosts fetch the rest from each other, every file's sha256 matches on every host, and a
peer killed mid-transfer still converges on a rerun."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from llamactl.inventory import load_inventory
from llamactl.ops.deploy import prepare
from tests.labfixtures import LLAMACTL, Lab, lab_sh, llamactl

pytestmark = [pytest.mark.lab, pytest.mark.slow]

HOSTS = ["lab-host1", "lab-host2", "lab-host3"]


def shipped(inventory: Path) -> dict[str, str]:
    """Remote path -> sha256 of every bulk file the inventory ships (wheel, wheelhouse, model)."""
    inv = load_inventory(inventory)
    spec = inv.hosts[0]
    ship = prepare(inv)
    release, model = ship.release_for(spec), ship.model_for(spec)
    out = {f"{spec.install_dir}/wheels/{release.wheel.name}": release.wheel.sha256}
    out.update({f"{spec.install_dir}/wheelhouse/{a.name}": a.sha256 for a in release.wheelhouse})
    if model is not None:
        out.update({f"{spec.model.source}/{a.name}": a.sha256 for a in model.files})
    return out


def shipped_bytes(inventory: Path) -> int:
    inv = load_inventory(inventory)
    ship = prepare(inv)
    spec = inv.hosts[0]
    model = ship.model_for(spec)
    release = ship.release_for(spec)
    return (release.wheel.size + sum(a.size for a in release.wheelhouse)
            + (sum(a.size for a in model.files) if model else 0))


def remote_digests(lab: Lab, host: str, paths: list[str]) -> dict[str, str | None]:
    script = ("import hashlib, json, sys\n"
              "def h(p):\n"
              "    try:\n        return hashlib.sha256(open(p, 'rb').read()).hexdigest()\n"
              "    except OSError:\n        return None\n"
              "print(json.dumps({p: h(p) for p in json.loads(sys.stdin.read())}))")
    from llamactl.inventory import load_inventory as load
    from llamactl.ops.connect import HostPool
    from llamactl.plan.command import Command

    with HostPool(load(lab.inventory)) as pool:
        out = pool.executor(host).run(Command.of("python3", "-c", script), stdin=json.dumps(paths).encode()).stdout
    return json.loads(out)


def test_first_deploy_sends_each_file_once_from_the_controller(deployed_lab: Lab) -> None:
    transfer = deployed_lab.deploy_json["transfer"]
    total = shipped_bytes(deployed_lab.inventory)
    assert transfer["bytes_sent_by_controller"] == total, transfer
    assert transfer["bytes_sent_by_peers"] == 2 * total
    assert transfer["rounds"] == 2
    for host in HOSTS:
        t = transfer["hosts"][host]
        assert t["error"] is None and t["fallbacks"] == 0
        assert t["bytes_from_controller"] + t["bytes_from_peers"] == total
    assert sum(t["bytes_served_to_peers"] for t in transfer["hosts"].values()) == 2 * total
    # the lab network's side of the story: what left this machine, SSH and everything else included
    assert total < deployed_lab.controller_tx_bytes <= 2 * total, (deployed_lab.controller_tx_bytes, total)


def test_every_file_matches_on_every_host(deployed_lab: Lab) -> None:
    want = shipped(deployed_lab.inventory)
    assert len(want) > 10
    for host in HOSTS:
        got = remote_digests(deployed_lab, host, sorted(want))
        assert got == want, host
        leftovers = lab_sh(deployed_lab, host, "find /opt/llamactl /srv/models -name '*.llamactl-part*' -o -name '*.llamactl-staged' | head")
        assert leftovers.strip() == ""


SERVER_PIDS = """import os
for p in os.listdir('/proc'):
    if p.isdigit():
        try:
            a = open('/proc/%s/cmdline' % p, 'rb').read().split(b'\\0')
        except OSError:
            continue
        if len(a) >= 4 and a[1] == b'-c' and a[-2] == b'serve' and b'def serve(cfg' in a[2]:
            print(p)
"""


def test_a_peer_killed_mid_transfer_converges_on_a_rerun(deployed_lab: Lab, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(deployed_lab.dir / "model", model)
    (model / "extra.bin").write_bytes(bytes(range(256)) * (96 * 1024))  # 24 MiB
    data = yaml.safe_load(deployed_lab.inventory.read_text())
    data["defaults"]["model"]["upload_from"] = str(model)
    inv = tmp_path / "inventory.yaml"
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    # 3 MB/s per peer: the second round takes ~8 s, long enough to kill its source mid-transfer
    proc = subprocess.Popen([*LLAMACTL, "deploy", str(inv), "--json", "--peer-rate", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = ""
    try:
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline and proc.poll() is None:
            parts = lab_sh(deployed_lab, "lab-host2", "ls /srv/models/tiny/ | grep -c llamactl-part || true").strip()
            if parts != "0":  # lab-host2 is fetching: kill the peer server that serves it, whichever host runs it
                for host in (h for h in HOSTS if h != "lab-host2"):
                    pids = lab_sh(deployed_lab, host, "python3 -c " + shlex.quote(SERVER_PIDS)).split()
                    if pids:
                        lab_sh(deployed_lab, host, "kill -9 " + " ".join(pids))
                        killed = f"{host}: {' '.join(pids)}"
            time.sleep(0.2)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:  # a failed test must not leave its deploy (and the deploy lock) to the next tests
            proc.kill()
            proc.wait()
            lab_sh(deployed_lab, "lab-lb", "rm -f /var/lib/llamactl/deploy.lock")
    assert killed, "never saw the transfer to kill it"
    assert "Traceback" not in err
    first = json.loads(out)
    assert first["transfer"]["hosts"]["lab-host2"]["fallbacks"] >= 1 or not first["ok"], first["transfer"]
    rerun = llamactl("deploy", str(inv), "--json")
    assert rerun.returncode == 0, rerun.stderr
    again = json.loads(rerun.stdout)
    assert again["transfer"]["bytes_sent_by_peers"] == 0
    want = {f"/srv/models/tiny/{k}": v for k, v in
            ((p.relative_to(model).as_posix(), __import__("hashlib").sha256(p.read_bytes()).hexdigest())
             for p in model.rglob("*") if p.is_file())}
    for host in HOSTS:
        assert remote_digests(deployed_lab, host, sorted(want)) == want, host
    # the lab's own inventory through the per-host path (no fan-out): its model files all match, nothing to send
    back = llamactl("deploy", str(deployed_lab.inventory), "--json", "--no-fanout")
    assert back.returncode == 0, back.stderr
    restored = json.loads(back.stdout)
    assert restored["transfer"] is None
    assert not any("model file" in c for h in restored["hosts"].values() for c in h["changes"]), restored
