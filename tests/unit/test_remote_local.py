"""LocalExecutor: same protocol as SSH, on this machine."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from llamactl.errors import RemoteCommandError
from llamactl.plan.command import Command
from llamactl.remote import CommandTimeout, LocalExecutor, RemoteFileError


def test_run_codes_streams_stdin_and_quoting() -> None:
    ex = LocalExecutor("lb")
    r = ex.run(Command.sh("echo out; echo err >&2; exit 4"), check=False)
    assert (r.host, r.exit_code, r.stdout, r.stderr) == ("lb", 4, "out\n", "err\n")
    assert ex.run(Command.of("printf", "%s", "a'b \"c\" $x")).stdout == "a'b \"c\" $x"
    assert ex.run(Command.of("wc", "-c"), stdin=b"x" * 3_000_000).stdout.strip() == "3000000"
    with pytest.raises(RemoteCommandError, match="^lb: `false` exited with 1$"):
        ex.run(Command.of("false"))


def test_timeout_kills_the_whole_group(tmp_path: Path) -> None:
    marker = tmp_path / "survived"
    started = time.monotonic()
    with pytest.raises(CommandTimeout, match="^localhost: `sleep 2; touch .*` timed out after 0.3 s"):
        LocalExecutor().run(Command.of("sh", "-c", f"sleep 2; touch {marker}"), timeout_s=0.3)
    assert time.monotonic() - started < 1.5
    time.sleep(2.2)
    assert not marker.exists()


def test_put_atomic_modes_and_read(tmp_path: Path) -> None:
    ex = LocalExecutor()
    target = tmp_path / "a" / "b" / "secret.env"
    old_umask = os.umask(0o077)
    try:
        ex.put_bytes(b"K=v\n", str(target), 0o640)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"K=v\n" and stat.S_IMODE(target.stat().st_mode) == 0o640
    ex.put_bytes(b"K=w\n", str(target), 0o600)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    src = tmp_path / "src"
    src.write_bytes(b"\0" * 100_000)
    ex.put_file(src, str(tmp_path / "copy"))
    assert ex.read_bytes(str(tmp_path / "copy")) == src.read_bytes()
    assert ex.read_bytes(str(tmp_path / "missing")) is None
    assert sorted(p.name for p in target.parent.iterdir()) == ["secret.env"]
    (tmp_path / "file").write_text("")
    with pytest.raises(RemoteFileError, match=f"^localhost: {tmp_path}/file/x: cannot write"):
        ex.put_bytes(b"", str(tmp_path / "file" / "x"))
