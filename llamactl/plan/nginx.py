"""The commands that test, reload and inspect nginx on a balancer host, and the parser of their output. Pure.

``llamactl.ops.balancer`` runs them: upload, test, reload, confirm that new workers started.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llamactl.plan.command import Command, quote

NGINX_UNIT = "nginx.service"
NGINX_PID_FILE = "/run/nginx.pid"


@dataclass(frozen=True)
class NginxControl:
    """How to test, reload and inspect nginx on a balancer host.

    ``reload=None`` picks ``systemctl reload nginx`` when nginx is active under systemd, else
    ``nginx -s reload`` (see ``reload_commands``). ``master_pid`` prints the master's PID; its children
    are the workers whose replacement proves a reload took.
    """

    test: Command = field(default_factory=lambda: Command.of("nginx", "-t"))
    reload: Command | None = None
    master_pid: Command | None = None
    systemd_unit: str = NGINX_UNIT
    confirm_timeout_s: float = 10.0

    @classmethod
    def for_prefix(cls, prefix: str, conf: str) -> NginxControl:
        """An nginx started as ``nginx -p PREFIX -c CONF`` (tests, unprivileged setups)."""
        flags = ("-p", prefix, "-c", conf)
        return cls(
            test=Command.of("nginx", "-t", *flags),
            reload=Command.of("nginx", "-s", "reload", *flags),
            master_pid=Command.sh(f"cat {quote(prefix.rstrip('/') + '/nginx.pid')}"),
        )

    def is_active(self) -> Command:
        """Exit 0 when nginx runs under systemd (decides how to reload it)."""
        return Command.of("systemctl", "is-active", "--quiet", self.systemd_unit)

    def reload_commands(self, under_systemd: bool) -> tuple[Command, Command]:
        """(reload, print the master's PID): the explicit ones, else systemd's or nginx's own."""
        reload = self.reload or (Command.of("systemctl", "reload", self.systemd_unit) if under_systemd
                                 else Command.of("nginx", "-s", "reload"))
        pid = self.master_pid or (Command.of("systemctl", "show", "--property=MainPID", "--value", self.systemd_unit)
                                  if under_systemd else Command.of("cat", NGINX_PID_FILE))
        return reload, pid


def workers_command(master_pid: int) -> Command:
    """The PIDs of the master's children (workers and cache processes), one a line."""
    return Command.of("ps", "-o", "pid=", "--ppid", str(master_pid))


def remove_command(path: str) -> Command:
    """Remove a config that failed its test and had no predecessor."""
    return Command.of("rm", "-f", path)


def parse_pids(text: str) -> frozenset[int]:
    return frozenset(int(tok) for tok in text.split() if tok.isdigit())
