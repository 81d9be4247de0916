"""A secret named by reference (``{env: VAR}`` or ``{file: PATH}``), read on the controller when the inventory loads.

One reader for every such secret (Redis' password, the VRRP password): exact errors at the reference's YAML
position, never the secret's value in a message (only where it came from and its length).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llamactl.inventory.load import _Context

REF = "{env: VAR} or {file: PATH}"


@dataclass(frozen=True)
class SecretRule:
    path: tuple[str, ...]  # where the reference sits, e.g. ("redis", "password")
    what: str  # in "exactly one source of the ..." and "a file holding the ..."
    holds: str  # in "(it holds the ...)"
    pattern: re.Pattern[str]  # a valid value, whole
    expected: str  # what a valid value is, in words
    min_length: int = 0


def read_secret(ctx: _Context, rule: SecretRule, var: str | None, file: str | None, base: Path,
                env: Mapping[str, str], report_neither: bool = True) -> str | None:
    """The secret's value, or None with the problem recorded in ``ctx``."""
    path = rule.path
    if var is not None and file is not None:
        ctx.add(path, f"found both env and file, expected exactly one source of the {rule.what}")
        return None
    if var is None and file is None:
        if report_neither:
            ctx.add(path, f"found neither env nor file, expected {REF}")
        return None
    if var is not None:
        if var not in env:
            ctx.add(path + ("env",), f"found {var}, expected the environment variable {var} to be set "
                    f"(it holds the {rule.holds})", key=False)
            return None
        value, where = env[var].strip(), var
    else:
        assert file is not None
        full = Path(file).expanduser()
        full = full if full.is_absolute() else (base / full).resolve()
        try:
            lines = [line.strip() for line in full.read_text().splitlines() if line.strip()]
        except OSError as exc:
            ctx.add(path + ("file",), f"found {full} unreadable ({exc.strerror}), expected a file holding the "
                    f"{rule.what}", key=False)
            return None
        if len(lines) > 1:
            ctx.add(path + ("file",), f"found {len(lines)} lines in {full}, expected the password on one line",
                    key=False)
            return None
        value, where = (lines[0] if lines else ""), str(full)
    if not rule.pattern.match(value) or len(value) < rule.min_length:
        shown = "empty" if not value else f"holding {len(value)} characters"
        ctx.add(path + ("env" if var is not None else "file",), f"found {where} {shown}, expected {rule.expected}",
                key=False)
        return None
    return value
