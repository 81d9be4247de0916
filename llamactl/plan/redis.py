"""Redis on its host (inventory ``redis:``): facts command, pure parser and planner. No side effects.

Deploy reads the Redis host's state in one round trip (``facts_command`` -> ``parse_facts``), then
``plan_redis`` decides: install the distribution's ``redis-server`` when it is missing (or stop at
preflight with the exact command when the host cannot), upload the rendered config (0600) and the unit,
reload/enable/start or restart only what changed. ``ping_command`` checks it answers with AUTH + PING;
the password is read from the config on the host, so it never appears in argv, logs or dry-run output.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llamactl.plan.command import Command, quote
from llamactl.plan.deploy import HostPlan, Upload
from llamactl.plan.render import RenderedFile, _render, render_redis_files

if TYPE_CHECKING:
    from llamactl.inventory import Inventory

REDIS_UNIT = "llamactl-redis.service"
REDIS_UNIT_PATH = f"/etc/systemd/system/{REDIS_UNIT}"
DEFAULT_SERVER = "/usr/bin/redis-server"
REDIS_USER = "redis"  # made by Debian's redis-server package
INSTALL = "apt-get update && apt-get install -y --no-install-recommends redis-server"
_ACTIVE = ("active", "activating", "reloading")


@dataclass(frozen=True)
class RedisFacts:
    systemd: bool
    server: str | None  # path of redis-server, None when missing
    cli: bool  # redis-cli present (Debian: redis-tools, a dependency of redis-server)
    apt: bool
    candidate: str | None  # apt's candidate version of redis-server, None: none known
    user: bool  # the redis system user exists
    files: dict[str, str | None] = field(default_factory=dict)  # path -> sha256 (None: missing)
    active: str = ""
    enabled: str = ""


def facts_command(inv: Inventory) -> Command:
    """One POSIX shell round trip printing ``key=value`` lines for ``parse_facts``."""
    assert inv.redis is not None
    files = [inv.redis.config_path, REDIS_UNIT_PATH]
    sums = " ".join(quote(p) for p in files)
    script = (
        '[ -d /run/systemd/system ] && echo systemd=yes; '
        'p=$(command -v redis-server 2>/dev/null || { [ -x /usr/sbin/redis-server ] && echo /usr/sbin/redis-server; }); '
        'echo "server=$p"; '
        'command -v redis-cli >/dev/null 2>&1 && echo cli=yes; '
        'command -v apt-get >/dev/null 2>&1 && echo apt=yes; '
        'c=$(apt-cache policy redis-server 2>/dev/null | sed -n "s/^ *Candidate: *//p"); echo "candidate=$c"; '
        'id -u redis >/dev/null 2>&1 && echo user=yes; '
        f'for f in {sums}; do if [ -f "$f" ]; then echo "file=$(sha256sum "$f")"; fi; done; '
        f'systemctl show -p ActiveState,UnitFileState {quote(REDIS_UNIT)} 2>/dev/null | sed "s/^/unit./"; '
        'true'
    )
    return Command.sh(script, "read the Redis host's state")


def parse_facts(stdout: str) -> RedisFacts:
    """Pure parser of ``facts_command``'s output."""
    values: dict[str, str] = {}
    files: dict[str, str | None] = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "file":
            digest, _, path = value.partition("  ")
            files[path.strip()] = digest.strip()
        else:
            values[key.strip()] = value.strip()
    candidate = values.get("candidate") or None
    return RedisFacts(
        systemd=values.get("systemd") == "yes",
        server=values.get("server") or None,
        cli=values.get("cli") == "yes",
        apt=values.get("apt") == "yes",
        candidate=None if candidate in (None, "(none)") else candidate,
        user=values.get("user") == "yes",
        files=files,
        active=values.get("unit.ActiveState", ""),
        enabled=values.get("unit.UnitFileState", ""),
    )


def render_unit(inv: Inventory, redis_server: str) -> RenderedFile:
    assert inv.redis is not None
    text = _render("llamactl-redis.service.j2", cluster=inv.cluster, config_path=inv.redis.config_path,
                   data_dir=inv.redis.data_dir, redis_server=redis_server, user=REDIS_USER)
    return RenderedFile(text, 0o644)


def desired_files(inv: Inventory, facts: RedisFacts) -> dict[str, RenderedFile]:
    """The config (0600, it holds the password) and the unit for the server the host has (or will have)."""
    files = dict(render_redis_files(inv))
    files[REDIS_UNIT_PATH] = render_unit(inv, facts.server or DEFAULT_SERVER)
    return files


def plan_redis(inv: Inventory, facts: RedisFacts) -> HostPlan:
    """What brings the Redis host to the desired state; ``problems`` when it cannot (nothing then runs)."""
    assert inv.redis is not None
    plan = HostPlan(host=inv.redis.host)
    if not facts.systemd:
        plan.problems.append("systemd is not running as the init system (/run/systemd/system is missing): "
                             "deploy runs Redis as a systemd unit")
    installing = facts.server is None or not facts.cli or not facts.user
    if installing and not (facts.apt and facts.candidate):
        why = "no apt-get" if not facts.apt else "apt knows no redis-server package"
        plan.problems.append(f"redis-server (with redis-cli and the redis user) is not installed and this host "
                             f"cannot install it ({why}); install it yourself, as root on {inv.redis.host}: "
                             f"`{INSTALL}`")
    if plan.problems:
        return plan
    if installing:
        plan.run(Command.sh(f"DEBIAN_FRONTEND=noninteractive {INSTALL}", "install redis-server"),
                 "install redis-server", f"installed redis-server {facts.candidate} (apt)")
    changed: set[str] = set()
    for path, rendered in sorted(desired_files(inv, facts).items()):
        if facts.files.get(path) == hashlib.sha256(rendered.content).hexdigest():
            continue
        changed.add(path)
        plan.steps.append(Upload(path, "Redis config" if path != REDIS_UNIT_PATH else "Redis unit",
                                 mode=rendered.mode, content=rendered.content, secret=rendered.mode & 0o077 == 0))
        plan.changes.append(f"{'created' if facts.files.get(path) is None else 'updated'} {path}")
    if REDIS_UNIT_PATH in changed:
        plan.run(Command.of("systemctl", "daemon-reload"), "unit changed", "reloaded systemd units")
    if facts.enabled != "enabled":
        plan.run(Command.of("systemctl", "enable", REDIS_UNIT), "enable Redis", f"enabled {REDIS_UNIT}")
    if facts.active not in _ACTIVE:
        plan.run(Command.of("systemctl", "start", REDIS_UNIT), "start Redis", f"started {REDIS_UNIT}")
    elif changed:
        plan.run(Command.of("systemctl", "restart", REDIS_UNIT), "restart Redis",
                 f"restarted {REDIS_UNIT} (config or unit changed)")
    return plan


def ping_command(inv: Inventory, timeout_s: float = 30.0) -> Command:
    """AUTH + PING on the inventory address until PONG (Redis answers LOADING while it reads its
    append-only file). The password comes from the config on the host into redis-cli's environment."""
    assert inv.redis is not None
    tries = max(1, int(timeout_s / 0.25))
    cli = (f"redis-cli --no-auth-warning -h {quote(inv.redis.address)} -p {inv.redis.port} ping")
    script = (
        f"REDISCLI_AUTH=$(sed -n 's/^requirepass //p' {quote(inv.redis.config_path)}); export REDISCLI_AUTH; "
        f"i=0; while [ $i -lt {tries} ]; do out=$({cli} 2>&1); "
        '[ "$out" = PONG ] && echo PONG && exit 0; i=$((i+1)); sleep 0.25; done; '
        'echo "Redis did not answer PONG to AUTH + PING: $out" >&2; exit 1'
    )
    return Command.sh(script, "check Redis answers (AUTH + PING)")
