"""How operations reach a host: the one way to connect, and a pool of connections by host name.

Every SSH connection of deploy, restart, rollback, watch, logs and ``status --deep`` is opened by
``connect_host`` (tests replace it, or hand a ``Connector`` to ``HostPool``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llamactl.inventory import Inventory
    from llamactl.remote.base import Executor

# (host name, address, inventory SSH settings) -> a connected executor; raises ConnectError.
Connector = Callable[[str, str, Any], "Executor"]


def connect_host(name: str, address: str, ssh: Any) -> Executor:
    from llamactl.remote.ssh import connect
    from llamactl.remote.target import SSHTarget

    return connect(SSHTarget.from_settings(name, address, ssh))


def host_address(inv: Inventory, name: str) -> tuple[str, Any]:
    """(address, SSH settings) of a balancer host or a server host, by name."""
    for bh in inv.balancer.hosts:
        if bh.name == name:
            return bh.address, bh.ssh
    host = inv.host(name)
    return host.address, host.ssh


class HostPool:
    """One executor per host, connected on first use, with a lock per host: executors are not
    required to be thread-safe, and a batch works on several instances at once. Use it as a context
    manager, or call ``close``."""

    def __init__(self, inv: Inventory, connect: Connector | None = None,
                 given: Mapping[str, Executor] | None = None) -> None:
        self._inv = inv
        self._connect: Connector = connect or connect_host  # looked up now: tests replace connect_host
        self._given = dict(given or {})  # the caller's executors: used, never closed or dropped
        self._executors: dict[str, Executor] = dict(self._given)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def __enter__(self) -> HostPool:  # noqa: PYI034 - not subclassed
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, name: str) -> tuple[Executor, threading.Lock]:
        """The host's executor (connecting if needed; raises ConnectError) and the lock to hold while using it."""
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self._executors:
                address, ssh = host_address(self._inv, name)
                self._executors[name] = self._connect(name, address, ssh)
        return self._executors[name], lock

    def executor(self, name: str) -> Executor:
        return self.get(name)[0]

    def lock_host(self) -> Executor:
        """The first balancer host: where the deploy lock and the audit log live."""
        return self.executor(self._inv.balancer.hosts[0].name)

    def balancers(self) -> dict[str, Executor]:
        return {bh.name: self.executor(bh.name) for bh in self._inv.balancer.hosts}

    def drop(self, name: str) -> None:
        """Close and forget a host's executor (after a connection error, or when done with the host)
        so the next use reconnects."""
        if name in self._given:
            return
        with self._guard:
            executor = self._executors.pop(name, None)
        if executor is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail too
                executor.close()

    def close(self) -> None:
        for name in list(self._executors):
            self.drop(name)
