"""known_hosts parsing and verification (pure file logic; keys are fixed test vectors)."""

from __future__ import annotations

import base64
import re
import stat
import threading
from pathlib import Path

import paramiko
import pytest

from llamactl.errors import ConnectError
from llamactl.remote.hostkeys import (
    fingerprint,
    host_entry_name,
    parse_known_hosts,
    pin_host_key,
    preferred_key_types,
    verify_host_key,
)

# Fingerprints as printed by `ssh-keygen -lf` for these exact public keys.
ED = "AAAAC3NzaC1lZDI1NTE5AAAAINvfUZri7Q0x7PNPXSeQxiNS/EC1ZUf1QJzsThJhgiRf"
ED_FP = "SHA256:My+lFJiOLWr8lkS4BNWtEKMGeLI8gnEVfHKnqX+MXQA"
EC = ("AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBFpJTmNYBss6gpeHW5bfaJoDtpoJTJByj5IXSa/IjxQz/"
      "B5z0YXiyq0y4D6r7vrIJJQ3e0ZYIgfQmXoQ/dT0rO4=")
EC_FP = "SHA256:3Tsr1xuXcS9PNElk4BAcnxXJEUS9/KlY0kiVPoiq/0E"


def key(kind: str, blob: str) -> paramiko.PKey:
    return paramiko.PKey.from_type_string(kind, base64.b64decode(blob))


ED_KEY, EC_KEY = key("ssh-ed25519", ED), key("ecdsa-sha2-nistp256", EC)


def other_ed25519() -> paramiko.PKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    kind, blob = raw.decode().split()[:2]
    return key(kind, blob)


def test_fingerprint_matches_openssh() -> None:
    assert fingerprint(ED_KEY) == ED_FP
    assert fingerprint(EC_KEY) == EC_FP


def test_entry_names() -> None:
    assert host_entry_name("10.0.0.1", 22) == "10.0.0.1"
    assert host_entry_name("10.0.0.1", 2222) == "[10.0.0.1]:2222"


def test_parse_plain_port_patterns_hashed_and_junk() -> None:
    hashed = paramiko.HostKeys.hash_host("[10.0.0.9]:2222")
    text = "\n".join([
        "# comment",
        "",
        f"gpu-01,10.0.0.1 ssh-ed25519 {ED} comment here",
        f"[10.0.0.2]:2222 ecdsa-sha2-nistp256 {EC}",
        f"10.0.0.* ecdsa-sha2-nistp256 {EC}",
        f"*.example.com,!evil.example.com ssh-ed25519 {ED}",
        f"{hashed} ssh-ed25519 {ED}",
        "broken-line-without-key",
        "10.0.0.1 ssh-unknowntype AAAA",
        "10.0.0.1 ssh-ed25519 not-base64!!",
        f"@cert-authority *.example.com ssh-ed25519 {ED}",
    ])
    assert [(k.key_type, k.line) for k in parse_known_hosts(text, "10.0.0.1")] == [
        ("ssh-ed25519", 3), ("ecdsa-sha2-nistp256", 5)]
    assert [k.line for k in parse_known_hosts(text, "gpu-01")] == [3]
    assert [k.line for k in parse_known_hosts(text, "[10.0.0.2]:2222")] == [4]  # brackets are literal
    assert [k.line for k in parse_known_hosts(text, "10.0.0.2")] == [5]
    assert [k.line for k in parse_known_hosts(text, "API.example.com")] == [6]  # case-insensitive
    assert parse_known_hosts(text, "evil.example.com") == []  # negation vetoes
    assert [k.line for k in parse_known_hosts(text, "[10.0.0.9]:2222")] == [7]
    assert [k.line for k in parse_known_hosts(text, "10.0.0.9")] == [5]  # the hash is for port 2222 only


def test_verify_known_key_passes(tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[10.0.0.1]:2222 ssh-ed25519 {ED}\n")
    verify_host_key(host="gpu-01", address="10.0.0.1", port=2222, key=ED_KEY, known_hosts=kh, policy="strict")


def test_unknown_key_strict(tmp_path: Path) -> None:
    kh = tmp_path / "missing" / "known_hosts"
    with pytest.raises(ConnectError) as info:
        verify_host_key(host="gpu-01", address="10.0.0.1", port=22, key=ED_KEY, known_hosts=kh, policy="strict")
    assert str(info.value) == (
        f"gpu-01: host key for 10.0.0.1:22 is unknown: ssh-ed25519 {ED_FP} is not in {kh}. Verify that "
        f"fingerprint out of band, then add the key with `ssh-keyscan -p 22 -t ssh-ed25519 10.0.0.1 >> {kh}`, "
        f"or set ssh.host_key_policy: accept-new to pin first-seen keys.")
    assert not kh.exists()


def test_changed_key_refused_under_both_policies(tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text(f"# header\n10.0.0.1 ssh-ed25519 {ED}\n")
    new = other_ed25519()
    for policy in ("strict", "accept-new"):
        with pytest.raises(ConnectError) as info:
            verify_host_key(host="gpu-01", address="10.0.0.1", port=22, key=new, known_hosts=kh,
                            policy=policy)
        message = str(info.value)
        assert message.startswith(f"gpu-01: host key for 10.0.0.1:22 has CHANGED. known_hosts has ssh-ed25519 "
                                  f"{ED_FP} ({kh}:2); the host now presents {fingerprint(new)}.")
        assert f"`ssh-keygen -R '10.0.0.1' -f {kh}`" in message
    assert kh.read_text() == f"# header\n10.0.0.1 ssh-ed25519 {ED}\n"


def test_other_type_only_is_refused(tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text(f"10.0.0.1 ecdsa-sha2-nistp256 {EC}\n")
    with pytest.raises(ConnectError, match="only knows its ecdsa-sha2-nistp256 key"):
        verify_host_key(host="h", address="10.0.0.1", port=22, key=ED_KEY, known_hosts=kh, policy="accept-new")


def test_revoked_key_refused(tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text(f"@revoked * ssh-ed25519 {ED}\n10.0.0.1 ssh-ed25519 {ED}\n")
    with pytest.raises(ConnectError, match=re.escape(f"h: host key {ED_FP} of 10.0.0.1:22 is marked @revoked in {kh}:1")):
        verify_host_key(host="h", address="10.0.0.1", port=22, key=ED_KEY, known_hosts=kh, policy="strict")


def test_accept_new_pins_once_with_private_file(tmp_path: Path) -> None:
    kh = tmp_path / "ssh" / "known_hosts"
    verify_host_key(host="h", address="10.0.0.1", port=2222, key=ED_KEY, known_hosts=kh, policy="accept-new")
    verify_host_key(host="h", address="10.0.0.1", port=2222, key=ED_KEY, known_hosts=kh, policy="accept-new")
    assert kh.read_text() == f"[10.0.0.1]:2222 ssh-ed25519 {ED}\n"
    assert stat.S_IMODE(kh.stat().st_mode) == 0o600
    assert stat.S_IMODE(kh.parent.stat().st_mode) == 0o700


def test_pin_keeps_existing_content_and_mode(tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text(f"10.0.0.5 ssh-ed25519 {ED}")  # no trailing newline
    kh.chmod(0o644)
    pin_host_key("h", kh, "10.0.0.6", 22, EC_KEY)
    assert kh.read_text() == f"10.0.0.5 ssh-ed25519 {ED}\n10.0.0.6 ecdsa-sha2-nistp256 {EC}\n"
    assert stat.S_IMODE(kh.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["known_hosts", "known_hosts.lock"]  # no temp left


def test_concurrent_pins_lose_nothing(tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    keys = {i: other_ed25519() for i in range(24)}
    threads = [threading.Thread(target=pin_host_key, args=("h", kh, f"10.0.1.{i}", 22, k)) for i, k in keys.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = kh.read_text().splitlines()
    assert sorted(lines) == sorted(f"10.0.1.{i} ssh-ed25519 {k.get_base64()}" for i, k in keys.items())


def test_racing_pins_of_different_keys_for_one_host(tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    errors: list[ConnectError] = []

    def pin(k: paramiko.PKey) -> None:
        try:
            pin_host_key("h", kh, "10.0.0.1", 22, k)
        except ConnectError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pin, args=(k,)) for k in (other_ed25519(), other_ed25519())]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(kh.read_text().splitlines()) == 1 and len(errors) == 1 and "CHANGED" in str(errors[0])


def test_preferred_key_types_put_known_first(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    rsa_pub = rsa.generate_private_key(65537, 2048).public_key().public_bytes(Encoding.OpenSSH,
                                                                               PublicFormat.OpenSSH).decode()
    kh = tmp_path / "known_hosts"
    kh.write_text(f"10.0.0.1 ecdsa-sha2-nistp256 {EC}\n10.0.0.1 {rsa_pub}\n10.0.0.2 ssh-ed25519 {ED}\n")
    order = preferred_key_types(kh, "10.0.0.1", 22)
    # RSA keys are stored as ssh-rsa but negotiated as rsa-sha2-*; the rest keep paramiko's order
    assert order[:3] == ["ecdsa-sha2-nistp256", "rsa-sha2-512", "rsa-sha2-256"]
    assert sorted(order) == sorted(paramiko.Transport._preferred_keys)
    assert preferred_key_types(tmp_path / "none", "10.0.0.1", 22) == list(paramiko.Transport._preferred_keys)
