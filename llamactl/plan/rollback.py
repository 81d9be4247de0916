"""Choosing the release to roll back to, from a host's activation history. Pure."""

from __future__ import annotations

from llamactl.plan.command import Command
from llamactl.plan.facts import HostFacts, gather_command
from llamactl.plan.render import ENV_DIR


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


def releases_command(python: str, install_dir: str) -> Command:
    """Read the host's installed releases, the active one and the activation history (the fact-gathering
    script with nothing else to look at)."""
    return gather_command(python, install_dir=install_dir, files=[], wheelhouse_dir="/nonexistent", units=[],
                          model_path=None, model_manifest=None, gpus=False, env_dir=ENV_DIR)
