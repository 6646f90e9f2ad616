"""Several seeds of one scenario, and Tanbr's paired differences against every baseline.

A comparison is only a result with its interval. Every policy of a seed serves and scores the same
requests, so Tanbr − baseline is paired per node-slot; the interval resamples node-slots of the
second half, pooled over the seeds (and a Student-t interval over the per-seed differences is given
beside it once there are two seeds or more).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from tanbr_ray.sim.config import SimConfig
from tanbr_ray.sim.output import PairedDiff, SeedCredits, SeedsSummary, SimOutput
from tanbr_ray.stats import paired_bootstrap, t_interval

REFERENCE = "Tanbr"


def run_seeds(cfg: SimConfig, run: Callable[[SimConfig], SimOutput]) -> list[SimOutput]:
    """`run` once per seed of `cfg.seed_list()` (each with `seed` set and `seeds` cleared); the first
    output then carries the seeds' summary and Tanbr's paired intervals over all of them."""
    outs = [run(cfg.model_copy(update={"seed": s, "seeds": None})) for s in cfg.seed_list()]
    outs[0].seeds = seeds_section(outs, cfg.seed_list())
    outs[0].paired = paired_section(outs)
    outs[0].summary["seeds"] = asdict(outs[0].seeds)
    outs[0].summary["paired"] = {name: asdict(p) for name, p in outs[0].paired.items()}
    return outs


def seed_dir(cfg: SimConfig, seed: int) -> Path:
    """Where a seed's results go: the output folder itself for one seed, `seed-<n>/` under it for several."""
    return Path(cfg.out) if len(cfg.seed_list()) == 1 else Path(cfg.out) / f"seed-{seed}"


def seeds_section(outs: list[SimOutput], seeds: list[int]) -> SeedsSummary:
    """Each policy's second-half credit per seed, mean and sd (ddof 1; 0 for one seed)."""
    pols: dict[str, SeedCredits] = {}
    for name in outs[0].records:
        v = [o.records[name].credit_second_half for o in outs]
        pols[name] = SeedCredits(v, float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
    return SeedsSummary(list(seeds), pols)


def paired_section(outs: list[SimOutput], reference: str = REFERENCE) -> dict[str, PairedDiff]:
    """{baseline: {diff_mean, ci95, per_seed, ci95_t_over_seeds}}: `reference` − baseline in
    second-half credit (fractions)."""
    if reference not in outs[0].series:
        return {}
    out = {}
    for name in outs[0].series:
        if name == reference:
            continue
        a, b, n, per_seed = [], [], [], []
        for o in outs:
            ref, base = o.series[reference], o.series[name]
            half = ref.node_credit.shape[0] // 2
            a.append(ref.node_credit[half:])
            b.append(base.node_credit[half:])
            n.append(ref.node_counts[half:])
            per_seed.append(float((a[-1] - b[-1]).sum() / max(n[-1].sum(), 1)))
        diff, ci = paired_bootstrap(np.concatenate(a), np.concatenate(b), np.concatenate(n))
        _, t_ci = t_interval(per_seed)
        out[name] = PairedDiff(diff, list(ci), per_seed, None if t_ci is None else list(t_ci),
                               "bootstrap over second-half node-slots, pooled over seeds (2000 resamples)")
    return out
