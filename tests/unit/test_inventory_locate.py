"""Which inventory / endpoint a command uses: argument, then environment, then ./inventory.yaml (pure)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from llamactl.errors import UsageError
from llamactl.inventory.locate import EndpointSource, locate_endpoint, locate_inventory

CWD = Path("/work/site")


def files(*names: str) -> Callable[[Path], bool]:
    present = {CWD / n if not n.startswith("/") else Path(n) for n in names}
    return lambda path: path in present


@pytest.mark.parametrize(("given", "env", "present", "expected"), [
    (Path("x.yaml"), {"LLAMACTL_INVENTORY": "/etc/y.yaml"}, ["inventory.yaml"], Path("x.yaml")),
    (None, {"LLAMACTL_INVENTORY": "/etc/y.yaml"}, ["/etc/y.yaml", "inventory.yaml"], Path("/etc/y.yaml")),
    (None, {"LLAMACTL_INVENTORY": "sub/y.yaml"}, ["sub/y.yaml"], Path("sub/y.yaml")),
    (None, {"LLAMACTL_INVENTORY": "  "}, ["inventory.yaml"], Path("inventory.yaml")),
    (None, {}, ["inventory.yaml"], Path("inventory.yaml")),
])
def test_inventory_order(given: Path | None, env: dict[str, str], present: list[str], expected: Path) -> None:
    assert locate_inventory(given, env, CWD, files(*present)) == expected


@pytest.mark.parametrize(("env", "message"), [
    ({}, ("no inventory given: pass the INVENTORY argument, set $LLAMACTL_INVENTORY, or run where "
          "./inventory.yaml exists (looked for /work/site/inventory.yaml)")),
    ({"LLAMACTL_INVENTORY": "gone.yaml"}, "$LLAMACTL_INVENTORY names gone.yaml: no such inventory file"),
])
def test_inventory_not_found(env: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError) as caught:
        locate_inventory(None, env, CWD, files("inventory.yml"))
    assert str(caught.value) == message and caught.value.exit_code == 2


@pytest.mark.parametrize(("endpoint", "inventory", "env", "expected"), [
    ("http://lb/", None, {"LLAMACTL_ENDPOINT": "http://env"}, EndpointSource(url="http://lb")),
    (None, Path("a.yaml"), {"LLAMACTL_ENDPOINT": "http://env"}, EndpointSource(inventory=Path("a.yaml"))),
    (None, None, {"LLAMACTL_ENDPOINT": "http://env/", "LLAMACTL_INVENTORY": "/i.yaml"},
     EndpointSource(url="http://env")),
    (None, None, {"LLAMACTL_INVENTORY": "/i.yaml"}, EndpointSource(inventory=Path("/i.yaml"))),
    (None, None, {}, EndpointSource(inventory=Path("inventory.yaml"))),
])
def test_endpoint_order(endpoint: str | None, inventory: Path | None, env: dict[str, str],
                        expected: EndpointSource) -> None:
    present = files("/i.yaml", "inventory.yaml")
    assert locate_endpoint(endpoint, inventory, env, CWD, present) == expected


def test_endpoint_errors() -> None:
    with pytest.raises(UsageError, match=r"^give either --endpoint or --inventory, not both$"):
        locate_endpoint("http://lb", Path("a.yaml"), {}, CWD, files())
    with pytest.raises(UsageError) as caught:
        locate_endpoint(None, None, {}, CWD, files())
    assert str(caught.value) == (
        "no endpoint given: pass --endpoint URL or --inventory FILE, set $LLAMACTL_ENDPOINT or "
        "$LLAMACTL_INVENTORY, or run where ./inventory.yaml exists (looked for /work/site/inventory.yaml)")
