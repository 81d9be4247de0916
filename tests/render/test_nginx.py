"""Rendered balancer configs pass a real `nginx -t` (Debian nginx 1.22) inside an http {} block."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from llamactl.inventory import Inventory
from llamactl.plan.render import render_balancer_files
from tests.render.tools import load, need, nginx_test

OK = "test is successful"


def conf_text(inv: Inventory, drained: frozenset[str] = frozenset()) -> str:
    return render_balancer_files(inv, drained)[inv.balancer.config_path].content.decode()


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr
    assert OK in result.stderr
    assert "[warn]" not in result.stderr and "[emerg]" not in result.stderr, result.stderr


def test_one_host(tmp_path: Path) -> None:
    inv = load("small")
    assert_ok(nginx_test(inv, tmp_path))
    text = conf_text(inv)
    assert (
        "server 127.0.0.3:8000" not in text and "server 127.0.0.2:8000 max_fails=2 fail_timeout=10s;" in text
    )
    assert text.count("keepalive_timeout 0;") == 1  # default: no idle client connections for a reload to reset


def test_many_hosts_several_gpus_tls_rate_limit(tmp_path: Path) -> None:
    openssl = need("openssl")
    cert, key = tmp_path / "vision.pem", tmp_path / "vision.key"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=vision.internal",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    inv = load("many")
    tls = inv.balancer.tls
    assert tls is not None
    lb = inv.balancer.__class__(
        **{
            **inv.balancer.__dict__,
            "tls": tls.model_copy(update={"certificate": str(cert), "certificate_key": str(key)}),
        }
    )
    inv = inv.__class__(**{**inv.__dict__, "balancer": lb})
    assert_ok(nginx_test(inv, tmp_path))
    text = conf_text(inv)
    main_upstream = text.split("upstream llamactl_many_hosts {")[1].split("}")[0]
    assert main_upstream.count("\n    server ") == len(inv.instances()) == 13
    # without Redis, one single-server upstream per instance for its in-memory jobs (see test_nginx_jobs.py)
    assert text.count("upstream llamactl_many_hosts_job_") == 13
    assert "listen 8443 ssl;" in text and "return 301 https://$host:8443$request_uri;" in text
    assert "limit_req_zone $binary_remote_addr zone=llamactl_many_hosts_rate:10m rate=20r/s;" in text
    assert text.count("limit_req_status 429;") == 3  # /, the chat stream and the in-memory jobs route
    assert "least_conn" not in text and "keepalive" not in text.split("}")[0]
    # client keep-alive asked for: set in the proxying server block (the redirecting one only answers 301)
    assert text.count("keepalive_timeout 30s;") == 1 and "keepalive_timeout 0;" not in text


def test_example(tmp_path: Path) -> None:
    assert_ok(nginx_test(load("example"), tmp_path))


def test_tls_without_redirect_serves_both(tmp_path: Path) -> None:
    openssl = need("openssl")
    cert, key = tmp_path / "c.pem", tmp_path / "c.key"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=x",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    from llamactl.inventory.model import TLSSettings

    inv = load("small")
    lb = inv.balancer.__class__(
        **{
            **inv.balancer.__dict__,
            "tls": TLSSettings(
                listen=8443, certificate=str(cert), certificate_key=str(key), redirect_http=False
            ),
        }
    )
    inv = inv.__class__(**{**inv.__dict__, "balancer": lb})
    assert_ok(nginx_test(inv, tmp_path))
    text = conf_text(inv)
    assert "listen 8080;\n    listen 8443 ssl;" in text and "return 301" not in text


def test_drained_instance_is_down(tmp_path: Path) -> None:
    inv = load("example")
    assert_ok(nginx_test(inv, tmp_path, frozenset({"gpu-02/1"})))
    text = conf_text(inv, frozenset({"gpu-02/1"}))
    assert "server 10.0.0.12:8001 max_fails=2 fail_timeout=10s down;  # gpu-02/1" in text
    assert text.count(" down;") == 1


def test_all_drained_answers_503(tmp_path: Path) -> None:
    inv = load("small")
    drained = frozenset(i.id for i in inv.instances())
    assert_ok(nginx_test(inv, tmp_path, drained))
    text = conf_text(inv, drained)
    assert "return 503" in text and "proxy_pass" not in text


@pytest.mark.parametrize("name", ["small", "many", "example"])
def test_retry_and_streaming_settings(name: str) -> None:
    text = conf_text(load(name))
    assert "proxy_next_upstream error timeout http_502 http_503 http_504 http_429 non_idempotent;" in text
    assert "add_header X-Upstream $upstream_addr always;" in text
    chat = text.split("location /v1/chat/completions {")[1].split("}")[0]
    assert "proxy_buffering off;" in chat
