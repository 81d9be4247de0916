"""RecordingExecutor (scripted replies, fake filesystem, safe records) and run_parallel."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from llamactl.errors import ConnectError, RemoteCommandError, UsageError
from llamactl.plan.command import Command
from llamactl.remote import (
    Err,
    Executor,
    FakeFile,
    LocalExecutor,
    Ok,
    RecordingExecutor,
    Reply,
    run_parallel,
)

SECRET = Command(("curl", "-H", "Authorization: Bearer tok-123", "http://x"), secret_indices=frozenset({2}))


def test_is_an_executor() -> None:
    assert isinstance(RecordingExecutor(), Executor) and isinstance(LocalExecutor(), Executor)


def test_scripted_replies_by_shell_string_display_responder_and_default() -> None:
    def responder(command: Command) -> Reply | None:
        return Reply(0, "active\n") if command.argv[:2] == ("systemctl", "is-active") else None

    ex = RecordingExecutor("gpu-01", responses={"python3 --version": Reply(0, "Python 3.11.7\n"),
                                                "uname -r": Reply(stdout="6.1\n")},
                           responder=responder, default=Reply(1, "", "not scripted"))
    assert ex.run(Command.of("python3", "--version")).stdout == "Python 3.11.7\n"
    assert ex.run(Command.of("systemctl", "is-active", "llamactl@0.service")).stdout == "active\n"
    result = ex.run(Command.of("rm", "-rf", "/opt/x"), check=False)
    assert (result.host, result.command, result.exit_code, result.stderr) == ("gpu-01", "rm -rf /opt/x", 1,
                                                                              "not scripted")
    assert ex.commands == ["python3 --version", "systemctl is-active llamactl@0.service", "rm -rf /opt/x"]


def test_check_raises_like_a_real_host_with_masked_command() -> None:
    ex = RecordingExecutor("lb", default=Reply(22, "", "curl: (22) 401"))
    with pytest.raises(RemoteCommandError) as info:
        ex.run(SECRET)
    assert (info.value.host, info.value.returncode) == ("lb", 22)
    assert "tok-123" not in str(info.value) and "***" in info.value.command
    assert all("tok-123" not in str(c) for c in ex.calls)


def test_reply_can_raise_to_simulate_a_dead_host() -> None:
    ex = RecordingExecutor("gpu-02", default=Reply(raises=ConnectError("gpu-02", "connection lost")))
    with pytest.raises(ConnectError, match="gpu-02: connection lost"):
        ex.run(Command.of("true"))


def test_fake_filesystem_and_records_without_content(tmp_path: Path) -> None:
    ex = RecordingExecutor("gpu-01", files={"/etc/old": b"old", "/etc/k": FakeFile(b"x", 0o600)})
    ex.put_bytes(b"LLAMACTL_API_KEYS=supersecret\n", "/etc/llamactl/instance-0.env", 0o600)
    local = tmp_path / "wheel.whl"
    local.write_bytes(b"PK\x03\x04")
    ex.put_file(local, "/opt/llamactl/wheel.whl")
    assert ex.read_bytes("/etc/llamactl/instance-0.env") == b"LLAMACTL_API_KEYS=supersecret\n"
    assert ex.files["/etc/llamactl/instance-0.env"].mode == 0o600
    assert ex.read_bytes("/etc/old") == b"old" and ex.read_bytes("/nope") is None
    assert [str(c) for c in ex.calls] == [
        "gpu-01: put /etc/llamactl/instance-0.env mode 0600 (30 bytes)",
        "gpu-01: put /opt/llamactl/wheel.whl mode 0644 (4 bytes)",
        "gpu-01: read /etc/llamactl/instance-0.env", "gpu-01: read /etc/old", "gpu-01: read /nope"]
    assert all("supersecret" not in repr(c) for c in ex.calls)
    assert ex.uploads[0].sha256 == __import__("hashlib").sha256(b"LLAMACTL_API_KEYS=supersecret\n").hexdigest()
    with pytest.raises(UsageError, match="missing: cannot read local file"):
        ex.put_file(tmp_path / "missing", "/x")


def test_stdin_is_recorded_by_size_only() -> None:
    ex = RecordingExecutor("h")
    ex.run(Command.of("tee", "/x"), stdin=b"password123")
    assert str(ex.calls[0]) == "h: run tee /x (stdin 11 bytes)" and "password123" not in repr(ex.calls)


def test_dry_run_wrapping_a_real_executor(tmp_path: Path) -> None:
    real = tmp_path / "current.conf"
    real.write_bytes(b"live\n")
    probe = Command.of("cat", str(real))
    ex = RecordingExecutor("localhost", inner=LocalExecutor(), passthrough=lambda c: c.argv[0] == "cat")
    assert ex.run(probe).stdout == "live\n"  # a read-only probe really ran
    ex.run(Command.of("rm", str(real)))  # a change is only recorded
    ex.put_bytes(b"new\n", str(real))
    assert real.read_bytes() == b"live\n" and ex.read_bytes(str(real)) == b"new\n"
    assert ex.read_bytes(str(tmp_path / "absent")) is None
    assert [(c.kind, c.dry) for c in ex.calls if c.kind == "run"] == [("run", False), ("run", True)]


def test_run_parallel_keeps_order_and_isolates_failures() -> None:
    def work(n: int) -> int:
        if n % 3 == 0:
            raise ConnectError(f"host{n}", "unreachable")
        time.sleep(0.01 * (5 - n % 5))
        return n * n

    outcomes = run_parallel(range(1, 10), work, max_workers=4)
    assert [o.value if isinstance(o, Ok) else str(o.error) for o in outcomes] == [
        1, 4, "host3: unreachable", 16, 25, "host6: unreachable", 49, 64, "host9: unreachable"]
    assert [o.ok for o in outcomes].count(False) == 3 and isinstance(outcomes[2], Err)


def test_run_parallel_bounds_concurrency() -> None:
    running = peak = 0
    lock = threading.Lock()

    def work(_: int) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1

    run_parallel(range(20), work, max_workers=3)
    assert peak == 3


def test_run_parallel_edges() -> None:
    assert run_parallel([], lambda x: x, max_workers=4) == []
    with pytest.raises(ValueError, match="max_workers must be >= 1, got 0"):
        run_parallel([1], lambda x: x, max_workers=0)

    def interrupt(_: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_parallel([1], interrupt, max_workers=1)
