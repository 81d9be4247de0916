"""apply_balancer_config with two balancer hosts: the same config on each, tested on each before any reload,
and a rejection on the second puts the previous config back on the first too (neither is reloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.inventory import Inventory, load_inventory
from llamactl.ops.balancer import BACKUP_SUFFIX, BalancerConfigError, apply_balancer_config
from llamactl.plan.render import render_balancer_files
from llamactl.remote.recording import RecordingExecutor, Reply
from tests.unit.test_balancer_apply import CONF, INVENTORY, Nginx

TWO = INVENTORY.replace("    lb: {address: 10.9.0.100}\n",
                        "    lb: {address: 10.9.0.100}\n    lb2: {address: 10.9.0.101}\n")


@pytest.fixture
def inv(tmp_path: Path) -> Inventory:
    path = tmp_path / "inventory.yaml"
    path.write_text(TWO)
    return load_inventory(path, env={})


def host(name: str, nginx: Nginx) -> RecordingExecutor:
    return RecordingExecutor(name, responder=nginx, default=Reply(99, "", "unexpected command"),
                             files={CONF: b"old config\n"})


def test_same_config_tested_on_every_host_then_reloaded(inv: Inventory) -> None:
    first, second = host("lb", Nginx()), host("lb2", Nginx())
    result = apply_balancer_config(inv, {"lb": first, "lb2": second}, frozenset({"a/0"}), reason="test")
    assert [h.host for h in result.hosts if h.reloaded] == ["lb", "lb2"]
    wanted = render_balancer_files(inv, frozenset({"a/0"}))[CONF].content
    assert first.files[CONF].content == wanted == second.files[CONF].content
    for ex in (first, second):
        assert ex.commands[0] == "nginx -t" and "systemctl reload nginx.service" in ex.commands


def test_rejection_on_the_second_host_rolls_back_the_first(inv: Inventory) -> None:
    first, second = host("lb", Nginx()), host("lb2", Nginx(test_rc=1))
    with pytest.raises(BalancerConfigError) as err:
        apply_balancer_config(inv, {"lb": first, "lb2": second}, frozenset({"a/0"}), reason="test")
    assert first.commands == ["nginx -t"] and second.commands == ["nginx -t"]  # no reload anywhere
    assert first.files[CONF].content == b"old config\n" == second.files[CONF].content
    assert first.files[CONF + BACKUP_SUFFIX].content == b"old config\n"
    message = str(err.value)
    assert message.startswith(f"lb2: {CONF}: nginx rejected the new config")
    assert "lb: passed the test; its previous config was put back too" in message
    assert 'unknown directive "check"' in message
