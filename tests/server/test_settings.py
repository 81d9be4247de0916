"""Server settings: env names, config files, precedence, errors naming their source, the config hash."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.server.settings import Settings, SettingsError


def test_env_names_from_the_contract() -> None:
    env = {
        "LLAMACTL_MODEL": "/models/cot",
        "LLAMACTL_REVISION": "abc",
        "LLAMACTL_HOST": "0.0.0.0",
        "LLAMACTL_PORT": "9001",
        "LLAMACTL_DEVICE": "cuda",
        "LLAMACTL_DTYPE": "bfloat16",
        "LLAMACTL_QUANTIZATION": "nf4",
        "LLAMACTL_MAX_BATCH_SIZE": "16",
        "LLAMACTL_MAX_WAIT_MS": "7.5",
        "LLAMACTL_QUEUE_LIMIT": "100",
        "LLAMACTL_REQUEST_TIMEOUT_S": "30",
        "LLAMACTL_DRAIN_TIMEOUT_S": "45",
        "LLAMACTL_MAX_BODY_MB": "10",
        "LLAMACTL_MAX_IMAGE_PIXELS": "1000000",
        "LLAMACTL_MAX_IMAGE_MB": "5",
        "LLAMACTL_API_KEYS": "a, b,,c",
        "LLAMACTL_CACHE_MAX_ENTRIES": "10",
        "LLAMACTL_CACHE_MAX_MB": "1.5",
        "LLAMACTL_CACHE_INCLUDE_SAMPLED": "true",
        "LLAMACTL_GEN_MAX_NEW_TOKENS": "2048",
        "LLAMACTL_GEN_TEMPERATURE": "0.6",
        "LLAMACTL_GEN_TOP_P": "0.9",
        "LLAMACTL_GEN_DO_SAMPLE": "1",
        "LLAMACTL_INSTANCE": "gpu1/0",
        "UNRELATED": "x",
    }
    s = Settings.from_env(env)
    assert (s.model, s.revision, s.host, s.port, s.device, s.dtype) == (
        "/models/cot",
        "abc",
        "0.0.0.0",
        9001,
        "cuda",
        "bfloat16",
    )
    assert (s.quantization, s.max_batch_size, s.max_wait_ms, s.queue_limit) == ("nf4", 16, 7.5, 100)
    assert (s.request_timeout_s, s.drain_timeout_s, s.max_body_mb, s.max_image_pixels, s.max_image_mb) == (
        30,
        45,
        10,
        1_000_000,
        5,
    )
    assert s.api_keys == ("a", "b", "c")
    assert (s.cache_max_entries, s.cache_max_mb, s.cache_include_sampled) == (10, 1.5, True)
    assert (s.gen_max_new_tokens, s.gen_temperature, s.gen_top_p, s.gen_do_sample) == (2048, 0.6, 0.9, True)
    assert s.instance == "gpu1/0"


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "c.env"
    cfg.write_text(
        "# comment\nLLAMACTL_MODEL=/from/file\nLLAMACTL_PORT=1\nqueue_limit = '7'\nMAX_BATCH_SIZE=\"3\"\n"
    )
    s = Settings.from_env({"LLAMACTL_CONFIG": str(cfg), "LLAMACTL_PORT": "2"}, max_batch_size=5)
    assert (s.model, s.port, s.queue_limit, s.max_batch_size) == ("/from/file", 2, 7, 5)
    y = tmp_path / "c.yaml"
    y.write_text("model: /from/yaml\nmax_wait_ms: 3\napi_keys: k1,k2\n")
    s = Settings.from_env({"LLAMACTL_CONFIG": str(y)}, port=None)
    assert (s.model, s.max_wait_ms, s.api_keys) == ("/from/yaml", 3, ("k1", "k2"))


def test_api_keys_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nfile-key-1\n\nfile-key-2\n")
    s = Settings.from_env(
        {"LLAMACTL_MODEL": "m", "LLAMACTL_API_KEYS": "env-key", "LLAMACTL_API_KEYS_FILE": str(keys)}
    )
    assert s.api_keys == ("env-key", "file-key-1", "file-key-2")


@pytest.mark.parametrize(
    ("env", "overrides", "message"),
    [
        ({}, {}, "no model given"),
        (
            {"LLAMACTL_MODEL": "m", "LLAMACTL_PORT": "http"},
            {},
            "LLAMACTL_PORT: Input should be a valid integer",
        ),
        (
            {"LLAMACTL_MODEL": "m"},
            {"max_batch_size": 0},
            "--max-batch-size: Input should be greater than or equal to 1",
        ),
        (
            {"LLAMACTL_MODEL": "m", "LLAMACTL_QUANTIZATION": "4bit"},
            {},
            "LLAMACTL_QUANTIZATION: Input should be",
        ),
        (
            {"LLAMACTL_MODEL": "m", "LLAMACTL_GEN_TOP_P": "0"},
            {},
            "LLAMACTL_GEN_TOP_P: Input should be greater",
        ),
        (
            {"LLAMACTL_MODEL": "m", "LLAMACTL_VISION_PRIORITY": "last"},
            {},
            "LLAMACTL_VISION_PRIORITY: Input should be 'equal', 'low', 'high' or 'first'",
        ),
        (
            {"LLAMACTL_MODEL": "m", "LLAMACTL_API_KEYS_FILE": "/nonexistent/keys"},
            {},
            "cannot read /nonexistent/keys",
        ),
    ],
)
def test_errors_name_the_setting_and_its_source(
    env: dict[str, str], overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env, **overrides)
    assert message in str(info.value)


def test_config_file_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.env"
    bad.write_text("LLAMACTL_MODEL=m\njust words\n")
    with pytest.raises(SettingsError, match=r"bad.env:2: expected KEY=VALUE"):
        Settings.from_env({"LLAMACTL_CONFIG": str(bad)})
    unknown = tmp_path / "u.yaml"
    unknown.write_text("model: m\nmax_batchsize: 3\n")
    with pytest.raises(SettingsError, match=r"u.yaml: max_batchsize: unknown setting"):
        Settings.from_env({"LLAMACTL_CONFIG": str(unknown)})
    notmap = tmp_path / "l.yaml"
    notmap.write_text("- a\n- b\n")
    with pytest.raises(SettingsError, match="expected a mapping"):
        Settings.from_env({"LLAMACTL_CONFIG": str(notmap)})


def test_secret_values_never_appear_in_errors() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"LLAMACTL_MODEL": "m", "LLAMACTL_API_KEYS": "s3cret", "LLAMACTL_PORT": "-1"})
    assert "s3cret" not in str(info.value)


def test_config_hash_ignores_placement_and_hides_keys(tmp_path: Path) -> None:
    base = Settings.from_env({"LLAMACTL_MODEL": "m", "LLAMACTL_API_KEYS": "k1"})
    moved = Settings.from_env(
        {
            "LLAMACTL_MODEL": "m",
            "LLAMACTL_API_KEYS": "k1",
            "LLAMACTL_HOST": "0.0.0.0",
            "LLAMACTL_PORT": "9",
            "LLAMACTL_INSTANCE": "h/3",
        }
    )
    assert base.config_hash() == moved.config_hash()
    assert len(base.config_hash()) == 16 and int(base.config_hash(), 16) >= 0
    assert (
        Settings.from_env({"LLAMACTL_MODEL": "m", "LLAMACTL_API_KEYS": "k2"}).config_hash()
        != base.config_hash()
    )
    assert (
        Settings.from_env(
            {"LLAMACTL_MODEL": "m", "LLAMACTL_API_KEYS": "k1", "LLAMACTL_MAX_BATCH_SIZE": "9"}
        ).config_hash()
        != base.config_hash()
    )
    # keys from a file or from the variable give the same effective config, so the same hash
    keys = tmp_path / "keys"
    keys.write_text("k1\n")
    from_file = Settings.from_env({"LLAMACTL_MODEL": "m", "LLAMACTL_API_KEYS_FILE": str(keys)})
    assert from_file.config_hash() == base.config_hash()


def test_settings_module_imports_no_heavy_packages() -> None:
    import subprocess
    import sys

    code = (
        "import sys, llamactl.server.settings as s; "
        "bad = [m for m in ('torch', 'fastapi', 'transformers', 'starlette') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_engine_and_stall_timeout_from_env_and_flags() -> None:
    default = Settings.from_env({"LLAMACTL_MODEL": "m"})
    assert (default.engine, default.stall_timeout_s) == ("auto", 60.0)
    env = {"LLAMACTL_MODEL": "m", "LLAMACTL_ENGINE": "hf", "LLAMACTL_STALL_TIMEOUT_S": "2.5"}
    s = Settings.from_env(env)
    assert (s.engine, s.stall_timeout_s) == ("hf", 2.5)
    flagged = Settings.from_env(env, engine="continuous", stall_timeout_s=30.0)
    assert (flagged.engine, flagged.stall_timeout_s) == ("continuous", 30.0)


@pytest.mark.parametrize(
    ("env", "overrides", "message"),
    [
        ({"LLAMACTL_ENGINE": "vllm"}, {}, "LLAMACTL_ENGINE: Input should be 'auto', 'continuous' or 'hf'"),
        ({"LLAMACTL_ENGINE": "HF"}, {}, "LLAMACTL_ENGINE: Input should be 'auto', 'continuous' or 'hf'"),
        ({}, {"engine": "static"}, "--engine: Input should be 'auto', 'continuous' or 'hf'"),
        ({"LLAMACTL_STALL_TIMEOUT_S": "0"}, {}, "LLAMACTL_STALL_TIMEOUT_S: Input should be greater than 0"),
        ({}, {"stall_timeout_s": -1.0}, "--stall-timeout-s: Input should be greater than 0"),
        (
            {"LLAMACTL_STALL_TIMEOUT_S": "inf"},
            {},
            "LLAMACTL_STALL_TIMEOUT_S: Input should be a finite number",
        ),
        (
            {"LLAMACTL_STALL_TIMEOUT_S": "soon"},
            {},
            "LLAMACTL_STALL_TIMEOUT_S: Input should be a valid number, unable to parse string as a number",
        ),
    ],
)
def test_engine_and_stall_timeout_errors(
    env: dict[str, str], overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"LLAMACTL_MODEL": "m", **env}, **overrides)
    assert str(info.value) == "invalid server settings: " + message


def test_engine_and_stall_timeout_are_part_of_the_config_hash() -> None:
    base = Settings.from_env({"LLAMACTL_MODEL": "m"}).config_hash()
    hashes = {
        Settings.from_env({"LLAMACTL_MODEL": "m", "LLAMACTL_ENGINE": name}).config_hash()
        for name in ("auto", "continuous", "hf")
    }
    assert len(hashes) == 3 and base in hashes
    assert Settings.from_env({"LLAMACTL_MODEL": "m", "LLAMACTL_STALL_TIMEOUT_S": "61"}).config_hash() != base
    # the rendered form of the default ("60") is the default
    assert Settings.from_env({"LLAMACTL_MODEL": "m", "LLAMACTL_STALL_TIMEOUT_S": "60"}).config_hash() == base
