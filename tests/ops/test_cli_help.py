"""Every command's help reads as paragraphs at any terminal width: no sentence broken mid-line.

A line of a paragraph ends early only where the next word would not have fit. Checked for the
description of every command and for the command lists of the groups, at 60 and 200 columns.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import typer
from typer.testing import CliRunner

from llamactl.cli.main import app

SLACK = 2  # rich's cell padding


def command_paths() -> list[list[str]]:
    def walk(command: object, prefix: list[str]) -> list[list[str]]:
        found = [prefix]
        for name, sub in getattr(command, "commands", {}).items():
            found += walk(sub, [*prefix, name])
        return found

    return walk(typer.main.get_command(app), [])


def render(path: list[str], columns: int) -> list[str]:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(columns), "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def description(lines: list[str]) -> list[list[str]]:
    """The paragraphs between the usage line and the first panel, as their text lines."""
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("Usage:")) + 1
    end = next(i for i, line in enumerate(lines) if line.lstrip().startswith("╭"))
    paragraphs: list[list[str]] = [[]]
    for line in lines[start:end]:
        if line.strip():
            paragraphs[-1].append(line.strip())
        elif paragraphs[-1]:
            paragraphs.append([])
    return [p for p in paragraphs if p]


def command_list(lines: list[str]) -> list[tuple[int, list[str]]]:
    """Each entry of the Commands panel: (room for its help text, its help lines)."""
    start = next((i for i, line in enumerate(lines) if "Commands" in line and line.lstrip().startswith("╭")), None)
    if start is None:
        return []
    entries: list[tuple[int, list[str]]] = []
    column = 0
    for line in lines[start + 1:]:
        if line.lstrip().startswith("╰"):
            break
        inner = line.rstrip()[1:-1]  # between the borders
        name, _, rest = inner.strip().partition(" ")
        if not inner.startswith(" " * 3):  # a new command: "│ name   help text"
            column = len(inner) - len(inner.lstrip()) + len(name) + len(rest) - len(rest.lstrip()) + 1
            entries.append((len(inner) - column - SLACK + 1, [rest.strip()]))
        else:
            entries[-1][1].append(inner.strip())
    return entries


def assert_filled(paragraph: list[str], room: int, where: str) -> None:
    for line, after in pairwise(paragraph):
        next_word = after.split()[0]
        assert len(line) + 1 + len(next_word) > room - SLACK, (
            f"{where}: line ends early although {next_word!r} fits:\n{line}\n{after}")


PATHS = command_paths()


@pytest.mark.parametrize("columns", [60, 200])
@pytest.mark.parametrize("path", PATHS, ids=[" ".join(["llamactl", *p]) for p in PATHS])
def test_help_reads_as_paragraphs(path: list[str], columns: int) -> None:
    lines = render(path, columns)
    where = f"llamactl {' '.join(path)} --help at {columns} columns"
    paragraphs = description(lines)
    assert paragraphs, where
    for paragraph in paragraphs:
        assert_filled(paragraph, columns - 2, where)
    for room, entry in command_list(lines):
        assert_filled(entry, room, where + " (command list)")


def test_the_check_catches_a_hard_wrapped_docstring() -> None:
    """Without the reflow, the command list shows restart's docstring line breaks."""
    text = "Restart inference servers: with --rolling, never more than\nrollout.max_unavailable out of the"
    with pytest.raises(AssertionError, match="line ends early"):
        assert_filled(text.splitlines(), 198, "raw docstring")
