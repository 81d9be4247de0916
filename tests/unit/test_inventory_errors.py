"""Exact messages for invalid inventories: `FILE:LINE:COL: dotted.path: found X, expected Y`, every problem."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from llamactl.errors import InventoryError, UsageError
from llamactl.inventory import load_inventory

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = (ROOT / "inventory.example.yaml").read_text()


def problems(text: str, tmp_path: Path, env: dict[str, str] | None = None) -> list[str]:
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    with pytest.raises(InventoryError) as caught:
        load_inventory(path, env=env or {})
    assert caught.value.exit_code == 2
    return [str(p).replace(str(path), "INV", 1) for p in caught.value.problems]


def mutate(old: str, new: str) -> str:
    assert EXAMPLE.count(old) == 1, old
    return EXAMPLE.replace(old, new)


def line(text: str, needle: str) -> int:
    """1-based line of the unique ``needle`` (so comment edits in the example don't break the tests)."""
    assert text.count(needle) == 1, needle
    return text[: text.index(needle)].count("\n") + 1


# (id, text replaced in inventory.example.yaml, its replacement, a unique needle on the problem's line,
#  the problem's column, the message after FILE:LINE:COL)
MUTATIONS = [
    pytest.param("  base_port: 8000", "  base_port: eight", "eight", 14,
        'defaults.base_port: found string "eight", expected an integer from 1 to 65535',
        id="wrong_type"),
    pytest.param("          port: 2222", "          port: 70000", "70000", 17,
        "groups.l4.hosts.gpu-03.ssh.port: found integer 70000, expected an integer from 1 to 65535",
        id="out_of_range_port_on_a_host"),
    pytest.param("  listen: 80\n", "  listen: 0\n", "listen: 0", 11,
        "balancer.listen: found integer 0, expected an integer from 1 to 65535",
        id="port_zero"),
    pytest.param("  stub_status_port: 8089 ", "  stub_status_port: 80 ", "stub_status_port: 80 ", 21,
        "balancer.stub_status_port: found 80, expected a port other than the balancer's listen ports "
        "(stub_status listens on 127.0.0.1 of the same host)",
        id="stub_status_on_the_public_port"),
    pytest.param("    extras: []  ", "    extras: [flash4, flash5]  ", "flash5", 13,
        "defaults.pip.extras: found a list, expected a list of llamactl's optional extras (flash4); not flash5",
        id="unknown_pip_extra"),
    pytest.param("  max_fails: 2\n", "  max_fails: yes\n", "max_fails: yes", 14,
        "balancer.max_fails: found boolean true, expected an integer of at least 0",
        id="boolean_is_not_an_integer"),
    pytest.param("    max_batch_size: 8 ", "    max_batch_size: 8.5 ", "8.5", 21,
        "defaults.server.max_batch_size: found number 8.5, expected an integer from 1 to 256",
        id="float_for_an_integer"),
    pytest.param("    max_batch_size: 8 ", "    max_bach_size: 8 ", "max_bach_size", 5,
        'defaults.server.max_bach_size: found unknown key "max_bach_size", did you mean "max_batch_size"?',
        id="misspelt_key_did_you_mean"),
    pytest.param("rollout:\n", "rolout:\n", "rolout:", 1,
        'rolout: found unknown key "rolout", did you mean "rollout"?',
        id="misspelt_top_level_key"),
    pytest.param("  fall: 3 ", "  colour: 3 ", "colour", 3,
        'health.colour: found unknown key "colour", expected one of: interval_s, timeout_s, fall, rise, '
        "startup_grace_s, watch, alerts",
        id="unknown_key_lists_the_choices"),
    pytest.param("    dtype: bfloat16 ", "    dtype: bf16 ", "bf16", 12,
        'defaults.model.dtype: found string "bf16", expected one of \'auto\', \'bfloat16\', \'float16\' or '
        "'float32'",
        id="literal_choice"),
    pytest.param("      quantization: nf4", "      quantization: fp4", "fp4", 21,
        'groups.l4.model.quantization: found string "fp4", expected one of \'none\', \'nf4\', \'int8\' or \'fp8\'',
        id="error_in_a_group_level_setting"),
    pytest.param("gpus: [0, 1, 2, 3]", "gpus: [0, 1, 1]", "[0, 1, 1]", 15,
        "groups.h100.hosts.gpu-02.gpus: found a list, expected a GPU count from 0 to 64 or a list of "
        "distinct GPU indices",
        id="duplicate_gpu_indices"),
    pytest.param("address: 10.0.0.13", "address: 10.0.0.11", "      gpu-03:", 7,
        'groups.l4.hosts.gpu-03: found address "10.0.0.11" again (first at groups.h100.hosts.gpu-01), '
        "expected one host per address",
        id="duplicate_address"),
    pytest.param("gpus: [0, 1, 2, 3]", "gpus: [0, 1]\n        ports: [9000, 9000]", "ports: [9000", 23,
        "groups.h100.hosts.gpu-02.ports[1]: found port 9000 again (instance 0 uses it), expected one port "
        "per instance",
        id="explicit_ports_collide"),
    pytest.param("gpus: [0, 1, 2, 3]", "gpus: [0, 1]\n        ports: [9000]", "ports: [9000", 16,
        "groups.h100.hosts.gpu-02.ports: found 1 ports, expected one per instance (2)",
        id="ports_count_must_match_instances"),
    pytest.param("  base_port: 8000", "  base_port: 65530", "65530", 14,
        "defaults.base_port: found 65530 with 8 instances (up to port 65537), expected every instance port "
        "at most 65535",
        id="ports_past_65535"),
    pytest.param("  hosts:\n    lb-01:\n      address: 10.0.0.2\n", "  hosts: {}\n", "hosts: {}", 3,
        "balancer.hosts: found no hosts, expected at least one balancer host",
        id="balancer_without_hosts"),
    pytest.param("        address: 10.0.0.11\n", "        bind: 127.0.0.1\n", "gpu-01:", 7,
        'groups.h100.hosts.gpu-01: found no "address", expected the host\'s address (a DNS name or an IP '
        "address)",
        id="missing_address"),
    pytest.param(
        '      HF_HUB_OFFLINE: "1"\n',
        '      HF_HUB_OFFLINE: "1"\n      HF_TOKEN: hf_abcdef\n',
        "hf_abcdef", 17,
        "defaults.server.env.HF_TOKEN: found an inline secret, expected ${HF_TOKEN} from the controller's "
        "environment",
        id="inline_token_in_server_env"),
    pytest.param("  server_name: vision.example.com", "  server_name: ${PUBLIC_NAME}", "PUBLIC_NAME", 16,
        "balancer.server_name: found ${PUBLIC_NAME} but environment variable PUBLIC_NAME is not set, "
        "expected it set",
        id="unset_interpolated_variable"),
    pytest.param("  server_name: vision.example.com", "  server_name: ${PUBLIC NAME}", "PUBLIC NAME", 16,
        'balancer.server_name: found "${PUBLIC NAME}" in "${PUBLIC NAME}", expected ${NAME} (write $${ for '
        "a literal ${)",
        id="bad_interpolation_syntax"),
    pytest.param("      gpu-01:\n", "      ../gpu-01:\n", "../gpu-01", 7,
        'groups.h100.hosts.../gpu-01: found host name "../gpu-01", expected letters, digits, ".", "_" or '
        '"-" (at most 63, starting with a letter or digit)',
        id="unsafe_host_name"),
    pytest.param("  install_dir: /opt/llamactl", "  install_dir: opt/llamactl", "install_dir: opt", 16,
        'defaults.install_dir: found string "opt/llamactl", expected an absolute path of letters, digits '
        "and ._/@+=,~- (no spaces)",
        id="relative_install_dir"),
    pytest.param("  timeout_s: 3\n", "  timeout_s: 30\n", "timeout_s: 30", 14,
        "health.timeout_s: found 30, expected at most interval_s (5)",
        id="health_timeout_longer_than_interval"),
    pytest.param("  l4:\n", "  l4:\n    <<: {}\n", "<<", 5,
        "groups.l4.<<: found a YAML merge key (<<), expected plain keys (use defaults and groups)",
        id="merge_keys_are_refused"),
    pytest.param(
        "      gpu-01:\n        address: 10.0.0.11\n",
        "      gpu-01: 10.0.0.11\n",
        "gpu-01: 10", 15,
        'groups.h100.hosts.gpu-01: found string "10.0.0.11", expected a mapping with at least an address',
        id="host_value_not_a_mapping"),
    pytest.param('      HF_HUB_OFFLINE: "1"\n', '      LLAMACTL_PORT: "1"\n', "LLAMACTL_PORT", 7,
        "defaults.server.env: found a mapping, expected extra variables only; LLAMACTL_PORT is set from the "
        "inventory's own settings",
        id="server_env_may_not_override_llamactl_settings"),
    pytest.param(
        "    gpus: 2\n    model:\n      quantization: nf4\n    server:\n      max_batch_size: 4\n    hosts:\n",
        "    gpus: 2\n    model:\n      quantization: nf4\n    server:\n      max_batch_size: 4\n    host:\n",
        "  l4:", 3,
        'groups.l4: found no "hosts", expected a mapping of host names to host settings (did you mean '
        '"hosts" instead of "host"?)',
        id="misspelt_hosts_in_a_group"),
    pytest.param(
        '      HF_HUB_OFFLINE: "1"\n',
        '      TOKENIZERS_PARALLELISM: "false"\n      OPENAI_API_KEY: sk-1\n',
        "sk-1", 23,
        "defaults.server.env.OPENAI_API_KEY: found an inline secret, expected ${OPENAI_API_KEY} from the "
        "controller's environment",
        id="ordinary_variables_are_not_taken_for_secrets"),
    pytest.param("    # engine: auto  ", "    engine: vllm    ", "engine: vllm", 13,
        'defaults.server.engine: found string "vllm", expected one of \'auto\', \'continuous\' or \'hf\'',
        id="unknown_engine"),
]


@pytest.mark.parametrize(("old", "new", "needle", "column", "message"), MUTATIONS)
def test_one_mutation_one_exact_problem(old: str, new: str, needle: str, column: int, message: str,
                                       tmp_path: Path) -> None:
    text = mutate(old, new)
    assert problems(text, tmp_path) == [f"INV:{line(text, needle)}:{column}: {message}"]


def test_syntax_error_gives_the_line(tmp_path: Path) -> None:
    text = mutate("cluster: vision-prod", "cluster: [vision-prod")
    n = line(text, "defaults:")
    assert problems(text, tmp_path) == [
        f"INV:{n}:9: found invalid YAML: expected ',' or ']', but got ':' (while parsing a flow sequence)"
    ]


def test_bad_indentation(tmp_path: Path) -> None:
    text = mutate("  base_port: 8000", "   base_port: 8000")
    n = line(text, "   base_port: 8000")
    assert problems(text, tmp_path) == [
        f"INV:{n}:4: found invalid YAML: expected <block end>, but found '<block mapping start>' "
        "(while parsing a block mapping)"
    ]


def test_quoted_number_is_a_string(tmp_path: Path) -> None:
    text = mutate("    port: 22\n", '    port: "22"\n')
    n = line(text, 'port: "22"')
    assert problems(text, tmp_path) == [
        f'INV:{n}:11: defaults.ssh.port: found string "22", expected an integer from 1 to 65535'
    ]


def test_duplicate_key(tmp_path: Path) -> None:
    text = mutate("  max_fails: 2\n", "  max_fails: 2\n  max_fails: 3\n")
    first = line(text, "max_fails: 2")
    assert problems(text, tmp_path) == [
        f'INV:{first + 1}:3: balancer.max_fails: found a duplicate key "max_fails" (first on line {first}), '
        "expected each key once"
    ]


def test_alias_bomb_is_refused_fast(tmp_path: Path) -> None:
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        levels.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    text = "version: 1\ncluster: bomb\n" + "\n".join(levels) + "\n"
    start = time.monotonic()
    got = problems(text, tmp_path)
    assert time.monotonic() - start < 2.0
    assert got == [
        "INV:6:8: found more than 1000 nodes expanded from aliases, expected at most 1000 "
        "(refusing a possible alias bomb)"
    ]


def test_duplicate_host_name_across_groups(tmp_path: Path) -> None:
    text = mutate("      gpu-03:\n", "      gpu-01:\n")
    assert problems(text, tmp_path) == [
        f'INV:{line(text, "10.0.0.13") - 1}:7: groups.l4.hosts.gpu-01: found host name "gpu-01" again '
        "(first at groups.h100.hosts.gpu-01), expected unique host names"
    ]


def test_balancer_host_named_like_a_server(tmp_path: Path) -> None:
    text = mutate("    lb-01:\n      address", "    gpu-02:\n      address")
    n = line(text, "    gpu-02:\n      address: 10.0.0.2")
    assert problems(text, tmp_path) == [
        f'INV:{n}:5: balancer.hosts.gpu-02: found host name "gpu-02" again '
        "(first at groups.h100.hosts.gpu-02), expected unique host names"
    ]


def test_balancer_port_collides_with_an_instance_on_the_same_machine(tmp_path: Path) -> None:
    text = mutate("      address: 10.0.0.2\n", "      address: 10.0.0.13\n")
    text = text.replace("  listen: 80\n", "  listen: 8001\n")
    assert problems(text, tmp_path) == [
        f"INV:{line(text, 'listen: 8001')}:11: balancer.listen: found port 8001 on 10.0.0.13, "
        "also used by instance gpu-03/1, expected a free port"
    ]


def test_empty_cluster(tmp_path: Path) -> None:
    text = (
        "version: 1\ncluster: c\ndefaults:\n  model: {source: /m}\ngroups: {}\n"
        "balancer:\n  hosts:\n    lb: {address: 10.0.0.1}\n"
    )
    assert problems(text, tmp_path) == [
        "INV:5:1: groups: found no hosts, expected at least one host under groups.<group>.hosts"
    ]


def test_no_balancer(tmp_path: Path) -> None:
    text = EXAMPLE[: EXAMPLE.index("balancer:\n")] + EXAMPLE[EXAMPLE.index("rollout:\n") :]
    assert problems(text, tmp_path) == ['INV:1:1: found no "balancer", expected a "balancer" mapping']


API_KEYS = (
    "    # api_keys:                        # optional; from the controller's environment or a file, never inline\n"
    "    #   env: LLAMACTL_API_KEYS         # comma-separated keys, read when the inventory is loaded\n"
)


def test_api_key_variable_not_set(tmp_path: Path) -> None:
    text = mutate(API_KEYS, "    api_keys:\n      env: LLAMACTL_API_KEYS\n")
    assert problems(text, tmp_path) == [
        f"INV:{line(text, 'env: LLAMACTL_API_KEYS')}:12: defaults.server.api_keys.env: found LLAMACTL_API_KEYS, "
        "expected the environment variable LLAMACTL_API_KEYS to be set (it holds the comma-separated API keys)"
    ]
    load_inventory(tmp_path / "inv.yaml", env={"LLAMACTL_API_KEYS": "a,b"})  # and set, it loads


def test_api_keys_inline_secret_is_not_echoed(tmp_path: Path) -> None:
    text = mutate(API_KEYS, "    api_keys: sk-live-1234567890\n")
    got = problems(text, tmp_path)
    assert got == [
        f"INV:{line(text, 'api_keys: sk-live')}:5: defaults.server.api_keys: found an inline secret, "
        "expected {env: VAR} or {file: PATH} (never keys inline)"
    ]
    assert "sk-live" not in "\n".join(got)


def test_api_keys_both_env_and_file(tmp_path: Path) -> None:
    (tmp_path / "keys.txt").write_text("k1\n")
    text = mutate(API_KEYS, "    api_keys: {env: LLAMACTL_API_KEYS, file: keys.txt}\n")
    assert problems(text, tmp_path, {"LLAMACTL_API_KEYS": "k"}) == [
        f"INV:{line(text, 'api_keys: {env')}:5: defaults.server.api_keys: found both env and file, "
        "expected exactly one source of API keys"
    ]


def test_api_keys_file_missing(tmp_path: Path) -> None:
    text = mutate(API_KEYS, "    api_keys: {file: secrets/keys.txt}\n")
    assert problems(text, tmp_path) == [
        f"INV:{line(text, 'secrets/keys.txt')}:22: defaults.server.api_keys.file: found "
        f"{tmp_path}/secrets/keys.txt unreadable (No such file or directory), expected a file of keys"
    ]


def test_version_and_batch_and_tls_port(tmp_path: Path) -> None:
    """Several problems in one file: all reported, in file order."""
    text = mutate("version: 1\n", "version: 2\n").replace("  batch: 25%", "  batch: 250%")
    text = text.replace("  # tls:\n  #   listen: 443\n", "  tls:\n    listen: 80\n")
    text = text.replace("  #   certificate: /etc", "    certificate: /etc")
    text = text.replace("  #   certificate_key: /etc", "    certificate_key: etc")
    assert problems(text, tmp_path) == [
        f"INV:{line(text, 'version: 2')}:10: version: found integer 2, expected one of 1",
        f"INV:{line(text, 'certificate_key: etc')}:22: balancer.tls.certificate_key: found string "
        '"etc/ssl/private/vision.key", expected an absolute path of letters, digits and ._/@+=,~- (no spaces)',
        f'INV:{line(text, "batch: 250%")}:10: rollout.batch: found string "250%", expected a count of at '
        'least 1 or a percentage from 1% to 100% like "25%"',
    ]


def test_tls_port_equal_to_http_port(tmp_path: Path) -> None:
    text = mutate("  # tls:\n  #   listen: 443\n", "  tls:\n    listen: 80\n")
    text = text.replace("  #   certificate: /etc", "    certificate: /etc")
    text = text.replace("  #   certificate_key: /etc", "    certificate_key: /etc")
    assert problems(text, tmp_path) == [
        f"INV:{line(text, '  tls:') + 1}:13: balancer.tls.listen: found port 80 for both HTTP and TLS, "
        "expected two different ports"
    ]


def test_not_a_mapping_and_empty(tmp_path: Path) -> None:
    assert problems("- a\n- b\n", tmp_path) == [
        "INV:1:1: found a list, expected a mapping with cluster, groups and balancer"
    ]
    assert problems("# nothing\n", tmp_path) == [
        "INV:1:1: found an empty document, expected an inventory mapping"
    ]


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such inventory file"):
        load_inventory(tmp_path / "nope.yaml")


def test_nothing_can_be_injected_into_nginx_or_systemd(tmp_path: Path) -> None:
    text = mutate("  server_name: vision.example.com", '  server_name: "x; include /etc/passwd"')
    text = text.replace("  config_path: /etc/nginx/conf.d/llamactl.conf", "  config_path: /etc/nginx/%i.conf")
    assert problems(text, tmp_path) == [
        f'INV:{line(text, "server_name: ")}:16: balancer.server_name: found string "x; include /etc/passwd", '
        'expected host names separated by spaces, like "vision.example.com" or "_"',
        f'INV:{line(text, "config_path: /etc/nginx/%i.conf")}:16: balancer.config_path: found string "/etc/nginx/%i.conf", '
        "expected an absolute path of letters, digits and ._/@+=,~- (no spaces)",
    ]


def test_null_group_and_null_balancer_host(tmp_path: Path) -> None:
    text = mutate("      address: 10.0.0.2\n", "      address: 10.0.0.2\n    lb-02:\n")
    text = text.replace("groups:\n", "groups:\n  spare:\n")
    assert problems(text, tmp_path) == [
        f"INV:{line(text, '  spare:')}:9: groups.spare: found null, expected a mapping",
        f"INV:{line(text, '    lb-02:')}:11: balancer.hosts.lb-02: found null, expected a mapping",
    ]


def test_host_keys_on_defaults_or_groups(tmp_path: Path) -> None:
    text = mutate("  python: /usr/bin/python3", "  address: 10.9.9.9\n  hosts: {}\n  python: /usr/bin/python3")
    text = text.replace("  l4:\n    gpus: 2\n", "  l4:\n    gpus: 2\n    address: 10.9.9.8\n")
    assert problems(text, tmp_path) == [
        f"INV:{line(text, '10.9.9.9')}:3: defaults.address: found an address in defaults, expected it on a host "
        "under groups.<group>.hosts.<host>",
        f"INV:{line(text, '  hosts: {}')}:3: defaults.hosts: found hosts in defaults, expected them under "
        "groups.<group>.hosts",
        f"INV:{line(text, '10.9.9.8')}:5: groups.l4.address: found an address in groups.l4, expected it on a host "
        "under groups.<group>.hosts.<host>",
    ]


@pytest.mark.parametrize(
    ("value", "found"),
    [("0", "integer 0"), ("-2.5", "number -2.5"), (".inf", "number inf"), ('"60"', 'string "60"'),
     ("true", "boolean true"), ("null", "null")],
)  # fmt: skip
def test_stall_timeout_must_be_a_positive_finite_number(tmp_path: Path, value: str, found: str) -> None:
    text = mutate("    stall_timeout_s: 60 ", f"    stall_timeout_s: {value} ")
    assert problems(text, tmp_path) == [
        f"INV:{line(text, 'stall_timeout_s:')}:22: defaults.server.stall_timeout_s: found {found}, "
        "expected a number of seconds greater than 0"
    ]


def test_engine_and_stall_timeout_per_group(tmp_path: Path) -> None:
    batch = "      max_batch_size: 4\n"
    text = mutate(batch, batch + "      engine: static\n      stall_timeout_s: 0\n")
    assert problems(text, tmp_path) == [
        f'INV:{line(text, "engine: static")}:15: groups.l4.server.engine: found string "static", '
        "expected one of 'auto', 'continuous' or 'hf'",
        f"INV:{line(text, 'stall_timeout_s: 0')}:24: groups.l4.server.stall_timeout_s: found integer 0, "
        "expected a number of seconds greater than 0",
    ]
