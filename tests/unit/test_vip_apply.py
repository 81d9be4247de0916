"""ops.vip against RecordingExecutor (pure logic beside the lab test tests/e2e/test_vip_lab.py): the exact
commands of preflight and apply, what an unchanged redeploy does (reads only), and the errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.inventory import Inventory
from llamactl.ops.vip import Prepared, VipError, apply_vip, preflight
from llamactl.plan.command import Command
from llamactl.plan.keepalived import CHECK_SCRIPT, render_keepalived_files
from llamactl.remote.recording import RecordingExecutor, Reply
from tests.inventory_support import load_text

INVENTORY = """\
version: 1
cluster: t
defaults:
  gpus: 0
  model: {source: /srv/model}
groups:
  g:
    hosts:
      a: {address: 10.9.0.1}
balancer:
  hosts:
    lb1: {address: 10.9.0.11}
    lb2: {address: 10.9.0.12}
  vip: {address: 10.9.0.100, router_id: 42}
"""
CONF = "/etc/keepalived/keepalived.conf"


@pytest.fixture
def inv(tmp_path: Path) -> Inventory:
    return load_text(tmp_path, INVENTORY, env={})


class Host:
    """A scripted balancer host: keepalived installed or not, running or not, holding the VIP or not."""

    def __init__(self, address: str, installed: bool = True, active: bool = False, holds: bool = False,
                 installable: bool = True) -> None:
        self.address, self.installed, self.active, self.holds = address, installed, active, holds
        self.installable = installable

    def __call__(self, command: Command) -> Reply | None:
        text = command.display()
        if "command -v keepalived" in text:
            return Reply(0, "/usr/sbin/keepalived\n") if self.installed else Reply(1)
        if "apt-get install" in text:
            self.installed = self.installable
            return Reply(0) if self.installable else Reply(100, "", "E: Unable to locate package keepalived\n")
        if text == "ip -o -4 addr show":
            vip = "2: eth0    inet 10.9.0.100/24 scope global secondary eth0\n" if self.holds else ""
            return Reply(0, f"1: lo    inet 127.0.0.1/8 scope host lo\n2: eth0    inet {self.address}/24 "
                            f"brd 10.9.0.255 scope global eth0\n{vip}")
        if text.startswith("keepalived -t"):
            return Reply(0)
        if text == "systemctl is-active keepalived.service":
            return Reply(0, "active\n") if self.active else Reply(3, "inactive\n")
        if text == "systemctl enable --now keepalived.service":
            self.active = True
            return Reply(0)
        if text == "systemctl is-enabled keepalived.service":
            return Reply(0, "enabled\n")
        if text == "systemctl reload keepalived.service":
            return Reply(0)
        return None


def executors(*hosts: Host, files: dict[str, dict[str, bytes]] | None = None) -> dict[str, RecordingExecutor]:
    return {name: RecordingExecutor(name, responder=h, default=Reply(99, "", "unexpected"),
                                    files=(files or {}).get(name))
            for name, h in zip(("lb1", "lb2"), hosts)}


def test_first_apply_tests_starts_and_reports_the_holder(inv: Inventory) -> None:
    exs = executors(Host("10.9.0.11", holds=True), Host("10.9.0.12"))
    prepared = preflight(inv, exs)
    assert prepared == Prepared({"lb1": "eth0", "lb2": "eth0"}, frozenset())
    result = apply_vip(inv, exs, prepared, sleep=lambda s: None)
    assert result.holder == "lb1" and result.changed
    assert [h.action for h in result.hosts] == ["started", "started"]
    assert exs["lb2"].commands[2:] == [
        "keepalived -t -f /etc/keepalived/keepalived.conf",
        "systemctl is-active keepalived.service",
        "systemctl enable --now keepalived.service",
        "systemctl is-active keepalived.service",
        "ip -o -4 addr show",
    ]
    assert b"priority 190" in exs["lb2"].files[CONF].content and exs["lb2"].files[CONF].mode == 0o600


def test_unchanged_redeploy_only_reads(inv: Inventory) -> None:
    files = {name: {p: f.content for p, f in render_keepalived_files(inv, lb, "eth0").items()}
             for name, lb in zip(("lb1", "lb2"), inv.balancer.hosts)}
    exs = executors(Host("10.9.0.11", active=True), Host("10.9.0.12", active=True, holds=True), files=files)
    result = apply_vip(inv, exs, preflight(inv, exs), sleep=lambda s: None)
    assert result.holder == "lb2" and not result.changed
    for ex in exs.values():
        assert ex.uploads == []
        assert set(ex.commands) <= {"command -v keepalived || test -x /usr/sbin/keepalived && echo /usr/sbin/keepalived",
                                    "ip -o -4 addr show", "systemctl is-active keepalived.service",
                                    "systemctl is-enabled keepalived.service"}


def test_changed_config_reloads_a_running_keepalived(inv: Inventory) -> None:
    exs = executors(Host("10.9.0.11", active=True, holds=True), Host("10.9.0.12", active=True),
                    files={"lb1": {CONF: b"old\n"}})
    result = apply_vip(inv, exs, preflight(inv, exs), sleep=lambda s: None)
    assert [h.action for h in result.hosts] == ["reloaded", "reloaded"]
    assert result.hosts[0].changed_paths == [CONF, CHECK_SCRIPT]
    assert "systemctl reload keepalived.service" in exs["lb1"].commands


def test_missing_keepalived_is_installed(inv: Inventory) -> None:
    exs = executors(Host("10.9.0.11"), Host("10.9.0.12", installed=False))
    prepared = preflight(inv, exs)
    assert prepared.installed == frozenset({"lb2"})
    assert ("DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends keepalived"
            in exs["lb2"].commands)


def test_keepalived_that_cannot_be_installed_stops_with_the_command(inv: Inventory) -> None:
    exs = executors(Host("10.9.0.11"), Host("10.9.0.12", installed=False, installable=False))
    with pytest.raises(VipError) as err:
        preflight(inv, exs)
    assert str(err.value) == (
        "lb2: balancer.vip needs keepalived, which is not installed and could not be installed "
        "(`DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends keepalived` exited 100: "
        "E: Unable to locate package keepalived); install it on lb2 with "
        "`apt-get install -y --no-install-recommends keepalived` and deploy again")


def test_rejected_config_is_put_back(inv: Inventory) -> None:
    host = Host("10.9.0.11")
    exs = executors(host, Host("10.9.0.12"), files={"lb1": {CONF: b"old\n"}})
    exs["lb1"].responses["keepalived -t -f /etc/keepalived/keepalived.conf"] = Reply(
        5, "", "(Line 3) Unknown keyword 'priorty'\n")
    with pytest.raises(VipError, match="keepalived rejected the new config") as err:
        apply_vip(inv, exs, preflight(inv, exs), sleep=lambda s: None)
    assert "Unknown keyword 'priorty'" in str(err.value)
    assert exs["lb1"].files[CONF].content == b"old\n"
    assert not any("systemctl" in c for c in exs["lb1"].commands)
    assert f"rm -f {CHECK_SCRIPT}" in exs["lb1"].commands  # it did not exist before: removed again


def test_no_holder_and_two_holders_are_errors(inv: Inventory) -> None:
    clock = [0.0]

    def tick(s: float) -> None:
        clock[0] += s

    exs = executors(Host("10.9.0.11", active=True), Host("10.9.0.12", active=True))
    with pytest.raises(VipError, match="held by no balancer host after 15 s"):
        apply_vip(inv, exs, preflight(inv, exs), sleep=tick, clock=lambda: clock[0])
    exs = executors(Host("10.9.0.11", active=True, holds=True), Host("10.9.0.12", active=True, holds=True))
    with pytest.raises(VipError, match="is held by lb1, lb2 at once"):
        apply_vip(inv, exs, preflight(inv, exs), sleep=tick, clock=lambda: clock[0])


def test_interface_not_found_is_named(inv: Inventory) -> None:
    exs = executors(Host("10.9.0.11"), Host("10.9.0.99"))
    with pytest.raises(VipError) as err:
        preflight(inv, exs)
    assert str(err.value) == ("lb2: no interface holds its inventory address 10.9.0.12; set "
                              "balancer.vip.interface")


def test_dry_run_diffs_mask_the_password(tmp_path: Path) -> None:
    from llamactl.ops.vip import dry_run_diffs

    inv = load_text(tmp_path, INVENTORY.replace("router_id: 42}", "router_id: 42, advert_interval_s: 1, auth: {env: PW}}"),
                    env={"PW": "topsecr"})
    exs = executors(Host("10.9.0.11"), Host("10.9.0.12"), files={"lb1": {CONF: b"auth_pass oldpass\n"}})
    diffs = dry_run_diffs(inv, exs)
    assert [d.path for d in diffs] == [f"lb1:{CONF}", f"lb1:{CHECK_SCRIPT}", f"lb2:{CONF}", f"lb2:{CHECK_SCRIPT}"]
    assert diffs[0].old == b"auth_pass ***\n" and b"auth_pass ***\n" in diffs[0].new
    assert all(b"topsecr" not in d.new for d in diffs)
    assert all(ex.uploads == [] for ex in exs.values())


def test_logs_of_a_balancer_host_include_keepalived(inv: Inventory) -> None:
    from llamactl.cli.logs import units_for

    assert units_for(inv, "lb2", None) == ["nginx.service", "llamactl-watch.service", "keepalived.service"]


def test_status_line_and_ok() -> None:
    from llamactl.cli.status import _vip_line
    from llamactl.ops.vip import VipHostState, VipState

    one = VipState("10.9.0.100", [VipHostState("lb1", "active", True), VipHostState("lb2", "active", False)])
    assert one.ok and _vip_line(one) == "VIP 10.9.0.100: held by lb1; keepalived: lb1 active, lb2 active"
    assert one.to_json()["holder"] == "lb1"
    none = VipState("10.9.0.100", [VipHostState("lb1", "inactive", False), VipHostState("lb2", "active", False)])
    assert not none.ok and _vip_line(none) == ("VIP 10.9.0.100: held by NO balancer host; keepalived: lb1 inactive, "
                                               "lb2 active")
    both = VipState("10.9.0.100", [VipHostState("lb1", "active", True), VipHostState("lb2", "active", True)])
    assert not both.ok and "held by lb1, lb2 AT ONCE" in _vip_line(both) and both.to_json()["holder"] is None
