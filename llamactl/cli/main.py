"""The ``llamactl`` entry point: registers every command and maps errors to exit codes in one spot."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Optional

import typer
from rich.console import Console

from llamactl import __version__
from llamactl.errors import InventoryError, LlamactlError

# Each module exposes ``register(app: typer.Typer) -> None``. Imports stay lazy inside commands so
# that ``llamactl --help`` on a laptop never imports torch.
COMMAND_MODULES = (
    "llamactl.cli.validate",
    "llamactl.cli.render",
    "llamactl.cli.deploy",
    "llamactl.cli.status",
    "llamactl.cli.restart",
    "llamactl.cli.watch",
    "llamactl.cli.infer",
    "llamactl.cli.logs",
    "llamactl.cli.rollback",
    "llamactl.cli.lab",
    "llamactl.cli.serve",
    "llamactl.cli.model",
)

app = typer.Typer(
    name="llamactl",
    help="Deploy, operate and serve a Llama 3.2 Vision inference cluster over SSH.\n\n"
    "Example: llamactl deploy inventory.yaml",
    no_args_is_help=True,
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


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as exc:  # a command module not written yet
        if exc.name != _name:
            raise
        continue
    _module.register(app)


def report_error(exc: LlamactlError) -> int:
    """Print a user-facing error (no traceback unless --debug) and return its exit code."""
    if DEBUG["on"]:
        err_console.print_exception()
    if isinstance(exc, InventoryError):
        for problem in exc.problems:
            err_console.print(str(problem), markup=False, soft_wrap=True)
    else:
        err_console.print(f"error: {exc}", markup=False, soft_wrap=True)
    return exc.exit_code


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
    except Exception as exc:  # click usage errors come through here with standalone_mode=False
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2 if isinstance(exc, click.UsageError) else exc.exit_code)
        raise
