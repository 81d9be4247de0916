"""How operations reach a host: one seam, so tests can hand in other executors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llamactl.remote.base import Executor

# (host name, address, inventory SSH settings) -> a connected executor; raises ConnectError.
Connector = Callable[[str, str, Any], Executor]


def connect_host(name: str, address: str, ssh: Any) -> Executor:
    from llamactl.remote.ssh import connect
    from llamactl.remote.target import SSHTarget

    return connect(SSHTarget.from_settings(name, address, ssh))
