"""nginx ``stub_status`` on the balancer host: the command that samples it twice, a second apart, from the
host itself (it listens on loopback only), and the pure parser. ``status`` shows the figures."""

from __future__ import annotations

import re
from dataclasses import dataclass

from llamactl.plan.command import Command, quote

STATUS_PATH = "/nginx_status"
SEPARATOR = "--- llamactl sample ---"
_PY_GET = "import sys,urllib.request;sys.stdout.write(urllib.request.urlopen(sys.argv[1],timeout=2).read().decode())"


class StubStatusError(ValueError):
    pass


@dataclass(frozen=True)
class StubStatus:
    active: int
    accepts: int
    handled: int
    requests: int
    reading: int
    writing: int
    waiting: int


@dataclass(frozen=True)
class BalancerFigures:
    """Clients connected now (this probe's own connection left out) and requests per second between samples
    (this probe's own request left out)."""

    active_connections: int
    requests_per_s: float
    sample: StubStatus


def sample_command(port: int) -> Command:
    """Two samples a second apart, each preceded by the host's clock: curl, else wget, else python3."""
    url = quote(f"http://127.0.0.1:{port}{STATUS_PATH}")
    get = (f"(curl -fsS --max-time 2 {url} 2>/dev/null || wget -qO- -T 2 {url} 2>/dev/null || "
           f"python3 -c {quote(_PY_GET)} {url})")
    once = f"date +%s.%N && {get}"
    return Command.sh(f"{once} && echo {quote(SEPARATOR)} && sleep 1 && {once}", "sample nginx stub_status")


_STUB = re.compile(
    r"Active connections:\s*(\d+)\s*\n\s*server accepts handled requests\s*\n\s*(\d+)\s+(\d+)\s+(\d+)\s*\n"
    r"\s*Reading:\s*(\d+)\s+Writing:\s*(\d+)\s+Waiting:\s*(\d+)"
)


def parse_stub_status(text: str) -> StubStatus:
    found = _STUB.search(text)
    if found is None:
        raise StubStatusError(f"not nginx stub_status output: {text.strip()[:200]!r}")
    return StubStatus(*(int(g) for g in found.groups()))


def parse_samples(stdout: str) -> BalancerFigures:
    """``sample_command``'s output -> the figures."""
    parts = stdout.split(SEPARATOR)
    if len(parts) != 2:
        raise StubStatusError(f"expected two stub_status samples, got: {stdout.strip()[:200]!r}")
    (t0, first), (t1, second) = (_timed(p) for p in parts)
    seconds = t1 - t0
    if seconds <= 0:
        raise StubStatusError(f"samples {seconds:g} s apart")
    others = max(0, second.requests - first.requests - 1)  # the second sample's own request is not traffic
    return BalancerFigures(max(0, second.active - 1), others / seconds, second)


def _timed(part: str) -> tuple[float, StubStatus]:
    clock, _, rest = part.strip().partition("\n")
    try:
        at = float(clock.strip())
    except ValueError:
        raise StubStatusError(f"no clock reading before a sample: {clock.strip()[:80]!r}") from None
    return at, parse_stub_status(rest)
