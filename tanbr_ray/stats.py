"""Small statistics shared by the benchmarks and the simulator."""

from __future__ import annotations

import numpy as np


def loglog_slope(cumulative: np.ndarray, start_frac: float = 0.25) -> float:
    """Least-squares slope of log R(t) against log t over t in [start_frac*T, T] (1 = linear).

    NaN when the curve is too short or not positive there (no regret to fit).
    """
    cumulative = np.asarray(cumulative, dtype=np.float64)
    T = len(cumulative)
    t = np.arange(max(1, int(start_frac * T)), T + 1)
    r = cumulative[t - 1]
    if len(t) < 2 or np.any(r <= 0):
        return float("nan")
    return float(np.polyfit(np.log(t), np.log(r), 1)[0])


def recovery_slots(per_slot_gap: np.ndarray, change: int, window: int) -> int | None:
    """Slots after an abrupt mix change until the gap to the oracle (per slot) is back to what it
    was just before: the first s >= change whose next `window` slots average no more than the
    `window` slots before the change. None when it never recovers within the run."""
    gap = np.asarray(per_slot_gap, dtype=np.float64)
    if change < window or change >= len(gap):
        return None
    before = gap[change - window:change].mean()
    for s in range(change, len(gap) - window + 1):
        if gap[s:s + window].mean() <= before:
            return s - change
    return None
