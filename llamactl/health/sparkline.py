"""Sparklines for ``status --watch``: a time window of readings per instance, bucketed and drawn with unicode
blocks. Pure: the caller passes the clock readings; nothing here sleeps or reads a clock.

A bucket with no reading is a blank, so a gap (an instance down, a window without requests) shows as a gap,
never as a zero. A window's quantile is only a reading when requests finished in it (the server's lifetime
quantile is no picture of the last seconds).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llamactl.health.report import HealthReport

BLOCKS = "▁▂▃▄▅▆▇█"
GAP = " "


def sparkline(values: Sequence[float | None], *, lo: float = 0.0, hi: float | None = None) -> str:
    """One character per value: the lowest block at ``lo``, the highest at ``hi`` (default: the largest
    value), a blank for None. Values outside are clipped; a flat line at ``lo`` is all lowest blocks."""
    seen = [v for v in values if v is not None and math.isfinite(v)]
    top = hi if hi is not None else (max(seen) if seen else lo)
    span = top - lo
    out = []
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(GAP)
            continue
        if span <= 0:
            out.append(BLOCKS[0] if v <= lo else BLOCKS[-1])
            continue
        share = min(1.0, max(0.0, (v - lo) / span))
        out.append(BLOCKS[min(len(BLOCKS) - 1, int(share * len(BLOCKS)))])
    return "".join(out)


@dataclass
class Series:
    """Readings ``(t, value)`` over the last ``window_s`` seconds (older ones dropped on ``add``)."""

    window_s: float
    points: deque[tuple[float, float | None]] = field(default_factory=deque)

    def add(self, t: float, value: float | None) -> None:
        self.points.append((t, value))
        while self.points and self.points[0][0] < t - self.window_s:
            self.points.popleft()

    def buckets(self, now: float, width: int) -> list[float | None]:
        """``width`` equal slices of ``(now - window_s, now]``, oldest first: the mean reading of each, None
        where a slice has none."""
        if width < 1:
            raise ValueError(f"width {width}: expected at least 1")
        size = self.window_s / width
        sums = [0.0] * width
        counts = [0] * width
        start = now - self.window_s
        for t, v in self.points:
            if v is None or t <= start or t > now:
                continue
            i = min(width - 1, max(0, math.ceil((t - start) / size) - 1))  # slices are (a, b]
            sums[i] += v
            counts[i] += 1
        return [s / c if c else None for s, c in zip(sums, counts)]

    def values(self) -> list[float | None]:
        return [v for _, v in self.points]

    def last(self) -> float | None:
        return next((v for _, v in reversed(self.points) if v is not None), None)


FIGURES = ("requests_per_s", "p95_s")


@dataclass
class History:
    """Per instance (and balancer) id, a ``Series`` for each figure the watch view draws."""

    window_s: float
    series: dict[str, dict[str, Series]] = field(default_factory=dict)

    def _of(self, key: str, figure: str) -> Series:
        return self.series.setdefault(key, {}).setdefault(figure, Series(self.window_s))

    def record(self, now: float, report: HealthReport) -> None:
        """One sweep's readings. An instance's first sweep has no window (its rate is a lifetime average):
        no reading then; a window without requests has a rate of 0 and no p95."""
        for i in report.instances:
            windowed = i.rate_window_s is not None and i.state != "down"
            rate = i.requests_per_s if windowed else None
            self._of(i.id, "requests_per_s").add(now, rate)
            self._of(i.id, "p95_s").add(now, i.p95_s if windowed and rate else None)
        for b in report.balancers:
            self._of(f"balancer:{b.name}", "requests_per_s").add(now, b.requests_per_s)

    def line(self, key: str, figure: str, now: float, width: int, hi: float | None = None) -> str:
        series = self.series.get(key, {}).get(figure)
        if series is None:
            return GAP * width
        return sparkline(series.buckets(now, width), hi=hi)

    def peak(self, keys: Iterable[str], figure: str) -> float | None:
        """The largest reading of ``figure`` over ``keys``: one scale for every instance's line."""
        found = [v for k in keys for v in self.series.get(k, {}).get(figure, Series(0)).values() if v is not None]
        return max(found) if found else None

    def to_dict(self) -> dict[str, dict[str, list[list[float | None]]]]:
        """Every reading kept, as ``[t, value]`` pairs (``--watch --json``)."""
        return {key: {fig: [[round(t, 3), v] for t, v in s.points] for fig, s in figs.items()}
                for key, figs in self.series.items()}
