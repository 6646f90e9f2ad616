"""`tanbr bench fleet`: what a slot costs as the fleet grows, and what one batched decision costs.

Two measurements:
- decisions (the router alone, on the synthetic landscape): a Tanbr grown for `grow` rounds node by
  node, then `select()` for one node at K = 8, and `select_many` / `update_many` for a slot of 128
  nodes at K = 8 and K = 192, each timed from that same grown state;
- the slot loop (local backend, the default scenario on the packaged 8 / 32 / 128-node fleets, Tanbr
  only, no disk memo, so every prediction is computed): this process's wall seconds per slot split
  into decide (select + update), merge (experts into each distinct x), score (the scored sample's
  forward passes) and the rest (monitor, push accounting, rewards). The first slot is left out of
  the means: every monitor is empty then and every node plays the same merge.
"""

from __future__ import annotations

import copy
import time
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from tanbr_ray.router import Tanbr
from tanbr_ray.router.synthetic import SyntheticConfig, SyntheticEnv
from tanbr_ray.simplex import MIX_CONCENTRATION

FLEETS = ("8", "32", "128")
PARTS = ("decide", "merge", "score", "rest")


def _mixes(env: SyntheticEnv, t: int, nodes: int, rng: np.random.Generator) -> np.ndarray:
    """One mix per node: the landscape's mix at t blended with a node's own Dirichlet(0.3) draw."""
    own = rng.dirichlet(np.full(env.config.num_tasks, MIX_CONCENTRATION), size=nodes)
    psis = 0.5 * env.psi(t)[None] + 0.5 * own
    return psis / psis.sum(1, keepdims=True)


def grown_tanbr(num_experts: int, budget: int, grow: int, seed: int = 0) -> tuple[Tanbr, SyntheticEnv]:
    """A Tanbr (default config) after `grow` rounds of select + update on the synthetic landscape."""
    env = SyntheticEnv(SyntheticConfig(num_experts=num_experts, num_tasks=8, budget=budget, seed=seed))
    policy = Tanbr(num_experts, 8)
    for t in range(grow):
        psi = env.psi(t)
        x = policy.select(psi, budget)
        policy.update(x, psi, env.sample_rewards(x))
    return policy, env


def decision_timing(num_experts: int, nodes: int, budget: int, grow: int = 1000, calls: int = 20,
                    seed: int = 0) -> dict:
    """Median ms of select_many and update_many for `nodes` nodes, each call on a copy of the grown
    state (so every call sees the tree of `grow` rounds), and of a single select() there."""
    torch.set_num_threads(1)  # as the router runs: tiny matmuls, threads only synchronise
    grown, env = grown_tanbr(num_experts, budget, grow, seed)
    rng = np.random.default_rng(seed + 1)
    sel, upd, one = [], [], []
    for c in range(calls):
        policy = copy.deepcopy(grown)
        psis = _mixes(env, grow + c, nodes, rng)
        t0 = time.perf_counter()
        xs = policy.select_many(psis, [budget] * nodes)
        t1 = time.perf_counter()
        rewards = np.stack([env.sample_rewards(x) for x in xs])
        t2 = time.perf_counter()
        policy.update_many(xs, psis, rewards)
        t3 = time.perf_counter()
        sel.append(t1 - t0)
        upd.append(t3 - t2)
    for c in range(10 * calls):
        psi = _mixes(env, grow + c, 1, rng)[0]
        t0 = time.perf_counter()
        grown.select(psi, budget)
        one.append(time.perf_counter() - t0)
        grown.pending.clear()
    return {"num_experts": num_experts, "nodes": nodes, "budget": budget, "grown_rounds": grow,
            "candidates": int(len(grown.tree.candidate_points(budget)[0])), "calls": calls,
            "select_many_ms_p50": float(np.median(sel) * 1e3), "update_many_ms_p50": float(np.median(upd) * 1e3),
            "select_ms_p50": float(np.median(one) * 1e3), "select_ms_p99": float(np.percentile(one, 99) * 1e3)}


def scenario(fleet: str, slots: int, overrides: Sequence[str] = ()):
    """The default scenario on a fleet, `slots` long, Tanbr only."""
    from tanbr_ray.sim.config import DEFAULT_CONFIG, load_config

    return load_config(DEFAULT_CONFIG, [f"fleet={fleet}", f"slots={slots}", "policies=[Tanbr]", "wandb=disabled",
                                        *overrides])


def slot_costs(moe, cfg, fleet=None, progress: bool = True) -> dict:
    """One simulation config (its fleet, or `fleet`), Tanbr only: mean wall seconds per slot (first
    slot left out) and its split, with what drives it (distinct merges and scored requests per slot)."""
    from tanbr_ray.sim.loop import Simulation

    slots = cfg.slots
    t0 = time.perf_counter()
    sim = Simulation(cfg, moe, fleet, progress=progress)
    setup = time.perf_counter() - t0
    run = sim.run_policy("Tanbr")
    steady = slice(1, None) if slots > 1 else slice(None)
    sec = {k: v[steady] for k, v in run.seconds.items()}
    split = {k: float(sec[k].mean()) for k in ("decide", "merge", "score")}
    split["rest"] = float(sec["total"].mean()) - sum(split.values())
    distinct = [len({x.tobytes() for x in run.choices[t]}) for t in range(slots)][steady]
    return {"fleet": cfg.fleet, "nodes": len(sim.nodes), "slots": slots, "seconds_per_slot": float(sec["total"].mean()),
            "split": split, "distinct_x_per_slot": float(np.mean(distinct)),
            "scored_per_slot": float(run.node_counts[steady].sum(1).mean()),
            "requests_per_slot": float(sim.wl.total_requests / slots), "setup_seconds": setup}


def run(moe, fleets: Sequence[str] = FLEETS, slots: int = 4, grow: int = 1000, calls: int = 20,
        overrides: Sequence[str] = (), progress: bool = True) -> dict:
    """Both measurements, JSON-ready."""
    timing = {}
    for k in tqdm((8, 192), desc="decision timing", disable=not progress, leave=False):
        timing[k] = decision_timing(k, 128, min(8, k), grow, calls)
    loops = [slot_costs(moe, scenario(f, slots, overrides), progress=progress)
             for f in tqdm(fleets, desc="fleets", disable=not progress)]
    nodes = [r["nodes"] for r in loops]
    secs = [r["seconds_per_slot"] for r in loops]
    slope = float(np.polyfit(np.log(nodes), np.log(secs), 1)[0]) if len(loops) > 1 else float("nan")
    big = loops[int(np.argmax(nodes))]
    return {
        "nodes": nodes, "seconds_per_slot": secs, "cost_slope": slope,
        "split": {p: [r["split"][p] for r in loops] for p in PARTS},
        "decide_share_at_max": big["split"]["decide"] / big["seconds_per_slot"],
        "distinct_x_per_slot": [r["distinct_x_per_slot"] for r in loops],
        "scored_per_slot": [r["scored_per_slot"] for r in loops],
        "fleets": loops,
        "select_many_ms": {"K8_N128": timing[8]["select_many_ms_p50"], "K192_N128": timing[192]["select_many_ms_p50"]},
        "update_many_ms": {"N128": timing[8]["update_many_ms_p50"], "N128_K192": timing[192]["update_many_ms_p50"]},
        "select_ms_p50_K8": timing[8]["select_ms_p50"],
        "decision_timing": list(timing.values()),
        "slots": slots,
        "method": "seconds per slot: mean over slots 2.. of this process's wall time, Tanbr on the local "
                  "backend, no disk memo; decisions: median over calls from a Tanbr grown node by node",
    }


TARGETS = {  # the targets: name -> (value in the results, upper limit)
    "select_many K=8, 128 nodes (ms)": (lambda o: o["select_many_ms"]["K8_N128"], 20.0),
    "select_many K=192, 128 nodes (ms)": (lambda o: o["select_many_ms"]["K192_N128"], 100.0),
    "select() K=8, tree of 1,000 rounds (ms)": (lambda o: o["select_ms_p50_K8"], 1.0),
    "update_many 128 nodes (ms)": (lambda o: o["update_many_ms"]["N128"], 50.0),
    "cost log-log slope": (lambda o: o["cost_slope"], 1.1),
    "decide share at the largest fleet": (lambda o: o["decide_share_at_max"], 0.10),
}


def targets(out: dict) -> list[list[str]]:
    rows = []
    for name, (get, limit) in TARGETS.items():
        v = get(out)
        rows.append([name, f"{v:.3f}", f"≤ {limit:g}", "met" if v <= limit else "MISSED"])
    return rows


def table(out: dict) -> list[list[str]]:
    rows = []
    for r in out["fleets"]:
        s = r["split"]
        rows.append([str(r["nodes"]), f"{r['seconds_per_slot']:.2f}", *(f"{s[p]:.3f}" for p in PARTS),
                     f"{r['distinct_x_per_slot']:.1f}", f"{r['scored_per_slot']:.0f}", f"{r['requests_per_slot']:.0f}"])
    return rows


TABLE_HEADER = ["nodes", "s / slot", "decide s", "merge s", "score s", "rest s", "distinct x", "scored", "requests"]


def plot(out: dict, path: str) -> None:
    """Seconds per slot and its parts against nodes, log-log, with a slope-1 reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = np.asarray(out["nodes"], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(n, out["seconds_per_slot"], "o-", lw=2.2, color="k", label=f"total (slope {out['cost_slope']:.2f})")
    for part in PARTS:
        ax.plot(n, np.maximum(out["split"][part], 1e-4), "o--", lw=1.2, label=part)
    ax.plot(n, out["seconds_per_slot"][0] * n / n[0], ":", color="grey", label="linear from the smallest fleet")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(n, [str(int(v)) for v in n])
    ax.set_xlabel("nodes")
    ax.set_ylabel("wall seconds per slot")
    ax.set_title("Slot cost against fleet size (local backend, Tanbr)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
