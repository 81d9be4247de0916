"""The ``redis:`` section: defaults, exact errors (never echoing the password), render, and a real redis-server
started with the rendered config."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest

from llamactl.cli.deploy import _masked
from llamactl.inventory import expected_env
from llamactl.plan.render import render_all
from tests.inventory_support import inventory_yaml, load_problems, load_text
from tests.redis_support import RedisServer

PASSWORD = "s3cret-Redis-pass-0123"  # 22 characters, with '-' to exercise quoting
BASE = inventory_yaml({"node-1": "127.0.0.1", "node-2": "10.0.0.12"}, {"lb-01": "127.0.0.1"},
                      balancer="  listen: 8080\n")  # the redis: section starts on line 15


def load(tmp_path: Path, redis: str, env: dict[str, str] | None = None) -> object:
    return load_text(tmp_path, BASE + redis, {"REDIS_PW": PASSWORD} if env is None else env)


def problems(tmp_path: Path, redis: str, env: dict[str, str] | None = None) -> list[str]:
    return load_problems(tmp_path, BASE + redis, {"REDIS_PW": PASSWORD} if env is None else env)


def test_defaults_and_env_file(tmp_path: Path) -> None:
    inv = load(tmp_path, "redis:\n  password: {env: REDIS_PW}\n")
    redis = inv.redis  # type: ignore[attr-defined]
    assert (redis.host, redis.address, redis.port) == ("lb-01", "127.0.0.1", 6379)
    assert (redis.appendonly, redis.appendfsync, redis.maxmemory_mb) == (True, "everysec", 256)
    assert PASSWORD not in repr(redis)
    for inst in inv.instances():  # type: ignore[attr-defined]
        assert expected_env(inv, inst)["LLAMACTL_REDIS_URL"] == f"redis://:{PASSWORD}@127.0.0.1:6379/0"  # type: ignore[arg-type]


def test_url_percent_encodes_the_password(tmp_path: Path) -> None:
    inv = load(tmp_path, "redis:\n  host: node-2\n  password: {env: REDIS_PW}\n",
               env={"REDIS_PW": "a/b@c:d%e+f#g?h!ij"})
    assert inv.redis.url == "redis://:a%2Fb%40c%3Ad%25e%2Bf%23g%3Fh%21ij@10.0.0.12:6379/0"  # type: ignore[attr-defined]


def test_password_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "redis.pass").write_text(PASSWORD + "\n")
    inv = load(tmp_path, "redis:\n  password: {file: redis.pass}\n  appendfsync: always\n")
    assert inv.redis.password == PASSWORD and inv.redis.appendfsync == "always"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("redis", "env", "expected"), [
    pytest.param(f"redis:\n  password: {PASSWORD}\n", None,
                 "INV:16:3: redis.password: found an inline secret, expected {env: VAR} or {file: PATH} "
                 "(never a password inline)", id="inline"),
    pytest.param("redis:\n  port: 6379\n", None,
                 'INV:15:1: redis: found no "password", expected {env: VAR} or {file: PATH} holding the '
                 "Redis password", id="missing"),
    pytest.param("redis:\n  password: {env: REDIS_PW, file: x}\n", None,
                 "INV:16:3: redis.password: found both env and file, expected exactly one source of the "
                 "password", id="both"),
    pytest.param("redis:\n  password: {}\n", None,
                 "INV:16:3: redis.password: found neither env nor file, expected {env: VAR} or {file: PATH}",
                 id="neither"),
    pytest.param("redis:\n  password: {env: NOPE}\n", None,
                 "INV:16:19: redis.password.env: found NOPE, expected the environment variable NOPE to be set "
                 "(it holds the Redis password)", id="env_unset"),
    pytest.param("redis:\n  password: {env: REDIS_PW}\n", {"REDIS_PW": "short"},
                 "INV:16:19: redis.password.env: found REDIS_PW holding 5 characters, expected a password of "
                 "at least 16 printable characters without spaces, quotes or backslashes", id="too_short"),
    pytest.param("redis:\n  password: {env: REDIS_PW}\n", {"REDIS_PW": "has a space in it, 16+"},
                 "INV:16:19: redis.password.env: found REDIS_PW holding 22 characters, expected a password of "
                 "at least 16 printable characters without spaces, quotes or backslashes", id="space"),
    pytest.param("redis:\n  host: lb-9\n  password: {env: REDIS_PW}\n", None,
                 'INV:16:9: redis.host: found "lb-9", expected the name of a balancer or server host '
                 "(lb-01, node-1, node-2)", id="unknown_host"),
    pytest.param("redis:\n  port: 8080\n  password: {env: REDIS_PW}\n", None,
                 "INV:16:9: redis.port: found port 8080 on 127.0.0.1, also used by balancer.listen, "
                 "expected a free port", id="port_of_the_balancer"),
    pytest.param("redis:\n  host: node-2\n  port: 8000\n  password: {env: REDIS_PW}\n", None,
                 "INV:17:9: redis.port: found port 8000 on 10.0.0.12, also used by instance node-2/0, "
                 "expected a free port", id="port_of_an_instance"),
    pytest.param("redis:\n  appendfsync: sometimes\n  password: {env: REDIS_PW}\n", None,
                 "INV:16:16: redis.appendfsync: found string \"sometimes\", expected one of 'always', "
                 "'everysec' or 'no'", id="appendfsync"),
    pytest.param("redis:\n  maxmemory_mb: 0\n  password: {env: REDIS_PW}\n", None,
                 "INV:16:17: redis.maxmemory_mb: found integer 0, expected an integer from 1 to 1048576",
                 id="maxmemory"),
    pytest.param("redis:\n  apendonly: true\n  password: {env: REDIS_PW}\n", None,
                 'INV:16:3: redis.apendonly: found unknown key "apendonly", did you mean "appendonly"?',
                 id="misspelt"),
])
def test_exact_errors(tmp_path: Path, redis: str, env: dict[str, str] | None, expected: str) -> None:
    found = problems(tmp_path, redis, env)
    assert found == [expected]
    assert PASSWORD not in "\n".join(found)


def test_password_file_problems(tmp_path: Path) -> None:
    (tmp_path / "two.pass").write_text(f"{PASSWORD}\nsecond-line-0123456\n")
    two = (f"INV:16:20: redis.password.file: found 2 lines in {tmp_path / 'two.pass'}, expected the password "
           "on one line")
    assert problems(tmp_path, "redis:\n  password: {file: two.pass}\n") == [two]
    none = (f"INV:16:20: redis.password.file: found {tmp_path / 'none.pass'} unreadable (No such file or "
            "directory), expected a file holding the password")
    assert problems(tmp_path, "redis:\n  password: {file: none.pass}\n") == [none]


def test_render_config_and_masking(tmp_path: Path) -> None:
    inv = load(tmp_path, "redis:\n  password: {env: REDIS_PW}\n  maxmemory_mb: 64\n")
    files = render_all(inv)  # type: ignore[arg-type]
    conf = files["lb-01"]["/etc/redis/llamactl.conf"]
    assert conf.mode == 0o600
    text = conf.content.decode()
    for line in ("bind 127.0.0.1", "port 6379", "protected-mode yes", f"requirepass {PASSWORD}",
                 "maxmemory 64mb", "maxmemory-policy noeviction", "appendonly yes", "appendfsync everysec",
                 "dir /var/lib/redis-llamactl"):
        assert line in text.splitlines(), line
    env_file = files["node-1"]["/etc/llamactl/instance-0.env"]
    assert env_file.mode == 0o600 and f"LLAMACTL_REDIS_URL=redis://:{PASSWORD}@" in env_file.content.decode()
    # deploy --dry-run prints diffs through _masked: neither file shows the password
    assert PASSWORD not in _masked(text) and "requirepass ***" in _masked(text)
    assert PASSWORD not in _masked(env_file.content.decode())
    assert "LLAMACTL_REDIS_URL=***" in _masked(env_file.content.decode())


def test_render_binds_the_inventory_address_and_loopback(tmp_path: Path) -> None:
    inv = load(tmp_path, "redis:\n  host: node-2\n  password: {env: REDIS_PW}\n  appendonly: false\n")
    text = render_all(inv)["node-2"]["/etc/redis/llamactl.conf"].content.decode()  # type: ignore[arg-type]
    assert "bind 10.0.0.12 127.0.0.1" in text.splitlines() and "appendonly no" in text.splitlines()


def raw(port: int, command: bytes) -> bytes:
    """One command on a fresh connection, answered by the server (the client library would retry)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(command)
        return sock.recv(256)


def test_rendered_config_starts_a_real_redis_server(tmp_path: Path) -> None:
    import redis

    (tmp_path / "data").mkdir()
    inv = load(tmp_path, f"redis:\n  password: {{env: REDIS_PW}}\n  maxmemory_mb: 64\n  data_dir: {tmp_path}/data\n")
    conf = tmp_path / "redis.conf"
    conf.write_bytes(render_all(inv)["lb-01"]["/etc/redis/llamactl.conf"].content)  # type: ignore[arg-type]
    conf.chmod(stat.S_IRUSR | stat.S_IWUSR)
    server = RedisServer(conf, tmp_path / "data", PASSWORD)
    server.start()  # port and bind overridden on its command line (no secret there)
    try:
        assert raw(server.port, b"PING\r\n").startswith(b"-NOAUTH")
        assert raw(server.port, b"AUTH wrong-password-123\r\n").startswith(b"-WRONGPASS")
        client = redis.Redis.from_url(server.url, socket_timeout=10, decode_responses=True)
        assert client.ping() is True
        config = client.config_get("*")
        assert config["appendonly"] == "yes" and config["appendfsync"] == "everysec"
        assert config["maxmemory"] == str(64 * 1024 * 1024) and config["maxmemory-policy"] == "noeviction"
        assert config["protected-mode"] == "yes"
        client.set("k", "v")
        assert client.get("k") == "v"
    finally:
        server.stop()
