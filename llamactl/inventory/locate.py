"""Which inventory (or endpoint) a command uses when none is named: one rule for every command.

Inventory: the argument, else ``$LLAMACTL_INVENTORY``, else ``./inventory.yaml``.
Endpoint (``infer``): ``--endpoint``, else ``--inventory``, else ``$LLAMACTL_ENDPOINT``, else the inventory
found as above. Pure: the environment, the working directory and the file test are passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from llamactl.errors import UsageError

INVENTORY_ENV = "LLAMACTL_INVENTORY"
ENDPOINT_ENV = "LLAMACTL_ENDPOINT"
DEFAULT_INVENTORY = "inventory.yaml"

IsFile = Callable[[Path], bool]


def _is_file(path: Path) -> bool:
    return path.is_file()


def _search_text(cwd: Path) -> str:
    return (f"pass the INVENTORY argument, set ${INVENTORY_ENV}, or run where ./{DEFAULT_INVENTORY} exists "
            f"(looked for {cwd / DEFAULT_INVENTORY})")


def locate_inventory(
    given: Path | None, env: Mapping[str, str], cwd: Path, is_file: IsFile = _is_file
) -> Path:
    """The inventory file to load; relative results are relative to ``cwd``. Raises ``UsageError``."""
    if given is not None:
        return given
    named = env.get(INVENTORY_ENV, "").strip()
    if named:
        path = Path(named)
        if not is_file(path if path.is_absolute() else cwd / path):
            raise UsageError(f"${INVENTORY_ENV} names {named}: no such inventory file")
        return path
    if is_file(cwd / DEFAULT_INVENTORY):
        return Path(DEFAULT_INVENTORY)
    raise UsageError(f"no inventory given: {_search_text(cwd)}")


@dataclass(frozen=True)
class EndpointSource:
    """Either a URL to use as it is, or the inventory whose balancer endpoint to use."""

    url: str | None = None
    inventory: Path | None = None


def locate_endpoint(
    endpoint: str | None, inventory: Path | None, env: Mapping[str, str], cwd: Path,
    is_file: IsFile = _is_file,
) -> EndpointSource:
    """Where ``infer`` sends its request: the command line first, then the environment, then ./inventory.yaml."""
    if endpoint and inventory is not None:
        raise UsageError("give either --endpoint or --inventory, not both")
    if endpoint:
        return EndpointSource(url=endpoint.rstrip("/"))
    if inventory is not None:
        return EndpointSource(inventory=inventory)
    from_env = env.get(ENDPOINT_ENV, "").strip()
    if from_env:
        return EndpointSource(url=from_env.rstrip("/"))
    try:
        return EndpointSource(inventory=locate_inventory(None, env, cwd, is_file))
    except UsageError as exc:
        if env.get(INVENTORY_ENV, "").strip():
            raise
        raise UsageError(
            f"no endpoint given: pass --endpoint URL or --inventory FILE, set ${ENDPOINT_ENV} or "
            f"${INVENTORY_ENV}, or run where ./{DEFAULT_INVENTORY} exists (looked for {cwd / DEFAULT_INVENTORY})"
        ) from exc
