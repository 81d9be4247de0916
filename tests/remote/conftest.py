"""Fixture: a directory with a client key, an authorized_keys and a known_hosts, and sshd servers on demand."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.remote.sshd import Lab, keygen


@pytest.fixture
def sshlab(tmp_path: Path) -> Iterator[Lab]:
    client_key = tmp_path / "id_ed25519"
    keygen(client_key)
    authorized = tmp_path / "authorized_keys"
    authorized.write_text((tmp_path / "id_ed25519.pub").read_text())
    known = tmp_path / "known_hosts"
    known.write_text("")
    the_lab = Lab(tmp_path, client_key, authorized, known)
    yield the_lab
    for server in the_lab.servers:
        server.stop()


