"""API keys over real HTTP: Bearer on inference routes, probes and /metrics open, keys never logged."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ._support import ThreadServer, make_settings, png_b64, start_thread_server

KEYS = ("k-first-0123456789", "k-second-abcdef")


@pytest.fixture(scope="module")
def srv(tiny_checkpoint: Path) -> Iterator[ThreadServer]:
    server = start_thread_server(make_settings(tiny_checkpoint, api_keys=KEYS))
    yield server
    server.stop()


def test_probes_and_metrics_are_open(srv: ThreadServer) -> None:
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(srv.url + path).status_code == 200, path


@pytest.mark.parametrize(
    "header", [None, "Bearer wrong", "Bearer", "Basic " + KEYS[0], KEYS[0], "Bearer " + KEYS[0] + "x"]
)
def test_missing_or_wrong_key_is_401(srv: ThreadServer, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    for method, path in (("POST", "/infer"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        r = httpx.request(method, srv.url + path, json={}, headers=headers)
        assert r.status_code == 401, (path, header)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"]["type"] == "unauthorized"
        assert KEYS[0] not in r.text


def test_valid_keys_work_and_are_not_logged(srv: ThreadServer, caplog: pytest.LogCaptureFixture) -> None:
    import openai

    caplog.set_level(logging.DEBUG)
    for key in KEYS:
        r = httpx.post(
            srv.url + "/infer",
            json={"image": png_b64(), "max_tokens": 3},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEYS[1], max_retries=0)
    assert client.models.list().data[0].id == srv.state.settings.model
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert not any(k in caplog.text for k in KEYS)
    assert not any(k in str(srv.state.health()) for k in KEYS)
