"""Synthetic merge landscapes with a known optimum, for regret benchmarks without a model.

Task v's mean reward for merging weights x is

    mu_v(x) = hi_v - w_v * sqrt(eps + || D_v (x - c_v) ||^2)

a smooth, non-linear (not quadratic) function peaking at c_v, a point near task v's own expert
(c_v = 0.7 * e_expert(v) + 0.3 * Dirichlet(1)), with per-task scale D_v (diagonal, in [1.5, 2.5]),
height hi_v and slope w_v. Every mu_v is concave (hi minus a norm of an affine map), so for any task
mix psi the psi-weighted objective F(x) = sum_v psi_v mu_v(x) is concave on the simplex: its maximum
is found by SLSQP and certified by the Frank-Wolfe gap max_i dF/dx_i - grad(F).x >= F* - F(x), which
the solution reports (tests require < 1e-6). With a budget B < K the optimum over the sparse set X is
approximated by re-solving on the support of the B largest weights of the unconstrained optimum.
Observed rewards add Gaussian noise (sd `noise`) to every task's mean.

Task-mix schedules psi_t, mixes drawn from Dirichlet(0.5): ``stationary`` (one fixed mix), ``drifting`` (linear interpolation
between random mixes, a new anchor every T/4 rounds) and ``switching`` (a new random mix,
abruptly, every T/5 rounds).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import minimize

Schedule = Literal["stationary", "drifting", "switching"]
_OPTIMA: dict[tuple, tuple[np.ndarray, float, float]] = {}
_OPTIMA_CAP = 200_000


class SyntheticConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_experts: int = Field(8, ge=2, le=4096)
    num_tasks: int = Field(8, ge=1, le=1024)
    budget: int = Field(8, ge=1)
    schedule: Schedule = "stationary"
    rounds: int = Field(2000, ge=1)
    noise: float = Field(0.05, ge=0.0, le=10.0)
    seed: int = 0


class SyntheticEnv:
    """Per-task reward functions over X plus a task-mix schedule psi_t."""

    def __init__(self, config: SyntheticConfig | None = None):
        self.config = c = config or SyntheticConfig()
        if c.budget > c.num_experts:
            raise ValueError(f"budget: {c.budget} exceeds num_experts {c.num_experts}")
        rng = np.random.default_rng(c.seed)
        K, V = c.num_experts, c.num_tasks
        self.expert_of_task = np.arange(V) % K
        self.centers = 0.7 * np.eye(K)[self.expert_of_task] + 0.3 * rng.dirichlet(np.ones(K), size=V)
        self.scales = rng.uniform(1.5, 2.5, size=(V, K))
        self.heights = rng.uniform(0.85, 0.95, size=V)
        self.slopes = rng.uniform(0.3, 0.4, size=V)
        self.eps = 0.01
        self._noise_rng = np.random.default_rng(c.seed + 10_000)
        # Mixes concentrated on a few tasks (an edge node serves one or two applications).
        self._anchors = rng.dirichlet(np.full(V, 0.5), size=8)
        # Optima depend on the landscape, not the noise: shared by every env built from this config,
        # so a benchmark solves each (psi, budget) once for all its policies.
        self._landscape_key = c.model_dump_json(exclude={"noise"})

    @property
    def name(self) -> str:
        c = self.config
        return f"synthetic-{c.schedule}-K{c.num_experts}-V{c.num_tasks}-B{c.budget}"

    # --- rewards ---------------------------------------------------------------------------
    def mean_rewards(self, xs: np.ndarray) -> np.ndarray:
        """mu_v(x) for rows of xs: shape (N, V) (or (V,) for one x)."""
        xs = np.asarray(xs, dtype=np.float64)
        single = xs.ndim == 1
        xs = np.atleast_2d(xs)
        diff = (xs[:, None, :] - self.centers[None]) * self.scales[None]
        out = self.heights - self.slopes * np.sqrt(self.eps + (diff ** 2).sum(-1))
        return out[0] if single else out

    def sample_rewards(self, x: np.ndarray) -> np.ndarray:
        mu = self.mean_rewards(x)
        return mu + self._noise_rng.normal(0.0, self.config.noise, size=mu.shape)

    def objective(self, x: np.ndarray, psi: np.ndarray) -> float:
        return float(self.mean_rewards(x) @ psi)

    def gradient(self, x: np.ndarray, psi: np.ndarray) -> np.ndarray:
        diff = (x[None] - self.centers) * self.scales
        norm = np.sqrt(self.eps + (diff ** 2).sum(-1))
        return -((psi * self.slopes / norm)[:, None] * diff * self.scales).sum(0)

    # --- schedule --------------------------------------------------------------------------
    def psi(self, t: int) -> np.ndarray:
        c = self.config
        if c.schedule == "stationary":
            return self._anchors[0]
        if c.schedule == "switching":
            period = max(1, c.rounds // 5)
            return self._anchors[(t // period) % len(self._anchors)]
        period = max(1, c.rounds // 4)
        k, frac = divmod(t / period, 1.0)
        a, b = self._anchors[int(k) % len(self._anchors)], self._anchors[(int(k) + 1) % len(self._anchors)]
        p = (1 - frac) * a + frac * b
        return p / p.sum()

    # --- optimum ---------------------------------------------------------------------------
    def optimum(self, psi: np.ndarray, budget: int | None = None) -> tuple[np.ndarray, float, float]:
        """(x*, F(x*), Frank-Wolfe gap) for this mix under the budget (cached per mix)."""
        budget = self.config.budget if budget is None else budget
        key = (self._landscape_key, np.asarray(psi, dtype=np.float64).tobytes(), budget)
        hit = _OPTIMA.get(key)
        if hit is None:
            if len(_OPTIMA) >= _OPTIMA_CAP:
                _OPTIMA.clear()
            hit = _OPTIMA[key] = self._solve(key[1], budget)
        x, value, gap = hit
        return x.copy(), value, gap

    def _solve(self, psi_bytes: bytes, budget: int) -> tuple[np.ndarray, float, float]:
        psi = np.frombuffer(psi_bytes, dtype=np.float64)
        K = self.config.num_experts
        x = self._solve_on(psi, np.arange(K))
        if np.count_nonzero(x > 1e-9) > budget:
            x = self._solve_on(psi, np.sort(np.argsort(-x, kind="stable")[:budget]))
        support = x > 0
        g = self.gradient(x, psi)
        gap = float(g[support].max() - g @ x) if budget < K else float(g.max() - g @ x)
        return x, self.objective(x, psi), max(gap, 0.0)

    def _solve_on(self, psi: np.ndarray, support: np.ndarray) -> np.ndarray:
        K, n = self.config.num_experts, len(support)

        def embed(z):
            x = np.zeros(K)
            x[support] = z
            return x

        def neg_f(z):
            return -self.objective(embed(z), psi)

        def neg_g(z):
            return -self.gradient(embed(z), psi)[support]

        starts = [np.full(n, 1.0 / n)] + [self._project(self.centers[v, support]) for v in range(len(psi))
                                          if psi[v] > 0][:4]
        best = None
        for z0 in starts:
            res = minimize(neg_f, z0, jac=neg_g, method="SLSQP", bounds=[(0.0, 1.0)] * n,
                           constraints=[{"type": "eq", "fun": lambda z: z.sum() - 1.0,
                                         "jac": lambda z: np.ones_like(z)}],
                           options={"ftol": 1e-12, "maxiter": 500})
            z = self._project(res.x)
            if best is None or neg_f(z) < neg_f(best):
                best = z
        return embed(best)

    @staticmethod
    def _project(z: np.ndarray) -> np.ndarray:
        """Euclidean projection onto the probability simplex (sort-based)."""
        u = np.sort(z)[::-1]
        css = np.cumsum(u) - 1.0
        k = np.nonzero(u - css / np.arange(1, len(z) + 1) > 0)[0][-1]
        return np.maximum(z - css[k] / (k + 1), 0.0)
