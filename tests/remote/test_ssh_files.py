"""SFTP uploads and reads against a real sshd: atomic replace, parents, modes, missing files."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamactl.errors import UsageError
from llamactl.remote.base import RemoteFileError
from llamactl.remote.ssh import SSHExecutor, connect
from tests.remote.sshd import NEEDS_SSHD, Lab

pytestmark = NEEDS_SSHD


@pytest.fixture
def host(sshlab: Lab) -> Iterator[SSHExecutor]:
    executor = connect(sshlab.target(sshlab.sshd()))
    yield executor
    executor.close()


def test_put_creates_parents_sets_mode_and_reads_back(host: SSHExecutor, tmp_path: Path) -> None:
    path = tmp_path / "remote" / "a" / "b" / "instance-0.env"
    host.put_bytes(b"LLAMACTL_API_KEYS=k1\n", str(path), mode=0o600)
    assert path.read_bytes() == b"LLAMACTL_API_KEYS=k1\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert host.read_bytes(str(path)) == b"LLAMACTL_API_KEYS=k1\n"
    script = tmp_path / "remote" / "run.sh"
    host.put_bytes(b"#!/bin/sh\n", str(script), mode=0o755)
    assert stat.S_IMODE(script.stat().st_mode) == 0o755
    assert sorted(p.name for p in path.parent.iterdir()) == ["instance-0.env"]  # no temp file left


def test_mode_is_exact_despite_umask_and_on_overwrite(host: SSHExecutor, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    path.chmod(0o644)
    host.put_bytes(b"new secret", str(path), mode=0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b"new secret"
    host.put_bytes(b"shared", str(path), mode=0o664)  # sshd's umask (022) must not strip group write
    assert stat.S_IMODE(path.stat().st_mode) == 0o664


def test_replace_is_atomic_rename(host: SSHExecutor, tmp_path: Path) -> None:
    path = tmp_path / "config"
    host.put_bytes(b"version 1\n" * 1000, str(path))
    before = path.stat().st_ino
    with open(path, "rb") as reader:  # a reader that opened the old file keeps seeing it whole
        host.put_bytes(b"version 2\n" * 1000, str(path))
        assert reader.read() == b"version 1\n" * 1000
    assert path.stat().st_ino != before and path.read_bytes() == b"version 2\n" * 1000


def test_put_file_streams_large_file(host: SSHExecutor, tmp_path: Path) -> None:
    local = tmp_path / "wheel.whl"
    local.write_bytes(os.urandom(3_000_000))
    remote = tmp_path / "srv" / "wheelhouse" / "wheel.whl"
    host.put_file(local, str(remote), mode=0o640)
    assert remote.read_bytes() == local.read_bytes()
    assert stat.S_IMODE(remote.stat().st_mode) == 0o640
    assert host.read_bytes(str(remote)) == local.read_bytes()


def test_put_file_missing_local_is_usage_error(host: SSHExecutor, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=f"{tmp_path}/nope: cannot read local file for {host.host}:/x"):
        host.put_file(tmp_path / "nope", "/x")


def test_read_missing_is_none_and_errors_name_host_and_path(host: SSHExecutor, tmp_path: Path) -> None:
    assert host.read_bytes(str(tmp_path / "missing")) is None
    (tmp_path / "file").write_text("x")
    with pytest.raises(RemoteFileError) as info:
        host.put_bytes(b"y", str(tmp_path / "file" / "below"))  # parent is a file
    assert str(info.value).startswith(f"{host.host}: {tmp_path}/file/below: ")
    with pytest.raises(RemoteFileError, match=f"^{host.host}: {tmp_path}: cannot read"):
        host.read_bytes(str(tmp_path))  # a directory


def test_empty_file(host: SSHExecutor, tmp_path: Path) -> None:
    host.put_bytes(b"", str(tmp_path / "empty"))
    assert host.read_bytes(str(tmp_path / "empty")) == b""
