"""Choosing the release to roll back to, from a host's activation history. Pure."""

from __future__ import annotations

from llamactl.plan.facts import HostFacts


def previous_release(facts: HostFacts, *, to: str | None = None) -> str | None:
    """The release to activate: ``to`` if given and installed, else the newest earlier activation.

    Returns None when there is nothing to roll back to. Raises ValueError for an unknown ``to``.
    """
    if to is not None:
        if to not in facts.releases:
            raise ValueError(f"release {to} is not installed (installed: {', '.join(facts.releases) or 'none'})")
        return to
    for rid in reversed(facts.history):
        if rid != facts.current and rid in facts.releases:
            return rid
    return None
