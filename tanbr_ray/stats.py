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


def recovery_slots(per_slot_gap: np.ndarray, change: int, window: int, tolerance: float = 0.0) -> int | None:
    """Slots after an abrupt mix change until the gap to the oracle (per slot) is back within
    `tolerance` of what it was just before: the first s >= change whose next `window` slots average
    no more than the `window` slots before the change, plus `tolerance`. None when it never recovers
    within the run."""
    gap = np.asarray(per_slot_gap, dtype=np.float64)
    if change < window or change >= len(gap):
        return None
    before = gap[change - window:change].mean() + tolerance
    for s in range(change, len(gap) - window + 1):
        if gap[s:s + window].mean() <= before:
            return s - change
    return None


def paired_bootstrap(credit_a: np.ndarray, credit_b: np.ndarray, counts: np.ndarray, resamples: int = 2000,
                     seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Difference of two policies' pooled credit (Σ credit / Σ requests) on the same units (node-slots
    with the same scored requests), and its 95 % bootstrap interval, resampling the units."""
    a, b, n = (np.asarray(v, dtype=np.float64).ravel() for v in (credit_a, credit_b, counts))
    if not (len(a) == len(b) == len(n)) or len(n) == 0:
        raise ValueError("paired_bootstrap: need equally many units (> 0) for both policies and the counts")
    diff = float((a - b).sum() / max(n.sum(), 1.0))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(n), size=(resamples, len(n)))
    boot = (a[idx] - b[idx]).sum(1) / np.maximum(n[idx].sum(1), 1.0)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return diff, (float(lo), float(hi))


def t_interval(values) -> tuple[float, tuple[float, float] | None]:
    """Mean and 95 % Student-t interval (None with fewer than two values)."""
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean())
    if len(v) < 2:
        return m, None
    half = float(t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return m, (m - half, m + half)
