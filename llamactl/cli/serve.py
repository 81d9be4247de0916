"""``llamactl serve``: run the inference server on this machine (what the systemd unit starts)."""

from __future__ import annotations

import typer

from llamactl.errors import UsageError

_EPILOG = (
    "Every option can also come from the environment (LLAMACTL_MODEL, LLAMACTL_PORT, ...) or from a YAML or "
    "KEY=VALUE file named by LLAMACTL_CONFIG; options given here win. API keys come only from LLAMACTL_API_KEYS "
    "or LLAMACTL_API_KEYS_FILE, never from the command line.\n\n"
    "Example: llamactl serve --model ./tiny-model --host 127.0.0.1 --port 8000 --device cpu"
)


def serve(
    model: str | None = typer.Option(None, "--model", help="Local checkpoint directory or hub id."),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision (commit, tag)."),
    host: str | None = typer.Option(None, "--host", help="Address to bind (default 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="Port to bind (default 8000)."),
    device: str | None = typer.Option(None, "--device", help="cuda, cpu or auto."),
    dtype: str | None = typer.Option(None, "--dtype", help="auto, bfloat16, float16 or float32."),
    quantization: str | None = typer.Option(None, "--quantization", help="none, nf4 or int8 (bitsandbytes), or fp8 (the continuous engine's, on Ada/Hopper GPUs)."),
    engine: str | None = typer.Option(
        None, "--engine", help="auto (continuous batching; the default), continuous or hf."
    ),
    max_batch_size: int | None = typer.Option(
        None, "--max-batch-size", help="The most sequences decoding together."
    ),
    max_wait_ms: float | None = typer.Option(None, "--max-wait-ms", help="How long a batch waits to fill."),
    queue_limit: int | None = typer.Option(None, "--queue-limit", help="Waiting requests before 429."),
    request_timeout_s: float | None = typer.Option(
        None, "--request-timeout-s", help="Per-request deadline (504 after it)."
    ),
    drain_timeout_s: float | None = typer.Option(
        None, "--drain-timeout-s", help="How long SIGTERM waits for in-flight requests."
    ),
    stall_timeout_s: float | None = typer.Option(
        None, "--stall-timeout-s", help="Busy with no engine step for this long: /ready says stalled (503)."
    ),
    max_body_mb: float | None = typer.Option(None, "--max-body-mb", help="Request body limit."),
    instance: str | None = typer.Option(None, "--instance", help="Label shown in /health, e.g. host/0."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Serve Llama 3.2 Vision over HTTP: /infer, /v1/chat/completions, /health, /ready, /metrics."""
    import logging
    import os

    from llamactl.server.settings import Settings, SettingsError

    try:
        settings = Settings.from_env(
            os.environ,
            model=model,
            revision=revision,
            host=host,
            port=port,
            device=device,
            dtype=dtype,
            quantization=quantization,
            engine=engine,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            queue_limit=queue_limit,
            request_timeout_s=request_timeout_s,
            drain_timeout_s=drain_timeout_s,
            stall_timeout_s=stall_timeout_s,
            max_body_mb=max_body_mb,
            instance=instance,
        )
    except SettingsError as exc:
        raise UsageError(str(exc)) from None
    if log_level not in ("debug", "info", "warning", "error"):
        raise UsageError(f"--log-level: expected debug, info, warning or error, found {log_level!r}")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from llamactl.server.app import create_app
    from llamactl.server.cpus import apply_budget
    from llamactl.server.lifecycle import serve as run_server

    # Before torch loads (OpenMP sizes its pool once) and before any thread exists (threads inherit affinity).
    cpu = apply_budget(slot=settings.host_slot, threads=settings.cpu_threads, pin=settings.cpu_pinning)
    logging.getLogger("llamactl.server").info("cpu budget: %s", cpu.describe())
    run_server(create_app(settings, cpu=cpu), settings.host, settings.port, log_level=log_level)


def register(app: typer.Typer) -> None:
    app.command("serve", epilog=_EPILOG)(serve)
