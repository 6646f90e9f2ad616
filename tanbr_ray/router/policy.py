"""The interface every router policy implements: `select(psi, budget) -> x`, `update(x, psi, rewards)`.

Validation lives here, once, so each algorithm only sees well-formed inputs: psi a distribution over
the V task types, 1 <= budget <= K, x in X, one finite reward per task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from tanbr_ray.simplex import check_budget, check_psi, check_rewards, check_x


class Policy(ABC):
    """A router policy over merging weights for K experts and V task types."""

    name: str = "policy"

    def __init__(self, num_experts: int, num_tasks: int):
        if num_experts < 1:
            raise ValueError(f"num_experts: must be >= 1, got {num_experts}")
        if num_tasks < 1:
            raise ValueError(f"num_tasks: must be >= 1, got {num_tasks}")
        self.num_experts, self.num_tasks = num_experts, num_tasks

    def select(self, psi, budget: int | None) -> np.ndarray:
        """Merging weights for the next slot given the task-mix estimate psi and expert budget B
        (None: no limit, B = K)."""
        psi = check_psi(psi, self.num_tasks)
        budget = check_budget(self.num_experts if budget is None else budget, self.num_experts)
        x = self._select(psi, budget)
        return check_x(x, self.num_experts, budget)

    def update(self, x, psi, rewards, observed=None) -> None:
        """Feed back the per-task rewards observed after serving a slot with weights x.

        `observed` (optional boolean mask) marks the tasks whose reward was measured this slot.
        """
        x = check_x(x, self.num_experts)
        psi = check_psi(psi, self.num_tasks)
        rewards, mask = check_rewards(rewards, self.num_tasks, observed)
        if not mask.any():
            return  # nothing measured: nothing to learn
        self._update(x, psi, rewards, mask)

    @abstractmethod
    def _select(self, psi: np.ndarray, budget: int) -> np.ndarray: ...

    def _update(self, x: np.ndarray, psi: np.ndarray, rewards: np.ndarray, mask: np.ndarray) -> None:
        """Static policies learn nothing."""


def default_task_experts(num_tasks: int, num_experts: int) -> np.ndarray:
    """Expert tied to each task type: task v -> expert v mod K (the upcycled MoE trains expert v on task v)."""
    return np.arange(num_tasks) % num_experts
