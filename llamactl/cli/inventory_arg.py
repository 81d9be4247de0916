"""The INVENTORY argument every inventory command shares, resolved by ``llamactl.inventory.locate``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from llamactl.inventory.locate import DEFAULT_INVENTORY, INVENTORY_ENV, locate_inventory

if TYPE_CHECKING:
    from llamactl.inventory import Inventory

HELP = f"The inventory YAML file (default: ${INVENTORY_ENV}, else ./{DEFAULT_INVENTORY})."


def inventory_argument() -> Any:
    """``inventory: Path | None = inventory_argument()`` in a command's signature."""
    return typer.Argument(None, metavar="INVENTORY", help=HELP, show_default=False)


def inventory_path(given: Path | None) -> Path:
    return locate_inventory(given, os.environ, Path.cwd())


def load(given: Path | None) -> Inventory:
    """The command's inventory, found and loaded (``UsageError`` / ``InventoryError`` otherwise)."""
    from llamactl.inventory import load_inventory

    return load_inventory(inventory_path(given))
