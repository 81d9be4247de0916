"""The server's metrics registry on its own: engine names, values read from callables, promtool's check."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from llamactl.server.metrics import Metrics

ENGINE_NAMES = (
    "llamactl_time_per_output_token_seconds_bucket",
    "llamactl_inter_token_latency_seconds_bucket",
    "llamactl_kv_pool_usage_ratio",
    "llamactl_cross_pool_usage_ratio",
    "llamactl_requests_waiting_for_memory",
    "llamactl_engine_stalled",
    "llamactl_engine_steps_total",
    "llamactl_engine_info",
    "llamactl_num_requests_running",
    "llamactl_num_requests_waiting",
)


def sample(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, name
    return float(found.group(1))


def basic() -> Metrics:
    return Metrics(running=lambda: 0, waiting=lambda: 0, gpu_memory=lambda: None)


def test_every_engine_name_is_exposed_with_zero_defaults() -> None:
    text = basic().render().decode()
    for name in ENGINE_NAMES:
        assert re.search(rf"^{name}[ {{]", text, re.MULTILINE), name
    zero = ENGINE_NAMES[2:7] + (
        "llamactl_time_per_output_token_seconds_count",
        "llamactl_inter_token_latency_seconds_count",
    )
    for name in zero:
        assert sample(text, name) == 0.0, name
    assert sample(text, 'llamactl_engine_info{name="unknown"}') == 1.0


@dataclass
class EngineState:
    """What an engine would report; the test changes it between scrapes."""

    kv: float = 0.5
    cross: float = 0.25
    held: int = 2
    stalled: bool = False
    steps: int = 10
    name: str = "continuous"


def test_values_come_from_the_engine_at_scrape_time() -> None:
    e = EngineState()
    m = Metrics(
        running=lambda: 5,
        waiting=lambda: 3,
        gpu_memory=lambda: (1, 2),
        kv_pool_usage=lambda: e.kv,
        cross_pool_usage=lambda: e.cross,
        waiting_for_memory=lambda: e.held,
        stalled=lambda: e.stalled,
        engine_steps=lambda: e.steps,
        engine_name=lambda: e.name,
    )
    text = m.render().decode()
    assert sample(text, "llamactl_kv_pool_usage_ratio") == 0.5
    assert sample(text, "llamactl_cross_pool_usage_ratio") == 0.25
    assert sample(text, "llamactl_requests_waiting_for_memory") == 2.0
    assert sample(text, "llamactl_engine_stalled") == 0.0
    assert sample(text, "llamactl_engine_steps_total") == 10.0
    assert sample(text, 'llamactl_engine_info{name="continuous"}') == 1.0
    e.stalled, e.steps, e.name, e.kv = True, 11, "hf", 1.0
    text = m.render().decode()
    assert sample(text, "llamactl_engine_stalled") == 1.0
    assert sample(text, "llamactl_engine_steps_total") == 11.0
    assert sample(text, 'llamactl_engine_info{name="hf"}') == 1.0 and "continuous" not in text
    assert sample(text, "llamactl_kv_pool_usage_ratio") == 1.0


def test_the_callables_are_not_read_while_the_registry_is_built() -> None:
    ready = False

    def steps() -> float:
        assert ready, "read before the engine exists"
        return 7.0

    def name() -> str:
        assert ready, "read before the engine exists"
        return "continuous"

    m = Metrics(
        running=lambda: 0, waiting=lambda: 0, gpu_memory=lambda: None, engine_steps=steps, engine_name=name
    )
    ready = True
    assert sample(m.render().decode(), "llamactl_engine_steps_total") == 7.0


def test_every_error_reason_is_exposed_at_zero_from_the_start() -> None:
    """Each reason the server reports has its series before the first failure (rate() and alerts see 0), and
    the list covers every reason the server's code passes (read from its source)."""
    from pathlib import Path

    from llamactl.server import metrics as metrics_module

    text = basic().render().decode()
    for reason in metrics_module.ERROR_REASONS:
        assert sample(text, f'llamactl_request_errors_total{{reason="{reason}"}}') == 0.0, reason
    source = Path(metrics_module.__file__).parent
    used = {m for f in source.glob("*.py") for m in re.findall(r'\berror\("([a-z_]+)"\)', f.read_text())}
    assert used and used <= set(metrics_module.ERROR_REASONS), used - set(metrics_module.ERROR_REASONS)


def test_token_histograms_observe_seconds() -> None:
    m = basic()
    for gap in (0.008, 0.009, 0.04):
        m.inter_token_latency.observe(gap)
    m.time_per_output_token.observe(0.019)
    text = m.render().decode()
    assert sample(text, 'llamactl_inter_token_latency_seconds_bucket{le="0.01"}') == 2.0
    assert sample(text, "llamactl_inter_token_latency_seconds_count") == 3.0
    assert sample(text, 'llamactl_time_per_output_token_seconds_bucket{le="0.02"}') == 1.0


def test_promtool_accepts_the_exposition() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    m = Metrics(running=lambda: 1, waiting=lambda: 0, gpu_memory=lambda: (1, 2), engine_name=lambda: "hf")
    m.inter_token_latency.observe(0.01)
    check = subprocess.run(
        [promtool, "check", "metrics"], check=False, input=m.render(), capture_output=True, timeout=30
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
