"""SSHTarget: everything needed to reach one host, with the inventory and ~/.ssh/config merged.

Precedence, per setting (HostName, User, Port, IdentityFile, ProxyJump):
  1. a value the inventory sets explicitly (at any level: defaults, group or host);
  2. ~/.ssh/config (when ``use_ssh_config``), sections matching the host's name, then its address;
  3. the inventory's built-in default, then ssh's own (local user name, port 22, ~/.ssh/id_*).
The address is the inventory's, except that a config HostName is used when the inventory gives no
separate address (address == name). Jump hosts are resolved through ssh config like OpenSSH does:
a hop's user is the one in the spec, else its config User, else the local user (not the target's).
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from llamactl.errors import UsageError
from llamactl.remote import sshconfig
from llamactl.remote.hostkeys import HostKeyPolicy


def _local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "root"


@dataclass(frozen=True)
class Hop:
    """A jump host: connected to first; the next hop or the target is reached through it."""

    name: str
    address: str
    port: int = 22
    user: str = field(default_factory=_local_user)
    identity_files: tuple[Path, ...] = ()


@dataclass(frozen=True)
class SSHTarget:
    name: str
    address: str
    port: int = 22
    user: str = field(default_factory=_local_user)
    identity_files: tuple[Path, ...] = ()
    jump: tuple[Hop, ...] = ()
    known_hosts: Path = field(default_factory=lambda: Path("~/.ssh/known_hosts").expanduser())
    host_key_policy: HostKeyPolicy = "strict"
    connect_timeout_s: float = 10.0
    allow_agent: bool = True
    # Without an identity file, try ~/.ssh/id_ed25519, id_ecdsa, id_rsa like ssh does.
    look_for_keys: bool = True
    # Transient connect failures (refused, timeout, unreachable) are retried this many times.
    retries: int = 2
    retry_backoff_s: float = 0.5
    # Run commands and write files as root through `sudo -n` (a no-op when the user is root).
    become: bool = False

    def __post_init__(self) -> None:
        # Accept str paths from callers; expand ~ once here rather than at every use.
        object.__setattr__(self, "known_hosts", Path(self.known_hosts).expanduser())
        object.__setattr__(self, "identity_files", tuple(Path(p).expanduser() for p in self.identity_files))

    @property
    def where(self) -> str:
        via = f" via {' -> '.join(h.name for h in self.jump)}" if self.jump else ""
        return f"{self.user}@{self.address}:{self.port}{via}"

    def as_hop(self) -> Hop:
        return Hop(self.name, self.address, self.port, self.user, self.identity_files)

    @classmethod
    def from_settings(
        cls, name: str, address: str, ssh: Any, *, ssh_config_path: str | Path | None = None
    ) -> SSHTarget:
        """Build from an inventory ``SSHSettings`` (any object with its attributes)."""
        explicit = _explicit_fields(ssh)

        def given(attr: str) -> Any:
            value = getattr(ssh, attr, None)
            return value if attr in explicit and value is not None else None

        def default(attr: str) -> Any:
            return getattr(ssh, attr, None)

        use_config = bool(getattr(ssh, "use_ssh_config", True))
        config = sshconfig.load_config(sshconfig.config_path(ssh_config_path)) if use_config else None
        found = sshconfig.lookup_host(config, name, address)

        if address == name and found.hostname:
            address = found.hostname
        identity = given("identity_file")
        identity_files = (
            (_path(identity),) if identity is not None
            else tuple(_path(p) for p in found.identity_files) or _opt_path(default("identity_file"))
        )
        jump_spec = given("jump") or found.proxy_jump or default("jump")
        policy = str(default("host_key_policy") or "strict")
        if policy not in ("strict", "accept-new"):
            raise UsageError(f"{name}: ssh.host_key_policy {policy!r}: expected strict or accept-new")
        return cls(
            name=name,
            address=address,
            port=int(given("port") or found.port or default("port") or 22),
            user=str(given("user") or found.user or default("user") or _local_user()),
            identity_files=identity_files,
            jump=tuple(_hop(config, j) for j in sshconfig.parse_jump(jump_spec)) if jump_spec else (),
            known_hosts=_path(default("known_hosts") or "~/.ssh/known_hosts"),
            host_key_policy=cast(HostKeyPolicy, policy),
            connect_timeout_s=float(default("connect_timeout_s") or 10.0),
            become=bool(default("become")),  # inventory only: ssh config has no such setting
        )


def _explicit_fields(ssh: Any) -> set[str]:
    # pydantic models know which fields came from the input; other objects: every non-None value.
    fields_set = getattr(ssh, "model_fields_set", None)
    if isinstance(fields_set, (set, frozenset)):
        return set(fields_set)
    return {k for k, v in vars(ssh).items() if v is not None} if hasattr(ssh, "__dict__") else set()


def _path(value: str | Path) -> Path:
    return Path(value).expanduser()


def _opt_path(value: str | Path | None) -> tuple[Path, ...]:
    return (_path(value),) if value else ()


def _hop(config: Any, spec: sshconfig.JumpSpec) -> Hop:
    found = sshconfig.lookup_host(config, spec.host, spec.host)
    return Hop(
        name=spec.host,
        address=found.hostname or spec.host,
        port=spec.port or found.port or 22,
        user=spec.user or found.user or _local_user(),
        identity_files=tuple(_path(p) for p in found.identity_files),
    )
