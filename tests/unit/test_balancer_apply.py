"""apply_balancer_config against RecordingExecutor: the exact command sequence on each path."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.inventory import Inventory
from llamactl.ops.balancer import BACKUP_SUFFIX, BalancerConfigError, apply_balancer_config
from llamactl.plan.nginx import NginxControl
from llamactl.plan.command import Command
from llamactl.plan.render import render_balancer_files
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
      b: {address: 10.9.0.2}
balancer:
  hosts:
    lb: {address: 10.9.0.100}
  config_path: /etc/nginx/conf.d/llamactl.conf
  prometheus_targets_path: /etc/prometheus/file_sd/llamactl.json
"""
CONF = "/etc/nginx/conf.d/llamactl.conf"
TARGETS = "/etc/prometheus/file_sd/llamactl.json"


@pytest.fixture
def inv(tmp_path: Path) -> Inventory:
    return load_text(tmp_path, INVENTORY, env={})


class Nginx:
    """Scripted answers of a systemd-managed nginx whose workers change on each reload."""

    def __init__(self, test_rc: int = 0, active: bool = True, reload_takes: bool = True) -> None:
        self.test_rc, self.active, self.reload_takes = test_rc, active, reload_takes
        self.workers = [101, 102]

    def __call__(self, command: Command) -> Reply | None:
        text = command.shell()
        if text == "nginx -t":
            if self.test_rc:
                return Reply(1, "", 'nginx: [emerg] unknown directive "check" in /etc/nginx/conf.d/llamactl.conf:7\n'
                                    "nginx: configuration file /etc/nginx/nginx.conf test failed\n")
            return Reply(0, "", "nginx: configuration file /etc/nginx/nginx.conf test is successful\n")
        if text == "systemctl is-active --quiet nginx.service":
            return Reply(0 if self.active else 3)
        if text.startswith("systemctl show"):
            return Reply(0, "100\n")
        if text.startswith("cat /run/nginx.pid"):
            return Reply(0, "100\n")
        if text.startswith("ps -o pid= --ppid 100"):
            return Reply(0, "".join(f"{w:>7}\n" for w in self.workers))
        if text == f"rm -f {CONF}":
            return Reply(0)
        if text in ("systemctl reload nginx.service", "nginx -s reload"):
            if self.reload_takes:
                self.workers = [w + 10 for w in self.workers]
            return Reply(0)
        return None


def recorder(nginx: Nginx, files: dict[str, bytes] | None = None) -> RecordingExecutor:
    return RecordingExecutor("lb", responder=nginx, default=Reply(99, "", "unexpected command"), files=files)


def test_changed_config_is_backed_up_tested_and_reloaded(inv: Inventory) -> None:
    ex = recorder(Nginx(), {CONF: b"old config\n"})
    result = apply_balancer_config(inv, {"lb": ex}, frozenset({"a/0"}), reason="test")
    assert result.changed and result.hosts[0].reloaded
    assert ex.commands == [
        "nginx -t",
        "systemctl is-active --quiet nginx.service",
        "systemctl show --property=MainPID --value nginx.service",
        "ps -o pid= --ppid 100",
        "systemctl reload nginx.service",
        "systemctl show --property=MainPID --value nginx.service",
        "ps -o pid= --ppid 100",
        "systemctl is-active --quiet nginx.service",
    ]
    puts = [u.path for u in ex.uploads]
    assert puts == [TARGETS, CONF + BACKUP_SUFFIX, CONF]
    assert ex.files[CONF + BACKUP_SUFFIX].content == b"old config\n"
    wanted = render_balancer_files(inv, frozenset({"a/0"}))
    assert ex.files[CONF].content == wanted[CONF].content
    assert b"down" in ex.files[CONF].content


def test_identical_config_changes_nothing(inv: Inventory) -> None:
    files = {p: f.content for p, f in render_balancer_files(inv).items()}
    ex = recorder(Nginx(), files)
    result = apply_balancer_config(inv, {"lb": ex}, reason="test")
    assert not result.changed
    assert ex.commands == [] and ex.uploads == []


def test_failed_test_restores_previous_and_never_reloads(inv: Inventory) -> None:
    ex = recorder(Nginx(test_rc=1), {CONF: b"old config\n"})
    with pytest.raises(BalancerConfigError) as err:
        apply_balancer_config(inv, {"lb": ex}, frozenset({"a/0"}), reason="test")
    assert ex.commands == ["nginx -t"]
    assert [u.path for u in ex.uploads] == [TARGETS, CONF + BACKUP_SUFFIX, CONF, CONF]
    assert ex.files[CONF].content == b"old config\n"
    message = str(err.value)
    assert message.startswith(f"lb: {CONF}: nginx rejected the new config")
    assert 'unknown directive "check"' in message and "keeps serving" in message


def test_failed_test_without_previous_file_removes_it(inv: Inventory) -> None:
    ex = recorder(Nginx(test_rc=1))
    with pytest.raises(BalancerConfigError):
        apply_balancer_config(inv, {"lb": ex}, reason="test")
    assert ex.commands == ["nginx -t", f"rm -f {CONF}"]
    assert [u.path for u in ex.uploads] == [TARGETS, CONF]  # no backup of a file that did not exist


def test_without_systemd_uses_nginx_signal(inv: Inventory) -> None:
    ex = recorder(Nginx(active=False), {CONF: b"old\n"})
    apply_balancer_config(inv, {"lb": ex}, reason="test")
    assert "nginx -s reload" in ex.commands and "cat /run/nginx.pid" in ex.commands
    assert "systemctl reload nginx.service" not in ex.commands


def test_reload_that_does_not_take_is_an_error(inv: Inventory) -> None:
    clock = [0.0]
    ex = recorder(Nginx(reload_takes=False), {CONF: b"old\n"})
    with pytest.raises(BalancerConfigError, match="started no new workers"):
        apply_balancer_config(inv, {"lb": ex}, reason="test", clock=lambda: clock[0],
                              sleep=lambda s: clock.__setitem__(0, clock[0] + s))


def test_custom_control_for_a_prefix(inv: Inventory) -> None:
    control = NginxControl.for_prefix("/tmp/ngx", "/tmp/ngx/nginx.conf")
    seen: list[str] = []
    workers = [1]

    def answer(command: Command) -> Reply:
        seen.append(command.shell())
        if command.argv[:2] == ("nginx", "-s"):
            workers[0] += 1
        if command.display().startswith("cat "):
            return Reply(0, "7\n")
        if command.argv[0] == "ps":
            return Reply(0, f"{workers[0]}\n")
        return Reply(0)

    ex = RecordingExecutor("lb", responder=answer, files={CONF: b"old\n"})
    apply_balancer_config(inv, {"lb": ex}, reason="test", nginx=control)
    assert seen[0] == "nginx -t -p /tmp/ngx -c /tmp/ngx/nginx.conf"
    assert "nginx -s reload -p /tmp/ngx -c /tmp/ngx/nginx.conf" in seen
    assert not any(s.startswith("systemctl") for s in seen)
