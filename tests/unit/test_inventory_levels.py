"""A wrong value is an error at the level where it is written (defaults, group), even when every host
gets that setting from a later level: exact messages with the bad value's own line."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.errors import InventoryError
from llamactl.inventory import load_inventory

EXAMPLE = (Path(__file__).resolve().parents[2] / "inventory.example.yaml").read_text()
H100 = "  h100:\n    gpus: 8\n"
L4 = "  l4:\n    gpus: 2\n"


def mutate(*edits: tuple[str, str]) -> str:
    text = EXAMPLE
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def position(text: str, needle: tuple[str, str]) -> str:
    """``LINE:COL`` of ``value`` where the unique ``key + value`` is written, for ``needle = (key, value)``."""
    key, value = needle
    assert text.count(key + value) == 1, needle
    before = text[: text.index(key + value) + len(key)]
    line = before.count("\n") + 1
    col = len(before) - before.rfind("\n")
    return f"{line}:{col}"


# (id, edits, the needle before the bad value, the expected "path: message")
CASES = [
    ("defaults overridden by every group",
     [("  gpus: 1 ", "  gpus: not-a-number ")],
     ("  gpus: ", "not-a-number"),
     ('defaults.gpus: found string "not-a-number", expected a GPU count from 0 to 64 or a list of distinct '
     "GPU indices")),
    ("defaults port overridden by every group",
     [("  base_port: 8000", "  base_port: 99999"), (H100, H100 + "    base_port: 9000\n"),
      (L4, L4 + "    base_port: 9000\n")],
     ("  base_port: ", "99999"),
     "defaults.base_port: found integer 99999, expected an integer from 1 to 65535"),
    ("defaults choice overridden by every group",
     [("    quantization: none ", "    quantization: fp4 "), (H100, H100 + "    model: {quantization: none}\n")],
     ("    quantization: ", "fp4"),
     "defaults.model.quantization: found string \"fp4\", expected one of 'none', 'nf4', 'int8' or 'fp8'"),
    ("defaults nested value overridden by every group",
     [("    max_entries: 1024", "    max_entries: -5"),
      (H100, H100 + "    server: {cache: {max_entries: 9}}\n"),
      ("      max_batch_size: 4\n", "      max_batch_size: 4\n      cache: {max_entries: 9}\n")],
     ("    max_entries: ", "-5"),
     "defaults.server.cache.max_entries: found integer -5, expected an integer of at least 0"),
    ("defaults ssh port overridden by every group",
     [("    port: 22\n", "    port: twenty-two\n"), (H100, H100 + "    ssh: {port: 22}\n"),
      (L4, L4 + "    ssh: {port: 22}\n")],
     ("    port: ", "twenty-two"),
     'defaults.ssh.port: found string "twenty-two", expected an integer from 1 to 65535'),
    ("group value overridden by its only host",
     [("      max_batch_size: 4\n", "      max_batch_size: 0\n"),
      ("          port: 2222\n", "          port: 2222\n        server: {max_batch_size: 4}\n")],
     ("      max_batch_size: ", "0"),
     "groups.l4.server.max_batch_size: found integer 0, expected an integer from 1 to 256"),
    ("group without hosts",
     [("groups:\n", "groups:\n  spare:\n    gpus: -1\n    hosts: {}\n")],
     ("    gpus: ", "-1"),
     "groups.spare.gpus: found integer -1, expected a GPU count from 0 to 64 or a list of distinct GPU indices"),
    ("mapping replaced as a whole by every group",
     [("    user: llamactl ", "    api_keys: {env: not-a-name}\n    user: llamactl "),
      (H100, H100 + "    server: {api_keys: {env: K}}\n"),
      ("      max_batch_size: 4\n", "      max_batch_size: 4\n      api_keys: {env: K}\n")],
     ("    api_keys: {env: ", "not-a-name"),
     ('defaults.server.api_keys.env: found string "not-a-name", expected an environment variable name like '
     "LLAMACTL_API_KEYS")),
]


@pytest.mark.parametrize(("edits", "needle", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_value_reported_where_written(tmp_path: Path, edits: list[tuple[str, str]], needle: tuple[str, str],
                                          expected: str) -> None:
    text = mutate(*edits)
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    with pytest.raises(InventoryError) as caught:
        load_inventory(path, env={"K": "key-1"})
    assert [str(p) for p in caught.value.problems] == [f"{path}:{position(text, needle)}: {expected}"]


def test_the_overriding_values_alone_are_valid(tmp_path: Path) -> None:
    """Each case's overrides are fine by themselves: the error above comes only from the overridden value."""
    text = mutate((H100, H100 + "    base_port: 9000\n    model: {quantization: none}\n    ssh: {port: 22}\n"
                   "    server: {cache: {max_entries: 9}, api_keys: {env: K}}\n"))
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    assert load_inventory(path, env={"K": "key-1"}).host("gpu-01").base_port == 9000
