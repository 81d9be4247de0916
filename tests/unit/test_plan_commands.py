"""Every remote command ops/ runs, as the exact string the host's shell receives (Kamal-style)."""

from __future__ import annotations

import json
from pathlib import Path

from llamactl.inventory import Instance, PipSettings
from llamactl.plan import lock, nginx, units
from llamactl.plan.deploy import DesiredHost, facts_command
from llamactl.plan.release import Artifact, Release, activate_command
from llamactl.plan.render import RenderedFile
from llamactl.plan.rollback import releases_command


def test_lock_commands() -> None:
    record = lock.lock_record(owner="alice@laptop", since="2026-01-01T10:00:00+0000", command_line="llamactl deploy x",
                              version="0.1.0")
    assert json.loads(record) == {"owner": "alice@laptop", "since": "2026-01-01T10:00:00+0000",
                                  "command": "llamactl deploy x", "version": "0.1.0"}
    take = lock.take_command('{"owner": "a"}')
    assert take.description == "take the deploy lock"
    assert take.shell() == ("sh -c 'mkdir -p /var/lib/llamactl && (set -C; printf '\"'\"'%s\\n'\"'\"' "
                            "'\"'\"'{\"owner\": \"a\"}'\"'\"' > /var/lib/llamactl/deploy.lock)'")
    assert take.display() == ("mkdir -p /var/lib/llamactl && (set -C; printf '%s\\n' '{\"owner\": \"a\"}' > "
                              "/var/lib/llamactl/deploy.lock)")
    assert lock.release_command().shell() == "rm -f /var/lib/llamactl/deploy.lock"
    audit = lock.audit_command()
    assert audit.display() == "mkdir -p /var/log/llamactl && cat >> /var/log/llamactl/audit.log"
    assert audit.description == "append to the audit log"


def test_audit_line_and_lock_description() -> None:
    line = lock.audit_line(time="T", who="w@h", command_line="llamactl restart inv.yaml", version="0.1.0",
                           result={"release": None, "ok": True, "changed": 1,
                                   "hosts": {"h1": {"changes": ["restart llamactl@0.service"]}}})
    assert line == ('{"changed": 1, "changes": {"h1": ["restart llamactl@0.service"]}, '
                    '"command": "llamactl restart inv.yaml", "ok": true, "release": null, "time": "T", '
                    '"version": "0.1.0", "who": "w@h"}\n')
    held = b'{"owner": "a@b", "since": "S", "command": "llamactl deploy x"}'
    assert lock.describe(held) == "held by a@b since S (llamactl deploy x)"
    assert lock.describe(b"garbage") == lock.describe(b"[1]") == "held (unreadable lock file)"


def test_nginx_commands() -> None:
    control = nginx.NginxControl()
    assert control.test.shell() == "nginx -t"
    assert control.is_active().shell() == "systemctl is-active --quiet nginx.service"
    reload, pid = control.reload_commands(under_systemd=True)
    assert (reload.shell(), pid.shell()) == ("systemctl reload nginx.service",
                                             "systemctl show --property=MainPID --value nginx.service")
    reload, pid = control.reload_commands(under_systemd=False)
    assert (reload.shell(), pid.shell()) == ("nginx -s reload", "cat /run/nginx.pid")
    prefixed = nginx.NginxControl.for_prefix("/tmp/ngx/", "/tmp/ngx/nginx.conf")
    assert prefixed.test.shell() == "nginx -t -p /tmp/ngx/ -c /tmp/ngx/nginx.conf"
    reload, pid = prefixed.reload_commands(under_systemd=True)  # explicit commands win
    assert (reload.shell(), pid.display()) == ("nginx -s reload -p /tmp/ngx/ -c /tmp/ngx/nginx.conf",
                                               "cat /tmp/ngx/nginx.pid")
    assert nginx.workers_command(100).shell() == "ps -o pid= --ppid 100"
    assert nginx.remove_command("/etc/nginx/conf.d/x.conf").shell() == "rm -f /etc/nginx/conf.d/x.conf"
    assert nginx.parse_pids(" 101\n 102\nx\n") == frozenset({101, 102})


def test_unit_commands() -> None:
    reset, start = units.restart_commands(["llamactl@0.service", "llamactl@1.service"])
    assert reset.shell() == "systemctl reset-failed llamactl@0.service llamactl@1.service"
    assert start.shell() == "systemctl restart llamactl@0.service llamactl@1.service"
    _, start = units.restart_commands(["llamactl@0.service"], "start", "start instances")
    assert start.shell() == "systemctl start llamactl@0.service" and start.description == "start instances"
    assert units.show_command(["llamactl@0.service"]).shell() == (
        "systemctl show llamactl@0.service -p Id,ActiveState,SubState,NRestarts")
    assert units.journal_command(["llamactl@0.service"], 15, output="cat").shell() == (
        "env SYSTEMD_COLORS=0 journalctl --no-pager -o cat -n 15 -u llamactl@0.service")


def test_release_activation() -> None:
    assert activate_command("/opt/llamactl", "0.1.0-abc").display() == (
        "ln -sfn /opt/llamactl/releases/0.1.0-abc /opt/llamactl/current.new && "
        "mv -T /opt/llamactl/current.new /opt/llamactl/current && "
        "echo 0.1.0-abc >> /opt/llamactl/releases/.history")


def test_fact_commands() -> None:
    desired = DesiredHost(
        name="h1", python="/usr/bin/python3", install_dir="/opt/llamactl", gpus=(0,),
        instances=(Instance("h1", 0, 0, "10.0.0.1", 8000),),
        files={"/etc/llamactl/instance-0.env": RenderedFile(b"", 0o600)},
        release=Release("r", Artifact(Path("/w.whl"), "w.whl", "", 1)), pip=PipSettings(),
        model_path="/srv/m", model_upload=None, service_user="llamactl")
    argv = facts_command(desired).argv
    assert argv[:2] == ("/usr/bin/python3", "-c") and json.loads(argv[3]) == {
        "env_dir": "/etc/llamactl", "files": ["/etc/llamactl/instance-0.env"], "gpus": True,
        "install_dir": "/opt/llamactl", "model_manifest": None, "model_path": "/srv/m",
        "units": ["llamactl@0.service"], "user": "llamactl", "wheelhouse_dir": "/opt/llamactl/wheelhouse"}
    argv = releases_command("/usr/bin/python3", "/opt/llamactl").argv
    assert json.loads(argv[3]) == {
        "env_dir": "/etc/llamactl", "files": [], "gpus": False, "install_dir": "/opt/llamactl",
        "model_manifest": None, "model_path": None, "units": [], "user": None, "wheelhouse_dir": "/nonexistent"}
