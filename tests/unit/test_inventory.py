"""Loading valid inventories: merging, instances, interpolation, API keys, selection, expected_env."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.errors import UsageError
from llamactl.inventory import expected_env, load_inventory
from llamactl.inventory.select import limit

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "inventories"


def test_example_merges_defaults_groups_hosts() -> None:
    inv = load_inventory(ROOT / "inventory.example.yaml", env={})
    assert inv.cluster == "vision-prod"
    assert [(h.name, h.group, h.gpus) for h in inv.hosts] == [
        ("gpu-01", "h100", list(range(8))),
        ("gpu-02", "h100", [0, 1, 2, 3]),
        ("gpu-03", "l4", [0, 1]),
    ]
    gpu03 = inv.host("gpu-03")
    assert gpu03.ssh.port == 2222 and gpu03.ssh.user == "deploy"  # host overrides one key, keeps the rest
    assert gpu03.model.quantization == "nf4" and gpu03.model.dtype == "bfloat16"
    assert gpu03.server.max_batch_size == 4 and gpu03.server.queue_limit == 64
    assert inv.host("gpu-01").model.quantization == "none"
    assert [i.id for i in inv.instances()][:3] == ["gpu-01/0", "gpu-01/1", "gpu-01/2"]
    last = inv.instances()[-1]
    assert (last.id, last.gpu, last.port, last.unit, last.url) == (
        "gpu-03/1",
        1,
        8001,
        "llamactl@1.service",
        "http://10.0.0.13:8001",
    )
    assert inv.endpoint == "http://10.0.0.2:80"
    lb = inv.balancer.hosts[0]
    assert (lb.name, lb.address, lb.ssh.user) == ("lb-01", "10.0.0.2", "deploy")  # takes defaults.ssh
    assert inv.balancer.next_upstream_timeout_s == inv.balancer.proxy_read_timeout_s == 900
    assert inv.rollout.batch == "25%" and inv.rollout.batch_size(14) == 3
    assert inv.health.fall == 3


def test_lists_replace_and_explicit_ports_and_tls_endpoint() -> None:
    inv = load_inventory(FIXTURES / "many.yaml", env={"HF_TOKEN": "hf_secret"})
    b2 = inv.host("b-2")
    assert b2.gpus == [1, 3, 5] and [i.port for i in b2.instances] == [7001, 7005, 7009]
    c1 = inv.host("c-1")
    assert c1.gpus == [] and [(i.gpu, i.port) for i in c1.instances] == [(None, 9000)]
    assert c1.model.source == "/models/cpu" and c1.model.quantization == "int8"  # mapping merged key by key
    assert inv.endpoint == "https://10.1.9.1:8443"
    assert [h.ssh.user for h in inv.balancer.hosts] == ["ops", "admin"]
    assert inv.balancer.hosts[1].ssh.port == 2200


def test_api_keys_from_a_file_relative_to_the_inventory() -> None:
    inv = load_inventory(FIXTURES / "many.yaml", env={"HF_TOKEN": "hf_secret"})
    ref = inv.host("a-1").server.api_keys
    assert ref is not None and ref.file == str(FIXTURES / "keys.txt")
    assert ref.keys == ("key-one", "key-two")
    assert "key-one" not in repr(ref)  # never shown by accident


def test_api_keys_from_the_environment(tmp_path: Path) -> None:
    text = (
        (ROOT / "inventory.example.yaml")
        .read_text()
        .replace("    # api_keys:  ", "    api_keys:  ")
        .replace("    #   env: LLAMACTL_API_KEYS", "      env: LLAMACTL_API_KEYS")
    )
    (tmp_path / "inv.yaml").write_text(text)
    inv = load_inventory(tmp_path / "inv.yaml", env={"LLAMACTL_API_KEYS": " k1, k2 ,"})
    env = expected_env(inv, inv.instances()[0])
    assert env["LLAMACTL_API_KEYS"] == "k1,k2"


def test_interpolation_and_escape(tmp_path: Path) -> None:
    (tmp_path / "inv.yaml").write_text(
        "version: 1\ncluster: c\ndefaults:\n  model: {source: '${MODELS}/tiny'}\n"
        "  server: {env: {PRICE: 'costs $${DOLLARS} and $5', HF_TOKEN: '${TOK}'}}\n"
        "groups: {g: {hosts: {h: {address: 10.0.0.1}}}}\nbalancer: {hosts: {lb: {address: 10.0.0.2}}}\n"
    )
    inv = load_inventory(tmp_path / "inv.yaml", env={"MODELS": "/srv/models", "TOK": "hf_1"})
    host = inv.hosts[0]
    assert host.model.source == "/srv/models/tiny"
    assert host.server.env == {"PRICE": "costs ${DOLLARS} and $5", "HF_TOKEN": "hf_1"}
    assert host.gpus == [0]  # the default: one GPU


def test_expected_env_for_cpu_and_gpu_instances() -> None:
    inv = load_inventory(FIXTURES / "many.yaml", env={"HF_TOKEN": "hf_secret"})
    gpu = expected_env(inv, inv.host("b-1").instances[2])
    assert (
        gpu["LLAMACTL_INSTANCE"],
        gpu["LLAMACTL_PORT"],
        gpu["LLAMACTL_DEVICE"],
        gpu["CUDA_VISIBLE_DEVICES"],
    ) == ("b-1/2", "9002", "cuda", "5")
    assert gpu["LLAMACTL_QUANTIZATION"] == "int8" and gpu["LLAMACTL_MODEL"] == "Xkev/Llama-3.2V-11B-cot"
    assert gpu["LLAMACTL_API_KEYS"] == "key-one,key-two" and gpu["HF_TOKEN"] == "hf_secret"
    cpu = expected_env(inv, inv.host("c-1").instances[0])
    assert (cpu["LLAMACTL_DEVICE"], cpu["CUDA_VISIBLE_DEVICES"], cpu["LLAMACTL_HOST"]) == (
        "cpu",
        "",
        "127.0.0.1",
    )
    assert cpu["LLAMACTL_REQUEST_TIMEOUT_S"] == "600" and cpu["LLAMACTL_GEN_TEMPERATURE"] == "0.6"
    assert cpu["HF_HOME"] == "/var/lib/llamactl/hf"
    every = {
        "LLAMACTL_MODEL",
        "LLAMACTL_REVISION",
        "LLAMACTL_HOST",
        "LLAMACTL_PORT",
        "LLAMACTL_DEVICE",
        "LLAMACTL_DTYPE",
        "LLAMACTL_QUANTIZATION",
        "LLAMACTL_ENGINE",
        "LLAMACTL_MAX_BATCH_SIZE",
        "LLAMACTL_MAX_WAIT_MS",
        "LLAMACTL_QUEUE_LIMIT",
        "LLAMACTL_REQUEST_TIMEOUT_S",
        "LLAMACTL_DRAIN_TIMEOUT_S",
        "LLAMACTL_STALL_TIMEOUT_S",
        "LLAMACTL_MAX_BODY_MB",
        "LLAMACTL_MAX_IMAGE_PIXELS",
        "LLAMACTL_MAX_IMAGE_MB",
        "LLAMACTL_CACHE_MAX_ENTRIES",
        "LLAMACTL_CACHE_MAX_MB",
        "LLAMACTL_CACHE_INCLUDE_SAMPLED",
        "LLAMACTL_GEN_MAX_NEW_TOKENS",
        "LLAMACTL_GEN_TEMPERATURE",
        "LLAMACTL_GEN_TOP_P",
        "LLAMACTL_GEN_DO_SAMPLE",
        "LLAMACTL_INSTANCE",
    }
    assert every <= set(cpu)


def test_expected_env_feeds_the_server_settings_hash() -> None:
    settings = pytest.importorskip("llamactl.server.settings")
    inv = load_inventory(FIXTURES / "many.yaml", env={"HF_TOKEN": "hf_secret"})
    a, b = (expected_env(inv, i) for i in inv.host("a-1").instances)
    ha = settings.Settings.from_env(a).config_hash()
    assert len(ha) == 16 and ha == settings.Settings.from_env(b).config_hash()  # port/label excluded
    c = expected_env(inv, inv.host("c-1").instances[0])
    assert settings.Settings.from_env(c).config_hash() != ha


def test_engine_and_stall_timeout_reach_the_env_file_and_the_hash(tmp_path: Path) -> None:
    settings = pytest.importorskip("llamactl.server.settings")
    server = "  server:\n    user: root\n"
    text = (FIXTURES / "small.yaml").read_text()
    text = text.replace(server, server + "    engine: hf\n    stall_timeout_s: 12.5\n")
    assert "engine: hf" in text
    (tmp_path / "inv.yaml").write_text(text)
    inv = load_inventory(tmp_path / "inv.yaml", env={})
    env = expected_env(inv, inv.instances()[0])
    assert (env["LLAMACTL_ENGINE"], env["LLAMACTL_STALL_TIMEOUT_S"]) == ("hf", "12.5")
    server = settings.Settings.from_env(env)
    assert (server.engine, server.stall_timeout_s) == ("hf", 12.5)
    default = load_inventory(FIXTURES / "small.yaml", env={})
    plain = expected_env(default, default.instances()[0])
    assert (plain["LLAMACTL_ENGINE"], plain["LLAMACTL_STALL_TIMEOUT_S"]) == ("auto", "60")
    assert settings.Settings.from_env(plain).config_hash() != server.config_hash()


def test_limit_by_names_and_globs() -> None:
    inv = load_inventory(ROOT / "inventory.example.yaml", env={})
    assert [h.name for h in limit(inv, None)] == ["gpu-01", "gpu-02", "gpu-03"]
    assert [h.name for h in limit(inv, "gpu-03,gpu-01")] == ["gpu-01", "gpu-03"]
    assert [h.name for h in limit(inv, "gpu-0[12]")] == ["gpu-01", "gpu-02"]
    with pytest.raises(UsageError, match="'gpu-9' matches no host"):
        limit(inv, "gpu-01,gpu-9")


def test_unquoted_interpolation_is_typed_like_yaml(tmp_path: Path) -> None:
    (tmp_path / "inv.yaml").write_text(
        "version: 1\ncluster: c\ndefaults:\n  base_port: ${PORT}\n  model: {source: /m, revision: '${REV}'}\n"
        "groups: {g: {hosts: {h: {address: 10.0.0.1}}}}\nbalancer: {hosts: {lb: {address: 10.0.0.2}}}\n"
    )
    inv = load_inventory(tmp_path / "inv.yaml", env={"PORT": "9100", "REV": "123"})
    assert inv.hosts[0].base_port == 9100 and inv.hosts[0].model.revision == "123"


def test_ssh_paths_resolved_relative_to_the_inventory_and_defaults_left_to_ssh(tmp_path: Path) -> None:
    (tmp_path / "inv.yaml").write_text(
        "version: 1\ncluster: c\ndefaults:\n  ssh: {identity_file: keys/id, port: 2200}\n  model: {source: /m}\n"
        "groups: {g: {hosts: {h: {address: 10.0.0.1}}}}\nbalancer: {hosts: {lb: {address: 10.0.0.2}}}\n"
    )
    inv = load_inventory(tmp_path / "inv.yaml", env={})
    ssh = inv.hosts[0].ssh
    assert ssh.identity_file == str(tmp_path / "keys" / "id")
    assert ssh.known_hosts == "~/.ssh/known_hosts"  # not given: ~/.ssh/config may still decide
    assert ssh.model_fields_set == {"identity_file", "port"}
    assert inv.balancer.hosts[0].ssh.model_fields_set == {"identity_file", "port"}
