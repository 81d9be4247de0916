"""The fan-out's edge with real processes and real HTTP on this machine: ``peer_agent`` servers and fetchers
started through ``LocalExecutor`` (the same commands SSH would run), one directory per simulated host."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from llamactl.ops.fanout import Distributor, start_server, stop_server
from llamactl.plan.fanout import HostNeeds, Item, plan_fanout
from llamactl.remote.local import LocalExecutor

PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"


def make_file(path: Path, size: int, seed: int) -> str:
    block = hashlib.sha256(str(seed).encode()).digest() * 32768  # 1 MiB of varied bytes
    with path.open("wb") as f:
        left = size
        while left:
            f.write(block[:min(left, len(block))])
            left -= min(left, len(block))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def files(tmp_path: Path) -> dict[str, tuple[Path, int]]:
    src = tmp_path / "controller"
    src.mkdir()
    out = {}
    for name, size in (("model.bin", 6 * 1024 * 1024 + 17), ("small.whl", 1234)):
        digest = make_file(src / name, size, len(name))
        out[digest] = (src / name, size)
    return out


def needs_for(tmp_path: Path, names: list[str], files: dict[str, tuple[Path, int]]) -> list[HostNeeds]:
    return [HostNeeds(n, tuple(Item(d, size, str(tmp_path / n / "srv" / p.name), 0o640)
                               for d, (p, size) in files.items())) for n in names]


def distribute(tmp_path: Path, needs: list[HostNeeds], files: dict[str, tuple[Path, int]],
               rate: float | None = None, executors: dict | None = None):  # type: ignore[no-untyped-def,type-arg]
    names = [h.host for h in needs]
    plan = plan_fanout(needs)
    messages: list[tuple[str, str]] = []
    report = Distributor(plan, executors or {n: LocalExecutor(n) for n in names}, {n: "127.0.0.1" for n in names},
                         {n: PY for n in names}, {d: p for d, (p, _) in files.items()},
                         lambda h, m: messages.append((h, m)), rate_bytes_s=rate).run()
    return plan, report, messages


def assert_all_present(tmp_path: Path, names: list[str], files: dict[str, tuple[Path, int]]) -> None:
    for n in names:
        for digest, (p, _) in files.items():
            dest = tmp_path / n / "srv" / p.name
            assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest, dest
            assert dest.stat().st_mode & 0o777 == 0o640
        leftovers = [x.name for x in (tmp_path / n / "srv").iterdir() if "llamactl-" in x.name]
        assert leftovers == []


def test_four_hosts_get_every_file_once_from_the_controller(tmp_path: Path, files: dict) -> None:  # type: ignore[type-arg]
    names = ["h1", "h2", "h3", "h4"]
    _, report, messages = distribute(tmp_path, needs_for(tmp_path, names, files), files)
    assert_all_present(tmp_path, names, files)
    total = sum(size for _, size in files.values())
    assert report.controller_bytes == total
    assert report.peer_bytes == 3 * total
    assert sum(h.served_to_peers for h in report.hosts.values()) == 3 * total
    assert all(h.error is None and h.fallbacks == 0 for h in report.hosts.values())
    assert any("from peers at" in m and "/s" in m for _, m in messages), messages
    assert report.rounds == 3
    # a rerun: every host already holds every file with the right digest and fetches nothing
    _, again, _ = distribute(tmp_path, needs_for(tmp_path, names, files), files)
    assert again.controller_bytes == 0 and again.peer_bytes == 0
    assert sum(h.files_present for h in again.hosts.values()) == 4 * len(files)  # seeds included: checked before sending
    assert_all_present(tmp_path, names, files)


def test_the_server_wants_the_token_and_serves_only_its_files(tmp_path: Path, files: dict) -> None:  # type: ignore[type-arg]
    digest, (path, size) = next(iter(files.items()))
    ex = LocalExecutor("h1")
    server = start_server(ex, PY, "127.0.0.1", {digest: str(path)})
    try:
        def get(url: str, token: str | None) -> int:
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
            try:
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=5) as resp:
                    return len(resp.read())
            except urllib.error.HTTPError as exc:
                return -exc.code

        assert get(f"{server.url}/{digest}", server.token) == size
        assert get(f"{server.url}/{digest}", None) == -403
        assert get(f"{server.url}/{digest}", server.token[:-1] + "x") == -403
        assert get(f"{server.url}/{'0' * 64}", server.token) == -404
        assert get(f"{server.url}/../../etc/passwd", server.token) == -404
    finally:
        stop_server(ex, server)
    assert not alive(server.pid)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it has exited)."""
    for _ in range(50):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if state == "Z":
            return False
        time.sleep(0.1)
    return True


def test_a_corrupt_peer_copy_is_refused_and_the_controller_fills_in(tmp_path: Path, files: dict) -> None:  # type: ignore[type-arg]
    names = ["h1", "h2", "h3"]
    digest, (_, size) = max(files.items(), key=lambda kv: kv[1][1])
    liar = tmp_path / "liar" / "model.bin"
    liar.parent.mkdir()
    liar.write_bytes(b"x" * size)  # right size, wrong content: a host whose facts claim the file
    needs = [HostNeeds("liar", (), {digest: str(liar)}), *needs_for(tmp_path, names, files)]
    plan, report, messages = distribute(tmp_path, needs, files)
    assert_all_present(tmp_path, names, files)
    assert plan.controller_bytes < size  # the plan trusted the liar for the big file...
    assert sum(h.fallbacks for h in report.hosts.values()) >= 1  # ...and the fetchers did not
    assert any("sha256" in m and "falling back to the controller" in m for _, m in messages), messages


def test_killing_a_peer_mid_transfer_falls_back_and_a_rerun_converges(tmp_path: Path, files: dict) -> None:  # type: ignore[type-arg]
    names = ["h1", "h2", "h3"]
    needs = needs_for(tmp_path, names, files)
    killed: list[int] = []

    class Watching(LocalExecutor):
        """h1 serves; once h2 is fetching from it, its server process is killed (SIGKILL)."""

        def run(self, command, **kw):  # type: ignore[no-untyped-def]
            if command.argv[-1] == "fetch" and self.host != "h1" and not killed:
                def killer() -> None:
                    time.sleep(0.5)
                    pid = json.loads((tmp_path / "h1.pid").read_text())
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                threading.Thread(target=killer, daemon=True).start()
            result = super().run(command, **kw)
            if command.argv[-1] == "serve":
                (tmp_path / f"{self.host}.pid").write_text(str(json.loads(result.stdout)["pid"]))
            return result

    executors = {n: Watching(n) for n in names}
    _, report, messages = distribute(tmp_path, needs, files, rate=2e6, executors=executors)  # 6 MB: ~3 s
    assert killed
    # every host still ended with every file: the fetchers of h1 took another peer or the controller
    assert_all_present(tmp_path, names, files)
    # h1 was the only holder of the big file in round 2: both its fetchers fell back to the controller
    assert report.hosts["h2"].fallbacks + report.hosts["h3"].fallbacks == 2, report.to_json()
    assert any("falling back to the controller" in m for _, m in messages)
    _, again, _ = distribute(tmp_path, needs, files)
    assert again.controller_bytes == 0 and again.peer_bytes == 0
    assert_all_present(tmp_path, names, files)


def test_a_peer_that_failed_once_is_not_asked_again_in_the_same_run(tmp_path: Path) -> None:
    from llamactl.ops.fanout import agent_command

    src = tmp_path / "src"
    src.mkdir()
    digests = {make_file(src / f"w{i}.whl", 1000 + i, i): src / f"w{i}.whl" for i in range(5)}
    ex = LocalExecutor("h1")
    server = start_server(ex, PY, "127.0.0.1", {d: str(p) for d, p in digests.items()})
    try:
        # a peer that refuses connections comes first for every file: tried once, then skipped
        dead = {"host": "gone", "url": "http://127.0.0.1:9/x", "token": "t"}
        items = [{"digest": d, "size": p.stat().st_size, "dest": str(tmp_path / "dst" / p.name), "mode": 0o644,
                  "sources": [dead, {"host": "h1", "url": f"{server.url}/{d}", "token": server.token}]}
                 for d, p in digests.items()]
        out = ex.run(agent_command(PY, "fetch"), stdin=json.dumps({"items": items, "timeout_s": 5}).encode())
    finally:
        stop_server(ex, server)
    answers = [json.loads(line) for line in out.stdout.splitlines()]
    assert [a["how"] for a in answers] == ["peer"] * 5 and all(a["source"] == "h1" for a in answers)
    assert "refused" in answers[0]["errors"][0].lower()
    assert all(a["errors"] == ["gone: skipped, failed earlier"] for a in answers[1:])
