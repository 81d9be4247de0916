"""API key entries with optional names and per-minute limits. Pure: no Redis, no I/O.

An entry (one line of the keys file, or one comma-separated item of the keys variable) is either a bare key::

    sk-abc123

or space-separated fields, ``key=`` required::

    name=alice key=sk-abc123 rpm=60 tpm=20000

``rpm``: requests per minute, ``tpm``: prompt + completion tokens per minute, both enforced across the cluster
(``llamactl.state.quotas``). A bare key is named ``key-`` + the first 8 hex digits of its sha256, so metrics and
``status --keys`` can show it without the key. Error messages name the entry by position, never its content.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
FIELDS = ("name", "key", "rpm", "tpm")


class KeySpecError(ValueError):
    """One or more bad entries; the message lists each by position (never echoing a key)."""


@dataclass(frozen=True)
class KeyPolicy:
    name: str
    key: str = field(repr=False)
    rpm: int | None = None  # requests per minute, None: unlimited
    tpm: int | None = None  # tokens (prompt + completion) per minute, None: unlimited

    @property
    def limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None


def default_name(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_entry(entry: str, where: str) -> KeyPolicy:
    """One entry; ``where`` names it in errors (e.g. "entry 3")."""
    tokens = entry.split()
    if not tokens:
        raise KeySpecError(f"{where}: found an empty entry, expected a key or name=... key=... [rpm=N] [tpm=N]")
    if len(tokens) == 1 and tokens[0].partition("=")[0] not in FIELDS:
        return KeyPolicy(default_name(tokens[0]), tokens[0])
    values: dict[str, str] = {}
    for i, token in enumerate(tokens, 1):
        name, sep, value = token.partition("=")
        if not sep or name not in FIELDS:
            raise KeySpecError(f"{where}: found an unknown field (word {i}), expected name=, key=, rpm= or tpm= "
                               "separated by spaces")
        if name in values:
            raise KeySpecError(f"{where}: found {name}= twice, expected it once")
        values[name] = value
    if not values.get("key"):
        raise KeySpecError(f"{where}: found no key=, expected key=KEY in an entry with fields")
    key_name = values.get("name") or default_name(values["key"])
    if not NAME_RE.match(key_name):
        raise KeySpecError(f"{where}: found name={key_name[:80]!r}, expected 1-64 letters, digits, '_', '.' or '-'")
    limits: dict[str, int] = {}
    for limit in ("rpm", "tpm"):
        if limit in values:
            raw = values[limit]
            if not raw.isdigit() or int(raw) < 1:
                raise KeySpecError(f"{where}: found {limit}={raw[:20]!r}, expected a whole number >= 1")
            limits[limit] = int(raw)
    return KeyPolicy(key_name, values["key"], limits.get("rpm"), limits.get("tpm"))


def parse_entries(entries: Iterable[str], what: str = "entry") -> list[KeyPolicy]:
    """Every entry; raises ``KeySpecError`` listing every problem (duplicate names or keys included)."""
    policies: list[KeyPolicy] = []
    problems: list[str] = []
    for i, entry in enumerate(entries, 1):
        try:
            policies.append(parse_entry(entry, f"{what} {i}"))
        except KeySpecError as exc:
            problems.append(str(exc))
    seen_names: dict[str, int] = {}
    seen_keys: dict[str, int] = {}
    for i, p in enumerate(policies, 1):
        if p.name in seen_names:
            problems.append(f"name {p.name!r} is used by two keys, expected one name per key")
        if p.key in seen_keys:
            problems.append(f"the same key appears twice (as {policies[seen_keys[p.key] - 1].name!r} and "
                            f"{p.name!r}), expected each key once")
        seen_names.setdefault(p.name, i)
        seen_keys.setdefault(p.key, i)
    if problems:
        raise KeySpecError("; ".join(problems))
    return policies
