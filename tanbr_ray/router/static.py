"""Policies that do not learn: Random, Uniform, psi-merge, and Best-x, which knows the rewards."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from tanbr_ray.simplex import psi_family, random_points
from tanbr_ray.router.policy import Policy, default_task_experts


class RandomPolicy(Policy):
    """Uniform over X: a uniformly random support of size B, then Dirichlet(1) weights on it. With
    `points` > 0 it plays a uniformly random one of `points` such draws, fixed per budget
    (`simplex.random_points`, the same for every seed): each play is still uniform over X, and the
    merges of a finite set are reused instead of made anew at every node-slot."""

    name = "Random"

    def __init__(self, num_experts: int, num_tasks: int, seed: int = 0, points: int = 0):
        super().__init__(num_experts, num_tasks)
        if points < 0:
            raise ValueError(f"random_points: must be >= 0, got {points}")
        self.rng = np.random.default_rng(seed)
        self.points = int(points)
        self._drawn: dict[int, np.ndarray] = {}  # budget -> its points

    def _select(self, psi, budget):
        if self.points:
            if budget not in self._drawn:
                self._drawn[budget] = random_points(self.num_experts, budget, self.points)
            return self._drawn[budget][self.rng.integers(self.points)].copy()
        support = self.rng.choice(self.num_experts, size=budget, replace=False)
        x = np.zeros(self.num_experts)
        x[support] = self.rng.dirichlet(np.ones(budget))
        return x


class _ExpertMassPolicy(Policy):
    """Policies that read psi through the task -> expert map (expert k serves the tasks tied to it)."""

    def __init__(self, num_experts: int, num_tasks: int, task_experts: Sequence[int] | None = None):
        super().__init__(num_experts, num_tasks)
        self.task_experts = np.asarray(task_experts if task_experts is not None
                                       else default_task_experts(num_tasks, num_experts))

    def expert_mass(self, psi: np.ndarray) -> np.ndarray:
        """Request share per expert: the psi mass of the tasks each expert serves."""
        return np.bincount(self.task_experts, weights=psi, minlength=self.num_experts)


class UniformPolicy(_ExpertMassPolicy):
    """x = 1/K (simple averaging). With B < K: 1/B over the experts of the B most requested tasks."""

    name = "Uniform"

    def _select(self, psi, budget):
        if budget >= self.num_experts:
            return np.full(self.num_experts, 1.0 / self.num_experts)
        mass = self.expert_mass(psi)
        x = np.zeros(self.num_experts)
        x[np.argsort(-mass, kind="stable")[:budget]] = 1.0 / budget
        return x


class PsiMergePolicy(_ExpertMassPolicy):
    """x from psi: each expert weighted by the mass of the tasks it serves, top-B renormalised (the
    ψ-family's p = 1), on the grid of multiples of 1/grid (0: exact)."""

    name = "psi-merge"

    def __init__(self, num_experts: int, num_tasks: int, task_experts: Sequence[int] | None = None, grid: int = 0):
        super().__init__(num_experts, num_tasks, task_experts)
        self.grid = int(grid)

    def _select(self, psi, budget):
        return psi_family(self.expert_mass(psi), budget, powers=(1.0,), grid=self.grid)[1.0]


class BestXPolicy(Policy):
    """Knows the reward function: plays its argmax for the current psi (zero regret by definition)."""

    name = "Best-x"

    def __init__(self, num_experts: int, num_tasks: int,
                 optimum: Callable[[np.ndarray, int], np.ndarray]):
        super().__init__(num_experts, num_tasks)
        self.optimum = optimum

    def _select(self, psi, budget):
        return self.optimum(psi, budget)
