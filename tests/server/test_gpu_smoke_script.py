"""The GPU smoke script's --tiny CPU mode runs end to end (so the GPU run is not its first run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ._support import REPO


@pytest.mark.slow
def test_gpu_smoke_tiny_mode(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_smoke.py"),
            "--tiny",
            "--model-dir",
            str(tiny_checkpoint),
            "--max-tokens",
            "16",
            "--levels",
            "1,4",
            "--requests",
            "4",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in data["levels"]] == [1, 4]
    for lv in data["levels"]:
        assert lv["completion_tokens"] == 16 * lv["requests"]  # ignore_eos: fixed-length answers
        assert lv["tok_per_s"] > 0 and lv["ttft_s_median"] is not None
    assert data["server_exit_code"] == 0
