"""Golden files: `render_all` output byte for byte. Regenerate with LLAMACTL_REGEN_GOLDEN=1 (then review the diff)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from llamactl.cli.render import write_tree
from llamactl.plan.render import render_all
from tests.render.tools import load

GOLDEN = Path(__file__).parent / "golden"


def tree(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("name", ["example", "small"])
def test_render_matches_golden(name: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_tree(out, render_all(load(name)))
    golden = GOLDEN / name
    if os.environ.get("LLAMACTL_REGEN_GOLDEN") == "1":
        shutil.rmtree(golden, ignore_errors=True)
        shutil.copytree(out, golden)
    got, want = tree(out), tree(golden)
    assert sorted(got) == sorted(want)
    for path, (content, mode) in got.items():
        assert content.decode() == want[path][0].decode(), path
        # git keeps only the executable bit, so modes are checked against the rule, not the checkout.
        assert mode == (0o600 if path.endswith(".env") else 0o644), path
