"""The best fixed x in hindsight, per node: the comparator regret is measured against.

Two stages, so the winner is the best in hindsight and not merely the luckiest on a small sample
(`screen_then_final`, shared with `tanbr bench model`'s landscape): every candidate is screened on a
small paired sample, the best few are then scored on everything, and the best of those wins.
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence, TypeVar

import numpy as np
from tqdm.auto import tqdm

from tanbr_ray.router import registry
from tanbr_ray.simplex import psi_family, random_points
from tanbr_ray.sim.spec import Spec

C = TypeVar("C", bound=Hashable)


def screen_then_final(candidates: Sequence[C], screened: Callable[[C], float], finalists: int,
                      final: Callable[[C], float]) -> tuple[C, dict[C, float]]:
    """The candidate with the highest `final` value among the `finalists` best by `screened` (a
    stable sort: ties keep the candidates' order); returns it and the finalists' final values."""
    ranked = sorted(candidates, key=lambda c: -screened(c))[:finalists]
    values = {c: final(c) for c in ranked}
    return max(ranked, key=lambda c: values[c]), values


def fixed_candidates(sim, n: int) -> list[np.ndarray]:
    """Fixed x tried for node n's best-in-hindsight, all under its budget: the ψ-family on the
    node's true average mix (x ∝ mass^p, top-B, p in PSI_POWERS; p = 1 is ψ-merge), Uniform,
    each expert alone that serves at least 5 % of its requests, and `fixed_candidates` random
    points of X: the first of the points Random plays (`simplex.random_points`, seeded by budget
    alone), so nodes of one budget, every seed and Random share them and their predictions."""
    budget = sim.budget(sim.nodes[n][1])
    mix = sim.wl.psi[:, n].mean(0)
    mass = np.bincount(sim.task_experts, weights=mix, minlength=sim.K)
    xs = list(psi_family(mass, budget).values())
    xs.append(registry.make_policy("Uniform", sim.K, sim.V, task_experts=sim.task_experts).select(mix, budget))
    xs += [np.eye(sim.K)[k] for k in np.flatnonzero(mass >= 0.05)]
    xs += list(random_points(sim.K, budget, sim.cfg.fixed_candidates))
    return list({x.tobytes(): x for x in xs}.values())


def selection_rows(sim) -> dict[str, list[tuple[str, int]]]:
    """Per task, the pool examples every fixed candidate is screened on (`regret_sample` of them,
    0 = the whole pool): one seeded draw, the same for every node, candidate and seed."""
    out = {}
    for v, task in enumerate(sim.tasks):
        size = len(sim.ev.labels[task])
        k = size if sim.cfg.regret_sample == 0 else min(sim.cfg.regret_sample, size)
        out[task] = [(task, int(i)) for i in np.sort(np.random.default_rng([3, v]).permutation(size)[:k])]
    return out


def best_fixed_credit(sim) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-slot credit of each node's best fixed x in hindsight, summed over nodes (each node has its
    own mix and budget), and each node's winner. A node's screened estimate weighs the candidates'
    per-task means on `selection_rows` by the node's own request count of each task over the run
    (the same examples for every candidate, so the ranking is paired); its `regret_finalists` best
    are scored on all the node's requests. Candidates several nodes share are screened once."""
    sim.ev.check.begin()
    plans = []  # (node, all its rows, its candidate specs, its request count per task)
    for n in range(len(sim.nodes)):
        rows = [r for t in range(sim.cfg.slots) for r in sim.rows(t, n)]
        if rows:
            counts = np.asarray([sum(task == t for t, _ in rows) for task in sim.tasks], dtype=np.float64)
            plans.append((n, rows, [Spec.merged(x) for x in fixed_candidates(sim, n)], counts))
    sel_rows = [r for rows in selection_rows(sim).values() for r in rows]
    task_of = np.asarray([sim.tasks.index(t) for t, _ in sel_rows])
    table = {}  # spec -> mean credit per task on the selection rows
    specs = list(dict.fromkeys(spec for _, _, cands, _ in plans for spec in cands))
    for spec in tqdm(specs, desc="best fixed x: screen", disable=not sim.progress, leave=False):
        credit = sim.row_credit(sel_rows, sim.ev.predict_rows(spec, sel_rows))
        table[spec] = np.asarray([credit[task_of == v].mean() for v in range(sim.V)])
    finalists = sim.cfg.regret_finalists
    sim.ev.prefetch([(spec, rows) for _, rows, cands, counts in plans
                     for spec in sorted(cands, key=lambda s: -float(table[s] @ counts))[:finalists]],
                    desc="best fixed x: finalists" if sim.progress else None)
    out, winners = np.zeros(sim.cfg.slots), {}
    for n, _, cands, counts in plans:
        per_slot = {}

        def final(spec: Spec) -> float:
            per_slot[spec] = np.asarray([sim.serve(spec, t, n)[1].sum() for t in range(sim.cfg.slots)])
            return float(per_slot[spec].sum())

        best, _ = screen_then_final(cands, lambda s: float(table[s] @ counts), finalists, final)
        out += per_slot[best]
        winners[sim.nodes[n][0]] = best.x
    return out, winners
