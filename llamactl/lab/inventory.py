"""The lab's inventory, endpoint file and known_hosts (pure builders plus one writer)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import yaml

from llamactl.lab.state import LabState

MODEL_SOURCE = "/srv/models/tiny"
REDIS_PASSWORD = "redis-password"  # in the lab directory, 0600, made once per lab directory
PROMETHEUS_PORT = 9090
VRRP_ROUTER_ID = 51


def build_inventory(state: LabState) -> dict[str, Any]:
    """The inventory of a lab, in the format of inventory.example.yaml. Absolute paths only."""
    d = Path(state.dir)
    inv = _inventory(state, d)
    if state.vip is not None:  # two or more balancer hosts: one floating address (keepalived)
        inv["balancer"]["hosts"] = {h.name: {"address": h.address} for h in state.balancers}
        inv["balancer"]["vip"] = {"address": state.vip, "prefix": int(state.subnet.split("/")[1]),
                                  "router_id": VRRP_ROUTER_ID}
    return inv


def _inventory(state: LabState, d: Path) -> dict[str, Any]:
    lb = state.balancer
    return {
        "version": 1,
        "cluster": "lab",
        "defaults": {
            "ssh": {
                "user": "root",
                "port": 22,
                "identity_file": str(d / "id_ed25519"),
                "known_hosts": str(d / "known_hosts"),
                "host_key_policy": "strict",
                "connect_timeout_s": 5,
                "use_ssh_config": False,
            },
            "python": "/usr/bin/python3",
            "install_dir": "/opt/llamactl",
            "gpus": 0,
            "base_port": 8000,
            "bind": "0.0.0.0",
            "model": {
                "source": MODEL_SOURCE,
                "upload_from": str(d / "model"),
                "dtype": "float32",
                "quantization": "none",
                "generation": {"max_new_tokens": 96, "temperature": 0.6, "top_p": 0.9, "do_sample": False},
            },
            "server": {
                "max_batch_size": 4,
                "max_wait_ms": 10,
                "queue_limit": 16,
                "request_timeout_s": 120,
                "drain_timeout_s": 10,
                "max_body_mb": 20,
                "max_image_pixels": 40000000,
                "max_image_mb": 15,
                # one OpenMP thread per CPU instance: the lab hosts share the machine's few cores, and
                # spinning OpenMP threads of several servers slow each other down 10-50x
                "env": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
            },
            "pip": {"no_index": True, "wheelhouse": str(d / "wheelhouse")},
        },
        "groups": {"lab": {"hosts": {h.name: {"address": h.address} for h in state.servers}}},
        "balancer": {
            "hosts": {lb.name: {"address": lb.address}},
            "listen": 80,
            "server_name": "_",
            "method": "least_conn",
            "max_fails": 2,
            "fail_timeout_s": 10,
            "keepalive": 8,
            "next_upstream_tries": 3,
            "client_max_body_size_mb": 25,
            "proxy_read_timeout_s": 300,
            "config_path": "/etc/nginx/conf.d/llamactl.conf",
            "prometheus_targets_path": "/etc/prometheus/file_sd/llamactl.json",
        },
        "rollout": {
            "batch": 1,
            "max_unavailable": 1,
            "drain_timeout_s": 10,
            "ready_timeout_s": 120,
            "canary": True,
        },
        # Redis on the balancer host (the distribution's redis-server, which every host has): shared jobs
        "redis": {"port": 6379, "maxmemory_mb": 64, "password": {"file": str(d / REDIS_PASSWORD)}},
        "health": {"interval_s": 2, "timeout_s": 2, "fall": 2, "rise": 1, "startup_grace_s": 120,
                   "alerts": {"enabled": True}},
        # Prometheus on the balancer host, from this machine's packages (lab hosts have no registry):
        # scrapes every instance and nginx, with the alert rules loaded.
        "prometheus": {"port": PROMETHEUS_PORT, "scrape_interval_s": 2, "scrape_timeout_s": 2,
                       "evaluation_interval_s": 2, "retention_time": "1d", "install": False},
    }


def endpoint(state: LabState) -> str:
    return f"http://{state.vip or state.balancer.address}:80"


def hosts_file(state: LabState) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{h.address}\t{h.name}" for h in state.hosts]
    lines.append(f"{state.bridge_address.split('/')[0]}\tlab-controller")
    return "\n".join(lines) + "\n"


def known_hosts(state: LabState, host_keys: dict[str, str]) -> str:
    """One line per host, for its address and its name: ``ADDR,NAME KEYTYPE KEY``."""
    out = []
    for h in state.hosts:
        keytype, key = host_keys[h.name].split()[:2]
        out.append(f"{h.address},{h.name} {keytype} {key}")
    return "\n".join(out) + "\n"


def write_files(state: LabState, host_keys: dict[str, str]) -> None:
    d = Path(state.dir)
    header = f"# Written by `llamactl lab up` for the lab {state.name!r} ({state.subnet}). Regenerated on each up.\n"
    (d / "inventory.yaml").write_text(header + yaml.safe_dump(build_inventory(state), sort_keys=False))
    (d / "known_hosts").write_text(known_hosts(state, host_keys))
    (d / "endpoint").write_text(endpoint(state) + "\n")
    password = d / REDIS_PASSWORD
    if not password.exists():
        fd = os.open(password, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24) + "\n")
