"""~/.ssh/config resolution (through paramiko.SSHConfig) and ProxyJump parsing.

Only the options llamactl acts on are extracted: HostName, User, Port, IdentityFile, ProxyJump.
How they combine with the inventory is decided in ``target.py``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import paramiko

from llamactl.errors import UsageError

DEFAULT_SSH_CONFIG = Path("~/.ssh/config")
# Tests and unusual setups point llamactl at another file without touching ~/.ssh.
SSH_CONFIG_ENV = "LLAMACTL_SSH_CONFIG"


@dataclass(frozen=True)
class SSHConfigEntry:
    """What ssh_config says about one host. None / () = the file does not set it."""

    hostname: str | None = None
    user: str | None = None
    port: int | None = None
    identity_files: tuple[str, ...] = ()
    proxy_jump: str | None = None

    def fill(self, other: SSHConfigEntry) -> SSHConfigEntry:
        """Keep our values, take ``other``'s where ours are unset (ssh's first-value-wins rule)."""
        return SSHConfigEntry(
            hostname=self.hostname or other.hostname,
            user=self.user or other.user,
            port=self.port if self.port is not None else other.port,
            identity_files=self.identity_files + tuple(f for f in other.identity_files
                                                       if f not in self.identity_files),
            proxy_jump=self.proxy_jump or other.proxy_jump,
        )


@dataclass(frozen=True)
class JumpSpec:
    """One hop of ``[user@]host[:port]`` (also ``ssh://user@host:port`` and ``[v6addr]:port``)."""

    host: str
    user: str | None = None
    port: int | None = None


def config_path(explicit: str | Path | None = None) -> Path:
    chosen = explicit or os.environ.get(SSH_CONFIG_ENV) or DEFAULT_SSH_CONFIG
    return Path(chosen).expanduser()


def load_config(path: Path) -> paramiko.SSHConfig | None:
    """The parsed file, or None when it does not exist. A malformed file is the user's to fix.
    Parsed once per (path, mtime, size): a deploy resolves every host against the same file."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ssh config: {exc.strerror or exc}") from exc
    return _parse(str(path), info.st_mtime_ns, info.st_size)


@functools.lru_cache(maxsize=8)
def _parse(path: str, _mtime_ns: int, _size: int) -> paramiko.SSHConfig | None:
    try:
        return paramiko.SSHConfig.from_path(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, paramiko.ConfigParseError) as exc:
        raise UsageError(f"{path}: cannot read ssh config: {exc}") from exc


def lookup(config: paramiko.SSHConfig, alias: str) -> SSHConfigEntry:
    try:
        found = config.lookup(alias)
    except (ValueError, paramiko.ConfigParseError, paramiko.CouldNotCanonicalize) as exc:
        raise UsageError(f"ssh config for {alias}: {exc}") from exc
    hostname = found.get("hostname")
    port = found.get("port")
    jump = found.get("proxyjump")
    return SSHConfigEntry(
        # paramiko fills HostName with the alias itself when the file does not set it.
        hostname=hostname if hostname and hostname != alias else None,
        user=found.get("user"),
        port=_port(port, f"ssh config Port for {alias}") if port is not None else None,
        identity_files=tuple(found.get("identityfile", [])),
        proxy_jump=None if jump is None or jump.lower() == "none" else jump,
    )


def lookup_host(config: paramiko.SSHConfig | None, name: str, address: str) -> SSHConfigEntry:
    """Settings for an inventory host: sections matching its name first, then its address."""
    if config is None:
        return SSHConfigEntry()
    found = lookup(config, name)
    return found if address == name else found.fill(lookup(config, address))


def _port(text: str, what: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise UsageError(f"{what}: {text!r} is not a TCP port (1-65535)")
    return port


def parse_jump(spec: str) -> list[JumpSpec]:
    """``ProxyJump``/inventory ``jump``: comma-separated hops, connected through in order."""
    hops: list[JumpSpec] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            raise UsageError(f"jump {spec!r}: empty hop (expected [user@]host[:port][,...])")
        rest = part.removeprefix("ssh://")
        user, _, hostport = rest.rpartition("@")
        port: int | None = None
        if hostport.startswith("["):  # [v6-address]:port
            host, _, tail = hostport[1:].partition("]")
            if tail:
                port = _port(tail.removeprefix(":"), f"jump {part!r}")
        elif hostport.count(":") == 1:
            host, _, port_text = hostport.partition(":")
            port = _port(port_text, f"jump {part!r}")
        else:
            host = hostport
        if not host or (user == "" and "@" in rest):
            raise UsageError(f"jump {part!r}: expected [user@]host[:port]")
        hops.append(JumpSpec(host=host, user=user or None, port=port))
    return hops
