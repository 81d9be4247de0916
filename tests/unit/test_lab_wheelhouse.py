"""The lab wheelhouse downloads the tested versions (constraints.txt), one line per phase, with real pip."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.errors import LlamactlError
from llamactl.lab import wheelhouse

ROOT = Path(__file__).resolve().parents[2]


def test_the_checkout_constraints_are_used_and_torch_stays_the_cpu_build() -> None:
    assert wheelhouse.CONSTRAINTS == ROOT / "constraints.txt"
    pins = wheelhouse.pinned_constraints().splitlines()
    assert "torch==2.13.0" in pins and pins[-1] == "torch==2.13.0+cpu"
    assert any(p.startswith("typer==") for p in pins)
    assert wheelhouse.pinned_constraints(None) == "torch==2.13.0+cpu\n"


def test_download_takes_the_pinned_version_and_says_one_line_per_phase(tmp_path: Path) -> None:
    tested = tmp_path / "constraints.txt"
    tested.write_text("# tested\nidna==3.20\n")
    said: list[str] = []
    cache = wheelhouse.ensure_cache(["idna"], said.append, tmp_path / "cache", tested)
    assert sorted(p.name for p in cache.glob("*.whl")) == ["idna-3.20-py3-none-any.whl"]
    assert said == [f"wheelhouse: downloading 1 requirements and their dependencies into {cache} (first time only)",
                    "wheelhouse: 1 wheels downloaded"]
    said.clear()
    wheelhouse.ensure_cache(["idna"], said.append, tmp_path / "cache", tested)
    assert said == [f"wheelhouse: cached in {cache}"]
    (cache / ".requirements").unlink()  # a changed stamp: pip finds the wheel already there
    said.clear()
    wheelhouse.ensure_cache(["idna"], said.append, tmp_path / "cache", tested)
    assert said[-1] == "wheelhouse: 1 wheels downloaded"


def test_a_pin_pip_cannot_meet_fails_with_pips_reason(tmp_path: Path) -> None:
    tested = tmp_path / "constraints.txt"
    tested.write_text("idna==0.0.1\n")
    with pytest.raises(LlamactlError) as caught:
        wheelhouse.ensure_cache(["idna"], lambda _: None, tmp_path / "cache", tested)
    message = str(caught.value)
    assert message.startswith("wheelhouse: `pip download` failed:") and "idna==0.0.1" in message
