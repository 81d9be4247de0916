"""The environment an instance's server runs with: what its env file holds, as a plain mapping.

``status`` feeds this to ``llamactl.server.settings.Settings.from_env(...).config_hash()`` to know the hash a
correctly deployed instance reports, so the file's content and this mapping must never diverge:
``llamactl.plan.render`` writes exactly this mapping.
"""

from __future__ import annotations

from llamactl.inventory.cluster import HostSpec, Instance, Inventory

STATE_DIR = "/var/lib/llamactl"  # systemd StateDirectory=llamactl: the one place the server may write


def number(value: float | int) -> str:
    """600.0 -> "600", 0.6 -> "0.6": integers stay integers so any parser reads them."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def _bool(value: bool) -> str:
    return "true" if value else "false"


def expected_env(inv: Inventory, instance: Instance) -> dict[str, str]:
    """Every variable in ``/etc/llamactl/instance-<index>.env`` for ``instance``, in file order."""
    host: HostSpec = inv.host(instance.host)
    model, server, gen = host.model, host.server, host.model.generation
    env: dict[str, str] = {
        "LLAMACTL_INSTANCE": instance.id,
        "LLAMACTL_HOST": host.bind,
        "LLAMACTL_PORT": str(instance.port),
        "LLAMACTL_DEVICE": "cpu" if instance.gpu is None else "cuda",
        # Empty for CPU instances so a stray GPU on a lab machine is never picked up.
        "CUDA_VISIBLE_DEVICES": "" if instance.gpu is None else str(instance.gpu),
        "LLAMACTL_MODEL": model.source,
        "LLAMACTL_REVISION": model.revision,
        "LLAMACTL_DTYPE": model.dtype,
        "LLAMACTL_QUANTIZATION": model.quantization,
        "LLAMACTL_ENGINE": server.engine,
        "LLAMACTL_MAX_BATCH_SIZE": str(server.max_batch_size),
        "LLAMACTL_MAX_WAIT_MS": str(server.max_wait_ms),
        "LLAMACTL_QUEUE_LIMIT": str(server.queue_limit),
        "LLAMACTL_REQUEST_TIMEOUT_S": number(server.request_timeout_s),
        "LLAMACTL_DRAIN_TIMEOUT_S": number(server.drain_timeout_s),
        "LLAMACTL_STALL_TIMEOUT_S": number(server.stall_timeout_s),
        "LLAMACTL_MAX_BODY_MB": str(server.max_body_mb),
        "LLAMACTL_MAX_IMAGE_PIXELS": str(server.max_image_pixels),
        "LLAMACTL_MAX_IMAGE_MB": str(server.max_image_mb),
        "LLAMACTL_CACHE_MAX_ENTRIES": str(server.cache.max_entries),
        "LLAMACTL_CACHE_MAX_MB": str(server.cache.max_mb),
        "LLAMACTL_CACHE_INCLUDE_SAMPLED": _bool(server.cache.include_sampled),
        "LLAMACTL_GEN_MAX_NEW_TOKENS": str(gen.max_new_tokens),
        "LLAMACTL_GEN_TEMPERATURE": number(gen.temperature),
        "LLAMACTL_GEN_TOP_P": number(gen.top_p),
        "LLAMACTL_GEN_DO_SAMPLE": _bool(gen.do_sample),
        "LLAMACTL_CPU_THREADS": "0" if server.cpu_threads == "auto" else str(server.cpu_threads),
        "LLAMACTL_CPU_PINNING": _bool(server.cpu_pinning),
        # This instance's place among the host's servers: each takes its share of the CPUs (server/cpus.py).
        "LLAMACTL_HOST_SLOT": f"{host.instances.index(instance)}/{len(host.instances)}",
        "HF_HOME": f"{STATE_DIR}/hf",
        "XDG_CACHE_HOME": f"{STATE_DIR}/cache",
    }
    if server.api_keys is not None and server.api_keys.keys:
        env["LLAMACTL_API_KEYS"] = ",".join(server.api_keys.keys)
    if inv.redis is not None:
        env["LLAMACTL_REDIS_URL"] = inv.redis.url  # holds the password: this file is 0600
        env["LLAMACTL_CACHE_SHARED_MB"] = str(inv.redis.cache_mb)
    env.update(server.env)  # validated: extras never override LLAMACTL_* or CUDA_VISIBLE_DEVICES
    return env
