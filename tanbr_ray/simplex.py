"""The feasible set X = {x in R^K : x >= 0, sum(x) = 1, ||x||_0 <= B} and input checks.

Shared by the router and the MoE (neither imports the other): every public entry point validates its
inputs here, so a bad psi, budget, x or reward vector fails fast with a ValueError naming the field
instead of silently corrupting learned state or merging garbage.
"""

from __future__ import annotations

import numpy as np

SUM_TOL = 1e-6


def as_vector(value, length: int, field: str) -> np.ndarray:
    """A finite float64 vector of the given length, or a ValueError naming `field`."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field}: expected a numeric vector, got {type(value).__name__}") from exc
    if arr.ndim != 1 or arr.shape[0] != length:
        raise ValueError(f"{field}: expected a vector of length {length}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{field}: contains NaN or infinite values")
    return arr


def check_psi(psi, num_tasks: int) -> np.ndarray:
    """psi must be a probability distribution over the V task types."""
    arr = as_vector(psi, num_tasks, "psi")
    if np.any(arr < 0):
        raise ValueError("psi: entries must be non-negative (a task distribution)")
    if abs(arr.sum() - 1.0) > SUM_TOL:
        raise ValueError(f"psi: entries must sum to 1 (a task distribution), got {arr.sum():.6g}")
    return arr


def check_budget(budget, num_experts: int) -> int:
    """budget B: how many experts may carry non-zero weight, 1 <= B <= K."""
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise ValueError(f"budget: expected an integer, got {type(budget).__name__}")
    if not 1 <= int(budget) <= num_experts:
        raise ValueError(f"budget: must be in [1, {num_experts}] (number of experts), got {budget}")
    return int(budget)


def check_x(x, num_experts: int, budget: int | None = None, tol: float = SUM_TOL) -> np.ndarray:
    """x must lie in X: one finite weight per expert, each ≥ 0, summing to 1 (±tol), ≤ budget non-zeros."""
    arr = as_vector(x, num_experts, "x")
    if np.any(arr < 0):
        raise ValueError(f"x: merging weights must be ≥ 0, got {arr.tolist()}")
    if abs(arr.sum() - 1.0) > tol:
        raise ValueError(f"x: merging weights must sum to 1 (±{tol}), got sum {arr.sum()!r}")
    if budget is not None and np.count_nonzero(arr) > budget:
        raise ValueError(f"x: {np.count_nonzero(arr)} non-zero weights exceed the budget B={budget}")
    return arr


def check_rewards(rewards, num_tasks: int, observed=None) -> tuple[np.ndarray, np.ndarray]:
    """One finite reward per task type, or per observed task type when a mask is given.

    A slot may carry no labelled request of some task: `observed` marks the tasks whose reward was
    measured; the others are ignored (returned as 0 with mask False) instead of being invented.
    """
    if observed is None:
        return as_vector(rewards, num_tasks, "rewards"), np.ones(num_tasks, dtype=bool)
    mask = np.asarray(observed, dtype=bool)
    if mask.shape != (num_tasks,):
        raise ValueError(f"observed: expected a boolean vector of length {num_tasks}, got shape {mask.shape}")
    try:
        arr = np.asarray(rewards, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"rewards: expected a numeric vector, got {type(rewards).__name__}") from exc
    if arr.shape != (num_tasks,):
        raise ValueError(f"rewards: expected a vector of length {num_tasks}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr[mask])):
        raise ValueError("rewards: contains NaN or infinite values for observed tasks")
    return np.where(mask, arr, 0.0), mask


def project_to_budget(x: np.ndarray, budget: int) -> np.ndarray:
    """Keep the `budget` largest weights (ties: lowest index) and renormalise.

    The cheapest map from the simplex into X; exact when x already has <= budget non-zeros.
    """
    x = np.asarray(x, dtype=np.float64)
    if np.count_nonzero(x) <= budget:
        return x / x.sum()
    keep = np.argsort(-x, kind="stable")[:budget]
    out = np.zeros_like(x)
    out[keep] = x[keep]
    total = out.sum()
    if total <= 0:  # all kept weights were zero: fall back to uniform over the kept support
        out[keep] = 1.0
        total = float(budget)
    return out / total


def project_rows_to_budget(xs: np.ndarray, budget: int) -> np.ndarray:
    """Row-wise `project_to_budget`, vectorised for candidate matrices."""
    xs = np.asarray(xs, dtype=np.float64)
    if budget >= xs.shape[1]:
        return xs / xs.sum(axis=1, keepdims=True)
    order = np.argsort(-xs, axis=1, kind="stable")[:, :budget]
    out = np.zeros_like(xs)
    rows = np.arange(xs.shape[0])[:, None]
    out[rows, order] = xs[rows, order]
    return out / out.sum(axis=1, keepdims=True)


PSI_POWERS = (0.5, 1.0, 2.0, 4.0)


def psi_family(mass: np.ndarray, budget: int, powers=PSI_POWERS) -> dict[float, np.ndarray]:
    """The ψ-family: x ∝ mass^p, top-B renormalised, per power p (p = 1 is ψ-merge; p > 1 sharpens
    towards the dominant experts). `mass` is the request share each expert serves; all zero → uniform."""
    m = np.asarray(mass, dtype=np.float64)
    if m.sum() <= 0:
        m = np.ones_like(m)
    return {p: project_to_budget(m**p / (m**p).sum(), budget) for p in powers}
