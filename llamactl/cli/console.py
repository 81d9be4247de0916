"""Rich consoles that honour NO_COLOR and keep machine output (stdout) apart from progress (stderr)."""

from __future__ import annotations

import os

from rich.console import Console


def console_for(*, stderr: bool) -> Console:
    return Console(stderr=stderr, no_color=bool(os.environ.get("NO_COLOR")) or None, highlight=False)
