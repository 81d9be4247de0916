"""``llamactl infer`` against simulated servers on loopback: answers, error messages and exit codes."""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from llamactl.health.canary import canary_png
from llamactl.health.simulate import Behaviour, Endpoint, running
from tests.health.helpers import free_base_port, run_cli, write_inventory

ADDR = "127.0.0.41"
HINT = "hint: run 'llamactl infer --help' for usage"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    path.write_bytes(canary_png())
    return path


@pytest.fixture
def port() -> int:
    return free_base_port([ADDR], 1)


def serve(port: int, **behaviour: Any) -> AbstractContextManager[list[Endpoint]]:
    return running([Endpoint(ADDR, port, Behaviour(**behaviour))])


def infer(
    args: list[str], capsys: pytest.CaptureFixture[str], mp: pytest.MonkeyPatch
) -> tuple[int, str, str]:
    return run_cli(["infer", *args], capsys, mp)


def test_staged_answer_with_backend_and_time(
    image: Path, port: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"http://{ADDR}:{port}"
    with serve(port, upstream="10.203.0.12:8001"):
        code, out, err = infer([str(image), "--endpoint", url, "-q", "What colour?"], capsys, monkeypatch)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:2] == ["Summary", "I will describe the image."]
    assert "Caption" in lines and "A plain red square." in lines
    assert "  1. The image has one colour." in lines and "  2. The colour is red." in lines
    assert lines[lines.index("Conclusion") + 1] == "It is a red square."
    assert lines[-1].startswith("answered in ") and lines[-1].endswith("by 10.203.0.12:8001")
    assert "server 0.25 s" in lines[-1]


def test_json_prints_the_servers_answer(
    image: Path, port: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve(port):
        code, out, _ = infer(
            [str(image), "--endpoint", f"http://{ADDR}:{port}", "--json"], capsys, monkeypatch
        )
    assert code == 0
    doc = json.loads(out)
    assert doc["result"]["conclusion"] == "It is a red square." and doc["inference_time"] == 0.25


def test_api_key_comes_from_the_named_env_var(
    image: Path, port: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"http://{ADDR}:{port}"
    monkeypatch.delenv("LLAMACTL_API_KEY", raising=False)
    with serve(port, api_key="s3cret"):
        code, out, err = infer([str(image), "--endpoint", url], capsys, monkeypatch)
        assert code == 1
        assert err.strip() == (
            f"error: {url}/infer: API key rejected (HTTP 401): set --api-key-env ($LLAMACTL_API_KEY is not set)"
        )
        monkeypatch.setenv("MY_KEY", "s3cret")
        code, out, err = infer(
            [str(image), "--endpoint", url, "--api-key-env", "MY_KEY"], capsys, monkeypatch
        )
        assert code == 0, err
        assert "s3cret" not in out + err


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        ({"infer_status": 413, "infer_message": "image is 30 MB, limit 15 MB"},
         "/infer: image too large (HTTP 413): image is 30 MB, limit 15 MB"),
        ({"infer_status": 429, "retry_after": 7}, "/infer: cluster busy, retry after 7 s (HTTP 429)"),
        ({"infer_status": 415, "infer_message": "unsupported image format"},
         "/infer: request rejected (HTTP 415): unsupported image format"),
        ({"infer_status": 503, "infer_message": "server is draining"},
         "/infer: server error (HTTP 503): server is draining"),
    ],
)  # fmt: skip
def test_http_errors_are_one_clear_line(
    image: Path, port: int, behaviour: dict[str, object], message: str,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    with serve(port, **behaviour):
        code, _, err = infer([str(image), "--endpoint", f"http://{ADDR}:{port}"], capsys, monkeypatch)
    assert code == 1
    assert err.strip() == f"error: http://{ADDR}:{port}{message}"


def test_refused_connection_exits_3_with_the_url(
    image: Path, port: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = infer([str(image), "--endpoint", f"http://{ADDR}:{port}"], capsys, monkeypatch)
    assert code == 3
    assert err.strip() == (
        f"error: http://{ADDR}:{port}/infer: connection refused: is the cluster up and the endpoint right?"
    )


def test_timeout_exits_3(
    image: Path, port: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve(port, delay_s=3.0):
        code, _, err = infer(
            [str(image), "--endpoint", f"http://{ADDR}:{port}", "--timeout", "0.5"], capsys, monkeypatch
        )
    assert code == 3
    assert "no answer within 0.5 s (raise --timeout for long answers)" in err


def test_missing_image_exits_2_before_any_request(
    tmp_path: Path, port: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens on the endpoint: a request would exit 3, so exit 2 proves none was sent.
    missing = tmp_path / "nope.jpg"
    code, _, err = infer([str(missing), "--endpoint", f"http://{ADDR}:{port}"], capsys, monkeypatch)
    assert (code, err.strip()) == (2, f"error: {missing}: image file not found\n{HINT}")
    code, _, err = infer([str(tmp_path), "--endpoint", f"http://{ADDR}:{port}"], capsys, monkeypatch)
    assert (code, err.strip()) == (2, f"error: {tmp_path}: is a directory, not an image file\n{HINT}")


def test_endpoint_from_inventory_or_environment(
    image: Path,
    port: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inv = write_inventory(tmp_path / "inv.yaml", {"h": "127.0.0.42"}, 1, port, port)
    monkeypatch.delenv("LLAMACTL_ENDPOINT", raising=False)
    with running([Endpoint("127.0.0.2", port, Behaviour())]):
        code, out, err = infer([str(image), "--inventory", str(inv), "--json"], capsys, monkeypatch)
        assert code == 0, err
        monkeypatch.setenv("LLAMACTL_ENDPOINT", f"http://127.0.0.2:{port}/")
        code, out, err = infer([str(image), "--json"], capsys, monkeypatch)
        assert code == 0, err
        assert json.loads(out)["result"]["conclusion"] == "It is a red square."
    monkeypatch.delenv("LLAMACTL_ENDPOINT")
    monkeypatch.delenv("LLAMACTL_INVENTORY", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./inventory.yaml here
    code, _, err = infer([str(image)], capsys, monkeypatch)
    assert (code, err.strip()) == (2, ("error: no endpoint given: pass --endpoint URL or --inventory FILE, set "
                                   "$LLAMACTL_ENDPOINT or $LLAMACTL_INVENTORY, or run where ./inventory.yaml exists "
                                   f"(looked for {tmp_path}/inventory.yaml)\n{HINT}"))


def test_stream_prints_tokens_then_the_stages(
    image: Path, port: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("llamactl.server.cot", reason="the server's CoT parser is not written yet")
    with serve(port, upstream="10.203.0.11:8000"):
        code, out, err = infer(
            [str(image), "--endpoint", f"http://{ADDR}:{port}", "--stream"], capsys, monkeypatch
        )
    assert code == 0, err
    raw, _, shown = out.partition("</CONCLUSION>")
    assert raw.startswith("<SUMMARY>I will describe the image.</SUMMARY><CAPTION>")
    lines = shown.splitlines()
    assert "Conclusion" in lines and lines[lines.index("Conclusion") + 1] == "It is a red square."
    assert "  2. The colour is red." in lines
    assert lines[-1].endswith("by 10.203.0.11:8000")


def test_stream_errors_map_like_plain_requests(
    image: Path, port: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve(port, infer_status=429, retry_after=3):
        code, _, err = infer(
            [str(image), "--endpoint", f"http://{ADDR}:{port}", "--stream"], capsys, monkeypatch
        )
    assert code == 1
    assert (
        err.strip()
        == f"error: http://{ADDR}:{port}/v1/chat/completions: cluster busy, retry after 3 s (HTTP 429)"
    )
