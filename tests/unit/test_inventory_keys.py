"""Named API keys with limits in the inventory's key source: accepted as written, bad entries reported at the
key source's YAML position, never echoing a key."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.errors import InventoryError
from llamactl.inventory import expected_env, load_inventory

INV = """\
version: 1
cluster: c
defaults:
  model: {source: /srv/model}
  gpus: 0
  server:
    api_keys: {file: keys.txt}
groups: {g: {hosts: {h: {address: 10.0.0.1}}}}
balancer: {hosts: {lb: {address: 10.0.0.2}}}
"""
SECRET = "sk-do-not-echo-42"


def write(tmp_path: Path, keys: str) -> Path:
    (tmp_path / "keys.txt").write_text(keys)
    (tmp_path / "inv.yaml").write_text(INV)
    return tmp_path / "inv.yaml"


def test_named_keys_with_limits_reach_the_env_file(tmp_path: Path) -> None:
    inv = load_inventory(write(tmp_path, f"name=alice key={SECRET} rpm=60 tpm=20000\nplain-key\n"), env={})
    env = expected_env(inv, inv.instances()[0])
    assert env["LLAMACTL_API_KEYS"] == f"name=alice key={SECRET} rpm=60 tpm=20000,plain-key"


def test_a_bad_entry_is_reported_at_the_key_source(tmp_path: Path) -> None:
    with pytest.raises(InventoryError) as caught:
        load_inventory(write(tmp_path, f"name=alice key={SECRET} rpm=-1\n"), env={})
    problems = [str(p).replace(str(tmp_path / "inv.yaml"), "INV") for p in caught.value.problems]
    expected = ("INV:7:22: defaults.server.api_keys.file: found key 1: found rpm='-1', expected a whole "
                "number >= 1; expected each key as KEY or name=NAME key=KEY [rpm=N] [tpm=N]")
    assert problems == [expected]
    assert SECRET not in str(caught.value)
