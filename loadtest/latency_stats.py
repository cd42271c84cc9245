"""Latency summaries that the load tools share."""
from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(sorted_values: list[float], percent: float) -> float:
    """Return the nearest-rank percentile of an ascending list."""
    return sorted_values[max(0, math.ceil(percent / 100 * len(sorted_values)) - 1)]


def summarize_ms(values_ns: Iterable[int], digits: int = 2) -> dict:
    """Return count, p50, p95, p99, max and mean in milliseconds of latencies given in nanoseconds."""
    values = sorted(value / 1e6 for value in values_ns)
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "p50": round(percentile(values, 50), digits),
        "p95": round(percentile(values, 95), digits),
        "p99": round(percentile(values, 99), digits),
        "max": round(values[-1], digits),
        "mean": round(sum(values) / len(values), digits),
    }
