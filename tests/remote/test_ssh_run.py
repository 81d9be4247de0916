"""SSHExecutor.run against a real sshd: exit codes, streams, big outputs, stdin, timeouts."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamactl.errors import ConnectError, RemoteCommandError
from llamactl.plan.command import Command
from llamactl.remote.base import TIMEOUT_EXIT_CODE, CommandTimeout
from llamactl.remote.ssh import SSHExecutor, connect
from tests.remote.sshd import NEEDS_SSHD, Lab

pytestmark = NEEDS_SSHD


@pytest.fixture
def host(sshlab: Lab) -> Iterator[SSHExecutor]:
    executor = connect(sshlab.target(sshlab.sshd()))
    yield executor
    executor.close()


def test_exit_codes_and_separate_streams(host: SSHExecutor) -> None:
    ok = host.run(Command.sh("echo out; echo err >&2"))
    assert (ok.exit_code, ok.stdout, ok.stderr, ok.host) == (0, "out\n", "err\n", host.host)
    assert ok.command == "echo out; echo err >&2"
    failed = host.run(Command.sh("echo partial; echo 'it broke' >&2; exit 3"), check=False)
    assert (failed.exit_code, failed.stdout, failed.stderr) == (3, "partial\n", "it broke\n")


def test_failing_command_raises_with_host_display_code_and_stderr(host: SSHExecutor) -> None:
    command = Command(("sh", "-c", 'echo "bad token $1" >&2; exit 7', "sh", "s3cr3t"), secret_indices=frozenset({4}))
    with pytest.raises(RemoteCommandError) as info:
        host.run(command)
    err = info.value
    assert (err.host, err.returncode) == (host.host, 7)
    assert err.command == command.display() and "s3cr3t" not in err.command and "***" in err.command
    assert "bad token s3cr3t" in err.stderr  # stderr is the host's own output, passed on as is
    assert str(err).startswith(f"{host.host}: `") and "exited with 7" in str(err)


def test_argv_is_quoted_once(host: SSHExecutor) -> None:
    tricky = "it's a \"test\" $HOME `id` ; rm -rf /nonexistent"
    assert host.run(Command.of("printf", "%s", tricky)).stdout == tricky


def test_five_megabytes_on_both_streams_at_once(host: SSHExecutor) -> None:
    size = 5_000_000
    script = f"head -c {size} /dev/zero | tr '\\0' o & head -c {size} /dev/zero | tr '\\0' e >&2; wait"
    result = host.run(Command.sh(script), timeout_s=60)
    assert len(result.stdout) == size and set(result.stdout) == {"o"}
    assert len(result.stderr) == size and set(result.stderr) == {"e"}


def test_stdin_large_roundtrip_without_deadlock(host: SSHExecutor) -> None:
    data = bytes(range(256)) * 20_000  # 5 MB: `cat` writes it back while we are still sending
    echoed = host.run(Command.sh("cat | base64 -w0"), stdin=data, timeout_s=60)
    assert echoed.stdout == base64.b64encode(data).decode()
    digest = host.run(Command.of("sha256sum"), stdin=data, timeout_s=60).stdout.split()[0]
    assert digest == hashlib.sha256(data).hexdigest()


def test_command_ignoring_stdin_still_completes(host: SSHExecutor) -> None:
    result = host.run(Command.of("true"), stdin=b"x" * 3_000_000, timeout_s=30)
    assert result.exit_code == 0


def test_timeout_names_host_and_command(host: SSHExecutor) -> None:
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        host.run(Command.of("sleep", "30"), timeout_s=0.5)
    assert time.monotonic() - started < 3
    assert info.value.returncode == TIMEOUT_EXIT_CODE and isinstance(info.value, RemoteCommandError)
    assert str(info.value) == f"{host.host}: `sleep 30` timed out after 0.5 s (exit code 124)"
    assert host.run(Command.of("echo", "still usable")).stdout == "still usable\n"


def test_timeout_kills_the_remote_command(host: SSHExecutor, tmp_path: Path) -> None:
    marker = tmp_path / "survived"
    with pytest.raises(CommandTimeout):
        host.run(Command.sh(f"sleep 2; touch {marker}"), timeout_s=0.3)
    time.sleep(2.5)
    assert not marker.exists()  # the host-side timeout(1) killed the command's process group


def test_timeout_kills_a_command_that_ignores_term(host: SSHExecutor, tmp_path: Path) -> None:
    marker = tmp_path / "stubborn"
    started = time.monotonic()
    with pytest.raises(CommandTimeout):  # TERM is ignored: timeout(1) must still KILL it after -k
        host.run(Command.sh(f"trap '' TERM; sleep 4; touch {marker}"), timeout_s=0.3)
    assert time.monotonic() - started < 4
    time.sleep(4.5 - (time.monotonic() - started))
    assert not marker.exists()


def test_own_exit_124_is_not_a_timeout(host: SSHExecutor) -> None:
    with pytest.raises(RemoteCommandError) as info:
        host.run(Command.sh("exit 124"), timeout_s=30)
    assert not isinstance(info.value, CommandTimeout) and info.value.returncode == 124


def test_background_child_holding_stdout_does_not_hang(host: SSHExecutor) -> None:
    started = time.monotonic()
    result = host.run(Command.sh("echo started; sleep 30 &"), timeout_s=20)
    assert result.stdout == "started\n" and result.exit_code == 0
    assert time.monotonic() - started < 5
    host.run(Command.sh("pkill -x -f 'sleep 30' || true"))


def test_one_connection_is_reused(host: SSHExecutor) -> None:
    seen = {host.run(Command.sh("echo $SSH_CONNECTION")).stdout for _ in range(3)}
    assert len(seen) == 1  # same client port every time: one TCP connection, many channels


def test_lost_connection_is_a_connect_error(host: SSHExecutor) -> None:
    # Kill this session's sshd process: the TCP connection dies under us.
    with pytest.raises((ConnectError, RemoteCommandError)):
        host.run(Command.sh("kill -9 $PPID; sleep 5"))  # no timeout: $PPID must be sshd, not timeout(1)
    with pytest.raises(ConnectError) as info:
        host.run(Command.of("true"))
    assert str(info.value).startswith(f"{host.host}: connection to root@127.0.0.1:") and "lost" in str(info.value)


def test_killed_by_signal_is_a_failure_not_success(host: SSHExecutor) -> None:
    with pytest.raises(RemoteCommandError) as info:
        host.run(Command.sh("kill -9 $$"))
    assert info.value.returncode == -1 and "killed by a signal" in str(info.value)
    assert host.run(Command.of("true")).ok  # the connection itself is fine
