"""known_hosts handling: strict checking by default, optional trust-on-first-use pinning.

Matching follows OpenSSH's file format: comma-separated patterns (``*``, ``?``, ``!negation``),
``[host]:port`` for non-22 ports, hashed ``|1|salt|hash`` names, and ``@revoked`` markers
(``@cert-authority`` lines are ignored: we do not do host certificates).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import paramiko

from llamactl.errors import ConnectError

HostKeyPolicy = Literal["strict", "accept-new"]

# RSA keys are stored as "ssh-rsa" but negotiated with SHA-2 signature algorithms.
_NEGOTIATION_NAMES = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256")}

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's format: ``SHA256:`` + unpadded base64 of the SHA-256 of the public key blob."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def host_entry_name(address: str, port: int) -> str:
    return address if port == 22 else f"[{address}]:{port}"


@dataclass(frozen=True)
class KnownKey:
    key_type: str
    key: paramiko.PKey
    line: int
    revoked: bool = False


def _glob(pattern: str, name: str) -> bool:
    """OpenSSH patterns know only ``*`` and ``?`` (brackets are literal: ``[host]:port``); case-insensitive."""
    regex = re.escape(pattern.lower()).replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(regex, name.lower()) is not None


def _name_matches(pattern_field: str, name: str) -> bool:
    """One known_hosts name field against one lookup name; negations veto a match."""
    matched = False
    for pattern in pattern_field.split(","):
        if pattern.startswith("|1|"):
            if paramiko.HostKeys.hash_host(name, pattern) == pattern:
                matched = True
            continue
        negated = pattern.startswith("!")
        if _glob(pattern[1:] if negated else pattern, name):
            if negated:
                return False
            matched = True
    return matched


def parse_known_hosts(text: str, name: str) -> list[KnownKey]:
    """Every key (and revocation) that ``text`` holds for ``name`` (e.g. ``[10.0.0.5]:2222``)."""
    found: list[KnownKey] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        fields = raw.split()
        if not fields or fields[0].startswith("#"):
            continue
        marker = ""
        if fields[0].startswith("@"):
            marker, fields = fields[0], fields[1:]
        if marker not in ("", "@revoked") or len(fields) < 3 or not _name_matches(fields[0], name):
            continue
        try:
            key = paramiko.PKey.from_type_string(fields[1], base64.b64decode(fields[2]))
        except Exception:  # noqa: BLE001, S112 - unknown key types and corrupt lines are skipped, like ssh does
            continue
        found.append(KnownKey(fields[1], key, lineno, revoked=marker == "@revoked"))
    return found


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def known_keys(path: Path, address: str, port: int) -> list[KnownKey]:
    return parse_known_hosts(_read(path), host_entry_name(address, port))


def preferred_key_types(path: Path, address: str, port: int) -> list[str]:
    """Host key algorithms to offer, known ones first, so a host with several keys shows us one we know."""
    first: list[str] = []
    for known in known_keys(path, address, port):
        for name in _NEGOTIATION_NAMES.get(known.key_type, (known.key_type,)):
            if name not in first:
                first.append(name)
    rest = [t for t in paramiko.Transport._preferred_keys if t not in first]
    return first + rest


def _path_lock(path: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(str(path.resolve()), threading.Lock())


def _check(host: str, where: str, path: Path, name: str, key: paramiko.PKey, known: list[KnownKey]) -> bool:
    """True if ``key`` is known good; raises on revoked or changed keys; False if nothing is known."""
    blob = key.asbytes()
    for entry in known:
        if entry.revoked and entry.key.asbytes() == blob:
            raise ConnectError(host, f"host key {fingerprint(key)} of {where} is marked @revoked "
                                     f"in {path}:{entry.line}; refusing to connect")
    good = [k for k in known if not k.revoked]
    if any(k.key.asbytes() == blob for k in good):
        return True
    same_type = [k for k in good if k.key_type == key.get_name()]
    if same_type:
        old = ", ".join(f"{fingerprint(k.key)} ({path}:{k.line})" for k in same_type)
        raise ConnectError(
            host,
            f"host key for {where} has CHANGED. known_hosts has {key.get_name()} {old}; the host now "
            f"presents {fingerprint(key)}. This may be a reinstalled host or a man-in-the-middle attack; "
            f"refusing to connect. If the change is expected, remove the old key with "
            f"`ssh-keygen -R '{name}' -f {path}` and connect again.",
        )
    if good:
        types = ", ".join(sorted({k.key_type for k in good}))
        raise ConnectError(
            host,
            f"{where} presented a {key.get_name()} host key {fingerprint(key)}, but {path} only knows "
            f"its {types} key(s); refusing to connect. Verify the new key, then add it to {path}.",
        )
    return False


def verify_host_key(
    *, host: str, address: str, port: int, key: paramiko.PKey, known_hosts: Path, policy: HostKeyPolicy
) -> None:
    """Raise ``ConnectError`` unless ``key`` is the known key of ``address:port`` (or is pinned now)."""
    name = host_entry_name(address, port)
    where = f"{address}:{port}"
    if _check(host, where, known_hosts, name, key, known_keys(known_hosts, address, port)):
        return
    if policy != "accept-new":
        raise ConnectError(
            host,
            f"host key for {where} is unknown: {key.get_name()} {fingerprint(key)} is not in {known_hosts}. "
            f"Verify that fingerprint out of band, then add the key with "
            f"`ssh-keyscan -p {port} -t {key.get_name()} {address} >> {known_hosts}`, "
            f"or set ssh.host_key_policy: accept-new to pin first-seen keys.",
        )
    pin_host_key(host, known_hosts, address, port, key)


def pin_host_key(host: str, path: Path, address: str, port: int, key: paramiko.PKey) -> None:
    """Append a key atomically. Threads (a per-file lock) and processes (flock) are serialized, and
    the file is re-read under the lock: a key pinned meanwhile by someone else is checked, not duplicated."""
    name = host_entry_name(address, port)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _path_lock(path), open(path.with_name(path.name + ".lock"), "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        current = _read(path)
        if _check(host, f"{address}:{port}", path, name, key, parse_known_hosts(current, name)):
            return
        if current and not current.endswith("\n"):
            current += "\n"
        current += f"{name} {key.get_name()} {key.get_base64()}\n"
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(current)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
