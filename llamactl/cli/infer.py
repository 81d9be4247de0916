"""``llamactl infer``: ask the cluster about one image, from a laptop."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

DEFAULT_QUESTION = "Describe this image in detail."


def _console() -> Console:
    from llamactl.cli.console import console_for

    return console_for(stderr=False)


def _endpoint(endpoint: str | None, inventory: Path | None) -> str:
    from llamactl.inventory.locate import locate_endpoint

    source = locate_endpoint(endpoint, inventory, os.environ, Path.cwd())
    if source.url is not None:
        return source.url
    from llamactl.inventory import load_inventory

    assert source.inventory is not None
    return load_inventory(source.inventory).endpoint.rstrip("/")


def _read_image(image: Path) -> bytes:
    from llamactl.errors import UsageError

    try:
        data = image.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{image}: image file not found") from None
    except IsADirectoryError:
        raise UsageError(f"{image}: is a directory, not an image file") from None
    except OSError as exc:
        raise UsageError(f"{image}: cannot read image file: {exc.strerror or exc}") from None
    if not data:
        raise UsageError(f"{image}: image file is empty")
    return data


def show_answer(
    console: Console, body: dict[str, Any], took_s: float, upstream: str | None, url: str
) -> None:
    """Summary, caption, numbered reasoning steps and conclusion, then timing and backend."""
    result = body.get("result") if isinstance(body.get("result"), dict) else {}
    assert isinstance(result, dict)
    for title, key in (("Summary", "summary"), ("Caption", "caption")):
        if result.get(key):
            console.print(f"[bold]{title}[/bold]")
            console.print(str(result[key]), markup=False)
    steps = result.get("reasoning") or []
    if steps:
        console.print("[bold]Reasoning[/bold]")
        for n, step in enumerate(steps, start=1):
            console.print(f"  {n}. {step}", markup=False)
    console.print("[bold]Conclusion[/bold]")
    console.print(str(result.get("conclusion") or "(no conclusion stage in the answer)"), markup=False)
    facts = [f"{took_s:.2f} s"]
    if isinstance(body.get("inference_time"), (int, float)):
        facts.append(f"server {body['inference_time']:.2f} s")
    if body.get("cached"):
        facts.append("cached")
    backend = upstream or f"{url} (no X-Upstream header)"
    console.print(f"[dim]answered in {', '.join(facts)} by {backend}[/dim]")


def infer(
    image: Path = typer.Argument(..., help="Image file (JPEG, PNG, WebP, ...)."),
    question: str = typer.Option(DEFAULT_QUESTION, "--question", "-q", help="What to ask about the image."),
    endpoint: str | None = typer.Option(None, "--endpoint", help="Cluster or server URL, e.g. http://lb:80."),
    inventory: Path | None = typer.Option(
        None, "--inventory", "-i", help="Take the endpoint from this inventory."
    ),
    stream: bool = typer.Option(False, "--stream", help="Print tokens as they are generated."),
    as_json: bool = typer.Option(False, "--json", help="Print the server's JSON answer."),
    api_key_env: str = typer.Option("LLAMACTL_API_KEY", "--api-key-env", help="Env var holding the API key."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1, help="Cap on generated tokens."),
    timeout: float = typer.Option(900.0, "--timeout", help="Seconds to wait for the answer."),
) -> None:
    """Ask the cluster about an image and show the staged answer.

    The endpoint comes from --endpoint, --inventory, $LLAMACTL_ENDPOINT, or the balancer of the inventory
    named by $LLAMACTL_INVENTORY or found as ./inventory.yaml; the API key from the environment variable
    named by --api-key-env (never from the command line).

    Example: llamactl infer photo.jpg --question "What is unusual here?" --endpoint http://lb.example.com
    """
    from llamactl.health import infer_client as ic

    data = _read_image(image)
    url = _endpoint(endpoint, inventory)
    key = os.environ.get(api_key_env) or None
    console = _console()
    request = ic.InferRequest(url, data, question, max_tokens, timeout, key, api_key_env)
    start = time.monotonic()
    if stream:
        text, upstream = ic.stream_chat(request, on_token=None if as_json else _printer(console))
        body = {"result": _stages(text), "full_response": text}
        if as_json:
            typer.echo(json.dumps(body, indent=2))
        else:
            console.print()
            show_answer(console, body, time.monotonic() - start, upstream, url)
        return
    body, upstream = ic.post_infer(request)
    if as_json:
        typer.echo(json.dumps(body, indent=2))
    else:
        show_answer(console, body, time.monotonic() - start, upstream, url)


def _stages(text: str) -> dict[str, Any]:
    """The staged answer of a streamed reply, parsed by the server's own CoT parser."""
    from llamactl.server.cot import parse_staged

    return dict(parse_staged(text).to_dict())


def _printer(console: Console) -> Callable[[str], None]:
    def emit(token: str) -> None:
        console.out(token, end="", highlight=False)
        console.file.flush()

    return emit


def register(app: typer.Typer) -> None:
    app.command("infer")(infer)
