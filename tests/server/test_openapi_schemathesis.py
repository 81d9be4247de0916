"""schemathesis, every check and every phase, against a real ``llamactl serve`` (tiny checkpoint) and its own
OpenAPI document: it must find nothing.

Without API keys, 100 examples per operation: about 1,700 test cases over the 9 operations (examples, coverage,
fuzzing and stateful phases), 10 to 35 s on a shared 2-core machine (seeds 1 to 6 at 100 and 200 examples found
nothing). With API keys, 30 examples per operation (about 800 cases): the same document plus bearer auth. The expected statuses of two checks are set in schemathesis.toml beside
this file (with the reasons). ``LLAMACTL_SCHEMATHESIS_SEED`` picks another seed; ``..._EXAMPLES`` another count.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import schemathesis  # noqa: F401  (a dev dependency: fail here, not skip, when it is missing)

HERE = Path(__file__).resolve().parent
# The server's settings keep generation short: answers of at most 16 tokens, and a 20 KiB body limit, because the
# hf engine has no prompt-length check and a fuzzed 1 MB prompt would keep the tiny model busy for minutes.
SERVER_ENV = {
    "LLAMACTL_GEN_MAX_NEW_TOKENS": "16",
    "LLAMACTL_MAX_BODY_MB": "0.02",
    "LLAMACTL_QUEUE_LIMIT": "8",
    "LLAMACTL_REQUEST_TIMEOUT_S": "20",
}


@pytest.mark.slow
@pytest.mark.parametrize(("keys", "default_examples"), [(False, "100"), (True, "30")], ids=["open", "api-keys"])
def test_schemathesis_finds_nothing(serve_factory: Any, tmp_path: Path, keys: bool, default_examples: str) -> None:
    """With API keys the document requires bearer auth, and schemathesis also checks that requests without it,
    or with a wrong key, are refused (401)."""
    server = serve_factory({**SERVER_ENV, "LLAMACTL_API_KEYS": "k1"} if keys else SERVER_ENV)
    examples = os.environ.get("LLAMACTL_SCHEMATHESIS_EXAMPLES", default_examples)
    seed = os.environ.get("LLAMACTL_SCHEMATHESIS_SEED", "1")
    cmd = [
        sys.executable, "-m", "schemathesis.cli",
        "--config-file", str(HERE / "schemathesis.toml"),
        "--no-color",
        "run", server.url + "/openapi.json",
        "--checks", "all",
        "--max-examples", examples,
        "--seed", seed,
        "--workers", "1",
        "--request-timeout", "30",
        "--generation-database", "none",
        *(["--header", "Authorization: Bearer k1"] if keys else []),
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=170, check=False)
    took = time.monotonic() - started
    out = proc.stdout + proc.stderr
    summary = re.search(r"(\d+) generated, (\d+) passed", out)
    print(f"schemathesis: {summary.group(0) if summary else 'no summary'} in {took:.0f}s (seed {seed})")
    assert proc.returncode == 0, out[-20000:]
    assert summary is not None and summary.group(1) == summary.group(2), out[-5000:]
    assert int(summary.group(1)) >= 9 * int(examples), out[-5000:]  # it really ran the operations
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert re.search(rf"✅ {phase}\b", out), f"{phase} phase did not pass:\n{out[-5000:]}"
