"""The one list of policies: every name the simulator, the router service, the sweeps and the regret
bench accept, what kind of policy it is, and how it is made.

Two families share the list. *Router policies* pick merging weights x per node and slot (a factory
makes them). *Fixed serving modes* always serve the same model (`serving` names it: a token-routed
MoE, a static merge, the task-tagged oracle); the simulator plays them through a fixed router, so
every policy runs the same slot loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np

from tanbr_ray.router.hoo import HOOPolicy
from tanbr_ray.router.nucb import NucbPolicy
from tanbr_ray.router.policy import Policy
from tanbr_ray.router.static import BestXPolicy, PsiMergePolicy, RandomPolicy, UniformPolicy
from tanbr_ray.router.tanbr import Tanbr, TanbrConfig

Kind = Literal["learning", "rule", "static merge", "token-routed", "tagged", "reward argmax"]


@dataclass(frozen=True)
class PolicyInfo:
    """One policy: its kind, what it serves when it is fixed, whether the router service can
    checkpoint it (a checkpoint holds its whole state; the others draw from RNGs they do not
    persist), and what it is in one line."""

    name: str
    kind: Kind
    description: str
    serving: tuple[str, ...] | None = None  # fixed serving mode ("top1",), ("static", "regmean"), ...; None = picks x
    checkpointable: bool = False

    @property
    def picks_x(self) -> bool:
        return self.serving is None

    @property
    def in_simulation(self) -> bool:
        """The reward's argmax exists only in the synthetic regret bench."""
        return self.kind != "reward argmax"

    @property
    def served(self) -> bool:
        """The router service runs it (it picks x and needs no reward argmax)."""
        return self.picks_x and self.in_simulation


_ALL = (
    PolicyInfo("Tanbr", "learning", "tree-structured neural bandit over X, warm-started at x = ψ̂", checkpointable=True),
    PolicyInfo("Switch-top1", "token-routed", "the full MoE, each token to its top-1 expert (Switch)", ("top1",)),
    PolicyInfo("Switch-top2", "token-routed", "the full MoE, each token to its top-2 experts", ("top2",)),
    PolicyInfo("Soft", "token-routed", "the full MoE, each token to every expert by router weight", ("soft",)),
    PolicyInfo("Oracle", "tagged", "each request served by its own task's expert (knows the task tag)", ("oracle",)),
    PolicyInfo("Uniform", "rule", "x = 1/K (simple averaging); with B < K, 1/B over the B most requested tasks' experts", checkpointable=True),
    PolicyInfo("psi-merge", "rule", "x = ψ̂ mapped onto the experts (the task-mix heuristic)", checkpointable=True),
    PolicyInfo("Nucb", "learning", "NeuralUCB over random points of X (no tree)"),
    PolicyInfo("HOO", "learning", "hierarchical optimistic optimisation over X"),
    PolicyInfo("Fisher", "static merge", "one Fisher-weighted merge of every expert", ("static", "fisher")),
    PolicyInfo("RegMean", "static merge", "one RegMean merge of every expert", ("static", "regmean")),
    PolicyInfo("Random", "rule", "a random point of X every slot"),
    PolicyInfo("Best-x", "reward argmax", "plays the reward function's argmax (synthetic bench only)"),
)
POLICIES: dict[str, PolicyInfo] = {p.name: p for p in _ALL}


def names(where: Literal["all", "simulation", "served", "picks_x"] = "all") -> list[str]:
    """Policy names in the registry's order: all; those the simulator plays; those the router
    service runs; those that pick x (router policies, the regret bench's)."""
    keep = {"all": lambda p: True, "simulation": lambda p: p.in_simulation, "served": lambda p: p.served,
            "picks_x": lambda p: p.picks_x}[where]
    return [p.name for p in _ALL if keep(p)]


def info(name: str, where: Literal["all", "simulation", "served", "picks_x"] = "all") -> PolicyInfo:
    """The entry for `name`; a clear error listing the valid names where it is not one of them."""
    valid = names(where)
    if name not in valid:
        raise ValueError(f"policies: unknown policy {name!r}; choose from {', '.join(valid)}")
    return POLICIES[name]


def make_policy(name: str, num_experts: int, num_tasks: int, seed: int = 0,
                tanbr: TanbrConfig | None = None, task_experts: Sequence[int] | None = None,
                optimum: Callable[[np.ndarray, int], np.ndarray] | None = None,
                tasks: Sequence[str] | None = None, random_points: int = 0) -> Policy:
    """A seeded router policy. `optimum(psi, budget) -> x` is needed by Best-x only; `random_points` > 0
    gives Random a fixed finite set of uniform draws to play from (`RandomPolicy`)."""
    info(name, "picks_x")
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
    if optimum is None:
        raise ValueError("optimum: Best-x needs the reward function's argmax")
    return BestXPolicy(num_experts, num_tasks, optimum)


def switch_baselines() -> list[str]:
    """The full MoE served token-routed top-k, top-2 first: what a merged model's latency is set against."""
    top = [p for p in _ALL if p.serving is not None and p.serving[0] in ("top1", "top2")]
    return [p.name for p in sorted(top, key=lambda p: p.serving[0], reverse=True)]
