"""Redis' state for ``llamactl status`` (inventory ``redis:``): a command run over SSH on the Redis host, a pure
parser, and the edge that runs it. redis-cli gets the password from the config on the host (never argv).

Shown: whether it answers, memory used / maxmemory, the jobs backlog (stream entries not ended, of which
claimed by an instance), the shared cache's bytes, and with ``--keys`` the cluster-wide usage per key name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llamactl.errors import LlamactlError
from llamactl.plan.command import Command, quote
from llamactl.plan.redis import REDIS_UNIT
from llamactl.state.names import CACHE_BYTES, GROUP, STREAM, USAGE

if TYPE_CHECKING:
    from llamactl.inventory import Inventory

USAGE_FIELDS = ("requests", "rejected", "prompt_tokens", "completion_tokens")


@dataclass
class RedisState:
    host: str
    unit: str = "unknown"
    answers: bool = False
    error: str | None = None
    used_memory: int | None = None
    maxmemory: int | None = None
    backlog: int | None = None  # job stream entries not ended (queued + running)
    claimed: int | None = None  # of which claimed by an instance (running, or about to be reclaimed)
    cache_bytes: int | None = None
    usage: dict[str, dict[str, int]] = field(default_factory=dict)  # key name -> USAGE_FIELDS

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "unit": self.unit, "answers": self.answers, "error": self.error,
                "used_memory_bytes": self.used_memory, "maxmemory_bytes": self.maxmemory,
                "jobs_backlog": self.backlog, "jobs_claimed": self.claimed, "cache_bytes": self.cache_bytes,
                **({"keys": self.usage} if self.usage else {})}

    def line(self) -> str:
        """One human line for the status table's footer."""
        if not self.answers:
            return f"redis on {self.host}: DOWN (unit {self.unit}){': ' + self.error if self.error else ''}"
        mib = 1024 * 1024
        mem = f"{(self.used_memory or 0) / mib:.1f}/{(self.maxmemory or 0) / mib:.0f} MiB"
        return (f"redis on {self.host}: up (unit {self.unit}), memory {mem}, jobs backlog {self.backlog} "
                f"({self.claimed} claimed), shared cache {(self.cache_bytes or 0) / mib:.1f} MiB")


def state_command(inv: Inventory, keys: bool) -> Command:
    assert inv.redis is not None
    cli = f"redis-cli --no-auth-warning -h 127.0.0.1 -p {inv.redis.port}"
    script = (
        f"echo \"unit=$(systemctl is-active {quote(REDIS_UNIT)} 2>/dev/null)\"; "
        f"REDISCLI_AUTH=$(sed -n 's/^requirepass //p' {quote(inv.redis.config_path)} 2>/dev/null); "
        "export REDISCLI_AUTH; "
        f"echo \"ping=$({cli} ping 2>&1 | head -n 1)\"; "
        f"{cli} info memory 2>/dev/null | tr -d '\\r' | grep -E '^(used_memory|maxmemory):' | tr ':' '='; "
        f"echo \"backlog=$({cli} xlen {STREAM} 2>/dev/null)\"; "
        f"echo \"claimed=$({cli} xpending {STREAM} {GROUP} 2>/dev/null | head -n 1)\"; "
        f"echo \"cache_bytes=$({cli} get {quote(CACHE_BYTES)} 2>/dev/null)\"; "
    )
    if keys:
        fields = " ".join(USAGE_FIELDS)
        script += (f"{cli} --scan --pattern {quote(USAGE + '*')} 2>/dev/null | while read -r k; do "
                   f"echo \"usage=$k $({cli} hmget \"$k\" {fields} | tr '\\n' ' ')\"; done; ")
    return Command.sh(script + "true", "read Redis' state")


def _int(value: str) -> int | None:
    return int(value) if value.strip().lstrip("-").isdigit() else None


def parse_state(host: str, stdout: str) -> RedisState:
    state = RedisState(host)
    for line in stdout.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if key == "unit":
            state.unit = value or "unknown"
        elif key == "ping":
            state.answers = value == "PONG"
            state.error = None if state.answers else (value[:200] or "no answer")
        elif key == "used_memory":
            state.used_memory = _int(value)
        elif key == "maxmemory":
            state.maxmemory = _int(value)
        elif key == "backlog":
            state.backlog = _int(value) if value else 0
        elif key == "claimed":
            state.claimed = _int(value) if value else 0
        elif key == "cache_bytes":
            state.cache_bytes = _int(value) if value else 0
        elif key == "usage":
            name, _, counts = value.partition(" ")
            numbers = counts.split()
            state.usage[name.removeprefix(USAGE)] = {
                f: (_int(numbers[i]) or 0) if i < len(numbers) else 0 for i, f in enumerate(USAGE_FIELDS)}
    return state


def read_redis_state(inv: Inventory, timeout_s: float, keys: bool = False) -> RedisState:
    """Over SSH on the ``redis:`` host; a connection failure is reported in the state, not raised."""
    from llamactl.ops.connect import HostPool

    assert inv.redis is not None
    try:
        with HostPool(inv) as pool:
            result = pool.executor(inv.redis.host).run(state_command(inv, keys), check=False,
                                                       timeout_s=max(timeout_s, 5.0))
    except LlamactlError as exc:
        return RedisState(inv.redis.host, error=f"cannot read it over SSH: {exc}")
    return parse_state(inv.redis.host, result.stdout)
