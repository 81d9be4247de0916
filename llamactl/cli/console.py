"""Rich consoles that honour NO_COLOR and keep machine output (stdout) apart from progress (stderr)."""

from __future__ import annotations

import os
import sys

from rich.console import Console

# Piped into a file or a CI log, rich would assume 80 columns and squash wide tables into ellipses.
PIPE_WIDTH = 200


def console_for(*, stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else PIPE_WIDTH
    return Console(stderr=stderr, no_color=bool(os.environ.get("NO_COLOR")) or None, highlight=False, width=width)
