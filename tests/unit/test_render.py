"""Pure rendering: paths, modes, unit directives, env file quoting, drained instances."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from llamactl.inventory import expected_env, load_inventory
from llamactl.plan.render import UNIT_PATH, envquote, render_all, render_balancer_files, render_host_files

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "inventories"


def many():  # type: ignore[no-untyped-def]
    return load_inventory(FIXTURES / "many.yaml", env={"HF_TOKEN": "hf_secret"})


def unit_lines(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def test_host_files_paths_and_modes() -> None:
    inv = many()
    files = render_host_files(inv, inv.host("b-1"))
    assert sorted(files) == [
        "/etc/llamactl/instance-0.env",
        "/etc/llamactl/instance-1.env",
        "/etc/llamactl/instance-2.env",
        UNIT_PATH,
    ]
    assert files[UNIT_PATH].mode == 0o644
    assert all(f.mode == 0o600 for p, f in files.items() if p.endswith(".env"))


def test_unit_directives() -> None:
    inv = many()
    host = inv.host("a-1")
    unit = unit_lines(render_host_files(inv, host)[UNIT_PATH].content.decode())
    assert unit["Type"] == "exec"
    assert unit["EnvironmentFile"] == "/etc/llamactl/instance-%i.env"
    assert unit["ExecStart"] == "/opt/llamactl/current/bin/llamactl serve"
    assert unit["Restart"] == "on-failure" and unit["KillSignal"] == "SIGTERM"
    # rollout.drain_timeout_s (120) is longer than the server's (60): the stop timeout exceeds both.
    assert int(unit["TimeoutStopSec"]) == 150 > 120
    assert (
        unit["User"] == "llamactl" and unit["ProtectSystem"] == "strict" and unit["NoNewPrivileges"] == "yes"
    )
    assert not {"PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock"} & set(
        unit
    )  # GPUs stay visible


def test_root_user_has_no_user_line() -> None:
    inv = load_inventory(FIXTURES / "small.yaml", env={})
    unit = render_host_files(inv, inv.hosts[0])[UNIT_PATH].content.decode()
    assert not re.search(r"^(User|Group)=", unit, re.MULTILINE)


def test_env_file_holds_exactly_expected_env() -> None:
    inv = many()
    for inst in inv.instances():
        text = render_host_files(inv, inv.host(inst.host))[f"/etc/llamactl/instance-{inst.index}.env"].content
        pairs = [line.split("=", 1) for line in text.decode().splitlines() if not line.startswith("#")]
        want = expected_env(inv, inst)
        assert [k for k, _ in pairs] == list(want)
        assert {k: v for k, v in pairs} == {k: envquote(v) for k, v in want.items()}
    a1 = render_host_files(inv, inv.host("a-1"))["/etc/llamactl/instance-0.env"].content.decode()
    assert 'NCCL_DEBUG="WARN path=/tmp/x"' in a1 and "LLAMACTL_API_KEYS=key-one,key-two" in a1


def test_envquote() -> None:
    assert envquote("plain/value:1,2") == "plain/value:1,2"
    assert envquote("") == ""
    assert envquote('a b"c\\d$e') == '"a b\\"c\\\\d\\$e"'


def test_drained_marks_down_only_those() -> None:
    inv = many()
    conf = render_balancer_files(inv, {"a-2/1", "c-1/0"})[inv.balancer.config_path].content.decode()
    down = re.findall(r"server (\S+) .* down;  # (\S+)", conf)
    assert down == [("10.1.0.2:9001", "a-2/1"), ("10.1.2.1:9000", "c-1/0")]


def test_render_all_covers_servers_and_balancers() -> None:
    inv = many()
    out = render_all(inv)
    assert list(out) == ["a-1", "a-2", "a-3", "b-1", "b-2", "c-1", "lb-a", "lb-b"]
    assert sorted(out["lb-b"]) == ["/etc/nginx/conf.d/llamactl.conf", "/etc/prometheus/file_sd/llamactl.json"]


def test_ipv6_addresses_are_bracketed() -> None:
    inv = load_inventory(FIXTURES / "small.yaml", env={})
    host = dataclasses.replace(
        inv.hosts[0], instances=[dataclasses.replace(inv.hosts[0].instances[0], address="fd00::2")]
    )
    inv6 = dataclasses.replace(inv, hosts=[host])
    files = render_balancer_files(inv6)
    assert "server [fd00::2]:8000 " in files[inv.balancer.config_path].content.decode()
    assert '"[fd00::2]:8000"' in files[inv.balancer.prometheus_targets_path].content.decode()
