"""Fan-out of a deploy's bulk files: who fetches what from whom, in rounds. Pure.

The controller sends each distinct file (by sha256) to one host; from the next round on, every host
holding it serves it to at most ``degree`` other hosts per round, so the holders of a file grow
(1 + degree)-fold per round: 8 hosts take 3 rounds, 300 hosts 7 (degree 2). The controller seeds
different files to different hosts, which spreads both its uploads and the hosts' serving load.

A host counts as holding a file when its facts say so (a model manifest entry, a wheelhouse file of
the right size): that is only a hint, since fetchers verify every digest and move on to the next
source, then to the controller, on a mismatch.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from llamactl.plan.deploy import DesiredHost, HostPlan, Upload
from llamactl.plan.facts import HostFacts
from llamactl.plan.release import Artifact

DEFAULT_DEGREE = 2
ALTERNATES = 2  # further holders a fetcher may try before falling back to the controller


@dataclass(frozen=True)
class Item:
    """One file a host must end up with."""

    digest: str  # sha256 hex
    size: int
    dest: str  # absolute path on the host
    mode: int = 0o644


@dataclass(frozen=True)
class HostNeeds:
    host: str
    needs: tuple[Item, ...]
    holds: Mapping[str, str] = field(default_factory=dict)  # digest -> path on the host (before the deploy)


@dataclass(frozen=True)
class Fetch:
    """``host`` gets ``item`` from ``sources`` (peer hosts, in order), else from the controller;
    no sources: the controller sends it (a seed)."""

    host: str
    item: Item
    sources: tuple[str, ...] = ()

    @property
    def seed(self) -> bool:
        return not self.sources


@dataclass(frozen=True)
class FanoutPlan:
    rounds: tuple[tuple[Fetch, ...], ...]
    serves: Mapping[str, Mapping[str, str]]  # source host -> digest -> its path there

    @property
    def controller_bytes(self) -> int:
        """What the controller sends when no peer fails."""
        return sum(f.item.size for r in self.rounds for f in r if f.seed)

    @property
    def peer_bytes(self) -> int:
        return sum(f.item.size for r in self.rounds for f in r if not f.seed)

    def serving_from(self, round_no: int) -> list[str]:
        """Hosts that are a source (first choice or alternate) in this round."""
        return sorted({s for f in self.rounds[round_no] for s in f.sources})


def plan_fanout(hosts: Sequence[HostNeeds], degree: int = DEFAULT_DEGREE) -> FanoutPlan:
    """Rounds of fetches after which every host holds every item it needs."""
    if degree < 1:
        raise ValueError(f"degree must be >= 1, got {degree}")
    order = {h.host: i for i, h in enumerate(hosts)}
    # digest -> hosts holding it, each with the path where it lives there
    where: dict[str, dict[str, str]] = {}
    pending: dict[str, list[Fetch]] = {}
    sizes: dict[str, int] = {}
    for h in hosts:
        for item in h.needs:  # the same content twice on one host is fetched twice, served from the first path
            pending.setdefault(item.digest, []).append(Fetch(h.host, item))
            sizes[item.digest] = item.size
    for h in hosts:
        for digest, path in h.holds.items():
            if digest in pending:
                where.setdefault(digest, {}).setdefault(h.host, path)
    seeds_to: dict[str, int] = {h.host: 0 for h in hosts}
    rounds: list[tuple[Fetch, ...]] = []
    serves: dict[str, dict[str, str]] = {}
    while any(pending.values()):
        fetches: list[Fetch] = []
        served: dict[str, set[str]] = {}  # source -> fetchers it serves this round
        arrived: list[tuple[str, str, str]] = []  # (digest, host, path), holders from the next round on
        for digest in sorted(pending, key=lambda d: (-sizes[d], d)):
            waiting = pending[digest]
            if not waiting:
                continue
            holders = where.get(digest, {})
            if not holders:
                pick = min(waiting, key=lambda f: (seeds_to[f.host], order[f.host]))
                seeds_to[pick.host] += pick.item.size or 1
                fetches.append(pick)
                waiting.remove(pick)
                arrived.append((digest, pick.host, pick.item.dest))
                continue
            for fetch in list(waiting):
                if set(holders) == {fetch.host}:  # the same content twice on one host, nobody else has it yet
                    fetches.append(fetch)  # the controller sends it again: rare (identical files), never stuck
                    waiting.remove(fetch)
                    continue

                def rank(src: str, fetcher: str = fetch.host, served: dict[str, set[str]] = served
                         ) -> tuple[int, int, int]:
                    return (fetcher not in served.get(src, set()), len(served.get(src, set())), order[src])

                able = sorted((s for s in holders if s != fetch.host
                               and (fetch.host in served.get(s, set()) or len(served.get(s, set())) < degree)),
                              key=rank)
                if not able:
                    continue
                first = able[0]
                served.setdefault(first, set()).add(fetch.host)
                others = sorted((s for s in holders if s not in (first, fetch.host)), key=rank)[:ALTERNATES]
                chosen = (first, *others)
                for src in chosen:
                    serves.setdefault(src, {})[digest] = holders[src]
                fetches.append(Fetch(fetch.host, fetch.item, chosen))
                waiting.remove(fetch)
                arrived.append((digest, fetch.host, fetch.item.dest))
        if not fetches:  # cannot happen (a digest with holders always has capacity); never loop forever
            raise AssertionError("fan-out planning made no progress")
        for digest, host, path in arrived:
            where.setdefault(digest, {}).setdefault(host, path)
        rounds.append(tuple(sorted(fetches, key=lambda f: (order[f.host], f.item.dest))))
        pending = {d: w for d, w in pending.items() if w}
    return FanoutPlan(tuple(rounds), serves)


def shipped_artifacts(desired: DesiredHost) -> dict[str, Artifact]:
    """The files the controller ships to this host, by their local path."""
    arts = [desired.release.wheel, *desired.release.wheelhouse]
    if desired.model_upload is not None:
        arts += desired.model_upload.files
    return {str(a.local_path): a for a in arts}


def host_needs(desired: DesiredHost, facts: HostFacts, plan: HostPlan) -> HostNeeds:
    """The bulk files ``plan`` uploads (wheel, wheelhouse, model files) as fan-out items, and what the host
    already holds that its peers may need (model files its manifest lists, wheelhouse files of the right size)."""
    arts = shipped_artifacts(desired)
    needs = tuple(Item(a.sha256, a.size, step.remote_path, step.mode)
                  for step in plan.steps if isinstance(step, Upload) and step.local_path is not None
                  for a in [arts[str(step.local_path)]])
    holds: dict[str, str] = {}
    for art in desired.release.wheelhouse:
        if art.sha256 and facts.wheelhouse.get(art.name) == art.size:
            holds[art.sha256] = posixpath.join(desired.wheelhouse_dir, art.name)
    manifest = (facts.model_manifest or {}).get("files", {})
    if desired.model_upload is not None and desired.model_path:
        for art in desired.model_upload.files:
            if manifest.get(art.name) == art.sha256:
                holds[art.sha256] = posixpath.join(desired.model_path, art.name)
    return HostNeeds(desired.name, needs, holds)


def without_bulk(plan: HostPlan) -> HostPlan:
    """The plan minus the bulk uploads that the fan-out delivers."""
    return replace(plan, steps=[s for s in plan.steps if not (isinstance(s, Upload) and s.local_path is not None)])
