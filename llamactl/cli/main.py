"""The ``llamactl`` entry point: registers every command and maps errors to exit codes in one spot."""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer
from rich.console import Console

from llamactl import __version__

# Every command module, imported explicitly: a missing or broken one fails here, loudly. Each exposes
# ``register(app: typer.Typer) -> None``; heavy imports (torch) stay inside the commands, so
# ``llamactl --help`` on a laptop never loads them.
from llamactl.cli import (
    deploy,
    infer,
    lab,
    logs,
    model,
    render,
    restart,
    rollback,
    serve,
    status,
    undrain,
    validate,
    watch,
)
from llamactl.cli.helptext import reflow_help
from llamactl.cli.usage import UsageReport, command_path, is_parser_error, parser_error_report
from llamactl.errors import InventoryError, LlamactlError, UsageError

COMMAND_MODULES = (
    validate, render, deploy, status, restart, watch, undrain, infer, logs, rollback, lab, serve, model,
)

app = typer.Typer(
    name="llamactl",
    help="Deploy, operate and serve a Llama 3.2 Vision inference cluster over SSH.\n\n"
    "Example: llamactl deploy inventory.yaml",
    no_args_is_help=False,  # a bare `llamactl` is a usage error (exit 2) naming the commands
    pretty_exceptions_enable=False,
    add_completion=True,
)

err_console = Console(stderr=True, no_color="NO_COLOR" in os.environ or None, highlight=False)
DEBUG = {"on": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llamactl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    version: Optional[bool] = typer.Option(  # noqa: UP007 - typer needs Optional
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    DEBUG["on"] = debug or os.environ.get("LLAMACTL_DEBUG") == "1"


for _module in COMMAND_MODULES:
    _module.register(app)
for _group in app.registered_groups:  # `llamactl lab` alone: a usage error too, not a help page
    if isinstance(_group.typer_instance, typer.Typer):
        _group.typer_instance.info.no_args_is_help = False
reflow_help(app)


def report_error(exc: LlamactlError) -> int:
    """Print a user-facing error (no traceback unless --debug) and return its exit code."""
    if DEBUG["on"]:
        err_console.print_exception()
    if isinstance(exc, InventoryError):
        for problem in exc.problems:
            err_console.print(str(problem), markup=False, soft_wrap=True)
    elif isinstance(exc, UsageError):
        hint = command_path(typer.main.get_command(app), sys.argv[1:]) + " --help"
        _print_usage(UsageReport(str(exc), hint, exc.exit_code))
    else:
        err_console.print(f"error: {exc}", markup=False, soft_wrap=True)
    return exc.exit_code


def _print_usage(report: UsageReport) -> None:
    for line in report.lines():
        err_console.print(line, markup=False, soft_wrap=True)


def main() -> None:
    try:
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except LlamactlError as exc:
        sys.exit(report_error(exc))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:
        if not is_parser_error(exc):  # a bug: its traceback is what we need to see
            raise
        if DEBUG["on"]:
            err_console.print_exception()
        report = parser_error_report(exc, sys.argv[1:], typer.main.get_command(app))
        _print_usage(report)
        sys.exit(report.exit_code)
