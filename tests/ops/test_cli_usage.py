"""Usage errors and the default inventory, through the installed ``llamactl`` entry point.

Every usage error of every command (no arguments, unknown command or option, a missing argument or
option value, a bad option value) prints exactly two lines on stderr, the error and a hint naming the
command's --help, and exits 2, never with a traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ENTRY_POINT = Path(sys.executable).with_name("llamactl")
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures/inventories/two-cpu-hosts.yaml"

INVENTORY_COMMANDS = ["validate", "render", "deploy", "status", "restart", "watch", "logs", "rollback"]
ALL_COMMANDS = INVENTORY_COMMANDS + ["undrain", "infer", "serve", "lab", "lab up", "lab down", "lab status",
                                     "model", "model tiny"]
NO_INVENTORY = ("no inventory given: pass the INVENTORY argument, set $LLAMACTL_INVENTORY, or run where "
                "./inventory.yaml exists (looked for {cwd}/inventory.yaml)")

# (command, arguments after it, what the error line must contain)
Case = tuple[str, list[str], str]
NO_ARGUMENTS: list[Case] = [(c, list[str](), NO_INVENTORY) for c in INVENTORY_COMMANDS if c not in ("logs", "render")] + [
    ("render", [], "Missing option '--out' / '-o'."),
    ("", [], ("missing command: expected one of deploy, infer, lab, logs, model, render, restart, rollback, "
              "serve, status, undrain, validate, watch")),
    ("logs", [], "missing argument HOST (a host name from the inventory)"),
    ("undrain", [], "missing argument INSTANCE (host/index, e.g. gpu-01/0)"),
    ("infer", [], "Missing argument 'image'."),
    ("serve", [], "no model given: set LLAMACTL_MODEL or pass --model PATH_OR_HUB_ID"),
    ("lab", [], "missing command: expected one of down, status, up"),
    ("lab up", [], "Missing argument 'N'."),
    ("model", [], "missing command: expected one of tiny"),
    ("model tiny", [], "Missing argument 'directory'."),
]
UNKNOWN: list[Case] = [(c, ["--bogus"], "No such option: --bogus") for c in [""] + ALL_COMMANDS] + [
    ("", ["foo"], "No such command 'foo'."),
    ("lab", ["sideways"], "No such command 'sideways'."),
]
MISSING_VALUE = [
    ("render", ["--out"], "Option '--out' requires an argument."),
    ("deploy", ["--parallel"], "Option '--parallel' requires an argument."),
    ("status", ["--limit"], "Option '--limit' requires an argument."),
    ("restart", ["--batch"], "Option '--batch' requires an argument."),
    ("watch", ["--log-file"], "Option '--log-file' requires an argument."),
    ("logs", ["h1", "--lines"], "Option '--lines' requires an argument."),
    ("rollback", ["--to"], "Option '--to' requires an argument."),
    ("infer", ["x.jpg", "--question"], "Option '--question' requires an argument."),
    ("serve", ["--model"], "Option '--model' requires an argument."),
    ("lab up", ["3", "--dir"], "Option '--dir' requires an argument."),
    ("lab down", ["--dir"], "Option '--dir' requires an argument."),
    ("lab status", ["--dir"], "Option '--dir' requires an argument."),
    ("model tiny", ["d", "--seed"], "Option '--seed' requires an argument."),
]
BAD_VALUE = [
    ("validate", ["--json=yes"], "Option '--json' does not take a value."),
    ("render", ["--out"], "Option '--out' requires an argument."),
    ("deploy", ["--parallel", "many"], "Invalid value for '--parallel'"),
    ("deploy", ["--parallel", "0"], "Invalid value for '--parallel'"),
    ("status", ["--timeout", "soon"], "Invalid value for '--timeout'"),
    ("restart", ["--yes=no"], "Option '--yes' does not take a value."),
    ("watch", ["--interval", "0"], "Invalid value for '--interval'"),
    ("logs", ["h1", "--lines", "-1"], "Invalid value for '--lines'"),
    ("rollback", ["--to"], "Option '--to' requires an argument."),
    ("undrain", ["x.yaml", "h/0", "--force-unlock=3"], "Option '--force-unlock' does not take a value."),
    ("infer", ["x.jpg", "--max-tokens", "0"], "Invalid value for '--max-tokens'"),
    ("serve", ["--port", "http"], "Invalid value for '--port'"),
    ("lab up", ["three"], "Invalid value for 'N'"),
    ("lab status", ["--json=1"], "Option '--json' does not take a value."),
    ("model tiny", ["d", "--seed", "x"], "Invalid value for '--seed'"),
]


def llamactl(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert ENTRY_POINT.is_file(), f"{ENTRY_POINT}: the llamactl entry point is not installed in this venv"
    base = {k: v for k, v in os.environ.items() if k not in ("LLAMACTL_INVENTORY", "LLAMACTL_ENDPOINT",
                                                             "LLAMACTL_MODEL", "LLAMACTL_CONFIG")}
    return subprocess.run([str(ENTRY_POINT), *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={**base, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}, check=False)


def assert_usage_error(proc: subprocess.CompletedProcess[str], command: str, expected: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("error: ") and expected.lower() in lines[0].lower(), lines[0]
    assert lines[1] == f"hint: run '{' '.join(['llamactl', *command.split()])} --help' for usage"


CASES = NO_ARGUMENTS + UNKNOWN + MISSING_VALUE + BAD_VALUE


@pytest.mark.parametrize(("command", "args", "expected"), CASES,
                         ids=[" ".join(["llamactl", *c.split(), *a]) for c, a, _ in CASES])
def test_usage_error(tmp_path: Path, command: str, args: list[str], expected: str) -> None:
    proc = llamactl(*command.split(), *args, cwd=tmp_path)
    assert_usage_error(proc, command, expected.format(cwd=tmp_path))


def test_every_command_is_covered() -> None:
    """The table above names every registered command: a new command gets its usage errors tested."""
    import typer

    from llamactl.cli.main import app

    def walk(command: object, prefix: str) -> list[str]:
        subs = getattr(command, "commands", {})
        names = [prefix] if prefix and not subs else []
        for name, sub in subs.items():
            names += walk(sub, f"{prefix} {name}".strip())
        return names

    registered = set(walk(typer.main.get_command(app), ""))
    assert registered == {c for c in ALL_COMMANDS if c not in ("lab", "model")}
    covered = {c for c, _, _ in UNKNOWN}
    assert registered <= covered


@pytest.mark.parametrize("command", ["validate", "status"])
def test_default_inventory_in_the_working_directory(tmp_path: Path, command: str) -> None:
    shutil.copy(FIXTURE, tmp_path / "inventory.yaml")
    proc = llamactl(command, "--json", *(["--timeout", "0.2"] if command == "status" else []), cwd=tmp_path)
    assert "Traceback" not in proc.stderr
    if command == "validate":
        assert proc.returncode == 0 and '"cluster": "c1"' in proc.stdout
    else:  # nothing answers at the fixture's addresses: a report of every instance down, exit 1
        assert proc.returncode == 1 and '"h1"' in proc.stdout and '"h2"' in proc.stdout


def test_inventory_from_the_environment(tmp_path: Path) -> None:
    shutil.copy(FIXTURE, tmp_path / "cluster.yaml")
    proc = llamactl("validate", cwd=tmp_path, env={"LLAMACTL_INVENTORY": "cluster.yaml"})
    assert proc.returncode == 0 and proc.stdout.startswith("cluster.yaml: valid: cluster c1"), proc.stderr
    proc = llamactl("validate", cwd=tmp_path, env={"LLAMACTL_INVENTORY": "gone.yaml"})
    assert_usage_error(proc, "validate", "$LLAMACTL_INVENTORY names gone.yaml: no such inventory file")


def test_logs_host_alone_uses_the_default_inventory(tmp_path: Path) -> None:
    shutil.copy(FIXTURE, tmp_path / "inventory.yaml")
    proc = llamactl("logs", "gpu-7", cwd=tmp_path)
    assert_usage_error(proc, "logs", "gpu-7: no such host in inventory.yaml (hosts: h1, h2, lb (balancer))")


def test_infer_endpoint_from_the_default_inventory(tmp_path: Path) -> None:
    """No --endpoint: the balancer of ./inventory.yaml is asked (nothing listens there: a connection error)."""
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    proc = llamactl("infer", "photo.png", "--timeout", "1", cwd=tmp_path)
    assert_usage_error(proc, "infer", "no endpoint given: pass --endpoint URL or --inventory FILE, set "
                       "$LLAMACTL_ENDPOINT or $LLAMACTL_INVENTORY, or run where ./inventory.yaml exists")
    text = FIXTURE.read_text().replace("10.9.0.100", "127.0.0.1").replace("balancer:\n", "balancer:\n  listen: 9\n")
    (tmp_path / "inventory.yaml").write_text(text)
    proc = llamactl("infer", "photo.png", "--timeout", "1", cwd=tmp_path)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 3, proc.stderr  # cannot reach: nothing listens on port 9
    assert proc.stderr == "error: http://127.0.0.1:9/infer: connection refused: is the cluster up and the endpoint right?\n"
