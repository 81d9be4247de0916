"""The small inventory that section tests (``redis:``, ``balancer.vip``, ``prometheus:``, keepalived) start from,
and loading inventory text from a temporary file.

Error messages carry YAML lines, so the text is laid out the same way every time: the CPU hosts start on line 9,
and what a test appends follows the balancer hosts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from llamactl.errors import InventoryError
from llamactl.inventory import Inventory, load_inventory


def _hosts(hosts: Mapping[str, str], indent: str) -> str:
    return "".join(f"{indent}{name}: {{address: {value}}}\n" for name, value in hosts.items())


def inventory_yaml(nodes: Mapping[str, str], balancers: Mapping[str, str], *, cluster: str = "lab",
                   balancer: str = "", sections: str = "") -> str:
    """A ``version: 1`` inventory: ``nodes`` in group ``cpu`` (no GPUs by default), ``balancers`` as the balancer
    hosts, then ``balancer``'s other keys (indented lines) and top-level ``sections``.

    A host's value is its address, optionally followed by more keys of its mapping: ``"10.0.0.12, gpus: 2"``.
    """
    return ("version: 1\n"
            f"cluster: {cluster}\n"
            "defaults:\n"
            "  gpus: 0\n"
            "  model: {source: /srv/model}\n"
            "groups:\n"
            "  cpu:\n"
            "    hosts:\n"
            f"{_hosts(nodes, '      ')}"
            "balancer:\n"
            "  hosts:\n"
            f"{_hosts(balancers, '    ')}"
            f"{balancer}{sections}")


def load_text(tmp_path: Path, text: str, env: Mapping[str, str]) -> Inventory:
    """Write ``text`` to ``tmp_path/inv.yaml`` and load it."""
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    return load_inventory(path, env=env)


def load_problems(tmp_path: Path, text: str, env: Mapping[str, str]) -> list[str]:
    """The problems loading ``text`` reports (an ``InventoryError``, exit code 2), the file's path shown as INV."""
    with pytest.raises(InventoryError) as caught:
        load_text(tmp_path, text, env)
    assert caught.value.exit_code == 2
    return [str(p).replace(str(tmp_path / "inv.yaml"), "INV", 1) for p in caught.value.problems]
