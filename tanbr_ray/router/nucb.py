"""Nucb: neural UCB over a fixed random candidate set (the paper's baseline).

Same reward model as Tanbr; the only difference is that its candidates are N points drawn uniformly
from the simplex once and never refined, so its precision is capped by how close the nearest
candidate lies to the optimum.
"""

from __future__ import annotations

import numpy as np

from tanbr_ray.router.bandit import BanditConfig, NeuralUCB
from tanbr_ray.simplex import project_rows_to_budget
from tanbr_ray.router.policy import Policy


class NucbPolicy(Policy):
    name = "Nucb"

    def __init__(self, num_experts: int, num_tasks: int, bandit: BanditConfig | None = None,
                 num_candidates: int = 256, seed: int = 0):
        super().__init__(num_experts, num_tasks)
        if num_candidates < 1:
            raise ValueError(f"num_candidates: must be >= 1, got {num_candidates}")
        bandit = bandit or BanditConfig(seed=seed)
        self.bandit = NeuralUCB(num_experts, num_tasks, bandit)
        rng = np.random.default_rng(seed)
        self.points = rng.dirichlet(np.ones(num_experts), size=num_candidates)
        self._cands: dict[int, np.ndarray] = {}

    def candidates(self, budget: int) -> np.ndarray:
        cands = self._cands.get(budget)
        if cands is None:
            cands = self._cands[budget] = project_rows_to_budget(self.points, budget)
        return cands

    def _select(self, psi, budget):
        cands = self.candidates(budget)
        mean, width = self.bandit.ucb(cands, psi)
        return cands[int(np.argmax(mean + self.bandit.config.gamma * width))].copy()

    def _select_many(self, psis, budgets):
        xs = np.zeros((len(psis), self.num_experts))
        for budget, rows in self._by_budget(budgets):
            cands = self.candidates(budget)
            mean, width = self.bandit.ucb_many(cands, psis[rows])
            xs[rows] = cands[np.argmax(mean + self.bandit.config.gamma * width, axis=1)]
        return xs

    def _update(self, x, psi, rewards, mask):
        self.bandit.observe(x, psi, rewards, mask)

    def _update_many(self, xs, psis, rewards, masks):
        self.bandit.observe_many(xs, psis, rewards, masks)
