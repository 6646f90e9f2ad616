"""The interface every router policy implements: `select(psi, budget) -> x`, `update(x, psi, rewards)`,
and their fleet forms `select_many(psis, budgets) -> xs`, `update_many(xs, psis, rewards, observed)`,
which a slot calls once for every node (node by node unless a policy batches them).

Validation lives here, once, so each algorithm only sees well-formed inputs: psi a distribution over
the V task types, 1 <= budget <= K, x in X, one finite reward per task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from tanbr_ray.simplex import check_budget, check_psi, check_psis, check_rewards, check_rewards_rows, check_x, check_xs


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

    def select_many(self, psis, budgets) -> np.ndarray:
        """x per node for a slot, (N, K): row n for psis[n] under budgets[n] (None: B = K)."""
        psis = check_psis(np.zeros((0, self.num_tasks)) if len(psis) == 0 else psis, self.num_tasks)
        if len(budgets) != len(psis):
            raise ValueError(f"budgets: {len(budgets)} for {len(psis)} nodes")
        budgets = [check_budget(self.num_experts if b is None else b, self.num_experts) for b in budgets]
        if not len(psis):
            return np.zeros((0, self.num_experts))
        return check_xs(self._select_many(psis, budgets), self.num_experts, budgets)

    def update_many(self, xs, psis, rewards, observed=None) -> None:
        """A slot's feedback, one row per node (as `update`); rows with nothing observed are skipped.
        Every row is checked before any is learned from."""
        n = len(xs)
        if not n == len(psis) == len(rewards) == (n if observed is None else len(observed)):
            raise ValueError(f"update_many: {n} x, {len(psis)} psi, {len(rewards)} rewards and "
                             f"{n if observed is None else len(observed)} masks; need one of each per node")
        if n == 0:
            return
        xs, psis = check_xs(xs, self.num_experts), check_psis(psis, self.num_tasks)
        rewards, masks = check_rewards_rows(rewards, self.num_tasks, observed)
        keep = masks.any(1)  # nothing measured: nothing to learn
        if keep.any():
            self._update_many(xs[keep], psis[keep], rewards[keep], masks[keep])

    @abstractmethod
    def _select(self, psi: np.ndarray, budget: int) -> np.ndarray: ...

    def _update(self, x: np.ndarray, psi: np.ndarray, rewards: np.ndarray, mask: np.ndarray) -> None:
        """Static policies learn nothing."""

    @staticmethod
    def _by_budget(budgets: list[int]):
        """(budget, the rows with it) for each distinct budget, in first-seen order: a batched policy
        scores one candidate set per budget."""
        for budget in dict.fromkeys(budgets):
            yield budget, [n for n, b in enumerate(budgets) if b == budget]

    def _select_many(self, psis: np.ndarray, budgets: list[int]) -> np.ndarray:
        """Node by node; a policy that can score every node at once overrides it."""
        return np.stack([self._select(psi, b) for psi, b in zip(psis, budgets)])

    def _update_many(self, xs: np.ndarray, psis: np.ndarray, rewards: np.ndarray, masks: np.ndarray) -> None:
        """Row by row; a policy that learns from a batch at once overrides it."""
        for row in zip(xs, psis, rewards, masks):
            self._update(*row)


def default_task_experts(num_tasks: int, num_experts: int) -> np.ndarray:
    """Expert tied to each task type: task v -> expert v mod K (the upcycled MoE trains expert v on task v)."""
    return np.arange(num_tasks) % num_experts
