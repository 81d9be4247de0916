"""Run the real nginx, systemd-analyze and promtool on rendered files, in temporary directories."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from llamactl.inventory import Inventory, load_inventory
from llamactl.plan.render import render_balancer_files

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "inventories"
ROOT = Path(__file__).resolve().parents[2]
ENV = {"HF_TOKEN": "hf_test", "LLAMACTL_API_KEYS": "k1,k2"}


def need(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None)
    if path is None:
        pytest.skip(f"{tool} is not installed (apt-get install nginx systemd prometheus)")
    return path


def load(name: str, **env: str) -> Inventory:
    path = ROOT / "inventory.example.yaml" if name == "example" else FIXTURES / f"{name}.yaml"
    return load_inventory(path, env={**ENV, **env})


def nginx_conf(prefix: Path, included: Path, extra_http: str = "") -> Path:
    """A minimal main config whose http {} includes the rendered file, everything under ``prefix``."""
    temps = "\n".join(
        f"    {k}_temp_path {prefix / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"pid {prefix / 'nginx.pid'};\nerror_log {prefix / 'error.log'};\n"
        "worker_processes 1;\nevents { worker_connections 64; }\n"
        f"http {{\n    access_log off;\n{temps}\n{extra_http}    include {included};\n}}\n"
    )
    return conf


def nginx_test(
    inv: Inventory, tmp: Path, drained: frozenset[str] = frozenset()
) -> subprocess.CompletedProcess[str]:
    nginx = need("nginx")
    files = render_balancer_files(inv, drained)
    rendered = tmp / "llamactl.conf"
    rendered.write_bytes(files[inv.balancer.config_path].content)
    conf = nginx_conf(tmp, rendered)
    return subprocess.run(
        [nginx, "-t", "-e", str(tmp / "error.log"), "-p", str(tmp), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )
