"""Pure statistics: percentiles, latency summaries, rates, medians and ratios (no I/O)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

PERCENTILES = (50, 95, 99)


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of already sorted values; None when there are none.

    Nearest rank (the smallest value with at least ``pct`` % of the values at or below it)
    never invents a latency nobody saw, which matters for small samples.
    """
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile must be within 0..100, got {pct}")
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


@dataclass(frozen=True)
class LatencySummary:
    """Latencies in milliseconds; every field is None when nothing was measured."""

    count: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def summarize(latencies_s: Iterable[float]) -> LatencySummary:
    """p50 / p95 / p99 / max in milliseconds of latencies given in seconds."""
    values = sorted(latencies_s)
    pcts = [percentile(values, p) for p in PERCENTILES]
    ms = [None if v is None else round(v * 1000, 2) for v in pcts]
    top = round(values[-1] * 1000, 2) if values else None
    return LatencySummary(len(values), ms[0], ms[1], ms[2], top)


def rate(count: int, start: float | None, end: float | None) -> float | None:
    """Events per second between two monotonic instants; None when undefined."""
    if start is None or end is None or count <= 0 or end <= start:
        return None
    return round(count / (end - start), 1)


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that were measured (None ignored); None when there are none."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return round(float(statistics.median(present)), 2)


def worst(values: Iterable[float | None]) -> float | None:
    """The largest measured value: how counts of errors are combined across runs."""
    present = [v for v in values if v is not None]
    return max(present) if present else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator rounded to 2 places; None when either is missing or zero."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 2)
