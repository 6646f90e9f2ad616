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
    return as_rows(value, length, field, single=True)[0]


def as_rows(value, length: int, field: str, single: bool = False) -> np.ndarray:
    """Finite float64 rows (N, length), one per node, or a ValueError naming `field` and the row
    (`single`: one vector, named without a row index)."""
    arr = _numeric(value, field)
    if single:
        if arr.ndim != 1 or arr.shape[0] != length:
            raise ValueError(f"{field}: expected a vector of length {length}, got shape {arr.shape}")
        arr = arr[None]
    elif arr.ndim != 2 or arr.shape[1] != length:
        raise ValueError(f"{field}: expected rows of length {length}, got shape {arr.shape}")
    _first_bad(~np.isfinite(arr).all(1), field, single, "contains NaN or infinite values")
    return arr


def _first_bad(bad: np.ndarray, field: str, single: bool, what) -> None:
    """Raise for the first row flagged bad; `what(i)` (or a string) says what is wrong with it."""
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{field if single else f'{field}[{i}]'}: {what(i) if callable(what) else what}")


def check_psi(psi, num_tasks: int) -> np.ndarray:
    """psi must be a probability distribution over the V task types."""
    return check_psis(psi, num_tasks, single=True)[0]


def check_psis(psis, num_tasks: int, single: bool = False) -> np.ndarray:
    """Rows of psi (one per node), each a probability distribution over the V task types."""
    arr = as_rows(psis, num_tasks, "psi", single)
    _first_bad((arr < 0).any(1), "psi", single, "entries must be non-negative (a task distribution)")
    sums = arr.sum(1)
    _first_bad(np.abs(sums - 1.0) > SUM_TOL, "psi", single,
               lambda i: f"entries must sum to 1 (a task distribution), got {sums[i]:.6g}")
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
    return check_xs(x, num_experts, None if budget is None else [budget], tol, single=True)[0]


def check_xs(xs, num_experts: int, budgets=None, tol: float = SUM_TOL, single: bool = False) -> np.ndarray:
    """Rows of x (one per node), each in X under its node's budget (None: no limit)."""
    arr = as_rows(xs, num_experts, "x", single)
    _first_bad((arr < 0).any(1), "x", single, lambda i: f"merging weights must be ≥ 0, got {arr[i].tolist()}")
    sums = arr.sum(1)
    _first_bad(np.abs(sums - 1.0) > tol, "x", single,
               lambda i: f"merging weights must sum to 1 (±{tol}), got sum {sums[i]!r}")
    if budgets is not None:
        nnz = np.count_nonzero(arr, axis=1)
        b = np.asarray(budgets)
        _first_bad(nnz > b, "x", single, lambda i: f"{nnz[i]} non-zero weights exceed the budget B={b[i]}")
    return arr


def check_rewards(rewards, num_tasks: int, observed=None) -> tuple[np.ndarray, np.ndarray]:
    """One finite reward per task type, or per observed task type when a mask is given.

    A slot may carry no labelled request of some task: `observed` marks the tasks whose reward was
    measured; the others are ignored (returned as 0 with mask False) instead of being invented.
    """
    arr = _numeric(rewards, "rewards")
    if arr.shape != (num_tasks,):
        raise ValueError(f"rewards: expected a vector of length {num_tasks}, got shape {arr.shape}")
    mask = None if observed is None else np.asarray(observed, dtype=bool)
    if mask is not None and mask.shape != (num_tasks,):
        raise ValueError(f"observed: expected a boolean vector of length {num_tasks}, got shape {mask.shape}")
    r, m = check_rewards_rows(arr[None], num_tasks, None if mask is None else mask[None], single=True)
    return r[0], m[0]


def check_rewards_rows(rewards, num_tasks: int, observed=None, single: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Rows of per-task rewards (one per node) and their observed masks, as `check_rewards`."""
    arr = _numeric(rewards, "rewards")
    if arr.ndim != 2 or arr.shape[1] != num_tasks:
        raise ValueError(f"rewards: expected rows of length {num_tasks}, got shape {arr.shape}")
    mask = np.ones(arr.shape, dtype=bool) if observed is None else np.asarray(observed, dtype=bool)
    if mask.shape != arr.shape:
        raise ValueError(f"observed: expected boolean rows of shape {arr.shape}, got shape {mask.shape}")
    _first_bad(~np.where(mask, np.isfinite(arr), True).all(1), "rewards", single,
               "contains NaN or infinite values" + ("" if observed is None else " for observed tasks"))
    return np.where(mask, arr, 0.0), mask


def _numeric(value, field: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field}: expected a numeric vector, got {type(value).__name__}") from exc


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
# an edge node's task mix is drawn from Dirichlet(MIX_CONCENTRATION) over the tasks: concentrated on a few
MIX_CONCENTRATION = 0.3
RANDOM_POINTS_SEED = 2


def random_points(num_experts: int, budget: int, count: int, seed: int = RANDOM_POINTS_SEED) -> np.ndarray:
    """`count` points drawn uniformly from X (a uniformly random support of size B, Dirichlet(1) weights
    on it), seeded by (seed, budget) and prefix-stable: the first n of a longer draw are a shorter one's."""
    budget = check_budget(budget, num_experts)
    rng = np.random.default_rng([seed, budget])
    out = np.zeros((count, num_experts))
    for row in out:
        row[rng.choice(num_experts, size=budget, replace=False)] = rng.dirichlet(np.ones(budget))
    return out


def snap_to_grid(x: np.ndarray, grid: int) -> np.ndarray:
    """x on the grid of multiples of 1/grid (grid 0: x unchanged), by largest remainder, so the sum
    stays 1 and no zero weight becomes non-zero (the support, hence the budget, is kept). A weight
    below 1/(2 grid) may drop to 0; a point with a single non-zero weight is left alone."""
    x = np.asarray(x, dtype=np.float64)
    if grid < 0:
        raise ValueError(f"grid: must be >= 0, got {grid}")
    if grid == 0:
        return x
    units = np.floor(x * grid)
    rest = x * grid - units
    short = int(round(grid - units.sum()))
    units[np.argsort(-rest, kind="stable")[:short]] += 1
    return units / grid


def psi_family(mass: np.ndarray, budget: int, powers=PSI_POWERS, grid: int = 0) -> dict[float, np.ndarray]:
    """The ψ-family: x ∝ mass^p, top-B renormalised, per power p (p = 1 is ψ-merge; p > 1 sharpens
    towards the dominant experts). `mass` is the request share each expert serves; all zero → uniform.
    With `grid` > 0 every point is snapped to multiples of 1/grid (`snap_to_grid`): ψ̂ moves a little
    every slot, and a grid makes the points a steady mix plays recur, so their merges are reused."""
    m = np.asarray(mass, dtype=np.float64)
    if m.sum() <= 0:
        m = np.ones_like(m)
    return {p: snap_to_grid(project_to_budget(m**p / (m**p).sum(), budget), grid) for p in powers}
