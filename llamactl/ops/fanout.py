"""Carrying out a ``FanoutPlan``: the controller seeds files over SFTP, hosts fetch the rest from peers.

Per round: start the peer servers this round needs (``peer_agent serve`` bound to the host's inventory
address, a fresh random token each), then every host of the round runs one ``peer_agent fetch`` for its
items. A seed is first uploaded by the controller to ``DEST.llamactl-staged`` and verified by the same
fetch. An item no peer could deliver (a dead peer, a wrong digest, a network that does not route between
hosts) is uploaded by the controller and verified; only when that fails too does the host fail. Servers
are killed when the fan-out ends (and exit by themselves after ``SERVER_TTL_S`` if the controller dies).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamactl.errors import LlamactlError
from llamactl.plan.command import Command
from llamactl.plan.fanout import FanoutPlan, Fetch
from llamactl.remote import peer_agent
from llamactl.remote.base import Executor
from llamactl.remote.parallel import run_parallel

AGENT_SOURCE = Path(peer_agent.__file__).read_text(encoding="utf-8")
SERVER_TTL_S = 3600
FETCH_TIMEOUT_S = 10.0  # per socket operation: a stalled peer is given up on, the next source tried
STAGED = ".llamactl-staged"

Say = Callable[[str, str], None]


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


@dataclass
class HostTransfer:
    """Bytes that reached one host, by origin, and what it served to its peers."""

    from_controller: int = 0
    from_peers: int = 0
    served_to_peers: int = 0
    files_fetched: int = 0
    files_present: int = 0  # already on the host with the right digest
    fallbacks: int = 0  # items a peer could not deliver, sent by the controller instead
    seconds: float = 0.0
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"bytes_from_controller": self.from_controller, "bytes_from_peers": self.from_peers,
                "bytes_served_to_peers": self.served_to_peers, "files_fetched": self.files_fetched,
                "files_present": self.files_present, "fallbacks": self.fallbacks,
                "seconds": round(self.seconds, 3), "error": self.error}


@dataclass
class TransferReport:
    hosts: dict[str, HostTransfer] = field(default_factory=dict)
    rounds: int = 0
    planned_controller_bytes: int = 0
    duration_s: float = 0.0

    @property
    def controller_bytes(self) -> int:
        return sum(h.from_controller for h in self.hosts.values())

    @property
    def peer_bytes(self) -> int:
        return sum(h.from_peers for h in self.hosts.values())

    def to_json(self) -> dict[str, object]:
        return {"bytes_sent_by_controller": self.controller_bytes, "bytes_sent_by_peers": self.peer_bytes,
                "planned_controller_bytes": self.planned_controller_bytes, "rounds": self.rounds,
                "duration_s": round(self.duration_s, 3),
                "hosts": {name: h.to_json() for name, h in sorted(self.hosts.items())}}


@dataclass(frozen=True)
class PeerServer:
    url: str
    token: str
    pid: int


def agent_command(python: str, mode: str) -> Command:
    return Command((python, "-c", AGENT_SOURCE, mode), description=f"fan-out agent: {mode}")


def start_server(executor: Executor, python: str, bind: str, files: Mapping[str, str],
                 rate_bytes_s: float | None = None) -> PeerServer:
    token = secrets.token_urlsafe(32)
    config = {"bind": bind, "token": token, "files": dict(files), "ttl_s": SERVER_TTL_S,
              "rate_bytes_s": rate_bytes_s}
    result = executor.run(agent_command(python, "serve"), stdin=json.dumps(config).encode(), timeout_s=60)
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    host = f"[{bind}]" if ":" in bind else bind
    return PeerServer(f"http://{host}:{int(answer['port'])}", token, int(answer["pid"]))


def stop_server(executor: Executor, server: PeerServer) -> None:
    with contextlib.suppress(Exception):  # a host that went away took its server with it
        executor.run(Command.of("kill", str(server.pid)), check=False, timeout_s=15)


class Distributor:
    """One fan-out: the plan, the hosts' executors and the local files the controller may send."""

    def __init__(self, plan: FanoutPlan, executors: Mapping[str, Executor], addresses: Mapping[str, str],
                 pythons: Mapping[str, str], local_files: Mapping[str, Path], say: Say, *,
                 parallel: int = 16, rate_bytes_s: float | None = None) -> None:
        self.plan, self.executors, self.addresses, self.pythons = plan, executors, addresses, pythons
        self.local_files, self.say, self.parallel, self.rate = local_files, say, parallel, rate_bytes_s
        self.report = TransferReport(rounds=len(plan.rounds), planned_controller_bytes=plan.controller_bytes)
        for name in executors:
            self.report.hosts[name] = HostTransfer()
        self.servers: dict[str, PeerServer] = {}
        self._lock = threading.Lock()

    def run(self) -> TransferReport:
        t0 = time.monotonic()
        try:
            for no, fetches in enumerate(self.plan.rounds):
                self._start_servers(no)
                by_host: dict[str, list[Fetch]] = {}
                for f in fetches:
                    if self.report.hosts[f.host].error is None:
                        by_host.setdefault(f.host, []).append(f)
                jobs = [(h, by_host[h], f"fan-out {no + 1}/{len(self.plan.rounds)}") for h in sorted(by_host)]
                run_parallel(jobs, lambda job: self._host_round(*job), max_workers=self.parallel)
        finally:
            run_parallel(sorted(self.servers), lambda h: stop_server(self.executors[h], self.servers[h]),
                         max_workers=self.parallel)
            self.report.duration_s = time.monotonic() - t0
        return self.report

    def _start_servers(self, round_no: int) -> None:
        wanted = [h for h in self.plan.serving_from(round_no)
                  if h not in self.servers and self.report.hosts[h].error is None]

        def start(host: str) -> None:
            try:
                server = start_server(self.executors[host], self.pythons[host], self.addresses[host],
                                      self.plan.serves[host], self.rate)
            except Exception as exc:  # noqa: BLE001 - its fetchers fall back to other sources
                self.say(host, f"cannot serve peers: {exc}")
                return
            with self._lock:
                self.servers[host] = server

        run_parallel(wanted, start, max_workers=self.parallel)

    def _host_round(self, host: str, fetches: list[Fetch], label: str) -> None:
        stats = self.report.hosts[host]
        t0 = time.monotonic()
        try:
            self._fetch_all(host, fetches, label)
        except Exception as exc:  # noqa: BLE001 - becomes the host's error; the others carry on
            stats.error = str(exc) if isinstance(exc, LlamactlError) else f"{type(exc).__name__}: {exc}"
        finally:
            stats.seconds += time.monotonic() - t0

    def _push(self, host: str, fetch: Fetch, label: str) -> dict[str, object]:
        """The controller uploads the item next to its destination; the agent verifies and places it."""
        executor = self.executors[host]
        self.say(host, f"{label}: sending {human(fetch.item.size)} from the controller")
        t0 = time.monotonic()
        executor.put_file(self.local_files[fetch.item.digest], fetch.item.dest + STAGED, mode=0o600)
        elapsed = max(time.monotonic() - t0, 1e-6)
        with self._lock:
            self.report.hosts[host].from_controller += fetch.item.size
        self.say(host, f"{label}: {human(fetch.item.size)} from the controller at "
                       f"{human(fetch.item.size / elapsed)}/s")
        return self._agent_item(fetch, staged=True)

    def _agent_item(self, fetch: Fetch, staged: bool = False) -> dict[str, object]:
        item = fetch.item
        entry: dict[str, object] = {"digest": item.digest, "size": item.size, "dest": item.dest, "mode": item.mode,
                                    "sources": []}
        if staged:
            entry["staged"] = item.dest + STAGED
        else:
            entry["sources"] = [{"host": s, "url": f"{self.servers[s].url}/{item.digest}",
                                 "token": self.servers[s].token} for s in fetch.sources if s in self.servers]
        return entry

    def _run_agent(self, host: str, entries: list[dict[str, object]]) -> dict[str, dict[str, Any]]:
        """The agent's result per destination path."""
        config = {"items": entries, "timeout_s": FETCH_TIMEOUT_S}
        result = self.executors[host].run(agent_command(self.pythons[host], "fetch"),
                                          stdin=json.dumps(config).encode(), timeout_s=3600)
        answers = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        return {str(a["dest"]): a for a in answers}

    def _fetch_all(self, host: str, fetches: list[Fetch], label: str) -> None:
        """One agent run: files already there are kept, the rest come from peers; then the controller
        sends the seeds and whatever no peer delivered, and a second run verifies and places them."""
        entries = [self._agent_item(f) for f in fetches]
        first = {str(s["host"]) for e in entries for s in e["sources"][:1]}  # type: ignore[index]
        if first:
            wanted = sum(f.item.size for f in fetches if not f.seed)
            self.say(host, f"{label}: fetching {human(wanted)} from {', '.join(sorted(first))}")
        t0 = time.monotonic()
        results = self._run_agent(host, entries)
        elapsed = max(time.monotonic() - t0, 1e-6)
        push: list[Fetch] = []
        for f in fetches:
            r = results.get(f.item.dest)
            if r is not None and r["ok"]:
                self._count(host, r)
                continue
            push.append(f)
            if not f.seed:
                with self._lock:
                    self.report.hosts[host].fallbacks += 1
                why = "; ".join(map(str, r["errors"])) if r and r["errors"] else "no peer server"
                self.say(host, f"{label}: {f.item.dest}: peers failed ({why[:160]}), falling back to the controller")
        got = sum(int(str(r["bytes"])) for r in results.values() if r["ok"] and r["how"] == "peer")
        if got:
            self.say(host, f"{label}: {human(got)} from peers at {human(got / elapsed)}/s")
        if not push:
            return
        staged = self._run_agent(host, [self._push(host, f, label) for f in push])
        for f in push:
            r = staged.get(f.item.dest)
            if r is None or not r["ok"]:
                errors = "; ".join(map(str, r["errors"])) if r else "no answer from the fetch agent"
                raise LlamactlError(f"{f.item.dest}: the controller's upload did not verify: {errors}")
            self._count(host, r)

    def _count(self, host: str, r: Mapping[str, Any]) -> None:
        stats = self.report.hosts[host]
        n = int(str(r["bytes"]))
        with self._lock:
            if r["how"] == "present":
                stats.files_present += 1
            elif r["how"] == "peer":
                stats.files_fetched += 1
                stats.from_peers += n
                source = self.report.hosts.get(str(r["source"]))
                if source is not None:
                    source.served_to_peers += n
            else:
                stats.files_fetched += 1
