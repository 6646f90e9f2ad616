"""`tanbr bench regret`: router policies x seeds x rounds on a synthetic landscape with a known optimum.

Regret at round t is F_t(x*_t) - F_t(x_t) with F_t the psi_t-weighted *mean* reward (pseudo-regret,
noise-free). Reported per policy: cumulative regret at T (mean and sd over seeds), the log-log slope of
cumulative regret over t in [T/4, T] (1 = linear; sublinear below), and select() latency p50/p99.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from tanbr_ray.router import Policy, Tanbr, TanbrConfig, registry
from tanbr_ray.router.synthetic import SyntheticConfig, SyntheticEnv
from tanbr_ray.stats import loglog_slope
ENVS = ("stationary", "drifting", "switching")


def make_policy(name: str, env: SyntheticEnv, seed: int, tanbr: TanbrConfig | None = None) -> Policy:
    c = env.config
    return registry.make_policy(name, c.num_experts, c.num_tasks, seed, tanbr, env.expert_of_task,
                                optimum=lambda psi, budget: env.optimum(psi, budget)[0])


def run_one(name: str, env_cfg: SyntheticConfig, tanbr: TanbrConfig | None = None) -> dict:
    """One policy, one seed: cumulative regret curve and per-call select() times."""
    env = SyntheticEnv(env_cfg)
    policy = make_policy(name, env, env_cfg.seed, tanbr)
    budget = env_cfg.budget
    regret = np.zeros(env_cfg.rounds)
    select_s = np.zeros(env_cfg.rounds)
    for t in range(env_cfg.rounds):
        psi = env.psi(t)
        t0 = time.perf_counter()
        x = policy.select(psi, budget)
        select_s[t] = time.perf_counter() - t0
        regret[t] = env.optimum(psi, budget)[1] - env.objective(x, psi)
        policy.update(x, psi, env.sample_rewards(x))
    return {"cumulative": np.cumsum(regret), "select_s": select_s}


def run(rounds: int = 2000, seeds: int = 5, schedule: str = "stationary",
        policies: Sequence[str] | None = None, num_experts: int = 8, num_tasks: int = 8,
        budget: int = 8, noise: float = 0.05, tanbr: TanbrConfig | None = None,
        progress: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """Returns (JSON-ready results, per-policy cumulative-regret curves of shape (seeds, rounds))."""
    if schedule not in ENVS:
        raise ValueError(f"env: unknown schedule {schedule!r}; choose from {', '.join(ENVS)}")
    policies = registry.names("picks_x") if policies is None else policies
    for name in policies:
        registry.info(name, "picks_x")
    torch.set_num_threads(1)  # tiny MLPs: threading overhead dominates
    base = SyntheticConfig(num_experts=num_experts, num_tasks=num_tasks, budget=budget,
                           schedule=schedule, rounds=rounds, noise=noise)
    curves: dict[str, np.ndarray] = {}
    out = {"rounds": rounds, "seeds": seeds, "env": SyntheticEnv(base).name, "schedule": schedule,
           "num_experts": num_experts, "num_tasks": num_tasks, "budget": budget, "noise": noise,
           "policies": {}}
    jobs = [(p, s) for p in policies for s in range(seeds)]
    results: dict[str, list[dict]] = {p: [] for p in policies}
    for name, seed in tqdm(jobs, desc="regret", disable=not progress):
        results[name].append(run_one(name, base.model_copy(update={"seed": seed}), tanbr))
    for name in policies:
        cum = np.stack([r["cumulative"] for r in results[name]])
        sel = np.concatenate([r["select_s"] for r in results[name]]) * 1e3
        curves[name] = cum
        final = cum[:, -1]
        out["policies"][name] = {
            "regret_mean": float(final.mean()),
            "regret_sd": float(final.std(ddof=1)) if seeds > 1 else 0.0,
            "slope": _finite_or_none(loglog_slope(cum.mean(0))),
            "select_ms_p50": float(np.percentile(sel, 50)),
            "select_ms_p99": float(np.percentile(sel, 99)),
        }
    return out, curves


def _finite_or_none(v: float) -> float | None:
    """JSON has no NaN: an undefined slope (zero regret) is written as null."""
    return v if np.isfinite(v) else None


def plot(out: dict, curves: dict[str, np.ndarray], path: str) -> None:
    """Cumulative regret curves, mean +- sd band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    t = np.arange(1, out["rounds"] + 1)
    for name, cum in curves.items():
        mean, sd = cum.mean(0), cum.std(0)
        ax.plot(t, mean, label=name, lw=2 if name == "Tanbr" else 1.2)
        ax.fill_between(t, mean - sd, mean + sd, alpha=0.2)
    ax.set_xlabel("round t")
    ax.set_ylabel("cumulative regret")
    ax.set_title(f"{out['env']} — {out['seeds']} seeds (mean ± sd)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(out: dict) -> list[list[str]]:
    rows = []
    for name, r in out["policies"].items():
        slope = "–" if r["slope"] is None else f"{r['slope']:.3f}"
        rows.append([name, f"{r['regret_mean']:.2f} ± {r['regret_sd']:.2f}", slope,
                     f"{r['select_ms_p50']:.3f}", f"{r['select_ms_p99']:.3f}"])
    return rows


TABLE_HEADER = ["policy", "cum. regret (mean ± sd)", "log-log slope", "select p50 ms", "select p99 ms"]


def select_timing(num_experts: int, budget: int, calls: int = 200, seed: int = 0) -> dict:
    """select() latency of a warmed-up Tanbr at a given K (tree grown to its node cap)."""
    torch.set_num_threads(1)
    env = SyntheticEnv(SyntheticConfig(num_experts=num_experts, num_tasks=8, budget=budget, seed=seed))
    policy = Tanbr(num_experts, 8)
    times = []
    for t in range(calls):
        psi = env.psi(t)
        t0 = time.perf_counter()
        x = policy.select(psi, budget)
        times.append(time.perf_counter() - t0)
        policy.update(x, psi, env.sample_rewards(x))
    ms = np.asarray(times) * 1e3
    return {"num_experts": num_experts, "budget": budget, "calls": calls,
            "select_ms_p50": float(np.percentile(ms, 50)), "select_ms_p99": float(np.percentile(ms, 99))}
