"""``llamactl model``: model checkpoint helpers (today: build the tiny test checkpoint)."""

from __future__ import annotations

from pathlib import Path

import typer

from llamactl.errors import UsageError

model_app = typer.Typer(
    help="Model checkpoint helpers.\n\nExample: llamactl model tiny ./tiny-model",
    no_args_is_help=True,
)


@model_app.command("tiny")
def tiny(
    directory: Path = typer.Argument(
        ..., help="Directory to write the checkpoint into (created if missing)."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same checkpoint."),
) -> None:
    """Build a tiny random-weight Llama 3.2 Vision checkpoint (about 1.2 MB) for tests, the lab and demos.

    It has the real model's architecture, file layout, special tokens and prompt format, loads with
    AutoProcessor + AutoModelForImageTextToText offline, and answers in SUMMARY/CAPTION/REASONING/CONCLUSION
    stages.

    Example: llamactl model tiny ./tiny-model --seed 1
    """
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory}: exists and is not a directory")
    if directory.is_dir() and any(p.name == "model.safetensors" for p in directory.iterdir()):
        typer.echo(f"overwriting the checkpoint in {directory}", err=True)
    from transformers.utils import logging as hf_logging  # heavy imports stay out of `llamactl --help`

    from llamactl.server.tiny import build_tiny_checkpoint

    # A 1 MB save needs no "Writing model shards" progress bar.
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    try:
        out = build_tiny_checkpoint(directory, seed=seed)
    except OSError as exc:
        raise UsageError(f"{directory}: cannot write the checkpoint: {exc.strerror or exc}") from exc
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    typer.echo(f"wrote tiny checkpoint to {out.resolve()} ({size / 1e6:.1f} MB, seed {seed})")


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
