"""``--limit``: pick hosts by comma-separated names or shell-style globs."""

from __future__ import annotations

import fnmatch

from llamactl.errors import UsageError
from llamactl.inventory.cluster import HostSpec, Inventory


def limit(inv: Inventory, pattern: str | None) -> list[HostSpec]:
    """Server hosts matching ``pattern`` (all when it is None or empty), in inventory order.

    A term that matches no host is a usage error, so a typo never silently deploys to nothing.
    """
    if not pattern:
        return list(inv.hosts)
    terms = [t.strip() for t in pattern.split(",") if t.strip()]
    chosen: set[str] = set()
    for term in terms:
        matched = {h.name for h in inv.hosts if fnmatch.fnmatchcase(h.name, term)}
        if not matched:
            known = ", ".join(h.name for h in inv.hosts)
            raise UsageError(f"--limit {pattern}: {term!r} matches no host (hosts: {known})")
        chosen |= matched
    return [h for h in inv.hosts if h.name in chosen]
