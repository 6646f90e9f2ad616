"""One factory for the router policies, by the names used in every output."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from tanbr_ray.router.hoo import HOOPolicy
from tanbr_ray.router.nucb import NucbPolicy
from tanbr_ray.router.policy import Policy
from tanbr_ray.router.static import OraclePolicy, PsiMergePolicy, RandomPolicy, UniformPolicy
from tanbr_ray.router.tanbr import Tanbr, TanbrConfig

ROUTER_POLICIES = ("Tanbr", "Nucb", "HOO", "Random", "Uniform", "psi-merge", "Oracle")


def make_policy(name: str, num_experts: int, num_tasks: int, seed: int = 0,
                tanbr: TanbrConfig | None = None, task_experts: Sequence[int] | None = None,
                optimum: Callable[[np.ndarray, int], np.ndarray] | None = None,
                tasks: Sequence[str] | None = None, random_points: int = 0) -> Policy:
    """A seeded policy. `optimum(psi, budget) -> x` is needed by the Oracle only; `random_points` > 0
    gives Random a fixed finite set of uniform draws to play from (`RandomPolicy`)."""
    cfg = tanbr or TanbrConfig()
    bandit = cfg.bandit.model_copy(update={"seed": seed})
    if name == "Tanbr":
        return Tanbr(num_experts, num_tasks, cfg.model_copy(update={"bandit": bandit}), tasks, task_experts)
    if name == "Nucb":
        return NucbPolicy(num_experts, num_tasks, bandit, seed=seed)
    if name == "HOO":
        return HOOPolicy(num_experts, num_tasks)
    if name == "Random":
        return RandomPolicy(num_experts, num_tasks, seed=seed, points=random_points)
    if name == "Uniform":
        return UniformPolicy(num_experts, num_tasks, task_experts)
    if name == "psi-merge":
        return PsiMergePolicy(num_experts, num_tasks, task_experts, grid=cfg.psi_grid)  # Tanbr's ψ-family grid
    if name == "Oracle":
        if optimum is None:
            raise ValueError("optimum: the Oracle policy needs the reward function's argmax")
        return OraclePolicy(num_experts, num_tasks, optimum)
    raise ValueError(f"policies: unknown policy {name!r}; choose from {', '.join(ROUTER_POLICIES)}")
