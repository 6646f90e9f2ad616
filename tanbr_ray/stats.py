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
