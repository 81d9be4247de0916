"""A pure parser for the Prometheus text exposition format, plus histogram quantiles and rates.

No client library: the controller runs on laptops without prometheus-client, and status only needs
a handful of series. Quantiles follow PromQL ``histogram_quantile`` (linear interpolation inside the
bucket that holds the rank; a rank in the +Inf bucket answers the highest finite bound).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

LATENCY = "llamactl_e2e_request_latency_seconds"
RUNNING = "llamactl_num_requests_running"
WAITING = "llamactl_num_requests_waiting"
GPU_USED = "llamactl_gpu_memory_used_bytes"
GPU_TOTAL = "llamactl_gpu_memory_total_bytes"


class MetricsParseError(ValueError):
    """A line of exposition text that is not valid; names the line number."""


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True)
class Histogram:
    """Cumulative buckets ``(upper_bound, count)`` sorted by bound, the last one +Inf."""

    buckets: tuple[tuple[float, float], ...]
    count: float
    sum: float

    def minus(self, earlier: Histogram) -> Histogram | None:
        """The observations made since ``earlier``; None if a counter went backwards (a restart)."""
        before = dict(earlier.buckets)
        if self.count < earlier.count or any(b not in before for b, _ in self.buckets):
            return None
        buckets = tuple((b, c - before[b]) for b, c in self.buckets)
        if any(c < 0 for _, c in buckets):
            return None
        return Histogram(buckets, self.count - earlier.count, self.sum - earlier.sum)


@dataclass(frozen=True)
class Scrape:
    """Every sample of one /metrics answer."""

    samples: tuple[Sample, ...]
    types: Mapping[str, str]

    def matching(self, name: str, labels: Mapping[str, str] | None = None) -> list[Sample]:
        want = labels or {}
        return [
            s for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in want.items())
        ]

    def value(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """Sum of every series of ``name`` matching ``labels``; None when there is none."""
        found = self.matching(name, labels)
        return sum(s.value for s in found) if found else None

    def histogram(self, name: str) -> Histogram | None:
        """The histogram ``name`` with all label sets (other than ``le``) added together."""
        by_bound: dict[float, float] = {}
        for s in self.matching(f"{name}_bucket"):
            if "le" not in s.labels:
                continue
            bound = _parse_float(s.labels["le"])
            by_bound[bound] = by_bound.get(bound, 0.0) + s.value
        if not by_bound:
            return None
        count = self.value(f"{name}_count")
        total = self.value(f"{name}_sum")
        buckets = tuple(sorted(by_bound.items()))
        return Histogram(buckets, count if count is not None else buckets[-1][1], total or 0.0)


def parse(text: str) -> Scrape:
    """Parse exposition text; raises MetricsParseError naming the first bad line."""
    samples: list[Sample] = []
    types: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 4 and parts[1] == "TYPE":
                types[parts[2]] = parts[3].strip()
            continue
        try:
            samples.append(_parse_sample(line))
        except (ValueError, IndexError) as exc:
            raise MetricsParseError(f"line {number}: {exc}: {raw[:120]!r}") from None
    return Scrape(tuple(samples), types)


def _parse_sample(line: str) -> Sample:
    brace = line.find("{")
    space = line.find(" ")
    labels: dict[str, str] = {}
    if brace != -1 and (space == -1 or brace < space):
        name = line[:brace]
        rest = _parse_labels(line, brace + 1, labels)
    else:
        if space == -1:
            raise ValueError("sample without a value")
        name, rest = line[:space], line[space:]
    fields = rest.split()
    if not name or not fields or len(fields) > 2:
        raise ValueError("expected `name[{labels}] value [timestamp]`")
    return Sample(name, labels, _parse_float(fields[0]))


def _parse_labels(line: str, pos: int, into: dict[str, str]) -> str:
    """Parse ``k="v",...}`` starting at ``pos``; returns the text after the closing brace."""
    while True:
        while pos < len(line) and line[pos] in " ,":
            pos += 1
        if pos >= len(line):
            raise ValueError("unterminated label set")
        if line[pos] == "}":
            return line[pos + 1 :]
        eq = line.index("=", pos)
        key = line[pos:eq].strip()
        if eq + 1 >= len(line) or line[eq + 1] != '"':
            raise ValueError(f"label {key} value is not quoted")
        pos = eq + 2
        chars: list[str] = []
        while line[pos] != '"':
            if line[pos] == "\\":
                pos += 1
                chars.append({"n": "\n", "\\": "\\", '"': '"'}.get(line[pos], "\\" + line[pos]))
            else:
                chars.append(line[pos])
            pos += 1
        into[key] = "".join(chars)
        pos += 1


def _parse_float(text: str) -> float:
    lowered = text.lower()
    if lowered in ("+inf", "inf"):
        return math.inf
    if lowered == "-inf":
        return -math.inf
    return float(text)


def quantile(hist: Histogram | None, q: float) -> float | None:
    """PromQL ``histogram_quantile(q, ...)``; None without observations."""
    if hist is None or not hist.buckets or hist.buckets[-1][1] <= 0:
        return None
    total = hist.buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for index, (bound, cumulative) in enumerate(hist.buckets):
        if cumulative >= rank:
            if math.isinf(bound):
                # Prometheus answers the highest finite bound when the rank lies past it.
                return hist.buckets[index - 1][0] if index > 0 else None
            if index == 0 and bound <= 0:
                return bound
            in_bucket = cumulative - below
            return lower + (bound - lower) * ((rank - below) / in_bucket if in_bucket else 1.0)
        lower, below = bound, cumulative
    return hist.buckets[-1][0]


def rate(earlier: float | None, later: float | None, seconds: float) -> float | None:
    """Per-second increase of a counter; None when unknown or reset (the server restarted)."""
    if earlier is None or later is None or seconds <= 0 or later < earlier:
        return None
    return (later - earlier) / seconds


def quantiles(hist: Histogram | None, qs: Iterable[float]) -> list[float | None]:
    return [quantile(hist, q) for q in qs]
